"""Test doubles that stand in where no real component can run here: a Kubernetes API server.

Installed with the package so the tests, the benchmarks and a developer at a shell can use
it alike (`python -m overspill.testing.kubeapi --kubeconfig /tmp/kc`).
"""
