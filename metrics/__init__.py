"""Metric sources, HPA metric semantics and the control plane's own Prometheus metrics."""
