"""What one remote's credentials add to the Envoy side: SDS secrets and the filters that use them.

Values never travel inside a cluster or a route: each is a `Secret` resource served over SDS on
the same ADS stream (before the clusters naming it), so a rotated Secret is one new SDS version
and Envoy swaps it in with no cluster change, no drain and no restart. On the remote's cluster,
upstream HTTP filters (`envoy.filters.http.credential_injector`) put them on each request that
goes to that remote, and only there: a header from a Secret (`generic`), or a token fetched with
OAuth2 client credentials (`oauth2`); a client certificate is the TLS context's SDS certificate.
A secret's resource is named after the cluster it serves, so it belongs to the model the cluster
does: only nodes whose scope admits the model get it, as with its clusters. Behind an aggregate
or a composite cluster, whose upstream filters are the ones Envoy runs, header injectors put each
remote's values in internal headers (`internal_header`), for `xds.failover` to sort out.
"""

from __future__ import annotations

import datetime
from dataclasses import replace

from api.crd import RemoteBackend
from api.credentials import TLS_CERT, TLS_KEY, SecretValue
from xds import resources as res
from xds.fields import Fields, duration
from xds.resources import NONE, RemoteCredentials
from xds.types import ADS

INJECTOR = "envoy.filters.http.credential_injector"
TOKEN_TIMEOUT = datetime.timedelta(seconds=5)
REDACTED = "<redacted>"
CREDENTIAL_HEADER = "x-overspill-credential"  # a prefix of internal headers, see `internal_header`


def header_secret_name(cluster: str, header: str) -> str:
    return f"{cluster}/header/{header.lower()}"


def oauth_secret_name(cluster: str) -> str:
    return f"{cluster}/oauth-client"


def certificate_secret_name(cluster: str) -> str:
    return f"{cluster}/client-certificate"


def token_cluster_name(cluster: str) -> str:
    return f"{cluster}/token"


def remote_credentials(remote: RemoteBackend, cluster: str) -> RemoteCredentials:
    """What `remote`'s credentials add to its cluster `cluster` (NONE for a remote without any).
    A value not read yet (its Secret missing) is not served: Envoy waits for it, and the
    reconciler sends that remote no traffic meanwhile."""
    if not remote.has_credentials:
        return NONE
    secrets: list[tuple[str, bytes]] = []
    for header in remote.secret_headers:
        name = header_secret_name(cluster, header.name)
        value = remote.secret(header.ref.name, header.ref.key)
        if value is not None:
            secrets.append((name, _generic(name, value)))
    filters = header_injectors(remote, cluster)
    token = None
    if remote.oauth is not None:
        oauth, name = remote.oauth, oauth_secret_name(cluster)
        value = oauth.inline_secret or (
            remote.secret(oauth.secret.name, oauth.secret.key) if oauth.secret is not None else None
        )
        if value is not None:
            secrets.append((name, _generic(name, value)))
        host, port = oauth.token_host_port
        token = (
            token_cluster_name(cluster),
            RemoteBackend(host, port, oauth.token_scheme, ca_file=remote.ca_file),
        )
        uri = _URI.uri(oauth.token_url) + _URI.cluster(token[0]) + _URI.timeout(duration(TOKEN_TIMEOUT))
        client = _CLIENT.client_id(oauth.client_id) + _CLIENT.client_secret(_sds(name))
        config = (
            _OAUTH2.token_endpoint(uri)
            + b"".join(_OAUTH2.scopes(scope) for scope in oauth.scopes)
            + _OAUTH2.client_credentials(client)
        )
        filters.append(_injector("envoy.http.injected_credentials.oauth2", _OAUTH2.pack(config)))
    tls = b""
    if remote.client_certificate is not None:
        name, ref = certificate_secret_name(cluster), remote.client_certificate
        cert, key = remote.secret(ref.name, TLS_CERT), remote.secret(ref.name, TLS_KEY)
        if cert is not None and key is not None:
            chain = _CERTIFICATE.certificate_chain(
                _DATA.inline_bytes(cert.reveal())
            ) + _CERTIFICATE.private_key(_DATA.inline_bytes(key.reveal()))
            secrets.append((name, _SECRET.name(name) + _SECRET.tls_certificate(chain)))
        tls = _COMMON_TLS.tls_certificate_sds_secret_configs(_sds(name))
    fields = res.upstream_filters(filters) if filters else b""
    return RemoteCredentials(tuple(secrets), fields, tls, token)


