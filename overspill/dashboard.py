"""The Grafana dashboard (`manifests/grafana/overspill-dashboard.json`), generated here.

Panels are declared as data (title, the sentence the README shows, PromQL queries) and laid out
on Grafana's 24-column grid row by row; `dashboard()` turns them into the JSON Grafana imports.
The same declarations serve the end-to-end test (every query run against a real Prometheus) and
the demo's picture (`overspill.demo.board`), through `queries()` and `substitute()`.

Envoy's per-model series are its cluster stats, which the bootstraps label with the model's
namespace, name and side (`xds.stats`): what Envoy served beside what the control plane decided.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from api.status import Phase
from xds.stats import MODEL_TAG, NAMESPACE_TAG, SIDE_TAG

UID = "overspill"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
MODEL = 'namespace="$namespace",name="$model"'
RATE = "$__rate_interval"
GRID_COLUMNS = 24

# Envoy's cluster stats of a model carry its namespace, name and side as labels (xds.stats).
ENVOY_MODEL = f'{NAMESPACE_TAG}="$namespace",{MODEL_TAG}="$model"'
ENVOY_REMOTE = f'{ENVOY_MODEL},{SIDE_TAG}="remote"'
ENVOY_ANY_MODEL = f'{SIDE_TAG}!=""'


def _side_rate(metric: str, selector: str, by: str = SIDE_TAG) -> str:
    """Per-second rate of an Envoy cluster counter, summed per side (local, remote) or `by`."""
    return f"sum by ({by}) (rate({metric}{{{selector}}}[{RATE}]))"


def _histogram_p99(metric: str, by: str = "") -> str:
    """The 99th percentile of one of the control plane's histograms (seconds), per `by`."""
    labels = f"{by}, le" if by else "le"
    return f"histogram_quantile(0.99, sum by ({labels}) (rate({metric}_bucket[{RATE}])))"


def _quantile(q: float) -> str:
    buckets = _side_rate("envoy_cluster_upstream_rq_time_bucket", ENVOY_MODEL, by=f"{SIDE_TAG}, le")
    return f"histogram_quantile({q:g}, {buckets})"


@dataclass(frozen=True)
class Query:
    """One PromQL target of a panel; `legend` is Grafana's legendFormat."""

    expr: str
    legend: str = ""


@dataclass(frozen=True)
class Panel:
    """One panel as the operator sees it; `description` is its hover text and its README line."""

    title: str
    description: str
    queries: tuple[Query, ...]
    unit: str = "short"
    kind: str = "timeseries"
    width: int = 8
    height: int = 8
    stacked: bool = False
    # refIds drawn as a dashed red line: a target, a threshold
    thresholds: tuple[str, ...] = ()
    max: float | None = None
    overrides: tuple[dict[str, Any], ...] = ()


@dataclass(frozen=True)
class Row:
    """A titled band of panels: Grafana lets an operator fold the ones not looked at."""

    title: str
    panels: tuple[Panel, ...]


# The phase timeline: one lane per phase, coloured while the model is in it.
PHASE_COLORS = {
    Phase.STANDBY: "green",
    Phase.ACTIVATING: "yellow",
    Phase.OFFLOADING: "orange",
    Phase.RELEASING: "light-orange",
    Phase.OUTAGE: "red",
    Phase.REMOTE_DOWN: "purple",
    Phase.INVALID: "dark-red",
}


def _phase_overrides() -> tuple[dict[str, Any], ...]:
    """Each phase's lane shows 1 as the phase's name in its colour (0 stays transparent)."""
    return tuple(
        {
            "matcher": {"id": "byName", "options": str(phase)},
            "properties": [
                {
                    "id": "mappings",
                    "value": [
                        {
                            "type": "value",
                            "options": {"0": {"text": " ", "color": "transparent", "index": 0}},
                        },
                        {"type": "value", "options": {"1": {"text": str(phase), "color": color, "index": 1}}},
                    ],
                }
            ],
        }
        for phase, color in PHASE_COLORS.items()
    )


