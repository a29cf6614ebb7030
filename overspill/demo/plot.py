"""The demo's timeline PNG: load, the offloading metric against its target, and where traffic went."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display here; must precede pyplot's import

import matplotlib.pyplot as plt  # noqa: E402


def _spans(ts: list[float], flags: list[bool]) -> list[tuple[float, float]]:
    """Maximal [start, end) time ranges where flags are true; each row covers [t, t+1)."""
    spans: list[tuple[float, float]] = []
    start: float | None = None
    for t, on in zip(ts, flags, strict=True):
        if on and start is None:
            start = t
        elif not on and start is not None:
            spans.append((start, t))
            start = None
    if start is not None:
        spans.append((start, ts[-1] + 1))
    return spans


def plot_timeline(rows: list[dict[str, Any]], path: Path, threshold: float) -> Path:
    """Draw rows (one per second) to `path` and return it.

    Row keys used: t (s), offered (rps), remote_rps, metric (None when unknown), remote_pct,
    offloading (bool), state (control-plane state; "Releasing" is hatched). Missing keys count as
    0 / None / False / "".
    """
    path = Path(path)
    ts = [float(r.get("t", i)) for i, r in enumerate(rows)]
    offered = [float(r.get("offered") or 0) for r in rows]
    remote_rps = [float(r.get("remote_rps") or 0) for r in rows]
    metric = [float("nan") if r.get("metric") is None else float(r["metric"]) for r in rows]
    remote_pct = [float(r.get("remote_pct") or 0) for r in rows]
    offloading = [bool(r.get("offloading")) for r in rows]
    # Releasing: still offloading, but every metric is under target and the buffer is running down.
    releasing = [
        on and str(r.get("state", "")).lower() == "releasing" for r, on in zip(rows, offloading, strict=True)
    ]
    spans = _spans(ts, offloading) if rows else []
    release_spans = _spans(ts, releasing) if rows else []

    fig, (ax_load, ax_metric, ax_share) = plt.subplots(3, 1, sharex=True, figsize=(11, 8.5))
    fig.suptitle("Overspill demo: burst offloading timeline", fontsize=14)

    for ax in (ax_load, ax_metric, ax_share):
        for i, (a, b) in enumerate(spans):
            ax.axvspan(a, b, color="tab:orange", alpha=0.15, label="offloading on" if i == 0 else None)
        for i, (a, b) in enumerate(release_spans):
            label = "releasing (buffer)" if i == 0 else None
            ax.axvspan(a, b, facecolor="none", edgecolor="tab:orange", hatch="//", alpha=0.4, label=label)
        ax.grid(True, alpha=0.3)

    ax_load.step(ts, offered, where="post", color="tab:blue", label="offered load")
    ax_load.step(ts, remote_rps, where="post", color="tab:red", label="served by remote")
    ax_load.set_title("Offered load and traffic served by the remote copy")
    ax_load.set_ylabel("requests / s")
    ax_load.set_ylim(bottom=0)
    ax_load.legend(loc="upper right")

    ax_metric.plot(ts, metric, color="tab:purple", marker=".", label="offloading metric")
    ax_metric.axhline(threshold, color="black", linestyle="--", label=f"target ({threshold:g})")
    ax_metric.set_title("Offloading metric (local in-flight requests) as the control plane reads it")
    ax_metric.set_ylabel("value")
    ax_metric.set_ylim(bottom=0)
    ax_metric.legend(loc="upper right")

    ax_share.step(ts, remote_pct, where="post", color="tab:red", label="share served by remote")
    ax_share.set_title("Remote share of answered requests")
    ax_share.set_ylabel("% of requests")
    ax_share.set_ylim(0, 105)
    ax_share.set_xlabel("time since load start (s)")
    ax_share.legend(loc="upper right")

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