def internal_header(index: int, header: str) -> str:
    """Where the injector puts remote `index`'s header credential `header` behind an aggregate
    or a composite cluster, for `xds.failover`'s script to move to `header` on that remote's
    requests only; it never leaves Envoy."""
    return f"{CREDENTIAL_HEADER}-{index}-{header.lower()}"


def header_injectors(remote: RemoteBackend, cluster: str, index: int | None = None) -> list[bytes]:
    """The injectors (encoded `HttpFilter`s) of `remote`'s headers from Secrets (served under
    `cluster`'s names): into the headers themselves, or with `index` into the internal headers
    of remote `index`."""
    filters = []
    for header in remote.secret_headers:
        target = header.name if index is None else internal_header(index, header.name)
        generic = (
            _GENERIC.credential(_sds(header_secret_name(cluster, header.name)))
            + _GENERIC.header(target)
            + _GENERIC.header_value_prefix(header.prefix)
        )
        filters.append(_injector("envoy.http.injected_credentials.generic", _GENERIC.pack(generic)))
    return filters


def member_credentials(remote: RemoteBackend, cluster: str) -> RemoteCredentials:
    """A remote's credentials on its cluster behind an aggregate or a composite: its client
    certificate only (its transport socket is its own); its filters would never run there, so
    the aggregate or composite injects its headers (see `header_injectors`)."""
    return replace(remote_credentials(remote, cluster), cluster_fields=b"")


_SDS = Fields("envoy.extensions.transport_sockets.tls.v3.SdsSecretConfig")
_SECRET = Fields("envoy.extensions.transport_sockets.tls.v3.Secret")
_GENERIC_SECRET = Fields("envoy.extensions.transport_sockets.tls.v3.GenericSecret")
_CERTIFICATE = Fields("envoy.extensions.transport_sockets.tls.v3.TlsCertificate")
_COMMON_TLS = Fields("envoy.extensions.transport_sockets.tls.v3.CommonTlsContext")
_DATA = Fields("envoy.config.core.v3.DataSource")
_URI = Fields("envoy.config.core.v3.HttpUri")
_EXTENSION = Fields("envoy.config.core.v3.TypedExtensionConfig")
_INJECTOR = Fields("envoy.extensions.filters.http.credential_injector.v3.CredentialInjector")
_GENERIC = Fields("envoy.extensions.http.injected_credentials.generic.v3.Generic")
_OAUTH2 = Fields("envoy.extensions.http.injected_credentials.oauth2.v3.OAuth2")
_CLIENT = Fields("envoy.extensions.http.injected_credentials.oauth2.v3.OAuth2.ClientCredentials")


def _sds(name: str) -> bytes:
    return _SDS.name(name) + _SDS.sds_config(ADS)


def _generic(name: str, value: SecretValue) -> bytes:
    return _SECRET.name(name) + _SECRET.generic_secret(
        _GENERIC_SECRET.secret(_DATA.inline_bytes(value.reveal()))
    )


def _injector(kind: str, config: bytes) -> bytes:
    # overwrite: a client's own header of that name never reaches the remote; no credential yet
    # (a token not fetched): the request is refused rather than sent without it.
    injector = _INJECTOR.overwrite(True) + _INJECTOR.credential(
        _EXTENSION.name(kind) + _EXTENSION.typed_config(config)
    )
    return res.http_filter(INJECTOR, _INJECTOR.pack(injector))


def without_credentials(remote: RemoteBackend) -> RemoteBackend:
    """`remote` with no credentials, for a configuration that cannot take SDS (a static bootstrap)."""
    return replace(remote, secret_headers=(), oauth=None, client_certificate=None, secrets=())


def redact(secret: dict) -> dict:
    """A Secret resource as proto3 JSON with every value replaced: what `overspill render` shows."""
    out = dict(secret)
    if "genericSecret" in out:
        out["genericSecret"] = {"secret": {"inlineBytes": REDACTED}}
    if "tlsCertificate" in out:
        out["tlsCertificate"] = {k: {"inlineBytes": REDACTED} for k in out["tlsCertificate"]}
    return out