ROWS: tuple[Row, ...] = (
    Row(
        "Fleet",
        (
            Panel(
                "Models per phase",
                "How many models are in each offload phase (Standby, Offloading, Outage, ...).",
                (Query("sum by (phase) (overspill_model_offload_state)", "{{phase}}"),),
                stacked=True,
                width=6,
            ),
            Panel(
                "Offloaded traffic",
                "Requests per second Envoy sent to all models' local pods and to their remote copies.",
                (Query(_side_rate("envoy_cluster_upstream_rq_total", ENVOY_ANY_MODEL), "{{side}}"),),
                unit="reqps",
                stacked=True,
                width=6,
            ),
            Panel(
                "Envoys connected",
                "Envoys connected to the control plane (every replica summed), per scope and protocol.",
                (
                    Query(
                        "sum by (scope, protocol) (overspill_xds_connected_envoys)", "{{scope}} {{protocol}}"
                    ),
                ),
                stacked=True,
                width=6,
            ),
            Panel(
                "NACKs",
                "Envoy rejections of the control plane's config by xDS type, and each model's so far.",
                (
                    Query(f"sum by (type) (increase(overspill_xds_nacks_total[{RATE}]))", "{{type}}"),
                    # A model's count starts at its first NACK, which increase() would miss.
                    Query(
                        "sum by (namespace, name, type) (overspill_model_xds_nacks_total)",
                        "{{namespace}}/{{name}} {{type}} (total)",
                    ),
                ),
                width=6,
            ),
        ),
    ),
    Row(
        "Model $namespace/$model",
        (
            Panel(
                "Phase",
                "The model's offload phase over time.",
                (Query(f"overspill_model_offload_state{{{MODEL}}}", "{{phase}}"),),
                kind="state-timeline",
                width=24,
                height=6,
                overrides=_phase_overrides(),
            ),
            Panel(
                "Remote share: decided and served",
                "The % the control plane decided to send to the remote, and the % of requests "
                "Envoy actually sent there.",
                (
                    Query(f"overspill_model_remote_weight_percent{{{MODEL}}}", "decided"),
                    Query(
                        f"100 * sum(rate(envoy_cluster_upstream_rq_total{{{ENVOY_REMOTE}}}[{RATE}]))"
                        f" / sum(rate(envoy_cluster_upstream_rq_total{{{ENVOY_MODEL}}}[{RATE}]))",
                        "served by Envoy",
                    ),
                ),
                unit="percent",
                max=100,
            ),
            Panel(
                "Offloading metric and target",
                "Each offloading metric as the control plane read it, its target drawn as a dashed line.",
                (
                    Query(f"overspill_model_metric_value{{{MODEL}}}", "{{metric}}"),
                    Query(f"overspill_model_metric_target{{{MODEL}}}", "target {{metric}}"),
                ),
                thresholds=("B",),
            ),
            Panel(
                "Ready endpoints",
                "Ready local endpoints of the model's Service; none means Outage (all to the remote).",
                (Query(f"overspill_model_ready_endpoints{{{MODEL}}}", "ready"),),
            ),
            Panel(
                "Requests: local and remote",
                "Requests per second Envoy sent to the model's local pods and to its remote copy.",
                (Query(_side_rate("envoy_cluster_upstream_rq_total", ENVOY_MODEL), "{{side}}"),),
                unit="reqps",
                stacked=True,
            ),
            Panel(
                "Latency p50 / p99",
                "Upstream response time per side, as Envoy measured it "
                "(interpolated within its histogram buckets).",
                (Query(_quantile(0.5), "p50 {{side}}"), Query(_quantile(0.99), "p99 {{side}}")),
                unit="ms",
            ),
            Panel(
                "Errors",
                "Responses per second that were not 2xx, per side and status class.",
                (
                    Query(
                        _side_rate(
                            "envoy_cluster_upstream_rq_xx",
                            f'{ENVOY_MODEL},envoy_response_code_class!="2"',
                            by=f"{SIDE_TAG}, envoy_response_code_class",
                        ),
                        "{{side}} {{envoy_response_code_class}}xx",
                    ),
                ),
                unit="reqps",
            ),
        ),
    ),
    Row(
        "Control plane",
        (
            Panel(
                "xDS pushes by type",
                "Responses sent to Envoys per second, by xDS type.",
                (Query(f"sum by (type) (rate(overspill_xds_pushes_total[{RATE}]))", "{{type}}"),),
                stacked=True,
            ),
            Panel(
                "xDS bytes by type",
                "Bytes of xDS responses sent per second, by type.",
                (Query(f"sum by (type) (rate(overspill_xds_sent_bytes_total[{RATE}]))", "{{type}}"),),
                unit="Bps",
                stacked=True,
            ),
            Panel(
                "Convergence p99",
                "How long Envoys take to ACK a push, per xDS type, and a new remote share from its "
                "decision to an Envoy's ACK (99th percentiles).",
                (
                    Query(
                        _histogram_p99("overspill_xds_push_to_ack_seconds", "type"), "push to ACK {{type}}"
                    ),
                    Query(_histogram_p99("overspill_weight_decision_to_ack_seconds"), "decision to ACK"),
                ),
                unit="s",
            ),
            Panel(
                "Metric read errors",
                "Failed reads of offloading metrics per second (source unreachable, query error, empty).",
                (
                    Query(
                        "sum by (namespace, name, metric) "
                        f"(rate(overspill_metric_read_errors_total[{RATE}]))",
                        "{{namespace}}/{{name}} {{metric}}",
                    ),
                ),
                width=6,
            ),
            Panel(
                "Evaluation duration p99",
                "How long an evaluation round takes (every model's metrics read, changed ones decided), "
                "and one read of a metric source (99th percentiles).",
                (
                    Query(_histogram_p99("overspill_evaluation_duration_seconds"), "evaluation"),
                    Query(
                        _histogram_p99("overspill_metric_read_duration_seconds", "source"), "read {{source}}"
                    ),
                ),
                unit="s",
                width=6,
            ),
            Panel(
                "CPU",
                "CPU seconds per second the control plane's processes used.",
                (Query(f'rate(process_cpu_seconds_total{{job=~"$job"}}[{RATE}])', "{{instance}}"),),
                unit="percentunit",
                width=6,
            ),
            Panel(
                "Memory",
                "Resident memory of the control plane's processes.",
                (Query('process_resident_memory_bytes{job=~"$job"}', "{{instance}}"),),
                unit="bytes",
                width=6,
            ),
        ),
    ),
)


