"""The custom resources users apply: `ModelDeployment` and `Policy`, parsed and validated.

Field names and shapes follow the product documents (seeds 001 and 002); everything
Overspill adds is optional so the documented examples apply unchanged.
"""

from __future__ import annotations

import datetime
import ipaddress
import re
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, NamedTuple

from api.credentials import (
    TLS_CERT,
    TLS_KEY,
    OAuthClient,
    SecretHeader,
    SecretKeyRef,
    SecretValue,
    parse_auth_config,
    parse_key_ref,
    parse_secret_header,
)
from api.fields import FieldError, Fields
from api.metric_spec import MetricSpec, parse_metric

MODEL_API = "deployment.beamlit.com/v1alpha1"
POLICY_API = "authorization.beamlit.com/v1alpha1"
SOURCE_KINDS = ("Deployment", "StatefulSet", "ReplicaSet", "DaemonSet")
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_HOSTNAME = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9]([-A-Za-z0-9]*[A-Za-z0-9])?(\.[A-Za-z0-9]([-A-Za-z0-9]*[A-Za-z0-9])?)*$"
)
_HEADER_NAME = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")


class ObjectKey(NamedTuple):
    """Identity of any object the store holds: kind, namespace, name.

    A named tuple, not a dataclass: every index of the store and the controller is keyed by
    it, and a tuple hashes and compares in C (a third of a cold start's store time at 10,000
    models went to the dataclass's `__hash__`)."""

    kind: str
    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class Meta:
    """The parts of `metadata` the control plane uses."""

    name: str
    namespace: str
    generation: int = 0
    resource_version: str = ""
    uid: str = ""
    labels: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class SourceRef:
    """`modelSourceRef`: the workload whose pods serve the model (used for the pod count)."""

    kind: str
    name: str
    namespace: str
    api_version: str = "apps/v1"


@dataclass(frozen=True)
class ServiceRef:
    """`serviceRef`: the Service clients call; `target_port` names its `spec.ports[].port`."""

    name: str
    namespace: str
    target_port: int | None = None


@dataclass(frozen=True)
class PolicyRef:
    """`spec.policies[]`: a `localPolicy` names a Policy in the model's namespace, enforced here;
    a `remotePolicy` (the upstream CRD's default) names one kept by the remote platform."""

    refType: str
    name: str

    @property
    def local(self) -> bool:
        return self.refType == "localPolicy"


@dataclass(frozen=True)
class Location:
    """Where a remote serves from, for location Policies: a country and a continent code (e.g.
    `de`, `eu`) and, for the upstream `type: location` rules, a named location (e.g. `eu-west`)."""

    country: str = ""
    continent: str = ""
    name: str = ""


@dataclass(frozen=True)
class Flavor:
    """What a remote runs on, for flavor Policies: `{type, name}` as upstream has it (`gpu`, `nvidia-l4`)."""

    type: str
    name: str


@dataclass(frozen=True)
class RemoteBackend:
    """`offloadingConfig.remoteBackend`: where the standby copy answers.

    The path prefix and headers are applied only to requests that spill over, so the
    remote can be a hosted endpoint with its own path layout and API key header.
    """

    host: str
    port: int
    scheme: str = "http"
    path_prefix: str = ""
    headers_to_add: tuple[tuple[str, str], ...] = ()
    ca_file: str = "/etc/ssl/certs/ca-certificates.crt"
    insecure_skip_verify: bool = False
    location: Location | None = None  # undeclared: satisfies no location Policy
    flavor: Flavor | None = None  # undeclared: satisfies no flavor Policy
    # Credentials by reference to Secrets of the model's namespace (see `api.credentials`).
    secret_headers: tuple[SecretHeader, ...] = ()
    oauth: OAuthClient | None = None
    client_certificate: SecretKeyRef | None = None  # a kubernetes.io/tls Secret (its tls.crt): mTLS
    # The values those references name, filled in by the reconciler (never by parsing): what
    # Envoy is served. A rotated Secret makes a different RemoteBackend, so a new SDS version.
    secrets: tuple[tuple[tuple[str, str], SecretValue], ...] = ()

    def secret_refs(self) -> tuple[SecretKeyRef, ...]:
        """Every Secret key this remote's credentials need."""
        refs = [h.ref for h in self.secret_headers]
        if self.oauth is not None and self.oauth.secret is not None:
            refs.append(self.oauth.secret)
        cert = self.client_certificate
        if cert is not None:
            refs += [cert, SecretKeyRef(cert.name, TLS_KEY, cert.path)]
        return tuple(refs)

    @property
    def has_credentials(self) -> bool:
        return bool(self.secret_headers) or self.oauth is not None or self.client_certificate is not None

    def secret(self, name: str, key: str) -> SecretValue | None:
        """The resolved value of one Secret key, or None while it cannot be read."""
        return next((v for ref, v in self.secrets if ref == (name, key)), None)

    @property
    def url(self) -> str:
        """How status, logs and policy messages name the remote: scheme://host[:port]/prefix."""
        return f"{self.scheme}://{self.authority}{self.path_prefix}"

    @cached_property  # asked for each resource built; frozen, so computed once
    def is_ip(self) -> bool:
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            return False
        return True

    @property
    def authority(self) -> str:
        default = 443 if self.scheme == "https" else 80
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == default else f"{host}:{self.port}"


