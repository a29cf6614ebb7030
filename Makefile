# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo demo-long-burst dashboard test lint bench bench-pipeline bench-kube bench-restart bench-react soak clean prometheus

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

# Debian's Prometheus (and promtool), and kubectl for the Kubernetes tests, installed when
# missing (needs root, as on these machines). kubectl usually comes with the machine image;
# Debian's kubernetes-client is the fallback.
prometheus:
	@{ command -v prometheus && command -v promtool; } >/dev/null || { \
	  echo "installing Debian's prometheus"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null; }
	@command -v kubectl >/dev/null || { \
	  echo "installing Debian's kubernetes-client (kubectl)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq kubernetes-client >/dev/null; }

demo: $(STAMP) prometheus
	$(BIN)/overspill demo --out out/demo

# A burst longer than the buffer, in Fixed and then Proportional mode (~3 min).
demo-long-burst: $(STAMP) prometheus
	$(BIN)/overspill demo --scenario long-burst --out out/demo-long-burst

# The Grafana dashboard, generated from overspill/dashboard.py (tests fail when it is stale).
dashboard: $(STAMP)
	$(BIN)/overspill dashboard --out manifests/grafana/overspill-dashboard.json

test: $(STAMP) prometheus
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	$(BIN)/pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	$(BIN)/ruff format --check .

# N models x M simulated Envoys over loopback gRPC (bench/README.md); not part of `make test`.
# BENCH_ARGS=--full adds N=10,000 x M=1,000; BENCH_ARGS=--quick is a smoke run.
# Then the pipeline bench (below): BENCH_ARGS goes to both, so keep to the flags both take
# (--quick, --full, --models, --protocol sotw|delta|both); run each target alone for the others.
bench: $(STAMP)
	$(BIN)/python -m bench.xds_bench $(BENCH_ARGS)
	$(BIN)/python -m bench.pipeline_bench $(BENCH_ARGS)

# The whole pipeline with a real Envoy (bench/README.md, "The pipeline with a real Envoy"):
# `overspill serve --manifests DIR` + Envoy (SotW and Delta) for N=100 and 1,000 models, and sovereign
# (installed on demand into out/sovereign-venv) on the same models. BENCH_ARGS=--quick is a smoke
# run (N=100); --full adds N=10,000 (about 15 more minutes).
bench-pipeline: $(STAMP)
	$(BIN)/python -m bench.pipeline_bench $(BENCH_ARGS)

# Kubernetes mode as real processes against the API server double (bench/README.md, "Kubernetes
# mode"): decision -> status -> followers' Envoys, failover, fan-out over 1 and 2 replicas, and a
# watch of N ModelDeployments. BENCH_ARGS=--quick is a smoke run; --full adds N=10,000 to the watch.
bench-kube: $(STAMP)
	$(BIN)/python -m bench.kube_bench $(BENCH_ARGS)

# `overspill serve` churned for minutes (models, weights, metric sources, Envoy connections); exits
# non-zero unless its RSS, open files and asyncio tasks come back (README, "Soak").
# SOAK_ARGS="--minutes 30" for a long run.
soak: $(STAMP) prometheus
	$(BIN)/python -m bench.soak $(SOAK_ARGS)

# A kill -9 of the control plane and M simulated Envoys reconnecting at once (bench/README.md,
# "Restarts"): N=100 x M=1,000, SotW and Delta, about 1 min.
bench-restart: $(STAMP)
	$(BIN)/python -m bench.restart_bench $(BENCH_ARGS)

# Reaction time, metric over target -> Envoy applies the weight, Envoy's load reports against
# Prometheus at 1 s scrape and 1 s evaluation (README, "Envoy's own load reports"): 10 load steps
# per path, about 3 min.
# BENCH_ARGS="-k 30" as in the README (8 min).
bench-react: $(STAMP) prometheus
	$(BIN)/python -m bench.react_bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) out .pytest_cache
