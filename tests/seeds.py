"""The product documents' YAML examples (seeds 001 and 002), as written, shared by the tests.

Seed 001's page lost its indentation and seed 002's uses tabs: these are their documented
structure, spaces for tabs.
"""

from __future__ import annotations

import yaml

# --- Seed 001, verbatim (the page lost its indentation; this is the documented structure) ---

SEED_001_MODEL = """\
apiVersion: deployment.beamlit.com/v1alpha1
kind: ModelDeployment
metadata:
  name: my-model
spec:
  model: my-model-on-Beamlit
  environment: production
  modelSourceRef:
    apiVersion: apps/v1
    kind: Deployment
    name: my-model
    namespace: default
  serviceRef:
    name: my-model
    namespace: default
    targetPort: 8080
  offloadingConfig:
    behavior:
      percentage: 50
    metrics:
      - type: Resource
        resource:
          name: cpu
          target:
            type: Utilization
            averageUtilization: 90
"""

SEED_001_POLICY = """\
apiVersion: authorization.beamlit.com/v1alpha1
kind: Policy
metadata:
  name: my-policy
spec:
  type: location
  locations:
    - type: country
      name: "us"
    - type: continent
      name: "na"
"""

SEED_001_MODEL_WITH_POLICIES = """\
apiVersion: deployment.beamlit.com/v1alpha1
kind: ModelDeployment
metadata:
  name: my-model
spec:
  model: my-model-on-Beamlit
  environment: production
  modelSourceRef:
    apiVersion: apps/v1
    kind: Deployment
    name: my-model
    namespace: default
  serviceRef:
    name: my-model
    namespace: default
    targetPort: 8080
  policies:
    - refType: localPolicy
      name: my-policy
    - refType: remotePolicy
      name: my-policy-on-beamlit
  offloadingConfig:
    behavior:
      percentage: 50
    metrics:
      - type: Resource
        resource:
          name: cpu
          target:
            type: Utilization
            averageUtilization: 90
"""

# --- Seed 002, verbatim fragments (indentation restored; tabs as spaces) ---

SEED_002_OVERVIEW = """\
offloadingConfig:
  behavior:
    percentage: 50
  metrics:
    - type: Resource
      resource:
        name: cpu
        target:
          type: Utilization
          averageUtilization: 50
"""

# The External example in the HPA ExternalMetricSource shape: `target` beside `metric`.
SEED_002_EXTERNAL_HPA = """\
offloadingConfig:
  behavior:
    percentage: 50
  metrics:
    - type: External
      external:
        metric:
          name: my_custom_metric_in_prom # Metric name, or PromQL query
          selector:
            # Any label you want to match in your metric.
            # This only works for a single metric (not a PromQL query).
            matchLabels:
              my_label: "value"
        target:
          type: Value
          value: 10
"""

# The same example as the seed page nests it: `target` under `metric`.
SEED_002_EXTERNAL_NESTED = """\
offloadingConfig:
  behavior:
    percentage: 50
  metrics:
    - type: External
      external:
        metric:
          name: my_custom_metric_in_prom # Metric name, or PromQL query
          selector:
            # Any label you want to match in your metric.
            # This only works for a single metric (not a PromQL query).
            matchLabels:
              my_label: "value"
          target:
            type: Value
            value: 10
"""

SEED_002_METRICS_SERVER = """\
  metrics:
  - type: Resource
    resource:
      name: cpu
      target:
        type: Utilization
        averageUtilization: 50
"""


def model_with(offloading_fragment: str) -> dict:
    """Seed 001's ModelDeployment with its offloadingConfig replaced by a seed 002 fragment."""
    doc = yaml.safe_load(SEED_001_MODEL)
    doc["spec"]["offloadingConfig"] = yaml.safe_load(offloading_fragment)["offloadingConfig"]
    return doc