@dataclass(frozen=True)
class Spillover:
    """`offloadingConfig.behavior.spillover`: Envoy retries on the remote, at once, a request the
    local pods turned away before doing any work, so a burst is absorbed in the seconds before
    the next evaluation moves the steady share. Off by default: it is safe only where the pods
    answer `status_codes` solely for requests they never started (see the README).
    """

    enabled: bool = False
    # Backend answers that mean "turned away before work"; only 429 and 503 are accepted.
    status_codes: tuple[int, ...] = (429, 503)
    # Retries in flight at once on the model's composite cluster (Envoy's `max_retries` circuit
    # breaker): Envoy's default of 3 would turn most of a burst's spill-overs into errors.
    max_retries: int = 1000
    # A retry needs the request body kept until the pods answer; past this size Envoy cannot
    # retry it (Envoy's own default is 1 MiB, short of image or long-context inputs).
    max_request_bytes: int = 16 * 1024 * 1024


SPILLOVER_CODES = (429, 503)
MODES = ("Fixed", "Proportional")
METRIC_MEASURES = ("Local", "Demand")
STALE_ACTIONS = ("hold", "local", "offload")


@dataclass(frozen=True)
class Behavior:
    """`offloadingConfig.behavior`: how much spills over and how eagerly it switches.

    `Fixed` (the seeds' rule) sends `percentage` % while a metric is over its target.
    `Proportional` sends the excess over the target, `percentage` being its cap: a metric
    that offloading lowers (`metric_measures` "Local") would otherwise fall under its target
    as soon as offloading starts and release it while the burst is still on.
    """

    percentage: float = 100.0
    activation_delay_seconds: float = 0.0
    buffer_duration_seconds: float = 30.0
    mode: str = "Fixed"
    # "Local": measured on the local side only, so it falls as the remote share rises (in-flight,
    # queue depth); "Demand": measured before the split (requests arriving at the gateway).
    metric_measures: str = "Local"
    tolerance: float = 0.1  # Proportional: no change while the metric is within 10 % of target, as the HPA
    smoothing_seconds: float = 3.0  # Proportional: time constant of the demand estimate's moving average
    metric_stale_after_seconds: float = 60.0  # 0: a metric is never considered stale
    on_stale_metric: str = "hold"  # what a stale metric does: hold the decision, go local, or offload
    spillover: Spillover = Spillover()

    @property
    def proportional(self) -> bool:
        return self.mode == "Proportional"


@dataclass(frozen=True)
class OffloadingConfig:
    """`remotes` in the user's order of preference: `remoteBackends`, or `remoteBackend` as a
    list of one."""

    behavior: Behavior
    metrics: tuple[MetricSpec, ...]
    remotes: tuple[RemoteBackend, ...] = ()

    @property
    def remote(self) -> RemoteBackend | None:
        """The preferred remote."""
        return self.remotes[0] if self.remotes else None


@dataclass(frozen=True)
class ObservedStatus:
    """The decision a leader last wrote on the CR's status.

    Followers serve it as is; a new leader resumes the offload state machine from it, so a
    failover moves no traffic and restarts no buffer timer. Times are wall-clock seconds.
    """

    phase: str = ""
    remote_percent: float = 0.0
    triggered: bool = False
    triggered_at: float | None = None
    over_since: float | None = None
    under_since: float | None = None
    observed_generation: int = 0
    last_transition: float | None = None  # when phase or share last changed


