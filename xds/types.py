"""Type URLs of the resources served, in the order a client must apply them."""

CLUSTER = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
ENDPOINT = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
LISTENER = "type.googleapis.com/envoy.config.listener.v3.Listener"
ROUTE = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
RUNTIME = "type.googleapis.com/envoy.service.runtime.v3.Runtime"

# Clusters, their endpoints and the weights before the listeners and routes that use them.
PUSH_ORDER = (CLUSTER, ENDPOINT, RUNTIME, LISTENER, ROUTE)
# Types a client subscribes to by name; the others are wildcard.
NAMED = {ENDPOINT, ROUTE, RUNTIME}
SHORT = {CLUSTER: "CDS", ENDPOINT: "EDS", LISTENER: "LDS", ROUTE: "RDS", RUNTIME: "RTDS"}
