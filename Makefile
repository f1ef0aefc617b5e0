# edgecache: two commands for a fresh Debian machine: `make run` and `make test`.
SHELL := /bin/bash
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CONFIG ?= config/edgecache.toml
DEB_TEST_PKGS := docker-registry skopeo nginx-light redis-server containerd podman wrk curl
DEB_TEST_BINS := /usr/bin/docker-registry /usr/bin/skopeo /usr/sbin/nginx /usr/bin/redis-server /usr/bin/containerd /usr/bin/podman /usr/bin/wrk /usr/bin/curl

.PHONY: run test venv deb-test-deps lint bench smoke clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip >/dev/null

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -e '.[test]'
	touch $@

venv: $(VENV)/.installed

run: venv
	$(BIN)/edgecache serve --config $(CONFIG)

deb-test-deps:
	@missing=0; for b in $(DEB_TEST_BINS); do [ -x $$b ] || missing=1; done; \
	if [ $$missing = 1 ]; then \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y --no-install-recommends $(DEB_TEST_PKGS); \
	fi

lint: venv
	$(BIN)/mypy -p edgecache
	$(BIN)/mypy tests
	$(BIN)/lint-imports

test: deb-test-deps venv lint
	$(BIN)/python -m pytest -p no:cacheprovider --cov=edgecache --cov-report=term --cov-fail-under=80 tests

bench: venv deb-test-deps
	$(BIN)/python loadtests/bench.py

smoke: venv deb-test-deps
	$(BIN)/python loadtests/run.py --scenario warm --seconds 20

clean:
	rm -rf $(VENV) .pytest_cache
