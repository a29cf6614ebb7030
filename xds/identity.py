"""Who a node is, by the client certificate it presented over mTLS, and what that lets it receive.

Node metadata is what the node says of itself; a certificate is what the CA says of it. Under
mTLS the namespaces a node receives are the intersection of the two (`Scope.within`):

* a SAN matching one of the gateway patterns (`--xds-gateway-identity`, shell-style globs):
  every model, as an edge gateway needs;
* otherwise the namespaces its SANs name: a SPIFFE ID `spiffe://<trust-domain>/ns/<ns>/...`
  (Istio's `/ns/<ns>/sa/<sa>`), or a DNS name `<anything>.<ns>.svc[.<cluster-domain>]`;
* a certificate naming neither: nothing.

Without a client certificate (plain TCP, or TLS without `--xds-client-ca`) there is no identity
and the metadata alone decides, as before.
"""

from __future__ import annotations

import fnmatch
import re
import urllib.parse
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

# A Kubernetes namespace name (RFC 1123 label): anything else in a SAN names no namespace.
_NAMESPACE = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")


@dataclass(frozen=True)
class Identity:
    """A node's certificate identity: `name` for logs and /status (the SANs, or the CN without any),
    and the namespaces it may receive (None: every model, a gateway; empty: none)."""

    name: str
    namespaces: frozenset[str] | None


@dataclass(frozen=True)
class IdentityRules:
    """How certificates map to namespaces: which SANs are gateways, and the cluster DNS domain
    of `<name>.<ns>.svc.<domain>` names."""

    gateways: tuple[str, ...] = ()
    cluster_domain: str = "cluster.local"

    def identify(self, auth: Mapping[str, Iterable[bytes]]) -> Identity | None:
        """The identity in a gRPC auth context (`context.auth_context()`), None without a client
        certificate. grpcio puts URI SANs under `peer_uri` and DNS SANs under `peer_dns`."""
        if not auth.get("x509_pem_cert"):
            return None
        uris = [v.decode(errors="replace") for v in auth.get("peer_uri", ())]
        dns = [v.decode(errors="replace") for v in auth.get("peer_dns", ())]
        sans = uris + dns
        name = ",".join(sans) or "CN=" + b",".join(auth.get("x509_common_name", ())).decode(errors="replace")
        if any(fnmatch.fnmatchcase(san, pattern) for san in sans for pattern in self.gateways):
            return Identity(name, None)
        namespaces = {ns for uri in uris if (ns := spiffe_namespace(uri))}
        namespaces |= {ns for d in dns if (ns := self.dns_namespace(d))}
        return Identity(name, frozenset(namespaces))

    def dns_namespace(self, name: str) -> str | None:
        """`<anything>.<ns>.svc` or `<anything>.<ns>.svc.<cluster-domain>` names namespace `<ns>`."""
        name = name.lower().rstrip(".")
        for suffix in (".svc", f".svc.{self.cluster_domain}"):
            if name.endswith(suffix):
                labels = name[: -len(suffix)].split(".")
                if len(labels) >= 2 and _NAMESPACE.fullmatch(labels[-1]):
                    return labels[-1]
        return None


def spiffe_namespace(uri: str) -> str | None:
    """`spiffe://<trust-domain>/ns/<ns>/...` names namespace `<ns>`."""
    parsed = urllib.parse.urlsplit(uri)
    if parsed.scheme != "spiffe" or not parsed.netloc:
        return None
    parts = parsed.path.split("/")
    if len(parts) >= 3 and parts[1] == "ns" and _NAMESPACE.fullmatch(parts[2]):
        return parts[2]
    return None