def _variables() -> list[dict[str, Any]]:
    def query(name: str, label: str, expr: str, multi: bool = False) -> dict[str, Any]:
        return {
            "name": name,
            "label": label,
            "type": "query",
            "datasource": DATASOURCE,
            "definition": expr,
            "query": {"query": expr, "refId": f"{name}-variable"},
            "refresh": 2,  # on time range change: models come and go
            "sort": 1,
            "multi": multi,
            "includeAll": multi,
            "current": {},
            "options": [],
            "hide": 0,
        }

    return [
        {
            "name": "datasource",
            "label": "Data source",
            "type": "datasource",
            "query": "prometheus",
            "current": {},
            "options": [],
            "refresh": 1,
            "regex": "",
            "hide": 0,
        },
        query("job", "Control plane job", "label_values(overspill_xds_streams, job)", multi=True),
        query("namespace", "Namespace", "label_values(overspill_model_offload_state, namespace)"),
        query("model", "Model", 'label_values(overspill_model_offload_state{namespace="$namespace"}, name)'),
    ]


def _panel_json(panel: Panel, pid: int, x: int, y: int) -> dict[str, Any]:
    defaults: dict[str, Any] = {"unit": panel.unit}
    if panel.max is not None:
        defaults["min"], defaults["max"] = 0, panel.max
    if panel.kind == "timeseries":
        defaults["custom"] = {
            "drawStyle": "line",
            "lineWidth": 1,
            "fillOpacity": 20 if panel.stacked else 0,
            "stacking": {"mode": "normal" if panel.stacked else "none", "group": "A"},
            "showPoints": "never",
        }
    overrides = [
        {
            "matcher": {"id": "byFrameRefID", "options": ref},
            "properties": [
                {"id": "color", "value": {"mode": "fixed", "fixedColor": "red"}},
                {"id": "custom.lineStyle", "value": {"fill": "dash", "dash": [10, 10]}},
                {"id": "custom.stacking", "value": {"mode": "none", "group": "A"}},
            ],
        }
        for ref in panel.thresholds
    ] + list(panel.overrides)
    return {
        "id": pid,
        "type": panel.kind,
        "title": panel.title,
        "description": panel.description,
        "datasource": DATASOURCE,
        "gridPos": {"h": panel.height, "w": panel.width, "x": x, "y": y},
        "fieldConfig": {"defaults": defaults, "overrides": overrides},
        "options": {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True}},
        "targets": [
            {"refId": chr(ord("A") + i), "datasource": DATASOURCE, "expr": q.expr, "legendFormat": q.legend}
            for i, q in enumerate(panel.queries)
        ],
    }


