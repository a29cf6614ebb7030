"""Envoy resources from desired state, the versioned resource cache, and the gRPC ADS server."""
