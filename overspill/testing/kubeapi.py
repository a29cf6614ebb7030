"""A Kubernetes API server test double that speaks the real REST wire protocol on loopback.

No kube-apiserver (and no container engine to run one) is available where the tests run, yet the
controller must be tested against the protocol it will meet in a cluster: discovery, lists with
selectors, watches that resume from a resourceVersion and expire with 410, optimistic concurrency,
the status subresource, patches, Tables for `kubectl get`, the metrics APIs. This module serves
all that from memory, well enough that the official `kubernetes` Python client and a real `kubectl`
work against it unchanged.

    async with FakeApiServer(crds=[Path("crd.yaml")]) as api:
        api.kubeconfig(tmp / "kc")             # for kubectl and kubernetes.config
        api.create({...})                      # fixtures straight into the store
        api.fail("services", verbs=("list", "watch"), code=503, times=2)

The server runs on its own thread and event loop, so blocking clients (the `kubernetes` package,
`subprocess`) can be called from test coroutines without deadlocking it; every helper is a plain
synchronous method that is safe from any thread. Standalone, for manual use:

    python -m overspill.testing.kubeapi --port 0 --kubeconfig /tmp/kc [--crd file.yaml ...]

What it does not do: admission, schema validation or pruning of custom resources, conversion
between versions (all versions of a resource share one storage, only `apiVersion` is rewritten),
server-side apply field ownership (an apply patch is served as a merge patch that creates when
missing), garbage collection by ownerReferences (a deleted namespace or CRD does take its objects
with it), scale subresources, authorization APIs (`kubectl auth can-i`), OpenAPI schemas
(`kubectl explain`), aggregated discovery (kubectl falls back to the plain lists), TLS. Protobuf
request bodies get 415: kubectl's generator commands (`kubectl create namespace|configmap|
deployment NAME ...`) send protobuf, so tests use `kubectl apply -f` / `kubectl create -f`.
Core v1 Events and events.k8s.io/v1 Events are stored apart (one storage on a real server).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import copy
import hashlib
import json
import os
import random
import re
import shutil
import signal
import string
import sys
import tempfile
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml
from aiohttp import web

Obj = dict[str, Any]

ADDED, MODIFIED, DELETED, BOOKMARK, ERROR = "ADDED", "MODIFIED", "DELETED", "BOOKMARK", "ERROR"
ALL_VERBS = ("create", "delete", "deletecollection", "get", "list", "patch", "update", "watch")
SERVER_VERSION = {
    # 1.32 so that a kubectl version dispatcher (as in the Cloud SDK) picks the kubectl we test with.
    "major": "1",
    "minor": "32",
    "gitVersion": "v1.32.0-fake",
    "gitCommit": "0000000000000000000000000000000000000000",
    "gitTreeState": "clean",
    "buildDate": "2024-12-11T00:00:00Z",
    "goVersion": "go1.23.4",
    "compiler": "gc",
    "platform": "linux/amd64",
}
METRICS_GROUP, CUSTOM_METRICS_GROUP, EXTERNAL_METRICS_GROUP = (
    "metrics.k8s.io",
    "custom.metrics.k8s.io",
    "external.metrics.k8s.io",
)
METRICS_VERSIONS = {
    METRICS_GROUP: "v1beta1",
    CUSTOM_METRICS_GROUP: "v1beta2",
    EXTERNAL_METRICS_GROUP: "v1beta1",
}
REASONS = {
    400: "BadRequest",
    401: "Unauthorized",
    403: "Forbidden",
    404: "NotFound",
    405: "MethodNotAllowed",
    406: "NotAcceptable",
    409: "Conflict",
    410: "Expired",
    415: "UnsupportedMediaType",
    422: "Invalid",
    429: "TooManyRequests",
    500: "InternalError",
    503: "ServiceUnavailable",
    504: "Timeout",
}


def now_timestamp() -> str:
    """RFC 3339 at one-second precision, as the API server writes creationTimestamp."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# --- Errors -------------------------------------------------------------------------------------


class ApiError(Exception):
    """A failure the real server would answer with a `Status` body; helpers raise it too."""

    def __init__(self, code: int, message: str, *, reason: str | None = None, details: Obj | None = None):
        super().__init__(message)
        self.code = code
        self.reason = reason or REASONS.get(code, "Unknown")
        self.message = message
        self.details = details

    def status(self) -> Obj:
        """The `Status` object clients parse for reason, code and details."""
        body: Obj = {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        }
        if self.details:
            body["details"] = self.details
        return body


def _details(res: Resource, name: str | None) -> Obj:
    details: Obj = {"kind": res.plural}
    if name:
        details["name"] = name
    if res.group:
        details["group"] = res.group
    return details


def not_found(res: Resource, name: str) -> ApiError:
    return ApiError(404, f'{res.key} "{name}" not found', details=_details(res, name))


def conflict(res: Resource, name: str, why: str) -> ApiError:
    return ApiError(
        409, f'Operation cannot be fulfilled on {res.key} "{name}": {why}', details=_details(res, name)
    )


STALE = "the object has been modified; please apply your changes to the latest version and try again"


