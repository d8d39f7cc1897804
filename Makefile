# authz-server — `make help` lists the targets.
.DEFAULT_GOAL := help
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: help install lint format test run fuzz mutate soak bench bench-variants bench-floors bench-loop bench-tools image image-check k8s-validate clean
.PHONY: monitoring-tools monitoring dashboard-preview

help: ## List the targets
	@grep -E '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-13s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP) ## Create .venv and install the package (editable) with dev extras

lint: $(STAMP) ## ruff (lint + format check) and mypy
	$(BIN)/ruff check authz_server tests examples bench fuzz proto k8s/monitoring
	$(BIN)/ruff format --check authz_server tests examples bench fuzz proto k8s/monitoring
	$(BIN)/mypy

format: $(STAMP) ## Apply ruff formatting and safe fixes
	$(BIN)/ruff check --fix authz_server tests examples bench fuzz proto k8s/monitoring
	$(BIN)/ruff format authz_server tests examples bench fuzz proto k8s/monitoring

# Two pytest processes: most of the suite waits (Envoy starting, IdPs answering, polls), so
# two overlap well even on two cores. A test file stays in one process (--dist loadfile), so a
# module's shared Envoy and server start once.
TEST_WORKERS ?= 2
test: $(STAMP) monitoring-tools ## Run the whole test suite (unit + end-to-end through a real Envoy; TEST_WORKERS=2)
	$(BIN)/pytest -n $(TEST_WORKERS) --dist loadfile

.PHONY: proto
proto: $(STAMP) ## Regenerate authz_server/v1/ from proto/*.proto (grpcio-tools); commit the result
	$(BIN)/python proto/generate.py

DOOR ?= grpc
run: $(STAMP) ## Demo: Envoy in front of the server, prints curl commands (DOOR=http: HTTP door)
	$(BIN)/python examples/demo/run.py --door $(DOOR)

bench: $(STAMP) bench-tools ## Real Envoy + wrk/h2load, ~7 min (BENCH_QUICK=1: ~2): bench/results/latest.md
	$(BIN)/python bench/envoy_bench.py

bench-variants: $(STAMP) bench-tools ## gRPC door variants (threads, Unix socket, options), ~8 min (BENCH_QUICK=1: ~2): bench/results/variants.md
	$(BIN)/python bench/variants.py

bench-floors: $(STAMP) bench-tools ## HTTP ext_authz floors (uvloop+httptools, uvicorn, granian) via Envoy, ~5 min: bench/results/http_candidates.md
	$(BIN)/pip install --quiet -e '.[dev,bench-candidates]'
	$(BIN)/python bench/http_candidates.py

FUZZ_SECONDS ?= 120
fuzz: $(STAMP) ## atheris (coverage-guided) for FUZZ_SECONDS (120), then the properties with 20,000 examples each and the index equivalence with 5,000: ~12 min
	$(BIN)/pip install --quiet -e '.[dev,fuzz]'
	$(BIN)/python fuzz/fuzz_check.py -max_total_time=$(FUZZ_SECONDS) -rss_limit_mb=2048
	HYPOTHESIS_PROFILE=fuzz $(BIN)/pytest -q -p no:cacheprovider tests/security/test_fuzz.py \
		tests/unit/test_policy_index.py

# mutmut over tokens, credentials, policy, policy_index, service, attributes, doors/http.py and
# config, each module within MUTATE_MINUTES; each mutant runs only the unit and security tests
# that cover its function (pyproject's [tool.mutmut]). Not part of `make test`. A second run
# resumes where the first stopped (results kept in mutants/). MUTATE_MODULES: e.g. "policy_index".
MUTATE_MINUTES ?= 6
MUTATE_MODULES ?=
mutate: $(STAMP) ## Mutation testing of the security-critical modules, MUTATE_MINUTES (6) each, ~50 min: bench/results/mutation.md
	$(BIN)/pip install --quiet -e '.[dev,mutate]'
	$(BIN)/python bench/mutate.py --minutes-per-module $(MUTATE_MINUTES) $(MUTATE_MODULES)

SOAK_MINUTES ?= 5
SOAK_DOOR ?= grpc
soak: $(STAMP) ## Real Envoy under load for SOAK_MINUTES (5), key rotation + config reload midway, exit 1 on a miss: bench/results/soak.md, .png (SOAK_DOOR=http)
	$(BIN)/python -m bench.soak --minutes $(SOAK_MINUTES) --door $(SOAK_DOOR)

bench-loop: $(STAMP) ## Per-Check CPU cost with a local loop (no network)
	$(BIN)/python bench/check_loop.py

bench-tools: ## Install the load generators (Debian wrk, nghttp2-client) when missing
	@if ! command -v wrk >/dev/null || ! command -v h2load >/dev/null || ! command -v nghttp >/dev/null; then \
		apt-get update && apt-get install -y wrk nghttp2-client; \
	fi

# One version for the package, the image tag and k8s/base/deployment.yaml: pyproject.toml's.
VERSION := $(shell sed -n 's/^version = "\(.*\)"$$/\1/p' pyproject.toml)
IMAGE ?= authz-server:$(VERSION)

image: ## Build the image (IMAGE=authz-server:<pyproject version>) with docker or podman; exit 2 if none runs
	@engine=""; \
	for candidate in $(CONTAINER_ENGINE) docker podman; do \
		if command -v $$candidate >/dev/null 2>&1 && $$candidate info >/dev/null 2>&1; then \
			engine=$$candidate; break; \
		fi; \
	done; \
	if [ -z "$$engine" ]; then \
		echo "make image: no container engine available ('docker info' and 'podman info' fail)." >&2; \
		echo "Build where Docker or Podman runs; 'make image-check' lints the Dockerfile here." >&2; \
		exit 2; \
	fi; \
	echo "$$engine build -t $(IMAGE) ."; \
	$$engine build -t $(IMAGE) .

image-check: $(STAMP) ## Lint the Dockerfile (hadolint) and test its shape; no engine needed
	$(BIN)/hadolint Dockerfile
	$(BIN)/pytest -q tests/test_dockerfile.py

k8s-validate: $(STAMP) ## Render k8s/ with kubectl and validate it offline (schemas, config, docs)
	$(BIN)/pytest -q tests/test_manifests.py tests/test_deploy_docs.py

# NOTE: policy-rc.d (exit 101) for the install, when none exists: the tests start their own
# Prometheus on 127.0.0.1, never Debian's service.
monitoring-tools: ## Install Prometheus and promtool (Debian's prometheus) when missing, service not started
	@if ! command -v prometheus >/dev/null || ! command -v promtool >/dev/null; then \
		apt-get update || exit 1; made=""; \
		if [ ! -e /usr/sbin/policy-rc.d ]; then \
			printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d && made=1; \
		fi; \
		DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends prometheus; status=$$?; \
		if [ -n "$$made" ]; then rm -f /usr/sbin/policy-rc.d; fi; \
		exit $$status; \
	fi

monitoring: $(STAMP) monitoring-tools ## Regenerate k8s/monitoring/ from generate.py; test it (promtool, schemas, real Prometheus)
	$(BIN)/python k8s/monitoring/generate.py
	$(BIN)/pytest -q tests/monitoring

dashboard-preview: $(STAMP) monitoring-tools ## Draw the dashboard's main panels from a real Prometheus run (~2 min): docs/dashboard-preview.png
	$(BIN)/python -m tests.monitoring.preview docs/dashboard-preview.png

clean: ## Remove the virtualenv and caches
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
