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

    Row keys used: t (s), offered (rps), remote_rps, metric (None when unknown), local_inflight
    (the local server's own average, optional), remote_pct, offloading (bool), state
    (control-plane state; "Releasing" is hatched). Missing keys count as 0 / None / False / "".
    """
    fig, axes = plt.subplots(3, 1, sharex=True, figsize=(11, 8.5))
    fig.suptitle("Overspill demo: burst offloading timeline", fontsize=14)
    _draw(list(axes), rows, threshold)
    return _save(fig, path)


def plot_comparison(
    runs: list[tuple[str, list[dict[str, Any]]]],
    path: Path,
    threshold: float,
    spans: list[tuple[float, float]] = (),
) -> Path:
    """Several runs of the same load side by side, one column each, on shared axes; `spans`
    (the burst) are shaded grey in every panel."""
    fig, grid = plt.subplots(
        3, len(runs), sharex=True, sharey="row", figsize=(8 * len(runs), 8.5), squeeze=False
    )
    fig.suptitle("Overspill demo: a burst longer than the buffer", fontsize=14)
    for column, (title, rows) in enumerate(runs):
        axes = list(grid[:, column])
        for ax in axes:
            for a, b in spans:
                ax.axvspan(a, b, color="grey", alpha=0.08)
        _draw(axes, rows, threshold, title)
    # a shared axis keeps the limits the first column set: make room for every column's values
    values = [r.get(k) for _, rows in runs for r in rows for k in ("metric", "local_inflight")]
    top = max([threshold, *(float(v) for v in values if v is not None)])
    grid[1, 0].set_ylim(0, top * 1.08)
    return _save(fig, path)


def _draw(axes: list[Any], rows: list[dict[str, Any]], threshold: float, title: str = "") -> None:
    ax_load, ax_metric, ax_share = axes
    ts = [float(r.get("t", i)) for i, r in enumerate(rows)]
    offered = [float(r.get("offered") or 0) for r in rows]
    remote_rps = [float(r.get("remote_rps") or 0) for r in rows]
    metric = [float("nan") if r.get("metric") is None else float(r["metric"]) for r in rows]
    inflight = [float("nan") if r.get("local_inflight") is None else float(r["local_inflight"]) for r in rows]
    remote_pct = [float(r.get("remote_pct") or 0) for r in rows]
    offloading = [bool(r.get("offloading")) for r in rows]
    # Releasing: still offloading, but every metric is under target and the buffer is running down.
    releasing = [
        on and str(r.get("state", "")).lower() == "releasing" for r, on in zip(rows, offloading, strict=True)
    ]
    spans = _spans(ts, offloading) if rows else []
    release_spans = _spans(ts, releasing) if rows else []

    for ax in axes:
        for i, (a, b) in enumerate(spans):
            ax.axvspan(a, b, color="tab:orange", alpha=0.15, label="offloading on" if i == 0 else None)
        for i, (a, b) in enumerate(release_spans):
            label = "releasing (buffer)" if i == 0 else None
            ax.axvspan(a, b, facecolor="none", edgecolor="tab:orange", hatch="//", alpha=0.4, label=label)
        ax.grid(True, alpha=0.3)

    ax_load.step(ts, offered, where="post", color="tab:blue", label="offered load")
    ax_load.step(ts, remote_rps, where="post", color="tab:red", label="served by remote")
    ax_load.set_title(
        f"{title}: offered load and the remote's part"
        if title
        else "Offered load and traffic served by the remote copy"
    )
    ax_load.set_ylabel("requests / s")
    ax_load.set_ylim(bottom=0)
    ax_load.legend(loc="upper right")

    ax_metric.plot(ts, metric, color="tab:purple", marker=".", label="offloading metric (as read)")
    if any(r.get("local_inflight") is not None for r in rows):
        ax_metric.step(
            ts, inflight, where="post", color="tab:green", label="local in-flight (server's average)"
        )
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


def _save(fig: Any, path: Path) -> Path:
    path = Path(path)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
