"""The resources as people read them: what `overspill render` prints, and bootstraps.

`served` reads the very bytes the server sends (one builder: `snapshot.Translator`). The
static bootstrap is the same translation with endpoints and routes inlined, so a rendered
file can run an Envoy with no control plane at all (e.g. to check a config).
"""

from __future__ import annotations

import ipaddress
from dataclasses import replace

# Imported for their message types: `Any.unpack` finds only the types that were imported.
import envoy_data_plane.envoy.config.cluster.v3  # noqa: F401
import envoy_data_plane.envoy.config.endpoint.v3  # noqa: F401
import envoy_data_plane.envoy.config.listener.v3  # noqa: F401
import envoy_data_plane.envoy.config.route.v3  # noqa: F401
import envoy_data_plane.envoy.extensions.clusters.aggregate.v3  # noqa: F401
import envoy_data_plane.envoy.extensions.clusters.composite.v3  # noqa: F401
import envoy_data_plane.envoy.extensions.filters.http.credential_injector.v3  # noqa: F401
import envoy_data_plane.envoy.extensions.filters.http.header_mutation.v3  # noqa: F401
import envoy_data_plane.envoy.extensions.filters.http.lua.v3  # noqa: F401
import envoy_data_plane.envoy.extensions.filters.http.router.v3  # noqa: F401
import envoy_data_plane.envoy.extensions.filters.http.upstream_codec.v3  # noqa: F401
import envoy_data_plane.envoy.extensions.filters.network.http_connection_manager.v3  # noqa: F401
import envoy_data_plane.envoy.extensions.http.injected_credentials.generic.v3  # noqa: F401
import envoy_data_plane.envoy.extensions.http.injected_credentials.oauth2.v3  # noqa: F401
import envoy_data_plane.envoy.extensions.retry.priority.previous_priorities.v3  # noqa: F401
import envoy_data_plane.envoy.extensions.transport_sockets.tls.v3  # noqa: F401
import envoy_data_plane.envoy.extensions.upstreams.http.v3  # noqa: F401
import envoy_data_plane.envoy.service.runtime.v3  # noqa: F401
from envoy_data_plane.envoy.config.cluster.v3 import Cluster
from envoy_data_plane.envoy.config.listener.v3 import Listener
from envoy_data_plane.google.protobuf import Any as ProtoAny

from api.desired import ModelRoute
from xds import failover, runtime, spillover
from xds import resources as res
from xds.credentials import redact, without_credentials
from xds.stats import QUIET_CLUSTER_STATS, stats_listener, stats_tags
from xds.types import HTTP_OPTIONS, PUSH_ORDER, SECRET
from xds.view import View


def served(view: View) -> dict[str, dict[str, bytes]]:
    """What the server sends a node of the view's scope: per type URL, each resource's `Any` bytes."""
    return {t: {name: r.any for name, r in view.resources[t].items()} for t in PUSH_ORDER}


def served_documents(view: View) -> dict[str, list[dict]]:
    """`served`, decoded to proto3 JSON mappings, as `overspill render` prints it: secrets with
    their values replaced (they leave the control plane only to Envoy)."""
    return {
        t: [
            redact(doc) if t == SECRET else doc
            for doc in (ProtoAny.FromString(body).unpack().to_dict() for body in resources.values())
        ]
        for t, resources in served(view).items()
    }


def static_bootstrap(routes: list[ModelRoute], address: str, port: int, admin_port: int = 9901) -> dict:
    # Remotes without their credentials: they come over SDS only, and a static bootstrap has none.
    routes = [replace(r, remotes=tuple(without_credentials(x) for x in r.remotes)) for r in routes]
    clusters = [res.local_cluster(r, static=True) for r in routes] + [
        body for r in routes for _, body in failover.remote_clusters(r) + spillover.clusters(r)
    ]
    clusters = [Cluster.FromString(body) for body in clusters]
    return {
        "node": {"id": "overspill-static", "cluster": "overspill"},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}},
        "stats_config": {"stats_tags": stats_tags()},
        "static_resources": {
            "listeners": [
                Listener.FromString(
                    res.listener(address, port, inline_routes=res.route_configuration(routes, static=True))
                ).to_dict()
            ],
            "clusters": [c.to_dict() for c in clusters],
        },
    }


