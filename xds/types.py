"""Type URLs of the resources served, in the order a client must apply them; and the names
every built resource shares (the config source of dynamic resources, the upstream options)."""

from xds.fields import Fields

CLUSTER = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
ENDPOINT = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
LISTENER = "type.googleapis.com/envoy.config.listener.v3.Listener"
SCOPED_ROUTE = "type.googleapis.com/envoy.config.route.v3.ScopedRouteConfiguration"
ROUTE = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
RUNTIME = "type.googleapis.com/envoy.service.runtime.v3.Runtime"
SECRET = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"

# Secrets (remotes' credentials) before the clusters that name them; clusters, their endpoints
# and the weights before the listeners and routes that use them; the
# listener before the routing scopes (its HttpConnectionManager subscribes to them), and the
# scopes before the route configurations (Envoy asks for those the scopes name).
PUSH_ORDER = (SECRET, CLUSTER, ENDPOINT, RUNTIME, LISTENER, SCOPED_ROUTE, ROUTE)
# Not a type on the wire: the key under which a view keeps its route configurations with the
# weights written in, for nodes that do not take the weight layers (`stream.Stream.route_form`).
ROUTE_WEIGHT_INLINE = ROUTE + "#weight-inline"
# Types a client subscribes to by name; the others are wildcard (in state of the world, a
# response of a wildcard type carries the whole set: Envoy removes what it leaves out).
NAMED = {ENDPOINT, ROUTE, RUNTIME, SECRET}
# Where clusters, route configurations, scopes and secrets name their dynamic parts: the same ADS
# stream (an encoded `ConfigSource`).
_SOURCE = Fields("envoy.config.core.v3.ConfigSource")
ADS = _SOURCE.ads(b"") + _SOURCE.resource_api_version("V3")
# The key of a cluster's upstream HTTP options (upstream filters, protocol) in its extension options.
HTTP_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
SHORT = {
    CLUSTER: "CDS",
    ENDPOINT: "EDS",
    LISTENER: "LDS",
    SCOPED_ROUTE: "SRDS",
    ROUTE: "RDS",
    RUNTIME: "RTDS",
    SECRET: "SDS",
}
