"""Turning YAML text into typed objects: one place that knows every kind Overspill reads."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from api.crd import (
    MODEL_API,
    POLICY_API,
    InvalidObject,
    ObjectKey,
    parse_model_deployment,
    parse_policy,
)
from reconciler.kube import parse_endpoint_slice, parse_secret, parse_service, parse_workload

_STR, _MAP, _SEQ = "tag:yaml.org,2002:str", "tag:yaml.org,2002:map", "tag:yaml.org,2002:seq"


class Loader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]
    """libyaml's parser when PyYAML was built with it (the wheels are: 8x faster than pure
    Python), with the implicit tag of a plain scalar remembered: manifests repeat the same
    keys and values, and PyYAML's resolver runs a regex table for each one."""

    _tags: dict[tuple[str, tuple[bool, bool]], str] = {}

    def resolve(self, kind: type, value: Any, implicit: Any) -> str:
        if kind is not yaml.ScalarNode:
            return _MAP if kind is yaml.MappingNode else _SEQ
        key = (value, implicit)
        tag = self._tags.get(key)
        if tag is None:
            if len(self._tags) > 100_000:  # a bound, for long runs of ever-new values
                self._tags.clear()
            tag = self._tags[key] = super().resolve(kind, value, implicit)
        return tag


Parser = Callable[[Any], Any]
PARSERS: dict[tuple[str, str], Parser] = {
    (MODEL_API, "ModelDeployment"): parse_model_deployment,
    (POLICY_API, "Policy"): parse_policy,
    ("v1", "Service"): parse_service,
    ("v1", "Secret"): parse_secret,
    ("discovery.k8s.io/v1", "EndpointSlice"): parse_endpoint_slice,
    **{
        ("apps/v1", k): (lambda raw, k=k: parse_workload(raw, k))
        for k in ("Deployment", "StatefulSet", "ReplicaSet", "DaemonSet")
    },
}


@dataclass(frozen=True)
class Rejected:
    """A document that could not be used, kept so its errors show on status, logs and /metrics.

    `key` is None when not even the object's identity could be read (e.g. broken YAML).
    """

    origin: str
    key: ObjectKey | None
    errors: tuple[str, ...]

    def __str__(self) -> str:
        return "; ".join(self.errors)


ParsedFile = tuple[list[Any], list[Rejected]]  # a file's objects, and its documents rejected


@dataclass(frozen=True)
class Limits:
    """How much one manifest file may ask of the control plane.

    Past a limit a document (or, for size, the file) is refused with the reason before it costs
    more: a YAML alias bomb is a few hundred bytes that expand to a billion nodes in whatever
    walks them (a parser, `str`, a status diff), and deep nesting exhausts the recursion that
    builds objects. Aliases are counted as the nodes they add, summed over the file.
    """

    max_bytes: int = 64 << 20  # a file of 10,000 models (three objects each) is 15 MB
    max_depth: int = 64  # a ModelDeployment nests 8 deep; 500 at most (the builders recurse)
    max_alias_nodes: int = 100_000  # nodes aliases may add to a file beyond those written


LIMITS = Limits()
DEPTH_CEILING = 500  # what `_construct`'s recursion (and PyYAML's) can take


class Refused(ValueError):
    """A document past a `Limits` bound; `key` names its object where that can be read."""

    def __init__(self, message: str, key: ObjectKey | None = None):
        super().__init__(message)
        self.key = key


class _TooDeep(Exception):
    """Raised by `_construct` past its depth; `_load` words it (the builder knows only its room)."""


