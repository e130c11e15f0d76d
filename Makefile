# Quick start (README): `make demo` sets up a fresh machine and runs the demo; `make test` runs the tests.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed

.PHONY: setup demo test test-fast bench clean

setup: $(STAMP)

# torch first, from the CPU wheel on local disk (a bare `torch` would pull a multi-GB CUDA build),
# then the exact pins of requirements.lock, then the project itself without re-resolving.
# Debian packages: Fashion-MNIST (demo data), PostgreSQL (the team-configuration test), Chromium + its driver
# (the viewer and report browser tests). Missing ones are installed when apt-get can (root); otherwise the tests
# that need them say so and skip.
APT_PKGS := dataset-fashion-mnist postgresql chromium chromium-driver

$(STAMP): pyproject.toml requirements.lock
	@missing=$$(for p in $(APT_PKGS); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	  if [ -n "$$missing" ]; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing) \
	    || echo "warning: could not install Debian package(s) $$missing"; fi
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -r requirements.lock
	$(BIN)/pip install -q --no-deps -e .
	touch $@

demo: setup
	$(BIN)/figan demo

test: setup
	$(BIN)/python -m pytest

# developers' fast lane: the models, checks, data and report tests, without services or platform flows
test-fast: setup
	$(BIN)/python -m pytest -m "not platform and not slow" -q

bench: setup
	$(BIN)/python benchmarks/core_pls.py
	$(BIN)/python benchmarks/core_gan.py
	$(BIN)/python benchmarks/pipeline.py
	$(BIN)/python benchmarks/trigger_burst.py
	$(BIN)/python benchmarks/service_load.py
	$(BIN)/python benchmarks/audit_verify.py

clean:
	rm -rf $(VENV) runs
