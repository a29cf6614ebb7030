"""Overspill: an Envoy control plane that offloads burst traffic of model-inference services."""

import os

# gRPC's fork support restarts its poller threads in a forked child, where subprocess then closes
# their epoll descriptor before exec and the child dies (SIGSEGV/SIGABRT) about one spawn in seven.
# Overspill only forks to exec (Envoy, Prometheus, the control plane in tests), so it needs none.
# Set before grpc is first imported, which this package's import precedes.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

__version__ = "0.1.0"
