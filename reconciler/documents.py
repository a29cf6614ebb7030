"""Turning YAML text into typed objects: one place that knows every kind Overspill reads."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
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
from reconciler.kube import parse_endpoint_slice, parse_service, parse_workload

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


def parse_documents(text: str, origin: str) -> tuple[list[Any], list[Rejected]]:
    """Every known object in a (multi-document) YAML text; `kind: List` items are unpacked."""
    try:
        docs = [d for d in load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        return [], [Rejected(origin, None, (f"{origin}: malformed YAML: {_one_line(exc)}",))]
    objects: list[Any] = []
    rejected: list[Rejected] = []
    queue = list(docs)
    while queue:
        doc = queue.pop(0)
        if not isinstance(doc, dict):
            rejected.append(Rejected(origin, None, (f"{origin}: a document must be a mapping",)))
            continue
        if doc.get("kind") == "List" or str(doc.get("kind", "")).endswith("List"):
            queue[:0] = [i for i in doc.get("items") or [] if i is not None]
            continue
        if (str(doc.get("apiVersion", "")), str(doc.get("kind", ""))) not in PARSERS:
            continue  # other kinds in the same directory are not ours to judge
        obj, rejection = parse_object(doc, origin)
        if obj is not None:
            objects.append(obj)
        if rejection is not None:
            rejected.append(rejection)
    return objects, rejected


def load_all(text: str) -> list[Any]:
    """`yaml.safe_load_all`, with strings, mappings and lists built here: PyYAML's constructor
    costs more than libyaml's parser, and manifests are mostly those three. Every other node
    (numbers, booleans, null, timestamps, merge keys) goes to PyYAML's safe constructor, and an
    alias is the same object twice, as there."""
    loader = Loader(text)
    try:
        docs = []
        while loader.check_node():
            docs.append(_construct(loader.get_node(), loader, {}))
        return docs
    finally:
        loader.dispose()


def _construct(node: yaml.Node, loader: Any, built: dict[int, Any]) -> Any:
    tag = node.tag
    if tag == _STR:
        return node.value
    if id(node) in built:
        return built[id(node)]
    if tag == _MAP and all(k.tag == _STR for k, _ in node.value):  # else merge keys, odd keys
        out: dict[str, Any] = {}
        built[id(node)] = out
        for k, v in node.value:
            out[k.value] = _construct(v, loader, built)
        return out
    if tag == _SEQ:
        items: list[Any] = []
        built[id(node)] = items
        items.extend(_construct(v, loader, built) for v in node.value)
        return items
    return loader.construct_object(node, deep=True)


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