def ads_bootstrap(
    xds_host: str = "127.0.0.1",
    xds_port: int = 18000,
    node_id: str = "overspill-gateway",
    node_cluster: str = "overspill-gateway",
    admin_port: int = 9901,
    delta: bool = True,
    namespaces: list[str] | None = None,
    match_labels: dict[str, str] | None = None,
    shards: int = runtime.SHARDS,
    listener_port: int | None = None,
    tls_ca: str | None = None,
    tls_cert: str | None = None,
    tls_key: str | None = None,
    tls_server_name: str | None = None,
    stats_port: int | None = None,
) -> dict:
    """An Envoy bootstrap that takes everything from the control plane over one ADS stream.

    The runtime layers are the weight shards (see `xds.runtime`), then an admin layer so an
    operator can pin a weight by hand (`POST /runtime_modify?overspill.NS.NAME=0`). With
    `tls_ca` the xDS connection is TLS (see `xds_tls_socket`). Delta by default: a structural
    change then sends what changed, where state of the world sends every cluster and scope
    again to every Envoy (8 MiB per new model at 10,000 models). Model cluster stats carry the labels
    namespace, model and side in `/stats/prometheus` (see `xds.stats`); with `stats_port` a
    listener on that port serves that path alone, for a Prometheus outside the pod.
    """
    scope: dict = {}
    if namespaces:
        scope["namespaces"] = list(namespaces)
    if match_labels:
        scope["matchLabels"] = dict(match_labels)
    if listener_port:
        scope["listenerPort"] = listener_port

    def ads() -> dict:  # a fresh mapping each time: YAML would print shared ones as anchors
        return {"ads": {}, "resource_api_version": "V3"}

    node: dict = {"id": node_id, "cluster": node_cluster}
    if scope:
        node["metadata"] = {"overspill": scope}
    xds_cluster: dict = {
        "name": "xds_cluster",
        "type": "STRICT_DNS",
        "connect_timeout": "1s",
        # ADS is gRPC: HTTP/2 to the control plane, with keepalives to notice it going away.
        "typed_extension_protocol_options": {
            HTTP_OPTIONS: {
                "@type": f"type.googleapis.com/{HTTP_OPTIONS}",
                "explicit_http_config": {
                    "http2_protocol_options": {"connection_keepalive": {"interval": "30s", "timeout": "5s"}}
                },
            }
        },
        "load_assignment": {
            "cluster_name": "xds_cluster",
            "endpoints": [
                {
                    "lb_endpoints": [
                        {
                            "endpoint": {
                                "address": {
                                    "socket_address": {
                                        "address": xds_host,
                                        "port_value": xds_port,
                                    }
                                }
                            }
                        }
                    ]
                }
            ],
        },
    }
    if tls_ca:
        xds_cluster["transport_socket"] = xds_tls_socket(
            tls_ca, tls_cert, tls_key, tls_server_name or xds_host
        )
    static: dict = {"clusters": [xds_cluster]}
    if stats_port:
        listener, admin_cluster = stats_listener(stats_port, admin_port)
        static = {"listeners": [listener], "clusters": [xds_cluster, admin_cluster]}
    return {
        "node": node,
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}},
        # Each model's route configuration would add a dozen stats (http.overspill.rds.<name>.*):
        # 120,000 series and about 70 MiB per Envoy at 10,000 models. The control plane sees
        # every ACK and NACK per route configuration itself (`overspill status`).
        # An upstream's traffic stats are made when it first sees traffic: 20,000 clusters'
        # full stat sets cost Envoy half its start-up CPU and 450 MiB at 10,000 models, and
        # most clusters (remotes on standby) never carry a request.
        "deferred_stat_options": {"enable_deferred_creation_stats": True},
        "stats_config": {
            "stats_tags": stats_tags(),
            "stats_matcher": {
                "exclusion_list": {
                    "patterns": [
                        {"prefix": f"http.{res.STAT_PREFIX}.rds."},
                        {"safe_regex": {"regex": QUIET_CLUSTER_STATS}},
                    ]
                }
            },
        },
        "dynamic_resources": {
            "ads_config": {
                "api_type": "DELTA_GRPC" if delta else "GRPC",
                "transport_api_version": "V3",
                "set_node_on_first_message_only": True,
                "grpc_services": [{"envoy_grpc": {"cluster_name": "xds_cluster"}}],
            },
            "cds_config": ads(),
            "lds_config": ads(),
        },
        # Envoy's load reports (LRS) go to the control plane over the xDS cluster: the requests in
        # flight and issued per model and side, read as `envoy:` offloading metrics (see `xds.lrs`).
        "cluster_manager": {
            "load_stats_config": {
                "api_type": "GRPC",
                "transport_api_version": "V3",
                "grpc_services": [{"envoy_grpc": {"cluster_name": "xds_cluster"}}],
            }
        },
        "layered_runtime": {
            "layers": [
                {"name": name, "rtds_layer": {"name": name, "rtds_config": ads()}}
                for name in runtime.layer_names(shards)
            ]
            + [{"name": "admin", "admin_layer": {}}]
        },
        "static_resources": static,
    }


UPSTREAM_TLS = "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"


def xds_tls_socket(ca: str, cert: str | None, key: str | None, server_name: str) -> dict:
    """The xDS cluster's TLS: trust `ca`, present `cert`/`key` (mTLS) if given, and accept only a
    server certificate naming `server_name` (a DNS SAN, sent as SNI too; or an IP address SAN)."""
    try:
        ipaddress.ip_address(server_name)
        san_type, sni = "IP_ADDRESS", None  # SNI cannot carry an address
    except ValueError:
        san_type, sni = "DNS", server_name
    common: dict = {
        "alpn_protocols": ["h2"],
        "validation_context": {
            "trusted_ca": {"filename": ca},
            "match_typed_subject_alt_names": [{"san_type": san_type, "matcher": {"exact": server_name}}],
        },
    }
    if cert and key:
        common["tls_certificates"] = [
            {"certificate_chain": {"filename": cert}, "private_key": {"filename": key}}
        ]
    context: dict = {"@type": f"type.googleapis.com/{UPSTREAM_TLS}", "common_tls_context": common}
    if sni:
        context["sni"] = sni
    return {"name": "envoy.transport_sockets.tls", "typed_config": context}