def parse_documents(text: str, origin: str, limits: Limits = LIMITS) -> tuple[list[Any], list[Rejected]]:
    """Every known object in a (multi-document) YAML text; `kind: List` items are unpacked.

    Never raises: broken YAML, a tag whose value does not convert (`!!timestamp 2020-13-45`) and
    documents past `limits` become `Rejected` entries that name the file (and the object, where
    its identity can be read)."""
    try:
        loaded = [d for d in _load(text, limits) if d is not None]
    except Exception as exc:  # libyaml's errors, and a constructor's ValueError on a tagged scalar
        return [], [Rejected(origin, None, (f"{origin}: malformed YAML: {_one_line(exc)}",))]
    objects: list[Any] = []
    rejected: list[Rejected] = []
    queue = list(loaded)
    while queue:
        doc = queue.pop(0)
        if isinstance(doc, Refused):
            rejected.append(
                Rejected(origin, doc.key, (f"{origin}: {doc.key or 'a document'}: refused: {doc}",))
            )
            continue
        if not isinstance(doc, dict):
            rejected.append(Rejected(origin, None, (f"{origin}: a document must be a mapping",)))
            continue
        if doc.get("kind") == "List" or str(doc.get("kind", "")).endswith("List"):
            items = doc.get("items")
            if items is not None and not isinstance(items, list):
                rejected.append(Rejected(origin, None, (f"{origin}: items of a List must be a list",)))
                continue
            queue[:0] = [i for i in items or [] if i is not None]
            continue
        if (str(doc.get("apiVersion", "")), str(doc.get("kind", ""))) not in PARSERS:
            continue  # other kinds in the same directory are not ours to judge
        obj, rejection = parse_object(doc, origin)
        if obj is not None:
            objects.append(obj)
        if rejection is not None:
            rejected.append(rejection)
    return objects, rejected


