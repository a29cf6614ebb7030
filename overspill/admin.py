"""The control plane's HTTP side: /metrics for Prometheus, /status for `overspill status`, /healthz."""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from overspill.plane import ControlPlane


def status_document(plane: ControlPlane) -> dict:
    """Per model: state, remote %, metrics, errors (Envoy NACKs too); per node: versions and NACKs."""
    nodes = [stream.describe() for stream in plane.xds.streams.values()]
    models = {str(k): s.to_dict() for k, s in sorted(plane.controller.status.items())}
    for node in nodes:
        for type_name, t in node["types"].items():
            for model in t["nackModels"]:
                if model in models:
                    models[model]["errors"].append(
                        f"{model}: Envoy {node['id']} rejected {type_name} "
                        f"version {t['nackVersion']}: {t['nack']}"
                    )
    return {
        "models": models,
        "rejected": [
            {
                "origin": r.origin,
                "object": str(r.key) if r.key else None,
                "kind": r.key.kind if r.key else None,
                "errors": list(r.errors),
            }
            for r in plane.store.rejected()
        ],
        "nodes": nodes,
    }


def make_app(plane: ControlPlane) -> web.Application:
    async def metrics(_: web.Request) -> web.Response:
        body = generate_latest(plane.instruments.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def status(_: web.Request) -> web.Response:
        return web.json_response(status_document(plane))

    async def healthz(_: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/status", status)
    app.router.add_get("/healthz", healthz)
    return app
