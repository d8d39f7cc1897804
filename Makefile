# authz-server — `make help` lists the targets.
.DEFAULT_GOAL := help
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: help install lock lock-upgrade drift lint format test run fuzz mutate soak bench bench-loop bench-tracing bench-profile bench-tools image image-base image-tools image-test image-check k8s-validate clean
.PHONY: monitoring-tools monitoring dashboard-preview redis-tools

help: ## List the targets
	@grep -E '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-13s %s\n", $$1, $$2}'

# Development, tests and CI install exactly the locked set (requirements/dev.txt, with hashes);
# pyproject.toml keeps the ranges a user of the package needs. `make lock` updates the lock.
$(STAMP): pyproject.toml requirements/dev.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --require-hashes -r requirements/dev.txt
	$(BIN)/pip install --quiet --no-deps --no-build-isolation -e .
	$(MAKE) --no-print-directory otlp-protos
	touch $(STAMP)

# NOTE: xds-protos ships an old copy of opentelemetry-proto's files at the same paths, and pip
# lets whichever it installs last own them. Re-installing opentelemetry-proto (its version as
# resolved, or the lock's entry with its hashes, no dependencies) after everything else makes
# its files win, whatever came before; the server's tracing refuses to start otherwise
# (authz_server/ops/tracing.py). Run it again after any `pip install` that (re)installs xds-protos.
.PHONY: otlp-protos
otlp-protos: ## Put opentelemetry-proto's files back over xds-protos' old copy (make install runs it)
	@if grep -q '^opentelemetry-proto==' requirements/dev.txt 2>/dev/null; then \
		awk '/^opentelemetry-proto==/ {on = 1; print; next} on && /^[^ ]/ {exit} on {print}' \
			requirements/dev.txt > $(VENV)/otlp-protos.txt; \
	else \
		$(BIN)/python -c 'import importlib.metadata as m; print("opentelemetry-proto==" + m.version("opentelemetry-proto"))' \
			> $(VENV)/otlp-protos.txt; \
	fi
	$(BIN)/pip install --quiet --no-deps --force-reinstall -r $(VENV)/otlp-protos.txt

install: $(STAMP) ## Create .venv and install the package (editable) with dev extras

# NOTE: --universal so the lock holds for every platform a contributor uses, not just this one;
# runtime.txt (the image's set) is compiled first and constrains dev.txt, so both agree.
LOCK_FLAGS := --generate-hashes --universal --python-version 3.11 --quiet
# NOTE: no $(STAMP) prerequisite: installing needs the lock, and a lock that lacks a new
# dependency must still be renewable.
lock: ## Update requirements/*.txt after a pyproject change, keeping the pins that still fit (uv); commit them
	test -x $(BIN)/pip || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet 'uv>=0.9'
	$(BIN)/uv pip compile pyproject.toml requirements/build.in $(LOCK_FLAGS) $(LOCK_UPGRADE) -o requirements/runtime.txt
	$(BIN)/uv pip compile pyproject.toml requirements/build.in --extra dev -c requirements/runtime.txt $(LOCK_FLAGS) $(LOCK_UPGRADE) -o requirements/dev.txt
	$(BIN)/uv pip compile pyproject.toml requirements/build.in --extra dev --extra mutate -c requirements/dev.txt $(LOCK_FLAGS) $(LOCK_UPGRADE) -o requirements/mutate.txt
	@echo "Locked. Run 'make install test' (a grpcio-tools change also needs 'make proto'), then commit requirements/."

lock-upgrade: ## Move requirements/*.txt to the newest versions pyproject allows (then make install proto test)
	$(MAKE) lock LOCK_UPGRADE=--upgrade

DRIFT_VENV ?= /tmp/authz-server-drift
drift: ## Newest allowed versions (not the lock) in a scratch venv, then the unit tests: drift seen before it bites
	rm -rf $(DRIFT_VENV)
	$(PYTHON) -m venv $(DRIFT_VENV)
	$(DRIFT_VENV)/bin/pip install --quiet --upgrade pip
	$(DRIFT_VENV)/bin/pip install --quiet '.[dev]'
	cd $(CURDIR) && $(DRIFT_VENV)/bin/python -m pytest -q -p no:cacheprovider tests/unit
	$(DRIFT_VENV)/bin/pip freeze > $(DRIFT_VENV)/freeze.txt
	@echo "Drift run green with the versions in $(DRIFT_VENV)/freeze.txt"

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
test: $(STAMP) monitoring-tools redis-tools ## Run the whole test suite (unit + end-to-end through a real Envoy; TEST_WORKERS=2)
	$(BIN)/pytest -n $(TEST_WORKERS) --dist loadfile