@dataclass(frozen=True)
class ModelDeployment:
    """A model to offload: its Service, its workload, and when and where to spill over.

    A ModelDeployment without `offloadingConfig` is still served through Envoy, all local.
    """

    meta: Meta
    service: ServiceRef
    source: SourceRef | None
    offloading: OffloadingConfig | None
    model: str = ""
    environment: str = "production"
    policies: tuple[PolicyRef, ...] = ()
    observed: ObservedStatus | None = None  # from `status`, where the object came from a cluster
    raw_status: dict | None = field(default=None, compare=False)  # that status as written, for diffs

    @cached_property  # every index and every evaluation asks; frozen, so computed once
    def key(self) -> ObjectKey:
        return ObjectKey("ModelDeployment", self.meta.namespace, self.meta.name)


@dataclass(frozen=True)
class PolicyRule:
    """One allowed place (`country`, `continent`, `location`) or flavor (`{type, name}`) of a Policy."""

    type: str
    name: str


@dataclass(frozen=True)
class Policy:
    """A location or flavor constraint on where a model may be offloaded (seed 001); enforced on
    remotes by `reconciler.policy`."""

    meta: Meta
    type: str
    locations: tuple[PolicyRule, ...] = ()
    flavors: tuple[PolicyRule, ...] = ()

    @property
    def key(self) -> ObjectKey:
        return ObjectKey("Policy", self.meta.namespace, self.meta.name)


class InvalidObject(ValueError):
    """An object that failed validation; `errors` name each field."""

    def __init__(self, key: str, errors: list[FieldError]):
        self.key = key
        self.errors = errors
        super().__init__("; ".join(f"{key}: {e}" for e in errors))


def parse_meta(doc: Fields, default_namespace: str = "default") -> Meta:
    meta = doc.sub("metadata")
    name = meta.str("name", required=True) or ""
    namespace = meta.str("namespace", default_namespace) or default_namespace
    for key, value in (("name", name), ("namespace", namespace)):
        if value and (len(value) > 253 or not _DNS_LABEL.match(value.replace(".", "-"))):
            meta.error(key, f"must be a lowercase DNS name, got {value!r}")
    return Meta(
        name=name,
        namespace=namespace,
        generation=meta.int("generation", 0) or 0,
        resource_version=meta.str("resourceVersion", "") or "",
        uid=meta.str("uid", "") or "",
        labels=meta.string_map("labels"),
    )


def parse_model_deployment(raw: Any, default_namespace: str = "default") -> ModelDeployment:
    """Parse and validate one ModelDeployment document, raising `InvalidObject` with every error."""
    errors: list[FieldError] = []
    doc = Fields.of(raw, "", errors)
    meta = parse_meta(doc, default_namespace)
    spec = doc.sub("spec")
    if not doc.has("spec"):
        doc.error("spec", "is required")

    environment = spec.str("environment", "production") or "production"
    if environment not in ("production", "development"):
        spec.error("environment", f"must be production or development, got {environment!r}")

    source = None
    if spec.has("modelSourceRef"):
        src = spec.sub("modelSourceRef")
        kind = src.str("kind", "Deployment") or "Deployment"
        if kind not in SOURCE_KINDS:
            src.error("kind", f"must be one of {', '.join(SOURCE_KINDS)}, got {kind!r}")
        source = SourceRef(
            kind=kind,
            name=src.str("name", required=True) or "",
            namespace=src.str("namespace", meta.namespace) or meta.namespace,
            api_version=src.str("apiVersion", "apps/v1") or "apps/v1",
        )

    svc = spec.sub("serviceRef")
    if not spec.has("serviceRef"):
        spec.error("serviceRef", "is required")
    port = svc.int("targetPort")
    if port is not None and not 1 <= port <= 65535:
        svc.error("targetPort", f"must be a port between 1 and 65535, got {port}")
    service = ServiceRef(
        name=svc.str("name", required=spec.has("serviceRef")) or "",
        namespace=svc.str("namespace", meta.namespace) or meta.namespace,
        target_port=port,
    )

    policies = []
    for p in spec.items("policies"):
        ref_type = p.str("refType", "remotePolicy") or "remotePolicy"  # the upstream CRD's default
        if ref_type not in ("localPolicy", "remotePolicy"):
            p.error("refType", f"must be localPolicy or remotePolicy, got {ref_type!r}")
        policies.append(PolicyRef(ref_type, p.str("name", required=True) or ""))

    offloading = _parse_offloading(spec.sub("offloadingConfig")) if spec.has("offloadingConfig") else None
    status = raw.get("status") if isinstance(raw, dict) else None
    if errors:
        raise InvalidObject(f"{meta.namespace}/{meta.name or '?'}", errors)
    return ModelDeployment(
        meta=meta,
        service=service,
        source=source,
        offloading=offloading,
        model=spec.str("model", meta.name) or meta.name,
        environment=environment,
        policies=tuple(policies),
        observed=parse_observed_status(status),
        raw_status=status if isinstance(status, dict) else None,
    )


