"""Bad manifests, tried systematically: any input gives errors naming the object and field, or a
valid object; never an exception, and never a change to the other models' routes.

Hypothesis generates the inputs: arbitrary YAML-shaped values, valid documents with one field
replaced by an arbitrary value, arbitrary text. YAML bombs, deep nesting and huge files are
refused within a memory bound measured on the process (RSS).
"""

from __future__ import annotations

import copy
import os
import re

import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from test_credentials import CREDENTIALS
from test_store_and_directory import make_controller, model_doc, routes_by_name, service_docs

from api.crd import InvalidObject, ObjectKey, parse_model_deployment, parse_policy
from api.fields import Fields, parse_quantity
from api.metric_spec import parse_metric
from api.status import Phase
from reconciler.directory import DirectorySource
from reconciler.documents import Limits, parse_documents, parse_file
from reconciler.store import ObjectStore
from xds.cache import Scope

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.sampled_from(
        ["", "500m", "2Gi", "1e999", "nan", "-1", "0", "1.5Ki", "http://x/y", "a:b:c", "[::1]:0"]
    ),
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=20,
)
# A path in the documents' error messages: dotted keys with list indexes, e.g. spec.x[0].y
ERROR = re.compile(r"^(?P<key>[^/\s:]+/[^:]+): (?P<path>[^ :]*): \S")

MODEL = model_doc(name="m", metric="queue_depth", source="app")
MODEL["spec"]["offloadingConfig"]["remoteBackend"].update(scheme="https", pathPrefix="/v1", **CREDENTIALS)
MODEL["spec"]["policies"] = [{"refType": "localPolicy", "name": "eu"}]
POLICY = {
    "apiVersion": "authorization.beamlit.com/v1alpha1",
    "kind": "Policy",
    "metadata": {"name": "eu"},
    "spec": {"type": "location", "locations": [{"type": "continent", "name": "eu"}]},
}


def leaf_paths(value, path=()) -> list[tuple]:
    """Every path into a document (mappings by key, lists by index), the root excluded."""
    out = []
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for k, v in items:
        out.append((*path, k))
        out.extend(leaf_paths(v, (*path, k)))
    return out


def replaced(doc: dict, path: tuple, value) -> dict:
    doc = copy.deepcopy(doc)
    target = doc
    for k in path[:-1]:
        target = target[k]
    target[path[-1]] = value
    return doc


def dotted(path: tuple) -> str:
    out = ""
    for k in path:
        out += f"[{k}]" if isinstance(k, int) else (f".{k}" if out else k)
    return out


@st.composite
def mutated(draw, doc: dict) -> tuple[tuple, dict]:
    """A valid document with one field (anywhere, a whole subtree or a leaf) replaced by anything."""
    path = draw(st.sampled_from(leaf_paths(doc)))
    return path, replaced(doc, path, draw(values))


def assert_errors_name_fields(exc: InvalidObject, near: tuple | None = None) -> None:
    assert exc.errors, "an invalid object says why"
    for e in exc.errors:
        assert isinstance(e.path, str) and isinstance(e.message, str) and e.message
        assert re.fullmatch(r"[A-Za-z0-9_.\[\]-]*", e.path), e.path
        if near is not None:  # the error is about the field replaced, or a sibling that needs it
            parent = dotted(near[:-1])
            assert e.path.startswith(parent), (e.path, parent)


# --- the CR parsers: any input is an object or field errors ---


@SETTINGS
@given(values)
def test_any_value_is_a_model_or_field_errors(raw):
    try:
        parse_model_deployment(raw)
    except InvalidObject as exc:
        assert_errors_name_fields(exc)


@SETTINGS
@given(mutated(MODEL))
def test_a_model_with_any_field_replaced_is_a_model_or_errors_at_that_field(case):
    path, doc = case
    try:
        parse_model_deployment(doc)
    except InvalidObject as exc:
        assert_errors_name_fields(exc, near=path)
        name = doc["metadata"].get("name") if isinstance(doc.get("metadata"), dict) else None
        if path[:2] not in (("metadata", "name"), ("metadata", "namespace")) and path != ("metadata",):
            assert exc.key == "default/m" and str(exc).startswith("default/m: "), (exc.key, name)


@SETTINGS
@given(st.one_of(values, mutated(POLICY).map(lambda c: c[1])))
def test_any_policy_is_a_policy_or_field_errors(raw):
    try:
        parse_policy(raw)
    except InvalidObject as exc:
        assert_errors_name_fields(exc)


@SETTINGS
@given(st.one_of(values, mutated(MODEL["spec"]["offloadingConfig"]["metrics"][0]).map(lambda c: c[1])))
def test_any_metric_spec_is_a_metric_or_errors_under_its_path(raw):
    errors = []
    spec = parse_metric(Fields.of(raw, "spec.offloadingConfig.metrics[0]", errors))
    assert spec is not None or errors
    for e in errors:
        assert e.path.startswith("spec.offloadingConfig.metrics[0]")
    if spec is not None and not errors:
        assert spec.target.threshold > 0


