"""The end-to-end demo, and the process harnesses and simulators it shares with the e2e tests.

procs     - Prometheus, Envoy and the control plane as managed subprocesses
sim       - simulated model servers exposing an in-flight gauge
load      - an open-loop HTTP load generator with per-second accounting
plot      - the demo's timeline PNG
scenario  - the demo itself (`overspill demo --out DIR`)
"""