.PHONY: proto
proto: $(STAMP) ## Regenerate authz_server/v1/ from proto/*.proto (grpcio-tools); commit the result
	$(BIN)/python proto/generate.py

DOOR ?= grpc
run: $(STAMP) ## Demo: Envoy in front of the server, prints curl commands (DOOR=http: HTTP door)
	$(BIN)/python examples/demo/run.py --door $(DOOR)

# BENCH_QUICK=1: a few minutes, for development; its report goes to a temporary file, never to
# bench/results/latest.md. BENCH_OUTPUT=FILE writes the report there instead.
bench: $(STAMP) bench-tools ## Real Envoy + wrk/h2load, ~8 min (BENCH_QUICK=1: ~3, to /tmp): bench/results/latest.md
	$(BIN)/python -m bench $(if $(BENCH_OUTPUT),--output $(BENCH_OUTPUT))

FUZZ_SECONDS ?= 120
fuzz: $(STAMP) ## atheris (coverage-guided) for FUZZ_SECONDS (120), then the properties with 20,000 examples each, the index equivalence with 5,000 and the decision memo equivalence with 3,000: ~20 min
	$(BIN)/pip install --quiet -e '.[dev,fuzz]'
	$(BIN)/python fuzz/fuzz_check.py -max_total_time=$(FUZZ_SECONDS) -rss_limit_mb=2048
	HYPOTHESIS_PROFILE=fuzz $(BIN)/pytest -q -p no:cacheprovider tests/security/test_fuzz.py \
		tests/unit/test_policy_index.py tests/unit/test_decision_memo.py

# mutmut over tokens, credentials, policy, policy_index, service, attributes, doors/http.py and
# config, each module within MUTATE_MINUTES; each mutant runs only the unit and security tests
# that cover its function (pyproject's [tool.mutmut]). Not part of `make test`. A second run
# resumes where the first stopped (results kept in mutants/). MUTATE_MODULES: e.g. "policy.index".
MUTATE_MINUTES ?= 6
MUTATE_MODULES ?=
mutate: $(STAMP) ## Mutation testing of the security-critical modules, MUTATE_MINUTES (6) each, ~80 min: bench/results/mutation.md
	$(BIN)/pip install --quiet --require-hashes -r requirements/mutate.txt
	$(MAKE) --no-print-directory otlp-protos
	$(BIN)/python bench/mutate.py --minutes-per-module $(MUTATE_MINUTES) $(MUTATE_MODULES)

SOAK_MINUTES ?= 5
SOAK_DOOR ?= grpc
soak: $(STAMP) ## Real Envoy under load for SOAK_MINUTES (5), key rotation + config reload midway, exit 1 on a miss: bench/results/soak.md, .png (SOAK_DOOR=http)
	$(BIN)/python -m bench.soak --minutes $(SOAK_MINUTES) --door $(SOAK_DOOR)

bench-loop: $(STAMP) ## Per-Check CPU cost with a local loop (no network)
	$(BIN)/python -m bench.scenarios.check_loop

bench-tracing: $(STAMP) ## Per-Check CPU with tracing off, on at 1% and at 100% sampling (in process and the server's own), ~2 min
	$(BIN)/python -m bench.scenarios.tracing --write bench/results/latest.md

# py-spy (PyPI, pinned, into this venv only: no dependency of the package) and Debian linux-perf
# (perf) sample the running servers; bench/scenarios/profile.py leaves out the part of a
# missing one.
PY_SPY_VERSION ?= 0.4.3
bench-profile: $(STAMP) bench-tools ## Where the server's CPU goes under the loads of `make bench` (py-spy, perf, context switches), ~3 min: bench/results/profile.md
	@test -x $(BIN)/py-spy || $(BIN)/pip install --quiet py-spy==$(PY_SPY_VERSION)
	@command -v perf >/dev/null || { apt-get update && apt-get install -y linux-perf; }
	$(BIN)/python -m bench.scenarios.profile

bench-tools: ## Install the load generators (Debian wrk, nghttp2-client) when missing
	@if ! command -v wrk >/dev/null || ! command -v h2load >/dev/null || ! command -v nghttp >/dev/null; then \
		apt-get update && apt-get install -y wrk nghttp2-client; \
	fi

