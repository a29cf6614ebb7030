"""Simulated peers of the control plane, shared by the protocol tests, the benchmark and the demo.

envoy - a simulated Envoy on the xDS wire, cheap enough to run a thousand of on one machine
"""
