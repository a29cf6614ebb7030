"""End to end with a hand-written, ADS-only Envoy bootstrap (no weight layers declared): the
weights still reach that Envoy, written into its routes, and the node is flagged on status, in
the log and in a metric. Real Envoy, real Prometheus, the real control plane; requests counted
at the backends."""

from __future__ import annotations

import asyncio

import pytest
from e2e_stack import SWITCH_BUDGET, Model, Stack, delta, stack, totals

pytestmark = pytest.mark.e2e

# What a user writes from Envoy's docs for "everything over ADS": no `layered_runtime`, so no
# RTDS layers. (The harness points `xds_cluster` and the admin port at the test's ports.)
HAND_WRITTEN = """\
node:
  id: edge-1
  cluster: hand-written-gateways
admin:
  address:
    socket_address: {{address: 127.0.0.1, port_value: 9901}}
dynamic_resources:
  ads_config:
    api_type: {api_type}
    transport_api_version: V3
    grpc_services:
    - envoy_grpc: {{cluster_name: xds_cluster}}
  cds_config: {{ads: {{}}, resource_api_version: V3}}
  lds_config: {{ads: {{}}, resource_api_version: V3}}
static_resources:
  clusters:
  - name: xds_cluster
    type: STATIC
    connect_timeout: 1s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config:
          http2_protocol_options: {{}}
    load_assignment:
      cluster_name: xds_cluster
      endpoints:
      - lb_endpoints:
        - endpoint:
            address:
              socket_address: {{address: 127.0.0.1, port_value: 18000}}
"""


async def share_of_remote(s: Stack, m: Model, n: int) -> tuple[int, int]:
    """Send n requests; (local, remote) counted at the backends. All must be answered 200."""
    before = totals(m)
    codes = await s.send(m, n)
    assert codes.count(200) == n, set(codes)
    return delta(m, before)


@pytest.mark.parametrize("api_type", ["GRPC", "DELTA_GRPC"])
async def test_hand_written_ads_bootstrap_offloads_releases_and_fails_over(tmp_path, api_type):
    bootstrap = tmp_path / "envoy.yaml"
    bootstrap.write_text(HAND_WRITTEN.format(api_type=api_type))
    m = Model("hand", percentage=50, buffer_seconds=3)
    async with stack(tmp_path, m, bootstrap=bootstrap) as s:
        local, remote = await share_of_remote(s, m, 100)
        assert (local, remote) == (100, 0), "no offloading while the metric is under its target"

        # Flagged: status (JSON and the CLI), one log line, the gauge.
        (node,) = (await s.control_plane.status())["nodes"]
        assert node["weightLayers"] is False and node["weightLayersSubscribed"] == 0, node
        printed = await s.overspill_status()
        assert "warning: does not take the weight layers (0/64 subscribed)" in printed, printed
        assert "use `overspill bootstrap`" in printed
        log = s.control_plane.log_text()
        warned = [line for line in log.splitlines() if "event=no_weight_layers" in line]
        assert len(warned) == 1, warned
        assert "node=overspill-test cluster=hand-written-gateways" in warned[0]
        assert "fix='use `overspill bootstrap`" in warned[0]
        metrics = await s.control_plane.metrics_text()
        gauge = 'overspill_xds_streams_without_weight_layers{node_cluster="hand-written-gateways"} 1.0'
        assert gauge in metrics, [ln for ln in metrics.splitlines() if "weight_layers" in ln]

        # Offloading on: the metric crosses, the remote share shows at the backends.
        s.knob.set("hand", 50)
        await s.wait_phase(m, {"Offloading"}, timeout=SWITCH_BUDGET + 2)
        await asyncio.sleep(0.5)  # the route update is in Envoy
        local, remote = await share_of_remote(s, m, 600)
        share = 100 * remote / (local + remote)
        print(f"{api_type} offloading: {remote}/{local + remote} to the remote = {share:.1f}% (want 50)")
        assert 40 <= share <= 60
        # The weight came in the routes: the Envoy has no runtime value for the model's key.
        assert "overspill.default.hand" not in await s.envoy.admin_get("/runtime")

        # Release: under the target for the buffer duration, then back to 0 % remote.
        s.knob.set("hand", 0)
        await s.wait_phase(m, {"Standby"}, timeout=m.buffer_seconds + SWITCH_BUDGET + 2)
        await asyncio.sleep(0.5)
        local, remote = await share_of_remote(s, m, 200)
        print(f"{api_type} released: {remote}/{local + remote} to the remote")
        assert (local, remote) == (200, 0)

        # Outage: no ready local endpoint, so 100 % to the remote.
        m.ready = False
        m.write(s.manifests)
        await s.wait_phase(m, {"Outage"}, timeout=SWITCH_BUDGET)
        await asyncio.sleep(0.5)
        local, remote = await share_of_remote(s, m, 200)
        print(f"{api_type} outage: {remote}/{local + remote} to the remote")
        assert (local, remote) == (0, 200)
        assert sum("event=no_weight_layers" in ln for ln in s.control_plane.log_text().splitlines()) == 1
        assert "event=route_hold_timeout" not in s.control_plane.log_text()
