# Set-up and entry points. `make demo` and `make test` are the two commands in README.md;
# both install what they need first (idempotent: each step is skipped when already done).
#
#   make setup   Debian packages (image sources, WordNet, Fashion-MNIST), the Twemoji npm package,
#                and a virtualenv with the project installed (pinned versions from pyproject.toml)
#   make demo    setup, then the demo job on the built-in offline pool (DEMO_SIZE=full for ~12.5k rows)
#   make test    setup, then the whole test suite (this is what .ci/run calls)
#   make perf    setup, then the perf/ benchmarks (slow; results go to perf/RESULTS.md by hand)

SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
DEPS := .deps
APT_PACKAGES := openclipart-svg tuxpaint-stamps-default dataset-fashion-mnist wordnet-base libcairo2
NPM_PACKAGES := emoji-datasource-twitter@16.0.0
WORK ?= work
# offline pool size for the demo: small (~1.5k rows) or full (~12.5k rows)
DEMO_SIZE ?= small
export NO_ALBUMENTATIONS_UPDATE := 1
export CURATE_DEPS := $(abspath $(DEPS))

.PHONY: setup system npm venv demo test perf clean

setup: system npm venv

system: $(DEPS)/system.stamp
$(DEPS)/system.stamp: Makefile
	@mkdir -p $(DEPS)
	@missing=$$(for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages: $$missing"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing; \
	fi
	@touch $@

npm: $(DEPS)/npm.stamp
$(DEPS)/npm.stamp: Makefile
	@mkdir -p $(DEPS)
	cd $(DEPS) && npm install --silent --no-audit --no-fund --prefix . $(NPM_PACKAGES)
	@touch $@

venv: $(VENV)/installed.stamp
$(VENV)/installed.stamp: pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -e '.[dev]'
	@touch $@

demo: setup
	$(VENV)/bin/curate demo --work $(WORK) --size $(DEMO_SIZE)

test: setup
	$(PY) -m pytest -q -p no:cacheprovider

perf: setup
	$(PY) -m perf.run_all

clean:
	rm -rf $(WORK) .pytest_cache
