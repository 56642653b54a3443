# django-postgrespool: `make help` lists the targets.
#
# Lanes: one virtualenv per Django × driver under .venv/ (made with uv).
# DJANGO=4.2|5.2|6.1 and DRIVER=psycopg|psycopg2 pick the lane of `make test`;
# MATRIX=1 runs every lane (what CI does).

.DEFAULT_GOAL := help
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c

PYTHON ?= python3
DJANGO ?= 5.2
DRIVER ?= psycopg
MATRIX ?=
QUICK ?=
PYTEST_ARGS ?=

LANE := dj$(subst .,,$(DJANGO))-$(DRIVER)
# With MATRIX=1 the tests that serve the example under real servers (marker
# "servers": runserver, gunicorn, uvicorn, gevent, Chromium) run in these
# lanes only, each Django release and each driver once; one lane runs them all.
SERVER_LANES := dj42-psycopg2 dj52-psycopg dj61-psycopg
# The pool's unit tests on a fake DB-API (marker "pool_unit") depend on the
# Python version only: they run in one lane per Python version the matrix uses
# (3.11, 3.12 and 3.13: tests/support/lanes.py).
POOL_UNIT_LANES := dj52-psycopg dj61-psycopg dj61-psycopg2
# Tests marked "default_lane" run once, in the default lane: those of `make
# demo` (the lane it uses; the others serve the example in their own tests)
# and those that do not depend on the lane's Django or driver. The default
# lane serves the example too, whichever lane DJANGO= and DRIVER= pick.
DEFAULT_LANE := $(LANE)
LANES := $(if $(MATRIX),$(shell $(PYTHON) tests/support/lanes.py list),$(LANE))
lane_python = $$($(PYTHON) tests/support/lanes.py python $(1))

.PHONY: help
help: ## Show this help
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  make %-18s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

.PHONY: system-deps
system-deps: ## Install the Debian packages the suites use (PostGIS, PgBouncer, wrk) when root
	@bash tests/support/system-deps.sh

# With MATRIX=1 the lanes run in two sequences side by side, of about the same
# length: a lane leaves the machine's 2 cores about 60 % idle (it mostly waits
# on its servers). The first holds the default lane and the other servers lanes
# but BESIDE_SERVER_LANES; the second those, then the lanes without servers
# tests (about 3 min each). The legacy lane runs beside both (~30 s of CPU in
# its ~2.5 min). The output of the second and the legacy lane's are printed at
# the end; a failing lane stops its own sequence only; Ctrl-C stops them all.
BESIDE_SERVER_LANES := dj61-psycopg
MAIN_LANES = $(filter $(filter-out $(BESIDE_SERVER_LANES),$(SERVER_LANES)) $(DEFAULT_LANE),$(LANES))
SIDE_LANES = $(strip $(filter $(BESIDE_SERVER_LANES),$(filter-out $(MAIN_LANES),$(LANES))) \
	$(filter-out $(SERVER_LANES) $(DEFAULT_LANE),$(LANES)))

.PHONY: test
test: system-deps ## Run the test suite (DJANGO=, DRIVER=, or MATRIX=1 for every lane) and, beside it, the legacy lane
	@run_lane() { \
	  lane=$$1; marks="not reliability and not dist"; \
	  if [ -n "$(MATRIX)" ] && [ -z "$$(echo ' $(SERVER_LANES) $(DEFAULT_LANE) ' | grep -F " $$lane ")" ]; then \
	    marks="$$marks and not servers"; \
	  fi; \
	  if [ -n "$(MATRIX)" ] && [ -z "$$(echo ' $(POOL_UNIT_LANES) $(DEFAULT_LANE) ' | grep -F " $$lane ")" ]; then \
	    marks="$$marks and not pool_unit"; \
	  fi; \
	  if [ -n "$(MATRIX)" ] && [ "$$lane" != "$(DEFAULT_LANE)" ]; then \
	    marks="$$marks and not default_lane"; \
	  fi; \
	  echo "==> lane $$lane ($$marks)"; \
	  py=$(call lane_python,$$lane); \
	  $$py -m pytest tests -p no:cacheprovider -m "$$marks" $(PYTEST_ARGS); \
	}; \
	side=; legacy=; logs=$$(mktemp -d); \
	trap 'kill $$side $$legacy 2>/dev/null || true; rm -rf "$$logs"' EXIT; \
	trap 'exit 130' INT TERM; \
	( $(PYTHON) tests/legacy/run.py ) > "$$logs/legacy" 2>&1 & legacy=$$!; \
	if [ -n "$(SIDE_LANES)" ]; then \
	  ( for lane in $(SIDE_LANES); do run_lane $$lane || exit 1; done ) > "$$logs/side" 2>&1 & side=$$!; \
	fi; \
	rc=0; \
	for lane in $(MAIN_LANES); do run_lane $$lane || { rc=1; break; }; done; \
	side_rc=0; if [ -n "$$side" ]; then wait $$side || side_rc=$$?; cat "$$logs/side"; fi; \
	legacy_rc=0; wait $$legacy || legacy_rc=$$?; cat "$$logs/legacy"; \
	[ $$rc -eq 0 ] && [ $$side_rc -eq 0 ] && [ $$legacy_rc -eq 0 ]