@SETTINGS
@given(values)
def test_a_quantity_is_a_finite_number_or_a_value_error(raw):
    try:
        number = parse_quantity(raw)
    except ValueError as exc:
        assert repr(raw)[:20] in str(exc) or "finite" in str(exc)
    else:
        assert isinstance(number, float) and number == number and abs(number) != float("inf")


@SETTINGS
@given(st.text(max_size=300) | st.binary(max_size=300).map(lambda b: b.decode("latin-1")))
def test_any_text_is_objects_or_rejections_naming_the_file(text):
    objects, rejected = parse_documents(text, "odd.yaml")
    for r in rejected:
        assert r.errors and all(e.startswith("odd.yaml: ") or e.startswith(f"{r.key}: ") for e in r.errors)


@SETTINGS
@given(st.lists(st.one_of(values, mutated(MODEL).map(lambda c: c[1])), min_size=1, max_size=4))
def test_any_documents_dumped_are_objects_or_rejections(docs):
    text = yaml.safe_dump_all(docs)
    objects, rejected = parse_documents(text, "odd.yaml")
    for r in rejected:
        for e in r.errors:
            assert e.startswith("odd.yaml: ") or ERROR.match(e), e


# --- YAML bombs, deep nesting, huge files: refused, naming the file, in bounded memory ---


def billion_laughs(levels: int = 9, name: str = "bomb") -> str:
    lines = [
        "apiVersion: deployment.beamlit.com/v1alpha1",
        "kind: ModelDeployment",
        f"metadata: {{name: {name}, namespace: default}}",
        "spec:",
        "  serviceRef: {name: svc}",
        '  l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]',
    ]
    lines += [f"  l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, levels)]
    lines.append(f"  labels: *l{levels - 1}")
    return "\n".join(lines) + "\n"


def rss_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


BOUND_KIB = 50 << 10  # 50 MiB: what refusing may cost at most; accepting any of these would cost GBs


@pytest.mark.parametrize(
    "case,text,expected",
    [
        ("billion laughs", billion_laughs(), "aliases expand the file by more than 100,000 nodes"),
        (
            "an alias to its own container",
            "apiVersion: v1\nkind: Service\nmetadata: {name: svc}\nspec: &s {ports: [*s]}\n",
            "an alias refers to a node that contains it",
        ),
        ("deep flow nesting", "a: " + "[" * 400 + "]" * 400, "nested deeper than 64 levels"),
        ("deeper than libyaml takes", "a: " + "[" * 5000 + "]" * 5000, "malformed YAML"),
        (
            "deep block nesting",
            "".join("  " * i + f"k{i}:\n" for i in range(300)),
            "nested deeper than 64 levels",
        ),
        ("merge keys of a bomb", billion_laughs().replace("  labels: *l8", "  x: {<<: {a: *l8}}"), "aliases"),
        (
            "a tag that does not convert",
            "a: !!timestamp 2020-13-45\n",
            "malformed YAML: month must be in 1..12",
        ),
        (
            "a Python tag",
            "a: !!python/object:os.system x\n",
            "malformed YAML: could not determine a constructor",
        ),
        ("a List whose items are not a list", "kind: List\nitems: 5\n", "items of a List must be a list"),
    ],
)
def test_yaml_bombs_and_nesting_are_refused_naming_the_file_in_bounded_memory(case, text, expected):
    before = rss_kib()
    objects, rejected = parse_documents(text, "bad.yaml")
    grown = rss_kib() - before
    assert objects == []
    (r,) = rejected
    (error,) = r.errors
    assert error.startswith("bad.yaml: ") and expected in error, error
    assert grown < BOUND_KIB, f"{case}: RSS grew {grown} KiB"


def test_a_refused_model_is_named_so_its_status_shows_why():
    objects, rejected = parse_documents(billion_laughs(name="mine"), "bad.yaml")
    (r,) = rejected
    assert r.key == ObjectKey("ModelDeployment", "default", "mine")
    assert r.errors[0].startswith("bad.yaml: default/mine: refused: aliases expand the file")


def test_a_huge_file_is_refused_unread(tmp_path):
    path = tmp_path / "huge.yaml"
    with open(path, "wb") as f:
        f.truncate(2 << 30)  # 2 GiB, sparse: refused by its size, never read
    before = rss_kib()
    objects, rejected = parse_file(path)
    assert rss_kib() - before < BOUND_KIB
    assert objects == []
    assert rejected[0].errors == (f"{path}: refused: larger than 67,108,864 bytes (--max-manifest-bytes)",)


def test_a_file_over_a_lower_limit_is_refused_and_one_under_it_is_read(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump_all([model_doc(), *service_docs()]))
    size = path.stat().st_size
    assert parse_file(path, Limits(max_bytes=size))[0]
    objects, rejected = parse_file(path, Limits(max_bytes=size - 1))
    assert not objects and "refused: larger than" in rejected[0].errors[0]


def test_not_utf8_and_unreadable_files_are_rejections(tmp_path):
    binary = tmp_path / "b.yaml"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    assert parse_file(binary)[1][0].errors[0].startswith(f"{binary}: not UTF-8 text")
    assert parse_file(tmp_path / "gone.yaml")[1][0].errors[0] == (
        f"{tmp_path / 'gone.yaml'}: unreadable: No such file or directory"
    )


def test_the_directory_source_refuses_a_bomb_with_a_log_line_a_metric_and_the_models_status(tmp_path, caplog):
    """The bomb replaces a model's good file: the model keeps routing as it was, its status shows
    the refusal, the log names the file, and /metrics counts the file's rejected document."""
    (tmp_path / "svc.yaml").write_text(yaml.safe_dump_all(service_docs()))
    good = model_doc(name="bomb")
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(good))
    store = ObjectStore()
    source = DirectorySource(tmp_path, store)
    source.sync()
    controller, cache, _ = make_controller(store)
    controller.instruments.watch_origins(store.rejected_by_origin)
    controller.reconcile()
    before = cache.view(Scope()).resources
    (tmp_path / "m.yaml").write_text(billion_laughs(name="bomb"))
    start = rss_kib()
    source.sync()
    controller.reconcile()
    assert rss_kib() - start < BOUND_KIB
    status = controller.status[ObjectKey("ModelDeployment", "default", "bomb")]
    assert status.phase != Phase.INVALID and "bomb" in routes_by_name(controller)
    assert status.errors == [
        f"{tmp_path / 'm.yaml'}: default/bomb: refused: aliases expand the file by more than 100,000 nodes"
        " (--max-manifest-alias-nodes)"
    ]
    assert cache.view(Scope()).resources == before
    assert any(
        r.message.startswith(f"event=invalid_object file={tmp_path / 'm.yaml'} error=")
        and "refused" in r.message
        for r in caplog.records
    )
    registry = controller.instruments.registry
    assert registry.get_sample_value("overspill_invalid_objects", {"origin": str(tmp_path / "m.yaml")}) == 1


