"""The demo's dashboard.png: the Grafana dashboard's main panels, drawn from its own queries.

Each panel's queries (`overspill.dashboard`, the same the committed JSON holds) are sent to the
demo's Prometheus as Grafana would send them (variables substituted, a range query per target),
and the series drawn with matplotlib: what Grafana would show, without a Grafana server.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display here; must precede pyplot's import

import matplotlib.pyplot as plt  # noqa: E402

from overspill.dashboard import PHASE_COLORS, dashboard, legend, substitute  # noqa: E402
from overspill.demo.procs import Prometheus  # noqa: E402

# The panels drawn, in reading order (three a row).
MAIN_PANELS = (
    "Phase",
    "Remote share: decided and served",
    "Offloading metric and target",
    "Requests: local and remote",
    "Latency p50 / p99",
    "Errors",
    "Models per phase",
    "Offloaded traffic",
    "Envoys connected",
    "xDS pushes by type",
    "Convergence p99",
    "Memory",
)
# Grafana's named colours, as matplotlib knows them.
_COLORS = {
    "green": "tab:green",
    "yellow": "gold",
    "orange": "tab:orange",
    "light-orange": "navajowhite",
    "red": "tab:red",
    "purple": "tab:purple",
    "dark-red": "darkred",
}
# Envoy's default stats_flush_interval: its histograms (latency) move only this often, so a
# rate() window shorter than two flushes is often empty (Grafana draws a gap there too).
ENVOY_FLUSH_SECONDS = 5.0
_UNITS = {"reqps": "requests / s", "percent": "%", "ms": "ms", "bytes": "MiB", "percentunit": "cores"}


@dataclass
class Series:
    """One series of a panel's query result: its legend name and its points (seconds from start)."""

    name: str
    ref: str
    ts: list[float]
    values: list[float]


async def panel_series(
    prom: Prometheus,
    panel: Mapping[str, Any],
    values: Mapping[str, str],
    start: float,
    end: float,
    step: float,
) -> list[Series]:
    """Every series of a panel's targets over [start, end], named as its legendFormat names them."""
    out: list[Series] = []
    steps = int((end - start) // step) + 1
    for target in panel["targets"]:
        result = await prom.query_range(substitute(target["expr"], values), start, end, step)
        for series in result:
            # On the whole step grid, NaN where Prometheus had no value: the line breaks there,
            # as Grafana's does, instead of joining the points either side of a gap.
            found = {round((float(t) - start) / step): float(v) for t, v in series["values"]}
            name = legend(target.get("legendFormat", ""), series["metric"]) or target["refId"]
            ts = [i * step for i in range(steps)]
            out.append(Series(name, target["refId"], ts, [found.get(i, math.nan) for i in range(steps)]))
    return out


async def draw_dashboard(
    prom: Prometheus,
    path: Path,
    values: Mapping[str, str],
    start: float,
    end: float,
    step: float = 1.0,
    title: str = "",
) -> Path:
    """Query the main panels over [start, end] (unix seconds) and draw them to `path`."""
    board = dashboard()
    panels = {p["title"]: p for p in board["panels"] if p["type"] != "row"}
    drawn = [(panels[t], await panel_series(prom, panels[t], values, start, end, step)) for t in MAIN_PANELS]
    columns = 3
    rows = math.ceil(len(drawn) / columns)
    fig, grid = plt.subplots(rows, columns, figsize=(6 * columns, 3.3 * rows), squeeze=False)
    model = f"{values.get('namespace')}/{values.get('model')}"
    fig.suptitle(title or f"Overspill dashboard (Grafana's queries, drawn): {model}", fontsize=14)
    for ax, (panel, series) in zip(grid.flat, drawn, strict=False):
        _draw_panel(ax, panel, series, end - start)
    for ax in list(grid.flat)[len(drawn) :]:
        ax.set_visible(False)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _draw_panel(ax: Any, panel: Mapping[str, Any], series: list[Series], span: float) -> None:
    ax.set_title(panel["title"], fontsize=11)
    ax.set_xlim(0, span)
    ax.grid(True, alpha=0.3)
    if panel["type"] == "state-timeline":
        _draw_phases(ax, series)
        return
    defaults = panel["fieldConfig"]["defaults"]
    unit = defaults.get("unit", "short")
    scale = 2**20 if unit == "bytes" else 1.0  # memory in MiB
    dashed = {o["matcher"]["options"] for o in panel["fieldConfig"]["overrides"] if "byFrameRefID" in str(o)}
    lines = [s for s in series if s.ref not in dashed]
    if defaults.get("custom", {}).get("stacking", {}).get("mode") == "normal" and lines:
        # Stacked as Grafana draws it; series that were always 0 (phases never entered) left out.
        shown = [s for s in lines if any(v > 0 for v in s.values)] or lines
        stacks = [[0.0 if math.isnan(v) else v / scale for v in s.values] for s in shown]
        ax.stackplot(shown[0].ts, *stacks, labels=[s.name for s in shown], alpha=0.6)
    else:
        for s in lines:  # a point between gaps (one push's ACK time) still shows as a dot
            ax.plot(s.ts, [v / scale for v in s.values], label=s.name, marker=".", markersize=3)
    for s in series:
        if s.ref in dashed:
            ax.plot(s.ts, [v / scale for v in s.values], color="red", linestyle="--", label=s.name)
    if not series:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="grey")
    ax.set_ylabel(_UNITS.get(unit, ""))
    top = defaults.get("max")
    ax.set_ylim(0, top * 1.02 if top is not None else max(ax.get_ylim()[1] * 1.1, 1e-9))
    ax.set_xlabel("seconds")
    if series:
        ax.legend(loc="upper left", fontsize=8, ncol=2)


def _draw_phases(ax: Any, series: list[Series]) -> None:
    """One lane per phase the model was in, coloured where it was (Grafana's state timeline)."""
    lanes = [s for s in series if 1 in s.values]
    colors = {str(p): _COLORS[c] for p, c in PHASE_COLORS.items()}
    for lane, s in enumerate(lanes):
        for t, v in zip(s.ts, s.values, strict=True):
            if v == 1:
                ax.barh(lane, 1.0, left=t, height=0.8, color=colors.get(s.name, "grey"), linewidth=0)
    ax.set_yticks(range(len(lanes)), [s.name for s in lanes])
    ax.set_ylim(-0.5, max(len(lanes), 1) - 0.5)
    ax.set_xlabel("seconds")