.PHONY: test-legacy
test-legacy: ## Run the legacy lane: Python 2.7 + Django 1.6 + South 1.0.2
	@$(PYTHON) tests/legacy/run.py

.PHONY: test-reliability
test-reliability: system-deps ## Run the reliability and security suite and print its report
	@py=$(call lane_python,$(LANE)); \
	$$py -m pytest tests -p no:cacheprovider -m reliability $(PYTEST_ARGS)

.PHONY: conformance
conformance: ## Run Django's own test suite against the pooled engine and the stock one
	@$(PYTHON) tests/conformance/run.py $(if $(MATRIX),--all,)

.PHONY: bench
bench: system-deps ## Benchmark against the alternatives (QUICK=1 for a short run)
	@$(PYTHON) bench/run.py $(if $(QUICK),--quick,)

.PHONY: demo
demo: ## Serve the example project on 127.0.0.1:8000 with an embedded PostgreSQL
	@py=$(call lane_python,$(LANE)); \
	$$py examples/demo.py

.PHONY: lint
lint: ## Type-check the packages (mypy, strict) and lint them (ruff)
	@py=$$($(PYTHON) tests/support/lanes.py tool lint "mypy>=1.13" "ruff>=0.8" "django-stubs>=5.1" \
	  "Django>=5.2,<5.3" "SQLAlchemy>=2.1,<2.2" "psycopg[binary]>=3.1.8" "dj-database-url>=3.0" \
	  "opentelemetry-api>=1.30" "prometheus_client>=0.20" "django-debug-toolbar>=4.4" \
	  -e packages/backend -e packages/dburl -e packages/south_adapter); \
	$$py -m mypy packages/backend/src packages/dburl/src packages/south_adapter/src && \
	$$py -m ruff check packages

DOCS_REQS := "sphinx>=8,<9" "furo>=2024.8" "Django>=5.2,<5.3" "SQLAlchemy>=2.1,<2.2" "psycopg[binary]>=3.1.8" \
	"dj-database-url>=3.0" -e packages/backend -e packages/dburl -e packages/south_adapter

.PHONY: docs
docs: ## Build the documentation site (Sphinx, warnings as errors) into docs/_build
	@py=$$($(PYTHON) tests/support/lanes.py tool docs $(DOCS_REQS)); \
	$$py -m sphinx -W --keep-going -q -b html docs docs/_build/html && \
	echo "docs: docs/_build/html/index.html"

.PHONY: dist
dist: ## Build the three sdists and wheels into dist/, twine-check them, test the wheels installed
	@py=$$($(PYTHON) tests/support/lanes.py tool build-tools "build>=1.2" "twine>=5"); \
	rm -rf dist && \
	for package in backend dburl south_adapter; do \
	  $$py -m build -q --outdir dist packages/$$package || exit 1; \
	done && \
	$$py -m twine check --strict dist/* && \
	lane=$(call lane_python,$(LANE)) && \
	$$lane -m pytest tests/dist -p no:cacheprovider -m dist $(PYTEST_ARGS)

.PHONY: clean
clean: ## Remove the virtualenvs and the demo's database
	rm -rf .venv .pgdata