# One version for the package, the image tag and k8s/base/deployment.yaml: pyproject.toml's.
VERSION := $(shell sed -n 's/^version = "\(.*\)"$$/\1/p' pyproject.toml)
IMAGE ?= authz-server:$(VERSION)

# The first of $(CONTAINER_ENGINE), docker, podman whose `info` answers ($$engine; empty if none).
FIND_ENGINE = engine=""; \
	for candidate in $(CONTAINER_ENGINE) docker podman; do \
		if command -v $$candidate >/dev/null 2>&1 && $$candidate info >/dev/null 2>&1; then \
			engine=$$candidate; break; \
		fi; \
	done
NO_ENGINE = echo "make $@: no container engine available ('docker info' and 'podman info' fail)." >&2; \
	echo "Build where Docker or Podman runs; 'make image-check' lints the Dockerfile here." >&2; \
	exit 2

image: ## Build the image (IMAGE=authz-server:<pyproject version>) with docker or podman; exit 2 if none runs
	@$(FIND_ENGINE); \
	if [ -z "$$engine" ]; then $(NO_ENGINE); fi; \
	echo "$$engine build -t $(IMAGE) ."; \
	$$engine build -t $(IMAGE) . || { status=$$?; \
		echo "make image: the build failed. Where $(BASE_IMAGE) cannot be pulled, 'make image-base' builds a stand-in once." >&2; \
		exit $$status; }

# The base both stages of the Dockerfile use, and the Debian release and packages that make a
# stand-in for it: Python 3.11 in bookworm, with venv and pip for the builder stage.
BASE_IMAGE := $(shell sed -n 's/^FROM \([^ ]*\) AS builder$$/\1/p' Dockerfile)
BASE_SUITE ?= bookworm
BASE_PACKAGES := python3,python3-venv,python3-pip,python-is-python3,ca-certificates

image-base: ## Only where python:3.11-slim cannot be pulled (no registry): a stand-in from Debian packages (mmdebstrap, ~2 min, once)
	@$(FIND_ENGINE); \
	if [ -z "$$engine" ]; then $(NO_ENGINE); fi; \
	base=docker.io/library/$(BASE_IMAGE); \
	if $$engine image inspect $$base >/dev/null 2>&1; then echo "$$base: present"; exit 0; fi; \
	if timeout 300 $$engine pull $$base; then exit 0; fi; \
	echo "$$base cannot be pulled: a stand-in from Debian $(BASE_SUITE) packages (mmdebstrap)"; \
	if ! command -v mmdebstrap >/dev/null; then \
		echo "make image-base: needs mmdebstrap ('make image-tools' installs it)" >&2; exit 2; \
	fi; \
	dir=$$(mktemp -d); \
	mmdebstrap --quiet --variant=minbase --include=$(BASE_PACKAGES) $(BASE_SUITE) $$dir/base.tar \
		&& $$engine import --change 'ENV=LANG=C.UTF-8' --change 'CMD=["python3"]' $$dir/base.tar $$base; \
	status=$$?; rm -rf $$dir; exit $$status

image-tools: ## Install podman, runc and mmdebstrap (Debian) when missing
	@if ! command -v podman >/dev/null || ! command -v runc >/dev/null || ! command -v mmdebstrap >/dev/null; then \
		apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends podman runc mmdebstrap; \
	fi

# tests/image/containers.conf holds what this kind of host needs (runtime, ulimits, CA bundle,
# network); the Dockerfile and `make image` need none of it.
IMAGE_TEST_CONF ?= $(CURDIR)/tests/image/containers.conf
image-test: $(STAMP) image-tools ## Build the image and run it for real with podman: Envoy in front, as k8s runs it, SIGTERM, the docs' docker run (~2 min; first time +3)
	CONTAINERS_CONF=$(IMAGE_TEST_CONF) $(MAKE) --no-print-directory image-base CONTAINER_ENGINE=podman
	CONTAINERS_CONF=$(IMAGE_TEST_CONF) CONTAINER_ENGINE=podman $(BIN)/pytest -p no:cacheprovider tests/image

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

# NOTE: as for Prometheus, policy-rc.d keeps Debian's service from starting: the tests start
# their own redis-server on a Unix socket in a temporary folder.
redis-tools: ## Install Debian's redis-server (the DPoP replay cache tests) when missing, service not started
	@if ! command -v redis-server >/dev/null; then \
		apt-get update || exit 1; made=""; \
		if [ ! -e /usr/sbin/policy-rc.d ]; then \
			printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d && made=1; \
		fi; \
		DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends redis-server; status=$$?; \
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
