# Set-up and entry points. `make demo` and `make test` are the two commands in README.md;
# both install what they need first (idempotent: each step is skipped when already done).
#
#   make setup   Debian packages (image sources, WordNet, Fashion-MNIST, Freeciv), npm packages (Twemoji,
#                OpenMoji, Fluent emoji, 8 small @iconify-json sets), the animal-mnist wheel, and a
#                virtualenv with the project installed (pinned versions from pyproject.toml)
#   make demo    setup, then the demo job on the built-in offline pool (DEMO_SIZE=full for ~12.5k rows)
#   make test    setup and test-deps (chromium + chromium-driver, for the browser test), then the whole test
#                suite (this is what .ci/run calls)
#   make perf    setup, then every perf/ benchmark beside its baseline -> perf/results.json and the generated
#                section of perf/RESULTS.md (full sizes: long; PERF_QUICK=1 make perf: quick sizes, <= 10 min)
#   make large-sources   opt-in: @iconify/json + Noto emoji for `curate pool build-offline --size large`

SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
DEPS := .deps
APT_PACKAGES := openclipart-svg tuxpaint-stamps-default dataset-fashion-mnist wordnet-base libcairo2 freeciv-data
NPM_PACKAGES := emoji-datasource-twitter@16.0.0 openmoji@17.0.0 fluentui-emoji@1.3.0 \
  @iconify-json/game-icons@1.2.4 @iconify-json/mdi@1.2.3 @iconify-json/simple-icons@1.2.103 \
  @iconify-json/twemoji@1.2.5 @iconify-json/flag@1.2.12 @iconify-json/circle-flags@1.2.11 \
  @iconify-json/fluent-emoji-high-contrast@1.2.6 @iconify-json/pixelarticons@1.2.9
# `--size large` also reads these (178 MB download): `make large-sources`
LARGE_NPM_PACKAGES := @iconify/json@2.2.535 emoji-datasource-google@16.0.0
WORK ?= work
# offline pool size for the demo: small (~1.5k rows) or full (~12.5k rows)
DEMO_SIZE ?= small
# PERF_QUICK=1: `make perf` at quick sizes
PERF_QUICK ?=
export NO_ALBUMENTATIONS_UPDATE := 1
export CURATE_DEPS := $(abspath $(DEPS))

.PHONY: setup system npm venv pydata demo test perf clean large-sources

setup: system npm venv pydata

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

# PyPI data wheels read as files, never installed (animal-mnist depends on tensorflow): 2.6 MB
pydata: $(DEPS)/pypi.stamp
$(DEPS)/pypi.stamp: Makefile $(VENV)/installed.stamp
	@mkdir -p $(DEPS)/pypi
	$(PY) -m pip download -q --no-deps --only-binary=:all: --dest $(DEPS)/pypi animal-mnist==0.4
	@touch $@

# opt-in: the complete iconify set and Noto emoji for `curate pool build-offline --size large`
large-sources: $(DEPS)/large.stamp
$(DEPS)/large.stamp: Makefile $(DEPS)/npm.stamp
	cd $(DEPS) && npm install --silent --no-audit --no-fund --prefix . $(NPM_PACKAGES) $(LARGE_NPM_PACKAGES)
	@touch $@

venv: $(VENV)/installed.stamp
$(VENV)/installed.stamp: pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -e '.[dev]'
	@touch $@

demo: setup
	$(VENV)/bin/curate demo --work $(WORK) --size $(DEMO_SIZE)

# the browser test (tests/test_browser.py): Debian's chromium and chromium-driver, for tests only
# (selenium comes with the venv's `dev` extra); `make demo` never installs them
TEST_APT_PACKAGES := chromium chromium-driver
.PHONY: test-deps
test-deps: $(DEPS)/test.stamp
$(DEPS)/test.stamp: Makefile $(VENV)/installed.stamp
	@mkdir -p $(DEPS)
	@missing=$$(for p in $(TEST_APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages for tests: $$missing"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing; \
	fi
	@touch $@

test: setup test-deps
	$(PY) -m pytest -q -p no:cacheprovider

perf: setup
	PERF_QUICK=$(PERF_QUICK) $(PY) -m perf.run_all

clean:
	rm -rf $(WORK) .pytest_cache