def parse_observed_status(raw: Any) -> ObservedStatus | None:
    """Our own `status`, read leniently: whatever is odd in it is left out, never an error."""
    if not isinstance(raw, dict) or not raw.get("phase"):
        return None

    def number(key: str) -> float | None:
        value = raw.get(key)
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None

    return ObservedStatus(
        phase=str(raw.get("phase")),
        remote_percent=number("remotePercent") or 0.0,
        triggered=bool(raw.get("triggeredAt")),
        triggered_at=parse_time(raw.get("triggeredAt")),
        over_since=parse_time(raw.get("overSince")),
        under_since=parse_time(raw.get("underSince")),
        observed_generation=int(number("observedGeneration") or 0),
        last_transition=parse_time(raw.get("lastTransitionTime")),
    )


def parse_time(value: Any) -> float | None:
    """An RFC 3339 timestamp (as Kubernetes writes them) as epoch seconds, or None."""
    if not isinstance(value, str) or not value:
        return None
    try:
        return datetime.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def format_time(epoch: float, micro: bool = False) -> str:
    """Epoch seconds as an RFC 3339 UTC timestamp: seconds, as metav1.Time has it, or microseconds."""
    when = datetime.datetime.fromtimestamp(epoch, datetime.UTC)
    return when.strftime("%Y-%m-%dT%H:%M:%S.%fZ" if micro else "%Y-%m-%dT%H:%M:%SZ")


def _parse_offloading(f: Fields) -> OffloadingConfig:
    b = f.sub("behavior")
    percentage = b.number("percentage", 100.0)
    if percentage is not None and not 0 <= percentage <= 100:
        b.error("percentage", f"must be between 0 and 100, got {_num(percentage)}")
    delays = {}
    for key, default in (("activationDelaySeconds", 0.0), ("bufferDurationSeconds", 30.0)):
        value = b.number(key, default)
        if value is not None and value < 0:
            b.error(key, f"must be 0 or more, got {_num(value)}")
        delays[key] = value if value is not None else default
    choices = {}
    for key, allowed in (
        ("mode", MODES),
        ("metricMeasures", METRIC_MEASURES),
        ("onStaleMetric", STALE_ACTIONS),
    ):
        value = b.str(key, allowed[0]) or allowed[0]
        if value not in allowed:
            b.error(key, f"must be {', '.join(allowed[:-1])} or {allowed[-1]}, got {value!r}")
        choices[key] = value
    tolerance = b.number("tolerance", Behavior.tolerance)
    if tolerance is not None and not 0 <= tolerance <= 0.9:
        b.error("tolerance", f"must be between 0 and 0.9, got {_num(tolerance)}")
    for key, default in (
        ("smoothingSeconds", Behavior.smoothing_seconds),
        ("metricStaleAfterSeconds", Behavior.metric_stale_after_seconds),
    ):
        value = b.number(key, default)
        if value is not None and value < 0:
            b.error(key, f"must be 0 or more, got {_num(value)}")
        delays[key] = value if value is not None else default
    behavior = Behavior(
        percentage=percentage if percentage is not None else 100.0,
        activation_delay_seconds=delays["activationDelaySeconds"],
        buffer_duration_seconds=delays["bufferDurationSeconds"],
        mode=choices["mode"],
        metric_measures=choices["metricMeasures"],
        tolerance=tolerance if tolerance is not None else Behavior.tolerance,
        smoothing_seconds=delays["smoothingSeconds"],
        metric_stale_after_seconds=delays["metricStaleAfterSeconds"],
        on_stale_metric=choices["onStaleMetric"],
        spillover=_parse_spillover(b.sub("spillover")),
    )
    metrics = tuple(m for m in (parse_metric(item) for item in f.items("metrics")) if m is not None)
    remotes = _parse_remotes(f)
    if len(remotes) > 1 or behavior.spillover.enabled:
        # Envoy runs the upstream filters of the cluster a route names: behind an aggregate (several
        # remotes) or a composite (spill-over) the OAuth2 injector, which writes Authorization
        # itself, would give every attempt (another remote's, a pod's) its token.
        for i, r in enumerate(remotes):
            if r.oauth is not None:
                f.error(
                    f"remoteBackends[{i}].authConfig"
                    if f.has("remoteBackends")
                    else "remoteBackend.authConfig",
                    "OAuth2 client credentials are taken with one remote and spill-over off only",
                )
    return OffloadingConfig(behavior, metrics, remotes)


