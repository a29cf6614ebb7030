"""Credentials a remote needs, named by reference to Secrets: never their values in the CR.

A remote backend may take a header whose value is a Secret's key (`headersToAdd[].valueFrom.
secretKeyRef`), OAuth2 client credentials (`authConfig`, as the upstream CRD has it, with the
client secret in a Secret) and a client certificate for mTLS (a `kubernetes.io/tls` Secret).
The CR holds only the references; the reconciler reads the values from the Secrets of the
model's namespace and the Envoy side serves them over SDS. A value is a `SecretValue`, whose
repr and str say nothing of it, so no log line, status or error can print one by accident.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import urlsplit

from api.fields import FieldError, Fields

TLS_CERT, TLS_KEY = "tls.crt", "tls.key"  # the keys of a kubernetes.io/tls Secret
_KEY = re.compile(r"^[-._a-zA-Z0-9]+$")  # a Secret data key, as Kubernetes allows them
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
_HOST = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9]*[A-Za-z0-9])?(\.[A-Za-z0-9]([-A-Za-z0-9]*[A-Za-z0-9])?)*$")


class SecretValue:
    """A secret's bytes: compared and hashed by value (a rotation is a change), never shown."""

    __slots__ = ("_value",)

    def __init__(self, value: bytes):
        self._value = value

    def reveal(self) -> bytes:
        """The bytes, for the one place that serves them (SDS)."""
        return self._value

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SecretValue) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __repr__(self) -> str:
        return "SecretValue(<redacted>)"

    __str__ = __repr__


@dataclass(frozen=True)
class SecretKeyRef:
    """`{name, key}`: one key of a Secret in the model's own namespace (as a Pod's env does)."""

    name: str
    key: str
    path: str  # the field path that names it, for errors

    def __str__(self) -> str:
        return f"{self.name}/{self.key}"


@dataclass(frozen=True)
class SecretHeader:
    """A request header to the remote whose value comes from a Secret, after an optional prefix
    (`Bearer `), injected by Envoy on the remote's cluster."""

    name: str
    ref: SecretKeyRef
    prefix: str = ""


@dataclass(frozen=True)
class OAuthClient:
    """`authConfig` of type `oauth`: OAuth2 client credentials. Envoy fetches a token from
    `token_url` (and again before it expires) and sends it as `Authorization: Bearer`."""

    client_id: str
    token_url: str
    secret: SecretKeyRef | None = None  # clientSecretRef; or the upstream CRD's inline clientSecret:
    inline_secret: SecretValue | None = None
    scopes: tuple[str, ...] = ()

    @property
    def token_scheme(self) -> str:
        return urlsplit(self.token_url).scheme

    @property
    def token_host_port(self) -> tuple[str, int]:
        parts = urlsplit(self.token_url)
        return parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)


def parse_secret_header(h: Fields, name: str) -> SecretHeader | None:
    """`valueFrom.secretKeyRef` of one `headersToAdd` entry (None if it has no `valueFrom`)."""
    if not h.has("valueFrom"):
        return None
    if h.has("value"):
        h.error("value", "cannot be given with valueFrom")
    ref = parse_key_ref(h.sub("valueFrom").sub("secretKeyRef"), h.sub("valueFrom").has("secretKeyRef"))
    prefix = h.str("valuePrefix", "") or ""
    if any(c in prefix for c in "\r\n\0"):
        h.error("valuePrefix", "must not contain line breaks")
    return SecretHeader(name, ref, prefix) if ref is not None else None


def parse_key_ref(f: Fields, present: bool = True) -> SecretKeyRef | None:
    if not present:
        f.errors.append(FieldError(f.path, "is required"))
        return None
    name = f.str("name", required=True)
    key = f.str("key", required=True)
    if name is not None and not _NAME.match(name):
        f.error("name", f"must be a Secret name (a lowercase DNS name), got {name!r}")
        name = None
    if key is not None and not _KEY.match(key):
        f.error("key", f"must be a Secret key (letters, digits, '-', '_', '.'), got {key!r}")
        key = None
    return SecretKeyRef(name, key, f.path) if name and key else None


def _usable_url(url: str) -> bool:
    """An http(s) URL whose host Envoy can reach as a cluster: a DNS name or an IP, a valid port,
    no user info (the client authenticates with its credentials, not the URL)."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises on a port out of range
    except ValueError:
        return False
    host = parts.hostname or ""
    return (
        parts.scheme in ("http", "https")
        and "@" not in parts.netloc
        and (_HOST.match(host) is not None or ":" in host)  # an IPv6 address was checked by urlsplit
        and not any(c in url for c in " \r\n\t")
    )


def parse_auth_config(f: Fields) -> OAuthClient | None:
    """`authConfig: {type: oauth, oauthConfig: {clientId, clientSecretRef, tokenUrl, scopes}}`; the
    upstream CRD's inline `clientSecret` is taken in place of `clientSecretRef`."""
    kind = f.str("type", "oauth") or "oauth"
    if kind != "oauth":
        f.error("type", f"must be oauth, got {kind!r}")
        return None
    o = f.sub("oauthConfig")
    if not f.has("oauthConfig"):
        f.error("oauthConfig", "is required for type oauth")
        return None
    client_id = o.str("clientId", required=True)
    token_url = o.str("tokenUrl", required=True)
    if token_url is not None and not _usable_url(token_url):
        o.error("tokenUrl", f"must be an http or https URL with a host name or IP, got {token_url!r}")
        token_url = None
    ref, inline = None, None
    if o.has("clientSecretRef"):
        ref = parse_key_ref(o.sub("clientSecretRef"))
        if o.has("clientSecret"):
            o.error("clientSecret", "cannot be given with clientSecretRef")
    elif o.has("clientSecret"):  # the upstream CRD's shape: in clear in the CR, served the same way
        text = o.str("clientSecret")
        inline = SecretValue(text.encode()) if text else None
    else:
        o.error("clientSecretRef", "is required (or the upstream clientSecret)")
    scopes = tuple(str(s) for s in o.list("scopes"))
    if client_id is None or token_url is None or (ref is None and inline is None):
        return None
    return OAuthClient(client_id, token_url, ref, inline, scopes)
