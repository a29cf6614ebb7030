"""Overspill: an Envoy control plane that offloads burst traffic of model-inference services."""

__version__ = "0.1.0"