MAX_REMOTES = 8  # a failover list, tried in order: more would only lengthen the retries


def _parse_remotes(f: Fields) -> tuple[RemoteBackend, ...]:
    """`remoteBackends` (tried in order), or the single `remoteBackend`; never both, so no
    remote is dropped without a word."""
    if f.has("remoteBackend"):
        if f.has("remoteBackends"):
            f.error("remoteBackends", "give remoteBackend or remoteBackends, not both")
        remote = _parse_remote(f.sub("remoteBackend"))
        return (remote,) if remote is not None else ()
    if not f.has("remoteBackends"):
        return ()
    items = f.items("remoteBackends")
    if isinstance(f.data["remoteBackends"], list) and not 1 <= len(items) <= MAX_REMOTES:
        f.error("remoteBackends", f"must list 1 to {MAX_REMOTES} remotes, got {len(items)}")
    remotes = [_parse_remote(item) for item in items]
    seen: dict[tuple[str, int, str], int] = {}
    for i, r in enumerate(remotes):
        if r is None:
            continue
        first = seen.setdefault((r.host, r.port, r.path_prefix), i)
        if first != i:
            f.error(f"remoteBackends[{i}]", f"is the same remote as remoteBackends[{first}]")
    return tuple(r for r in remotes if r is not None)


def _parse_spillover(f: Fields) -> Spillover:
    codes = []
    for i, code in enumerate(f.list("statusCodes")):
        if isinstance(code, bool) or code not in SPILLOVER_CODES:
            f.error(
                f"statusCodes[{i}]",
                f"must be 429 or 503 (a request turned away before any work), got {code!r}",
            )
        elif code not in codes:
            codes.append(code)
    max_retries = f.int("maxRetries", Spillover.max_retries)
    if max_retries is not None and max_retries < 1:
        f.error("maxRetries", f"must be 1 or more, got {max_retries}")
        max_retries = None
    max_bytes = f.int("maxRequestBytes", Spillover.max_request_bytes)
    if max_bytes is not None and not 1 <= max_bytes <= 1 << 30:
        f.error("maxRequestBytes", f"must be between 1 and 1073741824 (1 GiB), got {max_bytes}")
        max_bytes = None
    return Spillover(
        enabled=f.bool("enabled"),
        status_codes=tuple(sorted(codes)) if f.has("statusCodes") else Spillover.status_codes,
        max_retries=max_retries if max_retries is not None else Spillover.max_retries,
        max_request_bytes=max_bytes if max_bytes is not None else Spillover.max_request_bytes,
    )


def parse_remote_backend(raw: Any, path: str) -> RemoteBackend:
    """A remote backend from a mapping (also used for the controller-wide `--remote` default)."""
    errors: list[FieldError] = []
    remote = _parse_remote(Fields.of(raw, path, errors))
    if errors or remote is None:
        raise InvalidObject(path, errors)
    return remote


def _parse_remote(f: Fields) -> RemoteBackend | None:
    scheme = f.str("scheme", "http") or "http"
    if scheme not in ("http", "https"):
        f.error("scheme", f"must be http or https, got {scheme!r}")
    hostport = f.str("host", required=True)
    host, port = None, 443 if scheme == "https" else 80
    if hostport is not None:
        host, port = _split_host_port(f, hostport, port)
    prefix = f.str("pathPrefix", "") or ""
    if prefix and (not prefix.startswith("/") or any(c in prefix for c in "?# ")):
        f.error(
            "pathPrefix", f"must be a path starting with '/' and without '?', '#' or spaces, got {prefix!r}"
        )
    headers, secret_headers = _parse_headers(f)
    ca_file = f.str("caFile", RemoteBackend.ca_file) or RemoteBackend.ca_file
    insecure = f.bool("insecureSkipVerify")
    oauth = parse_auth_config(f.sub("authConfig")) if f.has("authConfig") else None
    certificate = None
    if f.has("clientCertificateRef"):
        ref = f.sub("clientCertificateRef")
        certificate = parse_key_ref(Fields({**ref.data, "key": TLS_CERT}, ref.path, ref.errors))
        if scheme != "https":
            f.error("clientCertificateRef", "needs scheme https")
    location = _parse_location(f.sub("location")) if f.has("location") else None
    flavor = None
    if f.has("flavor"):
        fl = f.sub("flavor")
        flavor = Flavor(fl.str("type", required=True) or "", fl.str("name", required=True) or "")
    if host is None:
        return None
    return RemoteBackend(
        host, port, scheme, prefix.rstrip("/"), headers, ca_file, insecure, location=location, flavor=flavor,
        secret_headers=secret_headers, oauth=oauth, client_certificate=certificate,
    )  # fmt: skip