def _layout(rows: tuple[Row, ...]) -> list[dict[str, Any]]:
    """Rows of panels left to right, wrapping at 24 columns; ids numbered in order from 1."""
    out: list[dict[str, Any]] = []
    y, pid = 0, 0
    for row in rows:
        pid += 1
        out.append(
            {
                "id": pid,
                "type": "row",
                "title": row.title,
                "collapsed": False,
                "gridPos": {"h": 1, "w": GRID_COLUMNS, "x": 0, "y": y},
                "panels": [],
            }
        )
        y += 1
        x, line_height = 0, 0
        for panel in row.panels:
            if x + panel.width > GRID_COLUMNS:
                x, y, line_height = 0, y + line_height, 0
            pid += 1
            out.append(_panel_json(panel, pid, x, y))
            x += panel.width
            line_height = max(line_height, panel.height)
        y += line_height
    return out


def dashboard() -> dict[str, Any]:
    """The dashboard as Grafana imports it (no datasource uid: the `datasource` variable picks one)."""
    return {
        "uid": UID,
        "title": "Overspill",
        "description": "Burst offloading: decisions, what Envoy served, and the control plane's health.",
        "tags": ["overspill", "envoy"],
        "timezone": "browser",
        "editable": True,
        "graphTooltip": 1,
        "schemaVersion": 39,
        "version": 1,
        "refresh": "30s",
        "time": {"from": "now-1h", "to": "now"},
        "templating": {"list": _variables()},
        "annotations": {"list": []},
        "links": [],
        "panels": _layout(ROWS),
    }


def render() -> str:
    """The committed file's exact text."""
    return json.dumps(dashboard(), indent=2, sort_keys=True) + "\n"


@dataclass(frozen=True)
class PanelQuery:
    """One query of the dashboard as written, with where it sits (for messages and the picture)."""

    panel: str
    ref: str
    expr: str
    legend: str


def queries(board: Mapping[str, Any]) -> Iterator[PanelQuery]:
    """Every panel query of a dashboard document (as loaded from its JSON)."""
    for panel in board["panels"]:
        for target in panel.get("targets", []):
            yield PanelQuery(panel["title"], target["refId"], target["expr"], target.get("legendFormat", ""))


def variable_queries(board: Mapping[str, Any]) -> Iterator[str]:
    """The PromQL inside the query variables' `label_values(...)`."""
    for variable in board["templating"]["list"]:
        if variable["type"] == "query":
            found = re.fullmatch(r"label_values\((.+),\s*\w+\)", variable["definition"])
            if found is None:
                raise ValueError(f"variable {variable['name']}: unexpected query {variable['definition']!r}")
            yield found.group(1)


def rate_interval(step: float, scrape_interval: float, floor: float = 0.0) -> str:
    """Grafana's `$__rate_interval`: the step plus one scrape, and at least four scrapes (and at
    least `floor` seconds, for series that change less often than they are scraped)."""
    return f"{max(step + scrape_interval, 4 * scrape_interval, floor):g}s"


def legend(template: str, labels: Mapping[str, str]) -> str:
    """A series' name as Grafana's legendFormat makes it (`{{label}}` replaced)."""
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), template).strip()


_VARIABLE = re.compile(r"\$(?:\{(\w+)\}|(\w+))")


def substitute(expr: str, values: Mapping[str, str]) -> str:
    """`expr` with Grafana's variables ($name, ${name}) replaced as Grafana would; a variable
    without a value is an error (Grafana would send it literally). `$1` (a regex group) stays."""

    def one(found: re.Match[str]) -> str:
        name = found.group(1) or found.group(2)
        if name.isdigit():
            return found.group(0)
        if name not in values:
            raise KeyError(f"no value for dashboard variable ${name} in {expr!r}")
        return values[name]

    return _VARIABLE.sub(one, expr)


# PromQL words that are not metric names: aggregations, their modifiers, set operators.
_KEYWORDS = frozenset(
    "sum min max avg group stddev stdvar count count_values bottomk topk quantile by without on "
    "ignoring group_left group_right and or unless bool offset inf nan".split()
)
_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"')
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_BRACES = re.compile(r"\{[^}]*\}|\[[^\]]*\]")
_WORD = re.compile(r"(?<![\w:.])[A-Za-z_:][\w:]*(?![\w:]|\s*\()")


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads: what is left of its words once strings, label
    matchers, ranges, grouping labels, functions and keywords are taken out."""
    bare = _BRACES.sub(" ", _GROUPING.sub(" ", _STRINGS.sub('""', expr)))
    return {w for w in _WORD.findall(bare) if w.lower() not in _KEYWORDS and not w.startswith("__")}
