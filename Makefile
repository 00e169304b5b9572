# crgate: `make run` (the main job on embedded defaults) and `make test` (the whole suite).
# Both set up what they need on first use (.venv, Debian packages when root) and are quick after.

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEB_PACKAGES := libopenjp2-7 libopenjp2-tools dcmtk libgdcm-tools dicom3tools
DEMO := var/demo

.PHONY: run test lint typecheck unit bench deps clean

$(BIN)/crgate: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,train]'
	touch $@

.stamp-deb:
	@missing=$$(for p in $(DEB_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing Debian packages: $$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else \
	    echo "missing Debian packages (run as root or apt-get install them): $$missing" >&2; exit 1; \
	  fi; \
	fi
	touch $@

deps: $(BIN)/crgate .stamp-deb

run: deps
	@test -f $(DEMO)/phantoms/truth.csv || $(BIN)/crgate synth --out-dir $(DEMO)/phantoms --studies 1 --seed 1
	$(BIN)/crgate transcode $(DEMO)/phantoms --cr 25 --out-dir $(DEMO)/cr25

lint: deps
	$(BIN)/ruff check services tests bench
	$(BIN)/ruff format --check services tests bench

typecheck: deps
	$(BIN)/mypy

test: deps lint typecheck
	$(BIN)/pytest -q

bench: deps
	$(BIN)/python bench/bench_transcode.py
	$(BIN)/python bench/bench_metrics.py
	$(BIN)/python bench/bench_inference.py

clean:
	rm -rf $(VENV) .stamp-deb var crgate-out .mypy_cache .ruff_cache .pytest_cache