def parse_file(path: Path | str, limits: Limits = LIMITS) -> ParsedFile:
    """`parse_documents` of a file; one too large, unreadable or not UTF-8 is rejected whole,
    and a large one is not read past the limit (its size is checked first, then the read stops)."""
    origin = str(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            data = f.read(limits.max_bytes + 1) if size <= limits.max_bytes else b""
        if size > limits.max_bytes or len(data) > limits.max_bytes:
            reason = f"larger than {limits.max_bytes:,} bytes (--max-manifest-bytes)"
            return [], [Rejected(origin, None, (f"{origin}: refused: {reason}",))]
        text = data.decode()
    except OSError as exc:
        return [], [Rejected(origin, None, (f"{origin}: unreadable: {exc.strerror or exc}",))]
    except UnicodeDecodeError as exc:
        return [], [Rejected(origin, None, (f"{origin}: not UTF-8 text: {exc}",))]
    return parse_documents(text, origin, limits)


def load_all(text: str, limits: Limits = LIMITS) -> list[Any]:
    """`yaml.safe_load_all`, within `limits` (raises `Refused` past them)."""
    docs = _load(text, limits)
    for doc in docs:
        if isinstance(doc, Refused):
            raise doc
    return docs


def _load(text: str, limits: Limits) -> list[Any]:
    """Each document built, or the `Refused` that stands for it.

    Strings, mappings and lists are built here: PyYAML's constructor costs more than libyaml's
    parser, and manifests are mostly those three. Every other node (numbers, booleans, null,
    timestamps, merge keys) goes to PyYAML's safe constructor, and an alias is the same object
    twice, as there: so building costs what is written, and an alias is charged to the file's
    budget the nodes it would add expanded, measured on libyaml's graph (`_Aliases`)."""
    loader = Loader(text)
    depth = min(limits.max_depth, DEPTH_CEILING)
    aliases = _Aliases(limits.max_alias_nodes)
    try:
        docs: list[Any] = []
        while loader.check_node():
            node = loader.get_node()
            try:
                docs.append(_construct(node, loader, {}, depth, aliases))
            except _TooDeep:
                docs.append(Refused(_too_deep(depth), _key_of_node(node)))
            except Refused as refused:
                refused.key = _key_of_node(node)
                docs.append(refused)
        return docs
    finally:
        loader.dispose()


def _construct(node: yaml.Node, loader: Any, built: dict[int, Any], room: int, aliases: _Aliases) -> Any:
    """The object of `node`, `room` levels allowed below it (refused deeper)."""
    if room <= 0:
        raise _TooDeep
    tag = node.tag
    if tag == _STR:
        return node.value
    if id(node) in built:  # an alias (a node met again)
        aliases.charge(node, room)
        return built[id(node)]
    if tag == _MAP and all(k.tag == _STR for k, _ in node.value):  # else merge keys, odd keys
        out: dict[str, Any] = {}
        built[id(node)] = out
        for k, v in node.value:
            out[k.value] = _construct(v, loader, built, room - 1, aliases)
        return out
    if tag == _SEQ:
        items: list[Any] = []
        built[id(node)] = items
        items.extend(_construct(v, loader, built, room - 1, aliases) for v in node.value)
        return items
    if not isinstance(node, yaml.ScalarNode):  # PyYAML's constructor recurses and expands merges
        aliases.charge(node, room)
    return loader.construct_object(node, deep=True)


class _Aliases:
    """The nodes a file's aliases add when expanded, against `Limits.max_alias_nodes`.

    An alias costs nothing to build (it is the same object again) but whatever walks the result
    (a parser, `str`, a status diff) walks it expanded: a billion laughs is a billion nodes.
    Each aliased node's expanded size is measured once, iteratively, on libyaml's node graph,
    so the bomb costs what its few dozen written nodes cost; a node that contains an alias to
    itself expands without end and is refused."""

    def __init__(self, limit: int):
        self.limit = limit
        self.added = 0
        self._size: dict[int, int] = {}
        self._height: dict[int, int] = {}

    def charge(self, node: yaml.Node, room: int) -> None:
        self.added += self._measure(node, room)
        if self.added > self.limit:
            raise Refused(
                f"aliases expand the file by more than {self.limit:,} nodes (--max-manifest-alias-nodes)"
            )

    def _measure(self, root: yaml.Node, max_depth: int) -> int:
        size, height = self._size, self._height
        open_: set[int] = set()  # the nodes on the path being walked
        stack: list[tuple[yaml.Node, int, bool]] = [(root, 1, False)]
        while stack:
            node, depth, finished = stack.pop()
            nid = id(node)
            kids = _children(node)
            if finished:
                open_.discard(nid)
                size[nid] = 1 + sum(size[id(k)] for k in kids)
                height[nid] = 1 + max((height[id(k)] for k in kids), default=0)
                continue
            if nid in size:  # measured already: its height still counts from here
                if depth + height[nid] - 1 > max_depth:
                    raise _TooDeep
                continue
            if nid in open_:
                raise Refused("an alias refers to a node that contains it (a structure without end)")
            if depth > max_depth:
                raise _TooDeep
            open_.add(nid)
            stack.append((node, depth, True))
            stack.extend((k, depth + 1, False) for k in kids)
        return size[id(root)]


def _too_deep(levels: int) -> str:
    return f"nested deeper than {levels} levels (--max-manifest-depth)"


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    if isinstance(node, yaml.SequenceNode):
        return node.value
    return []


def _key_of_node(node: yaml.Node) -> ObjectKey | None:
    """The identity of a known kind of object, read from its unbuilt node (for a refused document)."""
    fields = _scalars(node)
    meta = next((v for k, v in _pairs(node) if k == "metadata"), None)
    names = _scalars(meta) if meta is not None else {}
    if (fields.get("apiVersion", ""), fields.get("kind", "")) not in PARSERS or not names.get("name"):
        return None
    return ObjectKey(fields["kind"], names.get("namespace") or "default", names["name"])


def _pairs(node: yaml.Node) -> list[tuple[str, yaml.Node]]:
    if not isinstance(node, yaml.MappingNode):
        return []
    return [(k.value, v) for k, v in node.value if isinstance(k, yaml.ScalarNode)]


def _scalars(node: yaml.Node) -> dict[str, str]:
    return {k: v.value for k, v in _pairs(node) if isinstance(v, yaml.ScalarNode)}


def parse_object(doc: dict, origin: str) -> tuple[Any | None, Rejected | None]:
    """One object of a known apiVersion and kind: the typed object, or why it was rejected."""
    parser = PARSERS[(str(doc.get("apiVersion", "")), str(doc.get("kind", "")))]
    try:
        return parser(doc), None
    except InvalidObject as exc:
        return None, Rejected(origin, _key_of(doc), tuple(f"{exc.key}: {e}" for e in exc.errors))
    except Exception as exc:  # a parser bug must cost one document, never the source
        key = _key_of(doc)
        return None, Rejected(origin, key, (f"{key or origin}: cannot be read: {exc!r}",))


def _key_of(doc: dict) -> ObjectKey | None:
    meta = doc.get("metadata")
    if not isinstance(meta, dict) or not isinstance(meta.get("name"), str):
        return None
    return ObjectKey(str(doc.get("kind")), str(meta.get("namespace") or "default"), meta["name"])


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split())
