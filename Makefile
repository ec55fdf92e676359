# make run    the MNIST sweep on a local Ray (ARGS="--data mnist-5k" etc. to pass options)
# make test   the whole test suite (as CI runs it; prints the 25 slowest tests)
# make test-fast   the edit loop: no root, no local hosts, no TensorFlow training, no large downloads
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
NODES ?= 3
MAX_WORKERS ?=
MIN_WORKERS ?= 0
CONFIG ?=
CLUSTER_ARGS := $(if $(CONFIG),--config $(CONFIG),)

.PHONY: run test test-fast lint bench system-deps cluster-args cluster-up cluster-down cluster-status clean sim

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@touch $(STAMP)

run: $(STAMP)
	$(PY) -m pipeline.mnist $(ARGS)

# Debian packages the local VM hosts need (sshd, ip, nft); installed only as root and only when missing.
system-deps:
	@if [ "$$(id -u)" = 0 ]; then \
	  missing=""; \
	  command -v sshd >/dev/null || [ -x /usr/sbin/sshd ] || missing="$$missing openssh-server"; \
	  command -v ip >/dev/null || missing="$$missing iproute2"; \
	  command -v nft >/dev/null || [ -x /usr/sbin/nft ] || missing="$$missing nftables"; \
	  command -v sudo >/dev/null || missing="$$missing sudo"; \
	  command -v ssh >/dev/null || missing="$$missing openssh-client"; \
	  command -v rsync >/dev/null || missing="$$missing rsync"; \
	  if [ -n "$$missing" ]; then \
	    echo "installing:$$missing"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null) \
	      || echo "warning: could not install$$missing; tests that need them will skip"; \
	  fi; \
	else echo "not root: tests that need network namespaces will skip"; fi

# ruff (lint + format check), mypy and the import contracts (lint-imports), configured in pyproject.toml;
# `make test` runs it first
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

# the suite's modules on TEST_WORKERS processes (3 on a 2-core machine: most of a test's time is waiting on
# hosts and Ray), a module's tests on one (they share its clusters), the longest modules first
# (tests/conftest.py); TEST_WORKERS=0 runs everything in this process. test-fast: FAST_WORKERS (4: its tests,
# without hosts, wait on Ray and the local Exoscale's operations more than they compute, and need no host's memory)
TEST_WORKERS ?= 3
FAST_WORKERS ?= 4
workers = $(if $(filter 0,$(1)),,-n $(1) --dist loadfile)
test: $(STAMP) lint system-deps
	$(PY) -m pytest -q -ra --durations=25 $(call workers,$(TEST_WORKERS)) $(PYTEST_ARGS)

FAST := not root and not tensorflow and not slow
test-fast: $(STAMP)
	$(PY) -m pytest -q -ra -m "$(FAST)" --durations=10 $(call workers,$(FAST_WORKERS)) $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) -m bench.all $(ARGS)

# A local Exoscale (root): API on the hosts' gateway, instances booted as hosts offered uv and a package
# index; prints the line to source, then `make cluster-up` etc. work as with Exoscale. Ctrl-C stops it.
sim: $(STAMP) system-deps
	$(PY) -m cloud.sim api --hosts $(ARGS)

# MAX_WORKERS=N: an autoscaling cluster (head + MIN_WORKERS; Ray's autoscaler adds up to N workers)
cluster-args:
	@if [ -n "$(MAX_WORKERS)" ] && [ "$(origin NODES)" != "file" ]; then \
	  echo "NODES and MAX_WORKERS exclude each other: NODES=N makes N nodes, MAX_WORKERS=N an autoscaling cluster" >&2; \
	  exit 2; fi

cluster-up: cluster-args $(STAMP)
ifneq ($(MAX_WORKERS),)
	$(PY) exoscale.py $(CLUSTER_ARGS) up --min-workers $(MIN_WORKERS) --max-workers $(MAX_WORKERS)
else
	$(PY) exoscale.py $(CLUSTER_ARGS) up -n $(NODES)
	$(PY) exoscale.py $(CLUSTER_ARGS) install
	$(PY) exoscale.py $(CLUSTER_ARGS) start
endif

cluster-down: $(STAMP)
	$(PY) exoscale.py $(CLUSTER_ARGS) down --yes

cluster-status: $(STAMP)
	$(PY) exoscale.py $(CLUSTER_ARGS) status

clean:
	rm -rf $(VENV) results .pytest_cache
