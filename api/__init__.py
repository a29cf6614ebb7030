"""The bottom layer: resource types everyone agrees on.

The CRs users apply and their validation (`crd`, `fields`, `metric_spec`), what the
control plane knows per model (`status`), and the desired state handed to the Envoy side
with its naming rules (`desired`). Imports nothing of ours.
"""