# --- a mix of good and bad files: the good models' routes never change ---


GOOD = ["alpha", "beta"]


def bad_documents() -> st.SearchStrategy[str]:
    """Text of a manifest file that holds no valid object: anything from garbage to near-valid."""
    near_valid = st.one_of(
        *(mutated(model_doc(name=n, service=f"svc-{n}")).map(lambda c: c[1]) for n in GOOD),
        mutated(service_docs("svc-alpha")[0]).map(lambda c: c[1]),
        mutated(service_docs("svc-beta")[1]).map(lambda c: c[1]),
        mutated(POLICY).map(lambda c: c[1]),
    )
    return st.one_of(
        st.lists(st.one_of(near_valid, values), min_size=1, max_size=3).map(yaml.safe_dump_all),
        st.text(max_size=200),
        st.sampled_from(
            [billion_laughs(name="alpha"), "a: " + "[" * 2000, "a: !!float x\n", "{" * 70 + "}" * 70]
        ),
    )


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(bad_documents(), min_size=1, max_size=5))
def test_bad_files_beside_good_ones_never_change_the_good_models_routes(tmp_path_factory, bad):
    assume(not any(parse_documents(text, "x")[0] for text in bad))  # a valid document is no bad input
    root = tmp_path_factory.mktemp("mix")
    for n in GOOD:
        (root / f"{n}.yaml").write_text(
            yaml.safe_dump_all([model_doc(name=n, service=f"svc-{n}"), *service_docs(f"svc-{n}")])
        )
    store = ObjectStore()
    source = DirectorySource(root, store)
    source.sync()
    controller, cache, _ = make_controller(store)
    controller.reconcile()
    routes = {n: routes_by_name(controller)[n] for n in GOOD}
    resources = cache.view(Scope()).resources
    for i, text in enumerate(bad):
        (root / f"bad-{i}.yaml").write_text(text)
    source.sync()
    controller.reconcile()
    assert {n: routes_by_name(controller).get(n) for n in GOOD} == routes
    for n in GOOD:
        assert controller.status[ObjectKey("ModelDeployment", "default", n)].phase != Phase.INVALID
    for kind, named in cache.view(Scope()).resources.items():
        for name, resource_ in named.items():
            if any(f"/{n}/" in name or name.endswith(f"/{n}") for n in GOOD):
                assert resources[kind].get(name) == resource_, name
    for i in range(len(bad)):
        os.remove(root / f"bad-{i}.yaml")
    source.sync()
    controller.reconcile()
    assert {n: routes_by_name(controller).get(n) for n in GOOD} == routes


def test_memory_bound_is_measured_on_this_process():
    """The RSS reading the bounds above rely on moves when memory is used (so they can fail)."""
    before = rss_kib()
    block = bytearray(80 << 20)
    block[::4096] = b"x" * len(block[::4096])
    assert rss_kib() - before > BOUND_KIB
    del block