# --- Selectors ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Requirement:
    """One term of a label selector: `key op values` (op: =, !=, in, notin, exists, !, gt, lt)."""

    key: str
    op: str
    values: tuple[str, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        value = labels.get(self.key)
        if self.op in ("=", "in"):
            return value is not None and value in self.values
        if self.op in ("!=", "notin"):
            return value is None or value not in self.values
        if self.op == "exists":
            return value is not None
        if self.op == "!":
            return value is None
        try:
            number, bound = int(value or ""), int(self.values[0])
        except ValueError:
            return False
        return number > bound if self.op == "gt" else number < bound


_KEY = r"[A-Za-z0-9][-A-Za-z0-9_./]*"
_VALUE = r"[-A-Za-z0-9_.]*"
_SET_TERM = re.compile(rf"^({_KEY})\s+(in|notin)\s*\(([^)]*)\)$")
_EQ_TERM = re.compile(rf"^({_KEY})\s*(==|=|!=)\s*({_VALUE})$")
_CMP_TERM = re.compile(rf"^({_KEY})\s*([<>])\s*(-?\d+)$")
_EXISTS_TERM = re.compile(rf"^(!?)\s*({_KEY})$")


def _split_top_level(text: str) -> list[str]:
    """Splits on the commas that separate terms, not those inside `in (a,b)`."""
    parts, depth, current = [], 0, []
    for char in text:
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        if char == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return [part.strip() for part in parts if part.strip()]


def parse_label_selector(text: str | None) -> list[Requirement]:
    """Parses the labelSelector query syntax; a malformed selector is a 400, as on the real server."""
    requirements = []
    for term in _split_top_level(text or ""):
        if match := _SET_TERM.match(term):
            values = tuple(v.strip() for v in match[3].split(",") if v.strip())
            requirements.append(Requirement(match[1], match[2], values))
        elif match := _EQ_TERM.match(term):
            requirements.append(Requirement(match[1], "!=" if match[2] == "!=" else "=", (match[3],)))
        elif match := _CMP_TERM.match(term):
            requirements.append(Requirement(match[1], "gt" if match[2] == ">" else "lt", (match[3],)))
        elif match := _EXISTS_TERM.match(term):
            requirements.append(Requirement(match[2], "!" if match[1] else "exists"))
        else:
            raise ApiError(400, f"unable to parse requirement: {term!r}")
    return requirements


def labels_match(requirements: Iterable[Requirement], labels: Mapping[str, str] | None) -> bool:
    return all(req.matches(labels or {}) for req in requirements)


def parse_field_selector(text: str | None) -> list[tuple[str, bool, str]]:
    """`path=value`, `path==value`, `path!=value` terms; any dotted path is accepted (the real server
    allows a per-resource set; kubectl describe's `involvedObject.*` event search needs the generality)."""
    terms = []
    for term in _split_top_level(text or ""):
        match = re.match(r"^([A-Za-z0-9_.\-]+)\s*(==|=|!=)\s*(.*)$", term)
        if not match:
            raise ApiError(400, f"invalid field selector: {term!r}")
        terms.append((match[1], match[2] != "!=", match[3].strip()))
    return terms


def _dig(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(obj, dict):
            return None
        obj = obj.get(part)
    return obj


def fields_match(terms: Iterable[tuple[str, bool, str]], obj: Obj) -> bool:
    for path, equal, value in terms:
        got = _dig(obj, path)
        text = "" if got is None else _text(got)
        if (text == value) != equal:
            return False
    return True


# --- Patches ------------------------------------------------------------------------------------


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch: null deletes, objects merge, everything else replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out


# Lists merged by key under strategic merge patch (the patchMergeKey tags of the built-in types).
_MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "ephemeralContainers": "name",
    "volumes": "name",
    "env": "name",
    "imagePullSecrets": "name",
    "volumeMounts": "mountPath",
    "volumeDevices": "devicePath",
    "conditions": "type",
    "ownerReferences": "uid",
    "hostAliases": "ip",
    "topologySpreadConstraints": "topologyKey",
}
_PRIMITIVE_MERGE = {"finalizers"}
_DELETE = object()


def _merge_key(path: tuple[str, ...], name: str) -> str | None:
    if name == "ports":
        if path == ("spec",):
            return "port"  # Service
        if path and path[-1] in ("containers", "initContainers", "ephemeralContainers"):
            return "containerPort"
        return None  # e.g. EndpointSlice ports are atomic
    return _MERGE_KEYS.get(name)


def strategic_merge_patch(target: Any, patch: Any, path: tuple[str, ...] = ()) -> Any:
    """Strategic merge patch as kubectl apply sends it: a merge patch whose keyed lists (containers,
    ports, env, conditions...) merge by key, with the `$patch`, `$setElementOrder`, `$retainKeys` and
    `$deleteFromPrimitiveList` directives."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    directive = patch.get("$patch")
    if directive == "delete":
        return _DELETE
    if directive == "replace":
        return {k: copy.deepcopy(v) for k, v in patch.items() if k != "$patch"}
    out = dict(target) if isinstance(target, dict) else {}
    orders: dict[str, list[Any]] = {}
    removals: dict[str, list[Any]] = {}
    for key, value in patch.items():
        if key in ("$patch", "$retainKeys"):
            continue
        if key.startswith("$setElementOrder/"):
            orders[key.split("/", 1)[1]] = value
        elif key.startswith("$deleteFromPrimitiveList/"):
            removals[key.split("/", 1)[1]] = value
        elif value is None:
            out.pop(key, None)
        elif isinstance(value, dict):
            merged = strategic_merge_patch(out.get(key), value, (*path, key))
            if merged is _DELETE:
                out.pop(key, None)
            else:
                out[key] = merged
        elif isinstance(value, list):
            out[key] = _merge_list(out.get(key), value, path, key)
        else:
            out[key] = value
    for key, values in removals.items():
        if isinstance(out.get(key), list):
            out[key] = [item for item in out[key] if item not in values]
    for key, order in orders.items():
        if isinstance(out.get(key), list):
            out[key] = _apply_order(out[key], order, _merge_key(path, key))
    if isinstance(patch.get("$retainKeys"), list):
        out = {k: v for k, v in out.items() if k in patch["$retainKeys"]}
    return out


def _merge_list(current: Any, patch: list[Any], path: tuple[str, ...], name: str) -> list[Any]:
    current = current if isinstance(current, list) else []
    if name in _PRIMITIVE_MERGE:
        return [*current, *(item for item in patch if item not in current)]
    key = _merge_key(path, name)
    if key is None or not all(isinstance(item, dict) for item in patch):
        return copy.deepcopy(patch)
    if any(item.get("$patch") == "replace" for item in patch):
        return [copy.deepcopy(item) for item in patch if item.get("$patch") != "replace"]
    out = [item for item in current]
    for item in patch:
        index = next(
            (i for i, old in enumerate(out) if isinstance(old, dict) and old.get(key) == item.get(key)), None
        )
        if item.get("$patch") == "delete":
            out = [old for old in out if not (isinstance(old, dict) and old.get(key) == item.get(key))]
        elif index is None:
            out.append(strategic_merge_patch({}, item, (*path, name)))
        else:
            out[index] = strategic_merge_patch(out[index], item, (*path, name))
    return out


def _apply_order(items: list[Any], order: list[Any], key: str | None) -> list[Any]:
    def ident(item: Any) -> Any:
        return json.dumps(item.get(key) if key and isinstance(item, dict) else item, sort_keys=True)

    rank = {ident(entry): i for i, entry in enumerate(order)}
    return sorted(items, key=lambda item: rank.get(ident(item), len(rank)))


def _pointer(path: str) -> list[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise ApiError(422, f"invalid JSON pointer {path!r}")
    return [part.replace("~1", "/").replace("~0", "~") for part in path[1:].split("/")]


def _pointer_get(doc: Any, tokens: list[str]) -> Any:
    for token in tokens:
        if isinstance(doc, list):
            try:
                doc = doc[int(token)]
            except (ValueError, IndexError):
                raise ApiError(422, f"index {token!r} out of range") from None
        elif isinstance(doc, dict) and token in doc:
            doc = doc[token]
        else:
            raise ApiError(422, f"path element {token!r} not found")
    return doc


def _pointer_put(doc: Any, tokens: list[str], value: Any, *, insert: bool) -> Any:
    if not tokens:
        return value
    parent, last = _pointer_get(doc, tokens[:-1]), tokens[-1]
    if isinstance(parent, list):
        if last == "-":
            parent.append(value)
            return doc
        try:
            index = int(last)
        except ValueError:
            raise ApiError(422, f"invalid list index {last!r}") from None
        if not 0 <= index <= len(parent) - (0 if insert else 1):
            raise ApiError(422, f"index {index} out of range")
        if insert:
            parent.insert(index, value)
        else:
            parent[index] = value
    elif isinstance(parent, dict):
        if not insert and last not in parent:
            raise ApiError(422, f"path element {last!r} not found")
        parent[last] = value
    else:
        raise ApiError(422, "JSON patch path goes through a scalar")
    return doc


def _pointer_remove(doc: Any, tokens: list[str]) -> Any:
    if not tokens:
        raise ApiError(422, "cannot remove the whole document")
    parent, last = _pointer_get(doc, tokens[:-1]), tokens[-1]
    try:
        if isinstance(parent, list):
            return parent.pop(int(last))
        return parent.pop(last)
    except (ValueError, IndexError, KeyError, AttributeError, TypeError):
        raise ApiError(422, f"path element {last!r} not found") from None


def json_patch(doc: Any, operations: Any) -> Any:
    """RFC 6902 JSON patch: add, remove, replace, move, copy, test."""
    if not isinstance(operations, list):
        raise ApiError(400, "a JSON patch must be a list of operations")
    doc = copy.deepcopy(doc)
    for op in operations:
        kind, tokens = op.get("op"), _pointer(op.get("path", ""))
        if kind == "add":
            doc = _pointer_put(doc, tokens, copy.deepcopy(op.get("value")), insert=True)
        elif kind == "remove":
            _pointer_remove(doc, tokens)
        elif kind == "replace":
            doc = _pointer_put(doc, tokens, copy.deepcopy(op.get("value")), insert=False)
        elif kind in ("move", "copy"):
            source = _pointer(op.get("from", ""))
            value = (
                _pointer_remove(doc, source) if kind == "move" else copy.deepcopy(_pointer_get(doc, source))
            )
            doc = _pointer_put(doc, tokens, value, insert=True)
        elif kind == "test":
            if _pointer_get(doc, tokens) != op.get("value"):
                raise ApiError(422, f"testing value {op.get('path')} failed")
        else:
            raise ApiError(422, f"unsupported JSON patch operation {kind!r}")
    return doc


# --- Printing: JSONPath, ages, Table columns ----------------------------------------------------


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    if isinstance(value, dict | list):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


_JP_TOKEN = re.compile(
    r"""\.(?P<field>[^.\[\]]+)
    |\[(?P<index>-?\d+|\*)\]
    |\[['"](?P<quoted>[^'"]+)['"]\]
    |\[\?\(@\.(?P<fkey>[\w.\-/]+)\s*==\s*(?:"(?P<dq>[^"]*)"|'(?P<sq>[^']*)'|(?P<bare>[^)\s]*))\s*\)\]""",
    re.VERBOSE,
)


def jsonpath(obj: Any, path: str) -> list[Any]:
    """The JSONPath subset printer columns use: `.a.b`, `[0]`, `[*]`, `['x.y']`, `[?(@.k=="v")]`."""
    text = path.strip()
    if text.startswith("{") and text.endswith("}"):
        text = text[1:-1].strip()
    text = text.removeprefix("$")
    values, pos = [obj], 0
    while pos < len(text):
        match = _JP_TOKEN.match(text, pos)
        if not match:
            raise ValueError(f"unsupported JSONPath {path!r}")
        pos = match.end()
        found: list[Any] = []
        for value in values:
            name = match["field"] or match["quoted"]
            if name is not None:
                if isinstance(value, dict) and name in value:
                    found.append(value[name])
            elif match["index"] is not None:
                if isinstance(value, list):
                    if match["index"] == "*":
                        found.extend(value)
                    elif -len(value) <= int(match["index"]) < len(value):
                        found.append(value[int(match["index"])])
            elif isinstance(value, list):
                want = next(v for v in (match["dq"], match["sq"], match["bare"]) if v is not None)
                found.extend(
                    item
                    for item in value
                    if any(_text(got) == want for got in jsonpath(item, "." + match["fkey"]))
                )
        values = found
    return values


def human_duration(seconds: float) -> str:
    """k8s.io/apimachinery's HumanDuration, which kubectl shows in AGE columns."""
    s = int(seconds)
    if s < -1:
        return "<invalid>"
    if s < 0:
        return "0s"
    if s < 120:
        return f"{s}s"
    minutes, hours, days = s // 60, s // 3600, s // 86400
    if minutes < 10:
        return f"{minutes}m" if s % 60 == 0 else f"{minutes}m{s % 60}s"
    if minutes < 180:
        return f"{minutes}m"
    if hours < 8:
        return f"{hours}h" if minutes % 60 == 0 else f"{hours}h{minutes % 60}m"
    if hours < 48:
        return f"{hours}h"
    if hours < 192:
        return f"{days}d" if hours % 24 == 0 else f"{days}d{hours % 24}h"
    if days < 730:
        return f"{days}d"
    years = days // 365
    if days < 2920:
        return f"{years}y" if days % 365 == 0 else f"{years}y{days % 365}d"
    return f"{years}y"


def age(timestamp: Any) -> str | None:
    if not isinstance(timestamp, str) or not timestamp:
        return None
    try:
        then = datetime.fromisoformat(timestamp.replace("Z", "+00:00"))
    except ValueError:
        return "<invalid>"
    return human_duration(time.time() - then.timestamp())


@dataclass(frozen=True)
class Column:
    """A Table column: the definition kubectl prints as a header, and how to compute a cell."""

    name: str
    cell: Callable[[Obj], Any]
    type: str = "string"
    priority: int = 0
    format: str = ""
    description: str = ""

    def definition(self) -> Obj:
        return {
            "name": self.name,
            "type": self.type,
            "format": self.format,
            "description": self.description,
            "priority": self.priority,
        }


def printer_column(spec: Mapping[str, Any]) -> Column:
    """A CRD `additionalPrinterColumns` entry; the cell is the first JSONPath result, typed, with
    `date` rendered as an age as the real server's table convertor does."""
    path, kind = str(spec.get("jsonPath", "")), str(spec.get("type", "string"))
    jsonpath({}, path)  # reject an unsupported path at CRD registration, not at `kubectl get`

    def cell(obj: Obj) -> Any:
        found = [v for v in jsonpath(obj, path) if v is not None]
        if not found:
            return None
        value = found[0]
        if kind == "date":
            return age(value)
        if kind == "integer":
            return value if isinstance(value, int) else None
        if kind == "number":
            return value if isinstance(value, int | float) else None
        if kind == "boolean":
            return value if isinstance(value, bool) else None
        return ",".join(_text(v) for v in found)

    return Column(
        name=str(spec.get("name", path)),
        cell=cell,
        type=kind,
        priority=int(spec.get("priority", 0)),
        format=str(spec.get("format", "")),
        description=str(spec.get("description", "")),
    )


NAME_COLUMN = Column(
    "Name",
    lambda o: o["metadata"]["name"],
    format="name",
    description="Name must be unique within a namespace.",
)
AGE_COLUMN = Column(
    "Age",
    lambda o: age(o["metadata"].get("creationTimestamp")),
    description="CreationTimestamp is a timestamp representing the server time when this object was created.",
)


def _col(name: str, cell: Callable[[Obj], Any], *, priority: int = 0, type: str = "string") -> Column:
    return Column(name, cell, type=type, priority=priority)


def _g(obj: Obj, dotted: str, default: Any = None) -> Any:
    value = _dig(obj, dotted)
    return default if value is None else value


def _service_ports(svc: Obj) -> str:
    ports = []
    for port in _g(svc, "spec.ports", []):
        node = f":{port['nodePort']}" if port.get("nodePort") else ""
        ports.append(f"{port.get('port')}{node}/{port.get('protocol', 'TCP')}")
    return ",".join(ports) or "<none>"


def _pod_ready(pod: Obj) -> str:
    statuses = _g(pod, "status.containerStatuses", [])
    return f"{sum(1 for s in statuses if s.get('ready'))}/{len(_g(pod, 'spec.containers', []))}"


def _pod_status(pod: Obj) -> str:
    if pod["metadata"].get("deletionTimestamp"):
        return "Terminating"
    return _g(pod, "status.reason") or _g(pod, "status.phase", "Unknown")


def _slice_endpoints(eps: Obj) -> str:
    addresses = [a for ep in eps.get("endpoints") or [] for a in ep.get("addresses") or []]
    if not addresses:
        return "<unset>"
    more = f" + {len(addresses) - 3} more..." if len(addresses) > 3 else ""
    return ",".join(addresses[:3]) + more


def _selector(labels: Mapping[str, str] | None) -> str:
    return ",".join(f"{k}={v}" for k, v in (labels or {}).items()) or "<none>"


def _event_object(ev: Obj, ref: str) -> str:
    target = ev.get(ref) or {}
    return f"{str(target.get('kind', '')).lower()}/{target.get('name', '')}"


def _last_seen(ev: Obj) -> str | None:
    stamp = ev.get("lastTimestamp") or ev.get("eventTime") or _g(ev, "series.lastObservedTime")
    return age(stamp or ev["metadata"].get("creationTimestamp"))


BUILTIN_COLUMNS: dict[str, list[Column]] = {
    "namespaces": [NAME_COLUMN, _col("Status", lambda o: _g(o, "status.phase")), AGE_COLUMN],
    "services": [
        NAME_COLUMN,
        _col("Type", lambda o: _g(o, "spec.type")),
        _col("Cluster-IP", lambda o: _g(o, "spec.clusterIP", "<none>")),
        _col(
            "External-IP",
            lambda o: (
                ",".join(
                    i.get("ip") or i.get("hostname", "") for i in _g(o, "status.loadBalancer.ingress", [])
                )
                or "<none>"
            ),
        ),
        _col("Port(s)", _service_ports),
        AGE_COLUMN,
        _col("Selector", lambda o: _selector(_g(o, "spec.selector")), priority=1),
    ],
    "pods": [
        NAME_COLUMN,
        _col("Ready", _pod_ready),
        _col("Status", _pod_status),
        _col(
            "Restarts",
            lambda o: sum(s.get("restartCount", 0) for s in _g(o, "status.containerStatuses", [])),
            type="integer",
        ),
        AGE_COLUMN,
        _col("IP", lambda o: _g(o, "status.podIP", "<none>"), priority=1),
        _col("Node", lambda o: _g(o, "spec.nodeName", "<none>"), priority=1),
    ],
    "configmaps": [
        NAME_COLUMN,
        _col("Data", lambda o: len(o.get("data") or {}) + len(o.get("binaryData") or {}), type="integer"),
        AGE_COLUMN,
    ],
    "secrets": [
        NAME_COLUMN,
        _col("Type", lambda o: o.get("type", "Opaque")),
        _col("Data", lambda o: len(o.get("data") or {}), type="integer"),
        AGE_COLUMN,
    ],
    "events": [
        _col("Last Seen", _last_seen),
        _col("Type", lambda o: o.get("type")),
        _col("Reason", lambda o: o.get("reason")),
        _col("Object", lambda o: _event_object(o, "involvedObject")),
        _col("Message", lambda o: o.get("message")),
    ],
    "events.events.k8s.io": [
        _col("Last Seen", _last_seen),
        _col("Type", lambda o: o.get("type")),
        _col("Reason", lambda o: o.get("reason")),
        _col("Object", lambda o: _event_object(o, "regarding")),
        _col("Message", lambda o: o.get("note")),
    ],
    "endpointslices.discovery.k8s.io": [
        NAME_COLUMN,
        _col("AddressType", lambda o: o.get("addressType")),
        _col("Ports", lambda o: ",".join(str(p.get("port")) for p in o.get("ports") or []) or "<unset>"),
        _col("Endpoints", _slice_endpoints),
        AGE_COLUMN,
    ],
    "deployments.apps": [
        NAME_COLUMN,
        _col("Ready", lambda o: f"{_g(o, 'status.readyReplicas', 0)}/{_g(o, 'spec.replicas', 0)}"),
        _col("Up-to-date", lambda o: _g(o, "status.updatedReplicas", 0), type="integer"),
        _col("Available", lambda o: _g(o, "status.availableReplicas", 0), type="integer"),
        AGE_COLUMN,
        _col(
            "Containers",
            lambda o: ",".join(c["name"] for c in _g(o, "spec.template.spec.containers", [])),
            priority=1,
        ),
        _col(
            "Images",
            lambda o: ",".join(c.get("image", "") for c in _g(o, "spec.template.spec.containers", [])),
            priority=1,
        ),
        _col("Selector", lambda o: _selector(_g(o, "spec.selector.matchLabels")), priority=1),
    ],
    "statefulsets.apps": [
        NAME_COLUMN,
        _col("Ready", lambda o: f"{_g(o, 'status.readyReplicas', 0)}/{_g(o, 'spec.replicas', 0)}"),
        AGE_COLUMN,
    ],
    "daemonsets.apps": [
        NAME_COLUMN,
        _col("Desired", lambda o: _g(o, "status.desiredNumberScheduled", 0), type="integer"),
        _col("Current", lambda o: _g(o, "status.currentNumberScheduled", 0), type="integer"),
        _col("Ready", lambda o: _g(o, "status.numberReady", 0), type="integer"),
        AGE_COLUMN,
    ],
    "replicasets.apps": [
        NAME_COLUMN,
        _col("Desired", lambda o: _g(o, "spec.replicas", 0), type="integer"),
        _col("Current", lambda o: _g(o, "status.replicas", 0), type="integer"),
        _col("Ready", lambda o: _g(o, "status.readyReplicas", 0), type="integer"),
        AGE_COLUMN,
    ],
    "leases.coordination.k8s.io": [
        NAME_COLUMN,
        _col("Holder", lambda o: _g(o, "spec.holderIdentity", "")),
        AGE_COLUMN,
    ],
    "customresourcedefinitions.apiextensions.k8s.io": [
        NAME_COLUMN,
        _col("Created At", lambda o: o["metadata"].get("creationTimestamp"), type="date"),
    ],
}


# --- Resources ----------------------------------------------------------------------------------


_VERSION = re.compile(r"^v(\d+)(?:(alpha|beta)(\d+))?$")


def version_priority(version: str) -> tuple[int, int, int, str]:
    """Kubernetes version order: GA before beta before alpha, higher numbers first, others last."""
    match = _VERSION.match(version)
    if not match:
        return (3, 0, 0, version)
    stage = {None: 0, "beta": 1, "alpha": 2}[match[2]]
    return (stage, -int(match[1]), -int(match[3] or 0), "")


@dataclass
class Resource:
    """One served resource (all its versions share one storage, keyed `plural[.group]`)."""

    group: str
    plural: str
    kind: str
    namespaced: bool
    versions: list[str]  # served versions, preferred first
    singular: str = ""
    short_names: list[str] = field(default_factory=list)
    categories: list[str] = field(default_factory=list)
    status: bool = False  # has a status subresource
    columns: dict[str, list[Column]] = field(default_factory=dict)  # per version; missing: Name, Age
    crd: str | None = None  # the CustomResourceDefinition that defines it

    def __post_init__(self) -> None:
        self.singular = self.singular or self.kind.lower()
        self.versions = sorted(self.versions, key=version_priority)

    @property
    def key(self) -> str:
        return f"{self.plural}.{self.group}" if self.group else self.plural

    def api_version(self, version: str | None = None) -> str:
        version = version or self.versions[0]
        return f"{self.group}/{version}" if self.group else version

    def table_columns(self, version: str) -> list[Column]:
        if self.key in BUILTIN_COLUMNS:
            return BUILTIN_COLUMNS[self.key]
        extra = self.columns.get(version, [])
        has_age = any(c.name.lower() == "age" for c in extra)
        return [NAME_COLUMN, *extra, *([] if has_age else [AGE_COLUMN])]

    def discovery(self) -> list[Obj]:
        entry: Obj = {
            "name": self.plural,
            "singularName": self.singular,
            "namespaced": self.namespaced,
            "kind": self.kind,
            "verbs": list(ALL_VERBS),
        }
        if self.short_names:
            entry["shortNames"] = list(self.short_names)
        if self.categories:
            entry["categories"] = list(self.categories)
        entries = [entry]
        if self.status:
            entries.append(
                {
                    "name": f"{self.plural}/status",
                    "singularName": "",
                    "namespaced": self.namespaced,
                    "kind": self.kind,
                    "verbs": ["get", "patch", "update"],
                }
            )
        return entries


def builtin_resources() -> list[Resource]:
    def core(plural: str, kind: str, namespaced: bool = True, **kw: Any) -> Resource:
        return Resource("", plural, kind, namespaced, ["v1"], **kw)

    return [
        core("namespaces", "Namespace", False, short_names=["ns"], status=True),
        core("services", "Service", short_names=["svc"], categories=["all"], status=True),
        core("pods", "Pod", short_names=["po"], categories=["all"], status=True),
        core("events", "Event", short_names=["ev"]),
        core("configmaps", "ConfigMap", short_names=["cm"]),
        core("secrets", "Secret"),
        Resource("discovery.k8s.io", "endpointslices", "EndpointSlice", True, ["v1"]),
        Resource(
            "apps",
            "deployments",
            "Deployment",
            True,
            ["v1"],
            short_names=["deploy"],
            categories=["all"],
            status=True,
        ),
        Resource(
            "apps",
            "statefulsets",
            "StatefulSet",
            True,
            ["v1"],
            short_names=["sts"],
            categories=["all"],
            status=True,
        ),
        Resource(
            "apps",
            "daemonsets",
            "DaemonSet",
            True,
            ["v1"],
            short_names=["ds"],
            categories=["all"],
            status=True,
        ),
        Resource(
            "apps",
            "replicasets",
            "ReplicaSet",
            True,
            ["v1"],
            short_names=["rs"],
            categories=["all"],
            status=True,
        ),
        Resource("coordination.k8s.io", "leases", "Lease", True, ["v1"]),
        Resource("events.k8s.io", "events", "Event", True, ["v1"], short_names=["ev"]),
        Resource(
            "apiextensions.k8s.io",
            "customresourcedefinitions",
            "CustomResourceDefinition",
            False,
            ["v1"],
            short_names=["crd", "crds"],
            categories=["api-extensions"],
            status=True,
        ),
    ]


CRD_KEY = "customresourcedefinitions.apiextensions.k8s.io"


def crd_resources(crd: Obj) -> Resource:
    """The resource a CustomResourceDefinition serves; a malformed one is a 422 as on the real server."""
    spec, name = crd.get("spec") or {}, _g(crd, "metadata.name", "")
    names = spec.get("names") or {}
    group, plural, kind = spec.get("group"), names.get("plural"), names.get("kind")
    if not group or not plural or not kind:
        raise ApiError(
            422, f"CustomResourceDefinition {name!r} needs spec.group, spec.names.plural and .kind"
        )
    if name != f"{plural}.{group}":
        raise ApiError(
            422, f'CustomResourceDefinition "{name}": metadata.name must be spec.names.plural+"."+spec.group'
        )
    if spec.get("scope") not in ("Namespaced", "Cluster"):
        raise ApiError(422, f"CustomResourceDefinition {name!r}: spec.scope must be Namespaced or Cluster")
    versions = [v for v in spec.get("versions") or [] if v.get("served", True)]
    if not versions or sum(1 for v in spec.get("versions") or [] if v.get("storage")) != 1:
        raise ApiError(
            422, f"CustomResourceDefinition {name!r}: needs served versions and exactly one storage version"
        )
    try:
        columns = {
            v["name"]: [printer_column(c) for c in v.get("additionalPrinterColumns") or []] for v in versions
        }
    except ValueError as exc:
        raise ApiError(422, f"CustomResourceDefinition {name!r}: {exc}") from None
    return Resource(
        group,
        plural,
        kind,
        spec["scope"] == "Namespaced",
        [v["name"] for v in versions],
        singular=names.get("singular") or kind.lower(),
        short_names=list(names.get("shortNames") or []),
        categories=list(names.get("categories") or []),
        status=any("status" in (v.get("subresources") or {}) for v in versions),
        columns=columns,
        crd=name,
    )


def load_documents(source: str | Path | Mapping[str, Any]) -> list[Obj]:
    """Objects from a mapping, a YAML/JSON file path, or YAML text (multi-document, `kind: List` expanded)."""
    if isinstance(source, Mapping):
        docs: list[Any] = [dict(source)]
    else:
        text = source.read_text() if isinstance(source, Path) else source
        if isinstance(source, str) and "\n" not in source and Path(source).is_file():
            text = Path(source).read_text()
        docs = [d for d in yaml.safe_load_all(text) if d]
    out: list[Obj] = []
    for doc in docs:
        if doc.get("kind") == "List" or (doc.get("kind", "").endswith("List") and "items" in doc):
            out.extend(doc.get("items") or [])
        else:
            out.append(doc)
    return out


# --- Store and watches --------------------------------------------------------------------------


@dataclass(frozen=True)
class Change:
    """One committed write, kept in the bounded history that watches replay from."""

    rv: int
    type: str
    key: str  # Resource.key
    old: Obj | None
    new: Obj


CLOSE, ABORT, BOOKMARK_NOW = "close", "abort", "bookmark"


class Watch:
    """One open watch stream: its filters and the queue the store pushes changes into."""

    def __init__(
        self,
        res: Resource,
        namespace: str | None,
        labels: list[Requirement],
        fields: list[tuple[str, bool, str]],
        since: int,
        bookmarks: bool,
    ):
        self.res, self.key, self.namespace = res, res.key, namespace
        self.labels, self.fields, self.since, self.bookmarks = labels, fields, since, bookmarks
        self.queue: asyncio.Queue[Change | str] = asyncio.Queue()

    def selects(self, obj: Obj | None) -> bool:
        if obj is None:
            return False
        meta = obj["metadata"]
        if self.namespace is not None and meta.get("namespace") != self.namespace:
            return False
        return labels_match(self.labels, meta.get("labels")) and fields_match(self.fields, obj)

    def event(self, change: Change) -> tuple[str, Obj] | None:
        """The event this watcher sees; a label change moving an object in or out of the selector
        is an ADDED or DELETED, as with the real watch cache."""
        if change.key != self.key or change.rv <= self.since:
            return None
        was, now = self.selects(change.old), self.selects(change.new)
        if change.type == DELETED:
            return (DELETED, change.new) if was else None
        if now:
            return (MODIFIED if was else ADDED, change.new)
        if was and change.old is not None:
            gone = copy.deepcopy(change.old)
            gone["metadata"]["resourceVersion"] = change.new["metadata"]["resourceVersion"]
            return (DELETED, gone)
        return None


@dataclass
class Fault:
    """An injected failure or delay for requests to one resource (`times=None`: until cleared)."""

    key: str
    verbs: frozenset[str]
    code: int | None
    delay: float
    times: int | None
    namespace: str | None
    message: str

    def matches(self, verb: str, key: str, namespace: str | None) -> bool:
        return (
            key == self.key and verb in self.verbs and (self.namespace is None or self.namespace == namespace)
        )


@dataclass(frozen=True)
class Call:
    """One request as served, for tests that assert on what a client did (e.g. it re-listed)."""

    method: str
    path: str
    query: dict[str, str]
    verb: str  # get, list, watch, create, update, patch, delete, deletecollection, or "" (non-resource)
    resource: str  # Resource.key, or "" for discovery, metrics and other non-resource paths
    namespace: str | None
    name: str | None
    subresource: str | None
    code: int


class Store:
    """All state; used only from the server's event loop thread (helpers hop onto it)."""

    def __init__(self, history: int):
        self.resources: dict[str, Resource] = {}
        self.objects: dict[str, dict[tuple[str, str], Obj]] = {}
        self.rv = 0
        self.history: deque[Change] = deque(maxlen=max(1, history))
        self.oldest = 0  # a watch from a resourceVersion below this gets 410
        self.watches: set[Watch] = set()
        self.faults: list[Fault] = []
        self.status_conflicts: dict[tuple[str, str, str], int] = {}
        self.pod_metrics: dict[tuple[str, str], Obj] = {}
        self.custom_metrics: dict[tuple[str, str, str, str], Obj] = {}
        self.external_metrics: dict[tuple[str, str], list[Obj]] = {}
        self.cluster_ips = 0
        for res in builtin_resources():
            self.resources[res.key] = res

    # lookup

    def resolve(self, ref: str) -> Resource:
        """A resource by plural, singular, kind or short name, maybe `.group`-qualified, as kubectl takes."""
        if ref in self.resources:
            return self.resources[ref]
        name, _, group = ref.partition(".")
        lowered = name.lower()
        found = [
            r
            for r in self.resources.values()
            if (not group or r.group == group)
            and lowered in (r.plural, r.singular, r.kind.lower(), *(s.lower() for s in r.short_names))
        ]
        if not found:
            raise ApiError(404, f'the server doesn\'t have a resource type "{ref}"')
        return sorted(found, key=lambda r: (r.group != "", r.group))[0]

    def for_object(self, obj: Mapping[str, Any]) -> tuple[Resource, str]:
        api_version, kind = str(obj.get("apiVersion", "")), str(obj.get("kind", ""))
        group, _, version = api_version.rpartition("/")
        for res in self.resources.values():
            if res.group == group and res.kind == kind and version in res.versions:
                return res, version
        raise ApiError(404, f'no matches for kind "{kind}" in version "{api_version}"')

    def at_path(self, group: str, version: str, plural: str) -> Resource:
        for res in self.resources.values():
            if res.group == group and res.plural == plural and version in res.versions:
                return res
        raise ApiError(404, "the server could not find the requested resource")

    def group_versions(self) -> dict[str, list[str]]:
        groups: dict[str, set[str]] = {}
        for res in self.resources.values():
            groups.setdefault(res.group, set()).update(res.versions)
        return {g: sorted(v, key=version_priority) for g, v in groups.items()}

    def get(self, res: Resource, namespace: str | None, name: str) -> Obj | None:
        return self.objects.get(res.key, {}).get((namespace or "" if res.namespaced else "", name))

    def list(
        self,
        res: Resource,
        namespace: str | None,
        labels: list[Requirement] | None = None,
        fields: list[tuple[str, bool, str]] | None = None,
    ) -> list[Obj]:
        items = []
        for (ns, _), obj in sorted(self.objects.get(res.key, {}).items()):
            if res.namespaced and namespace is not None and ns != namespace:
                continue
            if labels_match(labels or [], obj["metadata"].get("labels")) and fields_match(fields or [], obj):
                items.append(obj)
        return items

    # writes

    def _commit(self, res: Resource, kind: str, old: Obj | None, new: Obj, dry_run: bool) -> Obj:
        if dry_run:
            return new
        self.rv += 1
        new["metadata"]["resourceVersion"] = str(self.rv)
        objects = self.objects.setdefault(res.key, {})
        key = (new["metadata"].get("namespace", ""), new["metadata"]["name"])
        if kind == DELETED:
            objects.pop(key, None)
        else:
            objects[key] = new
        change = Change(self.rv, kind, res.key, old, new)
        if len(self.history) == self.history.maxlen:
            self.oldest = self.history[0].rv
        self.history.append(change)
        for watch in self.watches:
            if watch.key == res.key:
                watch.queue.put_nowait(change)
        return new

    def _defaults(self, res: Resource, obj: Obj, old: Obj | None, wire: bool) -> None:
        """The defaulting a real server does that clients can see and tests may rely on."""
        spec = obj.get("spec")
        if res.key == "secrets":  # the API server stores stringData as data and never returns it
            plain = obj.pop("stringData", None) or {}
            data = obj.setdefault("data", {}) if plain else obj.get("data")
            for k, v in plain.items():
                data[k] = base64.b64encode(str(v).encode()).decode()
            obj.setdefault("type", "Opaque")
        if res.key == "services":
            spec = obj.setdefault("spec", {})
            spec.setdefault("type", "ClusterIP")
            spec.setdefault("sessionAffinity", "None")
            if not spec.get("clusterIP") and spec["type"] != "ExternalName":
                if old and _g(old, "spec.clusterIP"):
                    spec["clusterIP"] = old["spec"]["clusterIP"]
                else:
                    self.cluster_ips += 1
                    spec["clusterIP"] = f"10.96.{self.cluster_ips // 250}.{self.cluster_ips % 250 + 1}"
            if spec.get("clusterIP") and not spec.get("clusterIPs"):
                spec["clusterIPs"] = [spec["clusterIP"]]
            for port in spec.get("ports") or []:
                port.setdefault("protocol", "TCP")
                port.setdefault("targetPort", port.get("port"))
        elif res.key in ("deployments.apps", "statefulsets.apps", "replicasets.apps") and isinstance(
            spec, dict
        ):
            spec.setdefault("replicas", 1)
        elif res.key == "secrets":
            string_data = obj.pop("stringData", None) or {}
            data = obj.setdefault("data", {})
            for k, v in string_data.items():
                data[k] = base64.b64encode(str(v).encode()).decode()
            obj.setdefault("type", "Opaque")
        elif res.key == "namespaces":
            obj["metadata"].setdefault("labels", {})["kubernetes.io/metadata.name"] = obj["metadata"]["name"]
            if old is None and not obj.get("status"):
                obj["status"] = {"phase": "Active"}
        elif res.key == "pods" and old is None and not obj.get("status"):
            obj["status"] = {"phase": "Pending"}
        elif res.key == CRD_KEY:
            names = dict(_g(obj, "spec.names", {}))
            names.setdefault("singular", str(names.get("kind", "")).lower())
            names.setdefault("listKind", f"{names.get('kind', '')}List")
            stamp = now_timestamp()
            obj["status"] = {
                "acceptedNames": names,
                "conditions": [
                    {"type": t, "status": "True", "reason": r, "message": m, "lastTransitionTime": stamp}
                    for t, r, m in (
                        ("NamesAccepted", "NoConflicts", "no conflicts found"),
                        ("Established", "InitialNamesAccepted", "the initial names have been accepted"),
                    )
                ],
                "storedVersions": [v["name"] for v in _g(obj, "spec.versions", []) if v.get("storage")],
            }
            if old is not None and old.get("status") and _g(old, "status.acceptedNames") == names:
                obj["status"]["conditions"] = old["status"]["conditions"]

    def create(
        self, res: Resource, body: Obj, namespace: str | None, *, wire: bool, dry_run: bool = False
    ) -> Obj:
        obj = copy.deepcopy(body)
        meta = obj.setdefault("metadata", {})
        if not meta.get("name"):
            if not meta.get("generateName"):
                raise ApiError(
                    422, f"{res.kind}: metadata.name or generateName is required", details=_details(res, None)
                )
            suffix = "".join(random.choices(string.ascii_lowercase + string.digits, k=5))
            meta["name"] = meta["generateName"] + suffix
        name = meta["name"]
        if res.namespaced:
            if namespace and meta.get("namespace") and meta["namespace"] != namespace:
                raise ApiError(
                    400,
                    "the namespace of the provided object does not match the namespace sent on the request",
                )
            meta["namespace"] = namespace or meta.get("namespace") or "default"
            if self.get(self.resources["namespaces"], None, meta["namespace"]) is None:
                if wire:
                    raise not_found(self.resources["namespaces"], meta["namespace"])
                self.create(
                    self.resources["namespaces"], {"metadata": {"name": meta["namespace"]}}, None, wire=True
                )
        else:
            meta.pop("namespace", None)
        if self.get(res, meta.get("namespace"), name) is not None:
            raise ApiError(
                409, f'{res.key} "{name}" already exists', reason="AlreadyExists", details=_details(res, name)
            )
        for key in ("resourceVersion", "deletionTimestamp", "deletionGracePeriodSeconds", "managedFields"):
            meta.pop(key, None)
        meta.update(uid=str(uuid.uuid4()), creationTimestamp=now_timestamp(), generation=1)
        obj["apiVersion"], obj["kind"] = res.api_version(), res.kind
        if wire and res.status:
            obj.pop("status", None)
        self._defaults(res, obj, None, wire)
        if res.key == CRD_KEY:
            defined = crd_resources(obj)
            if not dry_run:
                self.resources[defined.key] = defined
        return self._commit(res, ADDED, None, obj, dry_run)

    def update(
        self,
        res: Resource,
        old: Obj,
        body: Obj,
        *,
        subresource: str | None,
        wire: bool,
        dry_run: bool = False,
    ) -> Obj:
        """A full-object write, as PUT and (after patching) PATCH do. On the wire, the main resource
        keeps the old status and the status subresource keeps everything but status; generation
        bumps when anything outside metadata (and status, when it is a subresource) changed; a
        write that changes nothing is not committed (no new resourceVersion, no event)."""
        if not isinstance(body, dict):
            raise ApiError(400, "the body must be a JSON object")
        old_meta, meta_in = old["metadata"], body.get("metadata") or {}
        name = old_meta["name"]
        if meta_in.get("name") not in (None, name):
            raise ApiError(
                400,
                f"the name of the object ({meta_in.get('name')}) does not match the name on the URL ({name})",
            )
        if meta_in.get("resourceVersion") and meta_in["resourceVersion"] != old_meta["resourceVersion"]:
            raise conflict(res, name, STALE)
        if meta_in.get("uid") and meta_in["uid"] != old_meta["uid"]:
            raise conflict(
                res,
                name,
                f"Precondition failed: UID in precondition: {meta_in['uid']}, "
                f"UID in object meta: {old_meta['uid']}",
            )
        if subresource == "status":
            new = {k: copy.deepcopy(v) for k, v in old.items() if k != "status"}
            if "status" in body:
                new["status"] = copy.deepcopy(body["status"])
        else:
            new = copy.deepcopy(body)
            meta = new["metadata"] = dict(new.get("metadata") or {})
            for key in (
                "uid",
                "creationTimestamp",
                "deletionTimestamp",
                "deletionGracePeriodSeconds",
                "generation",
                "namespace",
            ):
                if key in old_meta:
                    meta[key] = old_meta[key]
                else:
                    meta.pop(key, None)
            meta["name"] = name
            if wire and res.status:
                new.pop("status", None)
                if "status" in old:
                    new["status"] = copy.deepcopy(old["status"])
        new["apiVersion"], new["kind"] = res.api_version(), res.kind
        new["metadata"]["resourceVersion"] = old_meta["resourceVersion"]
        self._defaults(res, new, old, wire)
        if res.key == CRD_KEY:
            defined = crd_resources(new)
        ignored = {"metadata", "apiVersion", "kind", *(("status",) if res.status else ())}
        if {k: v for k, v in old.items() if k not in ignored} != {
            k: v for k, v in new.items() if k not in ignored
        }:
            new["metadata"]["generation"] = old_meta.get("generation", 1) + 1
        if new == old:
            return old
        if new["metadata"].get("deletionTimestamp") and not new["metadata"].get("finalizers"):
            return self._remove(res, old, new, dry_run)
        if res.key == CRD_KEY and not dry_run:
            self.resources[defined.key] = defined
        return self._commit(res, MODIFIED, old, new, dry_run)

    def patch(
        self,
        res: Resource,
        old: Obj,
        content_type: str,
        body: Any,
        *,
        subresource: str | None,
        wire: bool,
        dry_run: bool = False,
    ) -> Obj:
        if content_type == "application/json-patch+json":
            patched = json_patch(old, body)
        elif content_type in ("application/merge-patch+json", "application/apply-patch+yaml"):
            if not isinstance(body, dict):
                raise ApiError(400, "a merge patch must be a JSON object")
            patched = merge_patch(copy.deepcopy(old), body)
        elif content_type == "application/strategic-merge-patch+json":
            if res.crd:
                raise ApiError(415, "strategic merge patch is not supported for custom resources")
            if not isinstance(body, dict):
                raise ApiError(400, "a strategic merge patch must be a JSON object")
            patched = strategic_merge_patch(copy.deepcopy(old), body)
        else:
            raise ApiError(
                415,
                f"the body of the request was in an unknown format - accepted media types include: "
                f"application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml, "
                f"application/strategic-merge-patch+json (got {content_type!r})",
            )
        return self.update(res, old, patched, subresource=subresource, wire=wire, dry_run=dry_run)

    def delete(
        self, res: Resource, old: Obj, *, preconditions: Obj | None = None, dry_run: bool = False
    ) -> Obj:
        """Deletes, or with finalizers only marks deletionTimestamp (the finalizer's owner removes it)."""
        meta, name = old["metadata"], old["metadata"]["name"]
        pre = preconditions or {}
        if pre.get("uid") and pre["uid"] != meta["uid"]:
            raise conflict(
                res,
                name,
                f"Precondition failed: UID in precondition: {pre['uid']}, UID in object meta: {meta['uid']}",
            )
        if pre.get("resourceVersion") and pre["resourceVersion"] != meta["resourceVersion"]:
            raise conflict(
                res,
                name,
                f"Precondition failed: ResourceVersion in precondition: {pre['resourceVersion']}, "
                f"ResourceVersion in object meta: {meta['resourceVersion']}",
            )
        if meta.get("finalizers"):
            if meta.get("deletionTimestamp"):
                return old
            new = copy.deepcopy(old)
            new["metadata"].update(deletionTimestamp=now_timestamp(), deletionGracePeriodSeconds=0)
            return self._commit(res, MODIFIED, old, new, dry_run)
        return self._remove(res, old, copy.deepcopy(old), dry_run)

    def _remove(self, res: Resource, old: Obj, final: Obj, dry_run: bool) -> Obj:
        if dry_run:
            return final
        if res.key == "namespaces":
            for other in list(self.resources.values()):
                if other.namespaced:
                    for obj in self.list(other, final["metadata"]["name"]):
                        self._commit(other, DELETED, obj, copy.deepcopy(obj), False)
        if res.key == CRD_KEY:
            defined = crd_resources(old)
            for obj in self.list(defined, None):
                self._commit(defined, DELETED, obj, copy.deepcopy(obj), False)
            self.resources.pop(defined.key, None)
            for watch in self.watches:
                if watch.key == defined.key:
                    watch.queue.put_nowait(CLOSE)
        return self._commit(res, DELETED, old, final, False)

    def take_faults(self, verb: str, res: Resource, namespace: str | None) -> list[Fault]:
        hits = []
        for fault in list(self.faults):
            if fault.matches(verb, res.key, namespace):
                hits.append(fault)
                if fault.times is not None:
                    fault.times -= 1
                    if fault.times <= 0:
                        self.faults.remove(fault)
        return hits


def served(res: Resource, obj: Obj, version: str) -> Obj:
    """The stored object as a client of `version` sees it (no conversion: only apiVersion differs)."""
    return {**obj, "apiVersion": res.api_version(version), "kind": res.kind}


def table(res: Resource, version: str, objects: list[Obj], include: str, table_version: str, rv: int) -> Obj:
    """A meta.k8s.io Table, which kubectl asks for to print `get` output with server-side columns."""
    columns = res.table_columns(version)
    rows = []
    for obj in objects:
        row: Obj = {"cells": [col.cell(obj) for col in columns]}
        if include == "Object":
            row["object"] = served(res, obj, version)
        elif include != "None":
            row["object"] = {
                "kind": "PartialObjectMetadata",
                "apiVersion": f"meta.k8s.io/{table_version}",
                "metadata": obj["metadata"],
            }
        rows.append(row)
    return {
        "kind": "Table",
        "apiVersion": f"meta.k8s.io/{table_version}",
        "metadata": {"resourceVersion": str(rv)},
        "columnDefinitions": [col.definition() for col in columns],
        "rows": rows,
    }


def _media_params(accept: str) -> list[tuple[str, dict[str, str]]]:
    out = []
    for part in accept.split(","):
        pieces = [p.strip() for p in part.split(";")]
        params = dict(p.split("=", 1) for p in pieces[1:] if "=" in p)
        out.append((pieces[0].lower(), {k.strip(): v.strip() for k, v in params.items()}))
    return out


def table_version(accept: str) -> str | None:
    for media, params in _media_params(accept):
        if media == "application/json" and params.get("as") == "Table" and params.get("g") == "meta.k8s.io":
            if params.get("v") in ("v1", "v1beta1"):
                return params["v"]
    return None


def accepts_plain_json(accept: str) -> bool:
    """Whether the client takes a plain JSON answer; one that asked only for aggregated discovery or
    protobuf gets 406 and, like kubectl, falls back."""
    if not accept.strip():
        return True
    return any(
        media in ("application/json", "application/*", "*/*") and "as" not in params
        for media, params in _media_params(accept)
    )


def _truthy(value: str | None) -> bool:
    return value in ("1", "true", "True")


def quantity(value: str | int | float) -> str:
    """A resource.Quantity string: strings pass through, fractions become milli-units."""
    if isinstance(value, str):
        return value
    if float(value).is_integer():
        return str(int(value))
    return f"{round(value * 1000)}m"


# --- HTTP ---------------------------------------------------------------------------------------


def _json(body: Any, status: int = 200) -> web.Response:
    return web.Response(body=json.dumps(body).encode(), status=status, content_type="application/json")


class _Server:
    """The aiohttp application: routing from Kubernetes REST paths to the store."""

    def __init__(
        self, store: Store, *, token: str | None, bookmark_interval: float, address: Callable[[], str]
    ):
        self.store = store
        self.token = token
        self.bookmark_interval = bookmark_interval
        self.address = address
        self.calls: deque[Call] = deque(maxlen=20000)
        self.app = web.Application(client_max_size=32 * 1024 * 1024)
        self.app.router.add_route("*", "/{tail:.*}", self.handle)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        info: dict[str, Any] = {
            "verb": "",
            "resource": "",
            "namespace": None,
            "name": None,
            "subresource": None,
        }
        try:
            if self.token and request.path not in ("/version", "/healthz", "/livez", "/readyz"):
                if request.headers.get("Authorization") != f"Bearer {self.token}":
                    raise ApiError(401, "Unauthorized")
            response = await self.route(request, info)
        except ApiError as exc:
            response = _json(exc.status(), exc.code)
        except (json.JSONDecodeError, yaml.YAMLError, UnicodeDecodeError) as exc:
            response = _json(ApiError(400, f"invalid request body: {exc}").status(), 400)
        if not info.get("recorded"):
            self._record(request, info, response.status)
        return response

    def _record(self, request: web.Request, info: dict[str, Any], code: int) -> None:
        self.calls.append(
            Call(
                request.method,
                request.path,
                dict(request.query),
                info["verb"],
                info["resource"],
                info["namespace"],
                info["name"],
                info["subresource"],
                code,
            )
        )

    async def route(self, request: web.Request, info: dict[str, Any]) -> web.StreamResponse:
        parts = [p for p in request.path.split("/") if p]
        if request.path.rstrip("/") == "/version":
            return _json(SERVER_VERSION)
        if request.path.rstrip("/") in ("/healthz", "/livez", "/readyz"):
            return web.Response(text="ok")
        if parts[:1] == ["openapi"]:
            return self.openapi(parts[1:])
        if not parts or parts[0] not in ("api", "apis"):
            raise ApiError(404, "the server could not find the requested resource")
        discovery = len(parts) <= (2 if parts[0] == "api" else 3)
        if discovery and not accepts_plain_json(request.headers.get("Accept", "")):
            raise ApiError(406, "only plain JSON discovery is served here")
        if parts == ["api"]:
            return _json(
                {
                    "kind": "APIVersions",
                    "versions": ["v1"],
                    "serverAddressByClientCIDRs": [
                        {"clientCIDR": "0.0.0.0/0", "serverAddress": self.address()}
                    ],
                }
            )
        if parts == ["apis"]:
            return _json({"kind": "APIGroupList", "apiVersion": "v1", "groups": self.groups()})
        if parts[0] == "api":
            group, version, rest = "", parts[1], parts[2:]
        elif len(parts) == 2:
            group = next((g for g in self.groups() if g["name"] == parts[1]), None)
            if group is None:
                raise ApiError(404, "the server could not find the requested resource")
            return _json({"kind": "APIGroup", "apiVersion": "v1", **group})
        else:
            group, version, rest = parts[1], parts[2], parts[3:]
        if group in METRICS_VERSIONS:
            if version != METRICS_VERSIONS[group] or request.method != "GET":
                raise ApiError(
                    404 if request.method == "GET" else 405,
                    "the server could not find the requested resource",
                )
            return self.metrics(group, rest, request)
        if not rest:
            return self.resource_list(group, version)
        namespace: str | None = None
        if (
            rest[0] == "namespaces"
            and len(rest) >= 3
            and not (group == "" and len(rest) == 3 and rest[2] in ("status", "finalize"))
        ):
            namespace, rest = rest[1], rest[2:]
        if len(rest) > 3:
            raise ApiError(404, "the server could not find the requested resource")
        res = self.store.at_path(group, version, rest[0])
        name = rest[1] if len(rest) > 1 else None
        sub = rest[2] if len(rest) > 2 else None
        if (namespace is not None and not res.namespaced) or (
            sub is not None and (sub != "status" or not res.status)
        ):
            raise ApiError(404, "the server could not find the requested resource")
        info.update(resource=res.key, namespace=namespace, name=name, subresource=sub)
        return await self.resource(request, res, version, namespace, name, sub, info)

    def openapi(self, parts: list[str]) -> web.Response:
        """A minimal OpenAPI v3: per group-version, each kind's PATCH operation with the fieldValidation
        parameter. That is what kubectl apply checks to validate on the server side instead of
        downloading full schemas (without it, it insists on them); with no request body schemas it
        builds strategic merge patches from its compiled-in types. /openapi/v2 is a 404."""
        if parts[:1] != ["v3"]:
            raise ApiError(404, "the server could not find the requested resource")
        docs: dict[str, Obj] = {}
        for res in self.store.resources.values():
            for version in res.versions:
                prefix = f"apis/{res.group}/{version}" if res.group else f"api/{version}"
                doc = docs.setdefault(
                    prefix,
                    {
                        "openapi": "3.0.0",
                        "info": {"title": "Kubernetes", "version": SERVER_VERSION["gitVersion"]},
                        "paths": {},
                        "components": {"schemas": {}},
                    },
                )
                scope = "/namespaces/{namespace}" if res.namespaced else ""
                doc["paths"][f"/{prefix}{scope}/{res.plural}/{{name}}"] = {
                    "patch": {
                        "x-kubernetes-group-version-kind": {
                            "group": res.group,
                            "version": version,
                            "kind": res.kind,
                        },
                        "parameters": [
                            {"name": "fieldValidation", "in": "query", "schema": {"type": "string"}}
                        ],
                        "responses": {"200": {"description": "OK"}},
                    }
                }
        if len(parts) == 1:
            paths = {}
            for prefix, doc in sorted(docs.items()):
                digest = hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:32].upper()
                paths[prefix] = {"serverRelativeURL": f"/openapi/v3/{prefix}?hash={digest}"}
            return _json({"paths": paths})
        doc = docs.get("/".join(parts[1:]))
        if doc is None:
            raise ApiError(404, "the server could not find the requested resource")
        return _json(doc)

    def groups(self) -> list[Obj]:
        versions = self.store.group_versions()
        versions.pop("", None)
        for group, version in METRICS_VERSIONS.items():
            versions[group] = [version]
        return [
            {
                "name": group,
                "versions": [{"groupVersion": f"{group}/{v}", "version": v} for v in vs],
                "preferredVersion": {"groupVersion": f"{group}/{vs[0]}", "version": vs[0]},
            }
            for group, vs in versions.items()
        ]

    def resource_list(self, group: str, version: str) -> web.Response:
        resources = [
            entry
            for res in self.store.resources.values()
            if res.group == group and version in res.versions
            for entry in res.discovery()
        ]
        if not resources:
            raise ApiError(404, "the server could not find the requested resource")
        gv = f"{group}/{version}" if group else version
        resources.sort(key=lambda e: e["name"])
        return _json(
            {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": resources}
        )

    async def body(self, request: web.Request) -> Any:
        if "protobuf" in request.content_type or "cbor" in request.content_type:
            # Typed clients (`kubectl create ...`) try protobuf first and fall back to JSON on a 415.
            raise ApiError(415, f"the body of the request was in an unknown format: {request.content_type}")
        raw = await request.read()
        if not raw:
            raise ApiError(400, "the request body is empty")
        if "yaml" in request.content_type:
            return yaml.safe_load(raw)
        return json.loads(raw)

    async def resource(
        self,
        request: web.Request,
        res: Resource,
        version: str,
        namespace: str | None,
        name: str | None,
        sub: str | None,
        info: dict[str, Any],
    ) -> web.StreamResponse:
        store, query, method = self.store, request.query, request.method
        dry_run = bool(query.get("dryRun"))
        if method == "GET":
            verb = "get" if name else ("watch" if _truthy(query.get("watch")) else "list")
        else:
            verb = {
                "POST": "create",
                "PUT": "update",
                "PATCH": "patch",
                "DELETE": "delete" if name else "deletecollection",
            }.get(method, "")
            if not verb or (verb == "create" and name) or (verb in ("update", "patch") and not name):
                raise ApiError(
                    405, f"the server does not allow this method on the requested resource ({method})"
                )
        info["verb"] = verb
        for fault in store.take_faults(verb, res, namespace):
            if fault.delay:
                await asyncio.sleep(fault.delay)
            if fault.code:
                raise ApiError(fault.code, fault.message or f"injected fault on {verb} {res.key}")
        if sub == "status" and verb in ("update", "patch") and name:
            key = (res.key, namespace or "", name)
            if store.status_conflicts.get(key, 0) > 0:
                store.status_conflicts[key] -= 1
                raise conflict(res, name, STALE)
        tv = table_version(request.headers.get("Accept", ""))
        include = query.get("includeObject", "PartialObjectMetadata")
        if verb == "watch":
            return await self.watch(request, res, version, namespace, tv, include, info)
        if verb in ("list", "deletecollection"):
            items = store.list(
                res,
                namespace,
                parse_label_selector(query.get("labelSelector")),
                parse_field_selector(query.get("fieldSelector")),
            )
            if verb == "deletecollection":
                deleted = [store.delete(res, obj, dry_run=dry_run) for obj in items]
                return _json(self.list_body(res, version, deleted, None))
            items, token = self.page(items, query.get("limit"), query.get("continue"))
            if tv:
                body = table(res, version, items, include, tv, store.rv)
                if token:
                    body["metadata"]["continue"] = token
                return _json(body)
            return _json(self.list_body(res, version, items, token))
        if verb == "create":
            body = await self.body(request)
            if not isinstance(body, dict):
                raise ApiError(400, "the body must be a JSON object")
            if body.get("kind") not in (None, res.kind):
                raise ApiError(400, f"the kind of the body ({body.get('kind')}) does not match {res.kind}")
            obj = store.create(res, body, namespace, wire=True, dry_run=dry_run)
            return _json(served(res, obj, version), 201)
        assert name is not None
        old = store.get(res, namespace, name)
        if verb == "patch" and old is None and request.content_type == "application/apply-patch+yaml":
            body = await self.body(request)
            obj = store.create(
                res,
                {**body, "metadata": {**(body.get("metadata") or {}), "name": name}},
                namespace,
                wire=True,
                dry_run=dry_run,
            )
            return _json(served(res, obj, version), 201)
        if old is None:
            raise not_found(res, name)
        if verb == "get":
            if tv:
                return _json(table(res, version, [old], include, tv, store.rv))
            return _json(served(res, old, version))
        if verb == "update":
            obj = store.update(
                res, old, await self.body(request), subresource=sub, wire=True, dry_run=dry_run
            )
        elif verb == "patch":
            obj = store.patch(
                res,
                old,
                request.content_type,
                await self.body(request),
                subresource=sub,
                wire=True,
                dry_run=dry_run,
            )
        else:
            options: Any = {}
            with contextlib.suppress(ApiError, ValueError, yaml.YAMLError):  # DeleteOptions are optional
                options = await self.body(request) if request.can_read_body else {}
            preconditions = options.get("preconditions") if isinstance(options, dict) else None
            obj = store.delete(res, old, preconditions=preconditions, dry_run=dry_run)
        return _json(served(res, obj, version))

    def list_body(self, res: Resource, version: str, items: list[Obj], token: str | None) -> Obj:
        meta: Obj = {"resourceVersion": str(self.store.rv)}
        if token:
            meta["continue"] = token
        return {
            "kind": f"{res.kind}List",
            "apiVersion": res.api_version(version),
            "metadata": meta,
            "items": [served(res, obj, version) for obj in items],
        }

    def page(self, items: list[Obj], limit: str | None, token: str | None) -> tuple[list[Obj], str | None]:
        """limit/continue paging over the (namespace, name) order; the token is the last key served."""
        if token:
            try:
                after = json.loads(base64.urlsafe_b64decode(token.encode()))
            except ValueError:
                raise ApiError(410, "the provided continue parameter is too old", reason="Expired") from None
            items = [o for o in items if [o["metadata"].get("namespace", ""), o["metadata"]["name"]] > after]
        try:
            size = int(limit or 0)
        except ValueError:
            raise ApiError(400, f"invalid limit {limit!r}") from None
        if size > 0 and len(items) > size:
            items = items[:size]
            last = [items[-1]["metadata"].get("namespace", ""), items[-1]["metadata"]["name"]]
            return items, base64.urlsafe_b64encode(json.dumps(last).encode()).decode()
        return items, None

    async def watch(
        self,
        request: web.Request,
        res: Resource,
        version: str,
        namespace: str | None,
        tv: str | None,
        include: str,
        info: dict[str, Any],
    ) -> web.StreamResponse:
        """A watch stream: replay from history after the given resourceVersion (410 when compacted
        away), or synthetic ADDEDs for the current state, then live changes; bookmarks when asked."""
        store, query = self.store, request.query
        labels = parse_label_selector(query.get("labelSelector"))
        fields = parse_field_selector(query.get("fieldSelector"))
        bookmarks = _truthy(query.get("allowWatchBookmarks"))
        start = query.get("resourceVersion", "")
        try:
            since = int(start) if start not in ("", "0") else None
            timeout = float(query.get("timeoutSeconds") or 0)
        except ValueError:
            raise ApiError(400, "invalid resourceVersion or timeoutSeconds") from None
        watch = Watch(res, namespace, labels, fields, max(store.rv, since or 0), bookmarks)
        initial: list[tuple[str, Obj]] = []
        if since is None:
            initial = [(ADDED, obj) for obj in store.list(res, namespace, labels, fields)]
            if _truthy(query.get("sendInitialEvents")) and bookmarks:
                initial.append((BOOKMARK, self.bookmark(res, version, initial_end=True)))
        elif since < store.oldest:
            initial = [
                (
                    ERROR,
                    ApiError(
                        410, f"too old resource version: {since} ({store.oldest})", reason="Expired"
                    ).status(),
                )
            ]
        else:
            replay = Watch(res, namespace, labels, fields, since, bookmarks)
            initial = [e for e in (replay.event(c) for c in store.history) if e is not None]
        gone = bool(initial) and initial[0][0] == ERROR
        if not gone:
            store.watches.add(watch)
        response = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
        info["recorded"] = True
        self._record(request, info, 200)

        async def send(kind: str, obj: Obj) -> None:
            if tv and kind in (ADDED, MODIFIED, DELETED):
                obj = table(res, version, [obj], include, tv, int(obj["metadata"]["resourceVersion"]))
            elif kind in (ADDED, MODIFIED, DELETED):
                obj = served(res, obj, version)
            await response.write(json.dumps({"type": kind, "object": obj}).encode() + b"\n")

        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout if timeout else None
        next_bookmark = loop.time() + self.bookmark_interval if bookmarks else None
        try:
            await response.prepare(request)
            for kind, obj in initial:
                await send(kind, obj)
            while not gone:
                wakeups = [t for t in (deadline, next_bookmark) if t is not None]
                wait = min(wakeups) - loop.time() if wakeups else None
                if deadline is not None and loop.time() >= deadline:
                    break
                if next_bookmark is not None and loop.time() >= next_bookmark:
                    await send(BOOKMARK, self.bookmark(res, version))
                    next_bookmark = loop.time() + self.bookmark_interval
                    continue
                try:
                    item = await asyncio.wait_for(watch.queue.get(), wait)
                except TimeoutError:
                    continue
                if item == CLOSE:
                    break
                if item == ABORT:
                    if request.transport is not None:
                        request.transport.abort()
                    break
                if item == BOOKMARK_NOW:
                    if bookmarks:
                        await send(BOOKMARK, self.bookmark(res, version))
                    continue
                assert isinstance(item, Change)
                event = watch.event(item)
                if event is not None:
                    await send(*event)
            with contextlib.suppress(ConnectionError, RuntimeError):
                await response.write_eof()
        except ConnectionError:  # the client went away
            pass
        finally:
            store.watches.discard(watch)
        return response

    def bookmark(self, res: Resource, version: str, *, initial_end: bool = False) -> Obj:
        meta: Obj = {"resourceVersion": str(self.store.rv)}
        if initial_end:
            meta["annotations"] = {"k8s.io/initial-events-end": "true"}
        return {"kind": res.kind, "apiVersion": res.api_version(version), "metadata": meta}

    # metrics APIs

    def metrics(self, group: str, rest: list[str], request: web.Request) -> web.Response:
        store, version = self.store, METRICS_VERSIONS[group]
        gv = f"{group}/{version}"
        labels = parse_label_selector(request.query.get("labelSelector"))
        if not rest:
            return _json(
                {
                    "kind": "APIResourceList",
                    "apiVersion": "v1",
                    "groupVersion": gv,
                    "resources": self.metric_resources(group),
                }
            )
        namespace = None
        if rest[0] == "namespaces" and (
            len(rest) >= 3 and not (group == CUSTOM_METRICS_GROUP and len(rest) == 3)
        ):
            namespace, rest = rest[1], rest[2:]
        stamp = now_timestamp()
        if group == METRICS_GROUP:
            if rest[0] == "nodes":
                if len(rest) == 1:
                    return _json({"kind": "NodeMetricsList", "apiVersion": gv, "metadata": {}, "items": []})
                raise ApiError(404, f'nodemetrics.metrics.k8s.io "{rest[1]}" not found')
            if rest[0] != "pods" or len(rest) > 2:
                raise ApiError(404, "the server could not find the requested resource")
            fields = parse_field_selector(request.query.get("fieldSelector"))
            items = [
                {**m, "timestamp": stamp}
                for (ns, _), m in sorted(store.pod_metrics.items())
                if (namespace is None or ns == namespace)
                and labels_match(labels, m["metadata"].get("labels"))
                and fields_match(fields, m)
            ]
            if len(rest) == 2:
                found = [m for m in items if m["metadata"]["name"] == rest[1]]
                if not found:
                    raise ApiError(404, f'podmetrics.metrics.k8s.io "{rest[1]}" not found')
                return _json(found[0])
            return _json({"kind": "PodMetricsList", "apiVersion": gv, "metadata": {}, "items": items})
        if group == EXTERNAL_METRICS_GROUP:
            if namespace is None or len(rest) != 1:
                raise ApiError(404, "the server could not find the requested resource")
            series = store.external_metrics.get((namespace, rest[0]))
            if series is None:
                raise ApiError(404, f'external metric "{rest[0]}" not found in namespace "{namespace}"')
            items = [
                {"metricName": rest[0], "metricLabels": s["labels"], "timestamp": stamp, "value": s["value"]}
                for s in series
                if labels_match(labels, s["labels"])
            ]
            return _json(
                {"kind": "ExternalMetricValueList", "apiVersion": gv, "metadata": {}, "items": items}
            )
        if len(rest) != 3:
            raise ApiError(404, "the server could not find the requested resource")
        resource, name, metric = rest
        metric_labels = parse_label_selector(request.query.get("metricLabelSelector"))
        matches = []
        for (res_name, ns, obj_name, metric_name), entry in sorted(store.custom_metrics.items()):
            if res_name != resource or metric_name != metric or ns != (namespace or ""):
                continue
            if name != "*" and obj_name != name:
                continue
            if not labels_match(metric_labels, entry["metricLabels"]):
                continue
            if name == "*" and not labels_match(labels, self.object_labels(entry)):
                continue
            value: Obj = {
                "describedObject": entry["describedObject"],
                "metric": {"name": metric},
                "timestamp": stamp,
                "windowSeconds": entry["windowSeconds"],
                "value": entry["value"],
            }
            if entry["metricLabels"]:
                value["metric"]["selector"] = {"matchLabels": entry["metricLabels"]}
            matches.append(value)
        if not matches and name != "*":
            raise ApiError(404, f"the server could not find the metric {metric} for {resource} {name}")
        return _json({"kind": "MetricValueList", "apiVersion": gv, "metadata": {}, "items": matches})

    def object_labels(self, entry: Obj) -> Mapping[str, str]:
        """A custom metric's object labels: the live object's when it exists, else those given."""
        described = entry["describedObject"]
        with contextlib.suppress(ApiError):
            obj = self.store.get(
                self.store.resolve(entry["resource"]), described.get("namespace"), described["name"]
            )
            if obj is not None:
                return obj["metadata"].get("labels") or {}
        return entry["labels"]

    def metric_resources(self, group: str) -> list[Obj]:
        def entry(name: str, namespaced: bool, kind: str, verbs: list[str]) -> Obj:
            return {"name": name, "singularName": "", "namespaced": namespaced, "kind": kind, "verbs": verbs}

        if group == METRICS_GROUP:
            return [
                entry("nodes", False, "NodeMetrics", ["get", "list"]),
                entry("pods", True, "PodMetrics", ["get", "list"]),
            ]
        # Never an empty list: kubectl reports an empty group as a discovery error. With no metric
        # set, a placeholder stands in (KEDA's adapter likewise always lists "externalmetrics").
        if group == EXTERNAL_METRICS_GROUP:
            names = sorted({"externalmetrics", *(metric for _, metric in self.store.external_metrics)})
            return [entry(n, True, "ExternalMetricValueList", ["get"]) for n in names]
        pairs = sorted({(r, ns != "", m) for r, ns, _, m in self.store.custom_metrics}) or [
            ("pods", True, "*")
        ]
        return [entry(f"{r}/{m}", namespaced, "MetricValueList", ["get"]) for r, namespaced, m in pairs]


# --- The harness --------------------------------------------------------------------------------


def find_kubectl() -> str | None:
    """$KUBECTL, then kubectl on PATH, then /usr/bin/kubectl."""
    for candidate in (os.environ.get("KUBECTL"), shutil.which("kubectl"), "/usr/bin/kubectl"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


class FakeApiServer:
    """The test double on 127.0.0.1 in a background thread; every method is thread-safe and sync
    unless marked async. Use as `async with` or `with`; helpers address resources as kubectl does
    ("services", "svc", "Deployment", "deployments.apps", a CRD's plural/kind/short name).

    crds: CustomResourceDefinitions to serve from the start (mappings, YAML paths or YAML text;
        other kinds in those documents are ignored). More can be created at run time.
    port: 0 picks a free one (read `.port` / `.url` after start).
    token: when set, every API request needs `Authorization: Bearer <token>` (401 otherwise) and
        the kubeconfig carries it. kubectl (client-go) sends no bearer token over plain http, so
        leave it None for tests that run kubectl.
    bookmark_interval: seconds between BOOKMARK events on watches that allowed them.
    history: how many changes are kept for watches to resume from (older: 410 Expired).
    namespaces: created at start.
    """

    def __init__(
        self,
        crds: Iterable[str | Path | Mapping[str, Any]] = (),
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        token: str | None = None,
        bookmark_interval: float = 1.0,
        history: int = 1000,
        namespaces: Iterable[str] = ("default", "kube-system", "kube-public"),
    ):
        self._crds = list(crds)
        self._host, self._port = host, port
        self.token = token
        self._store = Store(history)
        self._server = _Server(
            self._store,
            token=token,
            bookmark_interval=bookmark_interval,
            address=lambda: f"{host}:{self.port}",
        )
        self._namespaces = list(namespaces)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self.port = 0

    # lifecycle

    @property
    def url(self) -> str:
        return f"http://{self._host}:{self.port}"

    def start(self) -> FakeApiServer:
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            self._loop = loop
            try:
                loop.run_until_complete(self._startup())
            except BaseException as exc:  # noqa: BLE001 - handed to the starting thread
                failure.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            loop.run_forever()
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

        self._thread = threading.Thread(target=run, name="fake-kube-apiserver", daemon=True)
        self._thread.start()
        if not ready.wait(15):
            raise RuntimeError("fake kube-apiserver did not start in 15 s")
        if failure:
            raise failure[0]
        self._tmp = tempfile.TemporaryDirectory(prefix="fake-kube-")
        self.kubeconfig(Path(self._tmp.name) / "kubeconfig")
        try:
            for ns in self._namespaces:
                self.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
            for source in self._crds:
                for doc in load_documents(source):
                    if doc.get("kind") == "CustomResourceDefinition":
                        self.create(doc)
        except BaseException:
            self.stop()
            raise
        return self

    async def _startup(self) -> None:
        self._runner = web.AppRunner(
            self._server.app, handler_cancellation=True, shutdown_timeout=1.0, access_log=None
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host, self._port)
        await site.start()
        self.port = int(self._runner.addresses[0][1])

    async def _shutdown(self) -> None:
        for watch in list(self._store.watches):
            watch.queue.put_nowait(CLOSE)
        await asyncio.sleep(0)
        if self._runner is not None:
            await self._runner.cleanup()

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None and self._thread.is_alive():
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(15)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(15)
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> FakeApiServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def __aenter__(self) -> FakeApiServer:
        return await asyncio.to_thread(self.start)

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.to_thread(self.stop)

    def _call(self, fn: Callable[[], Any]) -> Any:
        """Runs fn on the server's loop (all state lives there) and returns its result or raises."""
        if self._loop is None:
            raise RuntimeError("FakeApiServer is not started")
        if threading.current_thread() is self._thread:
            return fn()

        async def wrapper() -> Any:
            return fn()

        return asyncio.run_coroutine_threadsafe(wrapper(), self._loop).result(15)

    # clients

    def kubeconfig(self, path: str | Path, *, namespace: str = "default") -> Path:
        """Writes a kubeconfig (plain http, bearer token when set) for kubectl and kubernetes.config."""
        user: Obj = {"token": self.token} if self.token else {}
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": "fake", "user": user}],
            "contexts": [
                {"name": "fake", "context": {"cluster": "fake", "user": "fake", "namespace": namespace}}
            ],
            "current-context": "fake",
        }
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(config))
        return path

    @property
    def kubeconfig_path(self) -> Path:
        """The kubeconfig the harness wrote for itself at start."""
        assert self._tmp is not None, "FakeApiServer is not started"
        return Path(self._tmp.name) / "kubeconfig"

    def kubectl_command(self, *args: str) -> list[str]:
        """argv for kubectl against this server (own kubeconfig and discovery cache dir)."""
        binary = find_kubectl()
        if binary is None:
            raise FileNotFoundError("kubectl not found (set $KUBECTL or put it on PATH)")
        cache = self.kubeconfig_path.parent / "cache"
        return [binary, f"--kubeconfig={self.kubeconfig_path}", f"--cache-dir={cache}", *args]

    async def kubectl(
        self, *args: str, timeout: float = 30.0, check: bool = True, input: str | None = None
    ) -> tuple[int, str, str]:
        """Runs kubectl against this server: (returncode, stdout, stderr); check=True raises on failure."""
        proc = await asyncio.create_subprocess_exec(
            *self.kubectl_command(*args),
            stdin=asyncio.subprocess.PIPE if input is not None else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            out, err = await asyncio.wait_for(proc.communicate(input.encode() if input else None), timeout)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise TimeoutError(f"kubectl {' '.join(args)} took over {timeout} s") from None
        code, stdout, stderr = proc.returncode or 0, out.decode(), err.decode()
        if check and code != 0:
            raise RuntimeError(f"kubectl {' '.join(args)} failed ({code}):\n{stdout}{stderr}")
        return code, stdout, stderr

    # objects

    def create(self, obj: Mapping[str, Any]) -> Obj:
        """Creates an object as given, status included (a fixture, not a wire create); a missing
        namespace is created. Raises ApiError (409 AlreadyExists...)."""

        def run() -> Obj:
            res, _ = self._store.for_object(obj)
            return copy.deepcopy(self._store.create(res, dict(obj), None, wire=False))

        return self._call(run)

    def upsert(self, obj: Mapping[str, Any]) -> Obj:
        """Creates, or replaces the whole object (status included) when it exists."""

        def run() -> Obj:
            res, _ = self._store.for_object(obj)
            meta = obj.get("metadata") or {}
            old = self._store.get(res, meta.get("namespace") or "default", meta.get("name", ""))
            if old is None:
                return copy.deepcopy(self._store.create(res, dict(obj), None, wire=False))
            body = copy.deepcopy(dict(obj))
            body.setdefault("metadata", {}).pop("resourceVersion", None)
            return copy.deepcopy(self._store.update(res, old, body, subresource=None, wire=False))

        return self._call(run)

    def load(self, source: str | Path | Mapping[str, Any]) -> list[Obj]:
        """Upserts every object of a YAML/JSON file, YAML text or mapping (CRDs first)."""
        docs = load_documents(source)
        docs.sort(key=lambda d: d.get("kind") != "CustomResourceDefinition")
        return [self.upsert(doc) for doc in docs]

    def get(self, resource: str, name: str, namespace: str | None = "default") -> Obj | None:
        """The object (a copy) or None."""

        def run() -> Obj | None:
            res = self._store.resolve(resource)
            obj = self._store.get(res, namespace, name)
            return None if obj is None else copy.deepcopy(served(res, obj, res.versions[0]))

        return self._call(run)

    def list(
        self, resource: str, namespace: str | None = None, label_selector: str | None = None
    ) -> list[Obj]:
        """Objects (copies) in namespace, or in all namespaces when None."""

        def run() -> list[Obj]:
            res = self._store.resolve(resource)
            items = self._store.list(res, namespace, parse_label_selector(label_selector))
            return [copy.deepcopy(served(res, o, res.versions[0])) for o in items]

        return self._call(run)

    def replace(self, obj: Mapping[str, Any]) -> Obj:
        """Replaces the whole object, status included; metadata.resourceVersion, when set, must be current."""

        def run() -> Obj:
            res, _ = self._store.for_object(obj)
            meta = obj.get("metadata") or {}
            old = self._store.get(res, meta.get("namespace") or "default", meta.get("name", ""))
            if old is None:
                raise not_found(res, meta.get("name", ""))
            return copy.deepcopy(self._store.update(res, old, dict(obj), subresource=None, wire=False))

        return self._call(run)

    def patch(
        self,
        resource: str,
        name: str,
        patch: Any,
        *,
        namespace: str | None = "default",
        type: str = "merge",
        status: bool = False,
    ) -> Obj:
        """Patches (type: merge, strategic or json); status=True writes through the status subresource."""
        content_type = {
            "merge": "application/merge-patch+json",
            "strategic": "application/strategic-merge-patch+json",
            "json": "application/json-patch+json",
        }[type]

        def run() -> Obj:
            res = self._store.resolve(resource)
            old = self._store.get(res, namespace, name)
            if old is None:
                raise not_found(res, name)
            sub = "status" if status else None
            return copy.deepcopy(
                self._store.patch(res, old, content_type, patch, subresource=sub, wire=status)
            )

        return self._call(run)

    def set_status(self, resource: str, name: str, status: Obj, namespace: str | None = "default") -> Obj:
        """Replaces `status` as a status-subresource write would (generation unchanged)."""

        def run() -> Obj:
            res = self._store.resolve(resource)
            old = self._store.get(res, namespace, name)
            if old is None:
                raise not_found(res, name)
            return copy.deepcopy(
                self._store.update(res, old, {"status": status}, subresource="status", wire=True)
            )

        return self._call(run)

    def delete(self, resource: str, name: str, namespace: str | None = "default") -> Obj | None:
        """Deletes (or, with finalizers, marks for deletion); None when it did not exist."""

        def run() -> Obj | None:
            res = self._store.resolve(resource)
            old = self._store.get(res, namespace, name)
            return None if old is None else copy.deepcopy(self._store.delete(res, old))

        return self._call(run)

    @property
    def resource_version(self) -> int:
        """The global resourceVersion counter (the last committed write)."""
        return int(self._call(lambda: self._store.rv))

    @property
    def calls(self) -> list[Call]:
        """Every request served so far, oldest first (a watch is recorded when it starts)."""
        return list(self._call(lambda: list(self._server.calls)))

    # faults and watch control

    def fail(
        self,
        resource: str,
        *,
        verbs: Iterable[str] = ("list", "watch"),
        code: int = 500,
        times: int | None = 1,
        namespace: str | None = None,
        message: str = "",
    ) -> None:
        """The next `times` requests (None: all until clear_faults) of these verbs on the resource
        answer `code` with a Status (500 InternalError, 503 ServiceUnavailable, 429, 504...).
        Verbs: get, list, watch, create, update, patch, delete, deletecollection."""
        self._add_fault(resource, verbs, code, 0.0, times, namespace, message)

    def slow(
        self,
        resource: str,
        seconds: float,
        *,
        verbs: Iterable[str] = ("get", "list", "watch"),
        times: int | None = None,
        namespace: str | None = None,
    ) -> None:
        """Delays requests of these verbs on the resource by `seconds` before answering normally."""
        self._add_fault(resource, verbs, None, seconds, times, namespace, "")

    def _add_fault(
        self,
        resource: str,
        verbs: Iterable[str],
        code: int | None,
        delay: float,
        times: int | None,
        namespace: str | None,
        message: str,
    ) -> None:
        def run() -> None:
            key = self._store.resolve(resource).key
            self._store.faults.append(Fault(key, frozenset(verbs), code, delay, times, namespace, message))

        self._call(run)

    def clear_faults(self) -> None:
        """Removes every injected fault, delay and pending status conflict."""

        def run() -> None:
            self._store.faults.clear()
            self._store.status_conflicts.clear()

        self._call(run)

    def conflict_status_writes(
        self, resource: str, name: str, times: int = 1, namespace: str | None = "default"
    ) -> None:
        """The next `times` PUT/PATCH of this object's /status answer 409 Conflict (as after a race)."""

        def run() -> None:
            res = self._store.resolve(resource)
            key = (res.key, namespace or "" if res.namespaced else "", name)
            self._store.status_conflicts[key] = self._store.status_conflicts.get(key, 0) + times

        self._call(run)

    def compact(self) -> int:
        """Forgets the change history: a watch from any resourceVersion older than now gets 410 Expired.
        Returns the current resourceVersion (a watch from it or later still works)."""

        def run() -> int:
            self._store.history.clear()
            self._store.oldest = self._store.rv
            return self._store.rv

        return int(self._call(run))

    def drop_watches(self, resource: str | None = None, *, abrupt: bool = False) -> int:
        """Ends open watch streams (all, or one resource's): cleanly as on a server timeout, or with
        abrupt=True by cutting the connection mid-stream. Returns how many."""

        def run() -> int:
            key = None if resource is None else self._store.resolve(resource).key
            hit = [w for w in self._store.watches if key is None or w.key == key]
            for watch in hit:
                watch.queue.put_nowait(ABORT if abrupt else CLOSE)
            return len(hit)

        return int(self._call(run))

    def bookmark(self, resource: str | None = None) -> int:
        """Sends a BOOKMARK now on every open watch that allowed bookmarks; returns how many."""

        def run() -> int:
            key = None if resource is None else self._store.resolve(resource).key
            hit = [w for w in self._store.watches if w.bookmarks and (key is None or w.key == key)]
            for watch in hit:
                watch.queue.put_nowait(BOOKMARK_NOW)
            return len(hit)

        return int(self._call(run))

    def watch_count(self, resource: str | None = None) -> int:
        """Open watch streams (all, or on one resource)."""

        def run() -> int:
            key = None if resource is None else self._store.resolve(resource).key
            return sum(1 for w in self._store.watches if key is None or w.key == key)

        return int(self._call(run))

    async def wait_for_watches(
        self, resource: str | None = None, count: int = 1, timeout: float = 10.0
    ) -> None:
        """Waits until at least `count` watches are open (e.g. until a controller's informer started)."""
        deadline = time.monotonic() + timeout
        while self.watch_count(resource) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"fewer than {count} watches on {resource or 'any resource'} after {timeout} s"
                )
            await asyncio.sleep(0.02)

    # metrics

    def set_pod_metrics(
        self,
        namespace: str,
        name: str,
        containers: Mapping[str, Mapping[str, str | int | float]],
        *,
        labels: Mapping[str, str] | None = None,
        window: str = "30s",
    ) -> None:
        """PodMetrics for metrics.k8s.io: containers maps container name to usage, e.g.
        {"app": {"cpu": "250m", "memory": "64Mi"}}; labels default to the pod's, if it exists."""

        def run() -> None:
            pod = self._store.get(self._store.resources["pods"], namespace, name)
            pod_labels = dict(
                labels if labels is not None else (pod or {}).get("metadata", {}).get("labels") or {}
            )
            self._store.pod_metrics[(namespace, name)] = {
                "kind": "PodMetrics",
                "apiVersion": f"{METRICS_GROUP}/v1beta1",
                "metadata": {
                    "name": name,
                    "namespace": namespace,
                    "labels": pod_labels,
                    "creationTimestamp": now_timestamp(),
                },
                "window": window,
                "containers": [
                    {"name": c, "usage": {k: quantity(v) for k, v in usage.items()}}
                    for c, usage in containers.items()
                ],
            }

        self._call(run)

    def delete_pod_metrics(self, namespace: str, name: str) -> None:
        self._call(lambda: self._store.pod_metrics.pop((namespace, name), None))

    def set_custom_metric(
        self,
        resource: str,
        name: str,
        metric: str,
        value: str | int | float,
        *,
        namespace: str | None = "default",
        labels: Mapping[str, str] | None = None,
        metric_labels: Mapping[str, str] | None = None,
        window_seconds: int = 60,
    ) -> None:
        """A custom.metrics.k8s.io/v1beta2 value for one object (resource: "pods", "services",
        "deployments.apps"...; namespace None for cluster-scoped ones such as namespaces). The `*`
        form's labelSelector matches the live object's labels, else `labels`."""

        def run() -> None:
            res = self._store.resolve(resource)
            described = {"kind": res.kind, "name": name, "apiVersion": res.api_version()}
            if namespace:
                described["namespace"] = namespace
            self._store.custom_metrics[(res.plural, namespace or "", name, metric)] = {
                "resource": res.key,
                "describedObject": described,
                "value": quantity(value),
                "labels": dict(labels or {}),
                "metricLabels": dict(metric_labels or {}),
                "windowSeconds": window_seconds,
            }

        self._call(run)

    def set_external_metric(
        self,
        namespace: str,
        metric: str,
        value: str | int | float,
        *,
        labels: Mapping[str, str] | None = None,
    ) -> None:
        """One series of an external.metrics.k8s.io metric; series differ by labels, which the
        request's labelSelector filters."""

        def run() -> None:
            series = self._store.external_metrics.setdefault((namespace, metric), [])
            wanted = dict(labels or {})
            series[:] = [s for s in series if s["labels"] != wanted]
            series.append({"labels": wanted, "value": quantity(value)})

        self._call(run)

    def clear_external_metric(self, namespace: str, metric: str) -> None:
        self._call(lambda: self._store.external_metrics.pop((namespace, metric), None))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Kubernetes API server test double on loopback")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--kubeconfig", help="write a kubeconfig for kubectl here")
    parser.add_argument("--crd", action="append", default=[], help="CRD YAML file (repeatable)")
    parser.add_argument(
        "--load", action="append", default=[], help="YAML file of objects to create (repeatable)"
    )
    parser.add_argument("--token", default="", help="bearer token to require (default: none)")
    parser.add_argument("--bookmark-interval", type=float, default=1.0)
    args = parser.parse_args(argv)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with FakeApiServer(
        [Path(p) for p in args.crd],
        host=args.host,
        port=args.port,
        token=args.token or None,
        bookmark_interval=args.bookmark_interval,
    ) as api:
        for path in args.load:
            api.load(Path(path))
        if args.kubeconfig:
            api.kubeconfig(args.kubeconfig)
        print(
            f"fake kube-apiserver serving on {api.url}"
            + (f", kubeconfig {args.kubeconfig}" if args.kubeconfig else ""),
            flush=True,
        )
        try:
            while not stop.wait(0.5):
                pass
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
