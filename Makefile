# crgate: `make run` (the main job on embedded defaults) and `make test` (the whole suite).
# Both set up what they need on first use (.venv, Debian packages when root) and are quick after.

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEB_PACKAGES := libopenjp2-7 libopenjp2-tools dcmtk libgdcm-tools dicom3tools orthanc orthanc-dicomweb openjph-tools chromium chromium-driver
DEMO := var/demo

.PHONY: run test lint typecheck unit bench deps clean services viewer

$(BIN)/crgate: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,train]'
	touch $@

.stamp-deb: Makefile  # re-checked when DEB_PACKAGES changes
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

# `make viewer`: OHIF Viewer v3, the prebuilt dist/ of @ohif/app from the npm registry, unpacked
# into build/ohif/dist and moved under /viewer/ (services/api/viewer.py) for
# `crgate serve --viewer build/ohif/dist` (and the browser tests).
OHIF_VERSION := 3.13.2
VIEWER := build/ohif/dist
$(VIEWER)/index.html: Makefile services/api/viewer.py $(BIN)/crgate
	@command -v npm >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq npm >/dev/null; } || { echo "npm is needed for the viewer (apt-get install npm)" >&2; exit 1; }
	rm -rf build/ohif && mkdir -p build/ohif
	cd build/ohif && npm pack --silent @ohif/app@$(OHIF_VERSION) >/dev/null && tar xzf ohif-app-$(OHIF_VERSION).tgz && mv package/dist dist && rm -rf package ohif-app-$(OHIF_VERSION).tgz
	$(BIN)/python -m services.api.viewer $(VIEWER) >/dev/null
	touch $@
viewer: $(VIEWER)/index.html

# `make run`: crgate serve (data in var/demo) in the foreground; once it answers, a phantom study
# is pushed to it by C-STORE (pynetdicom, `crgate demo`) like a PACS would. Ctrl-C stops it.
HTTP_PORT ?= 8080
DICOM_PORT ?= 11112
run: deps viewer
	@mkdir -p $(DEMO); echo "starting crgate serve (log: $(DEMO)/serve.log)"; \
	$(BIN)/crgate serve --data-dir $(DEMO) --http-port $(HTTP_PORT) --dicom-port $(DICOM_PORT) --viewer $(VIEWER) >>$(DEMO)/serve.log 2>&1 & pid=$$!; \
	trap 'kill -TERM $$pid 2>/dev/null; wait $$pid' INT TERM; \
	until $(BIN)/python -c "import urllib.request as u; u.urlopen('http://127.0.0.1:$(HTTP_PORT)/healthz', timeout=1)" 2>/dev/null; do \
	  kill -0 $$pid 2>/dev/null || { echo "crgate serve did not start (ports $(HTTP_PORT), $(DICOM_PORT) in use? set HTTP_PORT=... DICOM_PORT=...)" >&2; exit 1; }; \
	  sleep 0.2; \
	done; \
	$(BIN)/crgate demo --url http://127.0.0.1:$(HTTP_PORT) --dicom CRGATE@127.0.0.1:$(DICOM_PORT) --data-dir $(DEMO); \
	echo; \
	echo "crgate is running (pid $$pid, log $(DEMO)/serve.log):"; \
	echo "  API docs      http://127.0.0.1:$(HTTP_PORT)/docs"; \
	echo "  OHIF viewer   http://127.0.0.1:$(HTTP_PORT)/viewer/ (after logging in)"; \
	echo "  browser login http://127.0.0.1:$(HTTP_PORT)/login (with the admin key)"; \
	echo "  admin API key $(DEMO)/admin.key (created on first start, mode 0600)"; \
	echo "  QIDO-RS       curl -H \"Authorization: Bearer \$$(cat $(DEMO)/admin.key)\" http://127.0.0.1:$(HTTP_PORT)/dicomweb/studies"; \
	echo "  DICOM         C-STORE / C-ECHO to AE CRGATE on port $(DICOM_PORT)"; \
	echo "Press Ctrl-C to stop it."; \
	wait $$pid

lint: deps
	$(BIN)/ruff check services tests bench
	$(BIN)/ruff format --check services tests bench

typecheck: deps
	$(BIN)/mypy

# The service tests talk to a real Redis (broker) and PostgreSQL on 127.0.0.1: start them when
# they are installed but not running (CI machines run both already).
services:
	@$(BIN)/python -c "import socket; socket.create_connection(('127.0.0.1', 6379), 1)" 2>/dev/null || { \
	  command -v redis-server >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get install -y -qq redis-server >/dev/null; }; \
	  echo "starting redis-server on 127.0.0.1:6379"; \
	  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no; sleep 0.5; }
	@$(BIN)/python -c "import socket; socket.create_connection(('127.0.0.1', 5432), 1)" 2>/dev/null || { \
	  command -v pg_ctlcluster >/dev/null && pg_ctlcluster --skip-systemctl-redirect $$(ls /etc/postgresql) main start; } || \
	  echo "PostgreSQL is not listening on 127.0.0.1:5432: the PostgreSQL variants of the tests will fail" >&2

test: deps lint typecheck services viewer
	$(BIN)/pytest -q

bench: deps
	$(BIN)/python bench/bench_transcode.py
	$(BIN)/python bench/bench_htj2k.py
	$(BIN)/python bench/bench_metrics.py
	$(BIN)/python bench/bench_inference.py
	$(BIN)/python bench/bench_ingest.py
	$(BIN)/python bench/bench_study.py

clean:
	rm -rf $(VENV) .stamp-deb var build crgate-out .mypy_cache .ruff_cache .pytest_cache
