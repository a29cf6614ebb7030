"""The resources as people read them: what `overspill render` prints, and a static bootstrap.

The static bootstrap is the same translation with endpoints and routes inlined, so a
rendered file can run an Envoy with no control plane at all (e.g. to check a config).
"""

from __future__ import annotations

from xds import resources as res
from xds.types import CLUSTER, ENDPOINT, LISTENER, ROUTE


def dynamic_resources(routes: list[res.ModelRoute], address: str, port: int) -> dict[str, list[dict]]:
    """What the ADS server serves, by type URL, as proto3 JSON mappings."""
    clusters = [res.local_cluster(r) for r in routes] + [res.remote_cluster(r) for r in routes if r.remote]
    return {
        CLUSTER: [c.to_dict() for c in clusters],
        ENDPOINT: [res.load_assignment(r).to_dict() for r in routes],
        LISTENER: [res.listener(address, port).to_dict()],
        ROUTE: [res.route_configuration(routes).to_dict()],
    }


def static_bootstrap(routes: list[res.ModelRoute], address: str, port: int, admin_port: int = 9901) -> dict:
    clusters = [res.local_cluster(r, static=True) for r in routes] + [
        res.remote_cluster(r) for r in routes if r.remote
    ]
    return {
        "node": {"id": "overspill-static", "cluster": "overspill"},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}},
        "static_resources": {
            "listeners": [
                res.listener(address, port, inline_routes=res.route_configuration(routes)).to_dict()
            ],
            "clusters": [c.to_dict() for c in clusters],
        },
    }