def _parse_location(f: Fields) -> Location:
    location = Location(
        country=f.str("country", "") or "",
        continent=f.str("continent", "") or "",
        name=f.str("name", "") or "",
    )
    if location == Location():
        f.errors.append(FieldError(f.path, "must name a country, a continent or a location name"))
    return location


def _split_host_port(f: Fields, text: str, default_port: int) -> tuple[str | None, int]:
    if "://" in text or "/" in text:
        f.error("host", f"must be a host name or IP with an optional :port (no scheme or path), got {text!r}")
        return None, default_port
    host, port = text, default_port
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else None
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    else:
        port_text = None
    if port_text is not None:
        if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
            f.error("host", f"port must be between 1 and 65535, got {port_text!r}")
            return None, default_port
        port = int(port_text)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if not _HOSTNAME.match(host):
            f.error("host", f"must be a DNS name or IP address, got {host!r}")
            return None, default_port
    return host, port


def _parse_headers(f: Fields) -> tuple[tuple[tuple[str, str], ...], tuple[SecretHeader, ...]]:
    """`headersToAdd` as a list of {name, value} (Kubernetes style) or a plain mapping; an entry
    of the list may take its value from a Secret instead (`valueFrom.secretKeyRef`)."""
    secret: list[SecretHeader] = []
    if isinstance(f.data.get("headersToAdd"), dict):
        pairs = list(f.string_map("headersToAdd").items())
    else:
        pairs = []
        for h in f.items("headersToAdd"):
            name = h.str("name", required=True) or ""
            from_secret = parse_secret_header(h, name)
            if from_secret is not None:
                secret.append(from_secret)
            elif not h.has("valueFrom"):
                pairs.append((name, h.str("value", "") or ""))
    for name in [n for n, _ in pairs] + [s.name for s in secret]:
        if name and (not _HEADER_NAME.match(name) or name.lower() in ("host", ":authority", ":path")):
            f.error("headersToAdd", f"{name!r} is not a header name that can be set")
    return tuple(pairs), tuple(secret)


def parse_policy(raw: Any, default_namespace: str = "default") -> Policy:
    errors: list[FieldError] = []
    doc = Fields.of(raw, "", errors)
    meta = parse_meta(doc, default_namespace)
    spec = doc.sub("spec")
    ptype = spec.str("type", required=True)
    if ptype is not None and ptype not in ("location", "flavor"):
        spec.error("type", f"must be location or flavor, got {ptype!r}")
    rules = {}
    # `location` is the upstream CRD's own location type (a named location), accepted as it is there;
    # a flavor's type is free text upstream (`cpu`, `gpu`, ...), so any is accepted.
    for key, allowed in (("locations", ("location", "country", "continent")), ("flavors", ())):
        items = []
        for r in spec.items(key):
            rtype = r.str("type", required=True)
            if rtype is not None and allowed and rtype not in allowed:
                r.error("type", f"must be {', '.join(allowed[:-1])} or {allowed[-1]}, got {rtype!r}")
            elif rtype == "":
                r.error("type", "must not be empty")
            items.append(PolicyRule(rtype or "", r.str("name", required=True) or ""))
        rules[key] = tuple(items)
    if ptype == "location" and not rules["locations"]:
        spec.error("locations", "is required for a location policy")
    if ptype == "flavor" and not rules["flavors"]:
        spec.error("flavors", "is required for a flavor policy")
    if errors:
        raise InvalidObject(f"{meta.namespace}/{meta.name or '?'}", errors)
    return Policy(meta, ptype or "", rules["locations"], rules["flavors"])


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)
