"""Envoy's own numbers for Prometheus: tags that turn model cluster names into labels, and a
listener that serves only `/stats/prometheus` for a Prometheus outside the pod.

A model's clusters are named `overspill/<namespace>/<name>/<side>` (`api.desired.cluster_name`).
Envoy's stats name them inside the stat name (`cluster.overspill/team-a/llama/local.upstream_rq_total`);
the tags below take the three parts out as labels, so `/stats/prometheus` shows
`envoy_cluster_upstream_rq_total{namespace="team-a",model="llama",side="local"}` and one PromQL
query covers every model. Each regex's first group is what it removes from the name and its
second group the label's value (Envoy's `TagSpecifier` rules); together they remove the whole
cluster name. A model's name may hold dots (a DNS subdomain), so the parts are cut at the slashes.
The side is the part after the model's name, whatever it is (`local`, `remote`, a later kind);
anything after it goes to `remote_index`: with several remotes (`xds.failover`) each has its own
cluster `…/remote/<i>` under the aggregate `…/remote`, and Envoy counts a request
(`upstream_rq_total`, `upstream_rq_active`) on the remote's own cluster but its response class
and time (`upstream_rq_xx`, `upstream_rq_time`) on the aggregate, the route's cluster: both carry
side="remote", so one selector sees a model's whole remote side.
"""

from __future__ import annotations

from api.desired import CLUSTER_PREFIX

# The labels a model's cluster stats carry in /stats/prometheus (beside Envoy's own).
NAMESPACE_TAG, MODEL_TAG, SIDE_TAG = "namespace", "model", "side"
REMOTE_INDEX_TAG = "remote_index"  # which of several remotes (0: the preferred); absent otherwise
_P = CLUSTER_PREFIX  # "overspill/": no regex metacharacters
STATS_TAGS = (
    {"tag_name": NAMESPACE_TAG, "regex": rf"^cluster\.({_P}([^/]+)/)[^/]+/[^.]+\."},
    {"tag_name": MODEL_TAG, "regex": rf"^cluster\.{_P}[^/]+/(([^/]+)/)[^.]+\."},
    {"tag_name": SIDE_TAG, "regex": rf"^cluster\.{_P}[^/]+/[^/]+/(([^/.]+)[/.])"},
    {"tag_name": REMOTE_INDEX_TAG, "regex": rf"^cluster\.{_P}[^/]+/[^/]+/[^/.]+/(([^.]+)\.)"},
)
# The stats a model's cluster makes before any traffic (with deferred creation, 48 of them:
# circuit breakers, load balancer, EDS update and assignment counters, membership), left out:
# Envoy runs every tag regex above on every stat it makes (std::regex). With all of them that
# cost it 13 of 18 CPU-s taking 20,000 clusters at 10,000 models; the two `membership_*` gauges
# alone cost it 0.9 of 4.3 s. Membership repeats what the control plane sends (and shows as
# `overspill_model_ready_endpoints`): no health checks run, and a failover remote's ejection
# shows in its `outlier_detection.ejections_active`, which is kept.
# Traffic stats (`upstream_*`) and every other cluster's stats are kept. RE2, matched against
# the whole stat name.
QUIET_CLUSTER_STATS = (
    rf"^cluster\.{_P}.*\.(circuit_breakers\..*|lb_.*|update_.*|assignment_.*|init_fetch_timeout"
    r"|default\.total_match_count|max_host_weight|version|version_text|warming_state|membership_.*)$"
)
STATS_LISTENER = "overspill_stats"  # the listener (and stat prefix) that serves /stats/prometheus
ADMIN_CLUSTER = "overspill_admin"  # Envoy's admin port, as a cluster that listener routes to
PROMETHEUS_PATH = "/stats/prometheus"


def stats_tags() -> list[dict]:
    """`stats_config.stats_tags` (fresh mappings: YAML would print shared ones as anchors)."""
    return [dict(tag) for tag in STATS_TAGS]


HCM = "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
ROUTER = "envoy.extensions.filters.http.router.v3.Router"


def stats_listener(port: int, admin_port: int) -> tuple[dict, dict]:
    """A listener on every address at `port` that answers `GET /stats/prometheus` from the admin
    port (kept on 127.0.0.1), and 404 for any other path or method: Prometheus can scrape the pod
    without the admin's other endpoints (`/quitquitquit`, `/runtime_modify`) being reachable."""
    route = {
        "match": {
            "path": PROMETHEUS_PATH,
            "headers": [{"name": ":method", "string_match": {"exact": "GET"}}],
        },
        "route": {"cluster": ADMIN_CLUSTER},
    }
    hcm = {
        "@type": f"type.googleapis.com/{HCM}",
        "stat_prefix": STATS_LISTENER,
        "route_config": {"virtual_hosts": [{"name": STATS_LISTENER, "domains": ["*"], "routes": [route]}]},
        "http_filters": [
            {"name": "envoy.filters.http.router", "typed_config": {"@type": f"type.googleapis.com/{ROUTER}"}}
        ],
    }
    listener = {
        "name": STATS_LISTENER,
        "address": {"socket_address": {"address": "0.0.0.0", "port_value": port}},
        "filter_chains": [
            {"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}
        ],
    }
    admin = {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}}
    cluster = {
        "name": ADMIN_CLUSTER,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": ADMIN_CLUSTER,
            "endpoints": [{"lb_endpoints": [{"endpoint": admin}]}],
        },
    }
    return listener, cluster
