# Set-up and everyday commands. `make demo` and `make test` work on a fresh clone: each creates .venv and
# installs what it needs (torch pinned to 2.13.0: the CPU build here, the CUDA one on a GPU machine).
# `make test` is the full suite (what CI runs); `make test-fast` leaves out the slow end-to-end tests, for the
# edit-test loop.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
DAGSTER_HOME_DIR := $(CURDIR)/.dagster_home
DEMO_DIR := $(CURDIR)/.demo
DEMO_PORT ?= 8765
# Runs the Dagster daemon lets go at once (empty: ca-platform's default for the instance's storage).
MAX_CONCURRENT_RUNS ?=

.PHONY: install postgres browser demo test test-fast ui benchmarks clean FORCE

install: $(INSTALLED)

# uv installs in seconds what pip takes minutes for. It does not read pip's settings, so it is told where the
# machine keeps local wheels: torch's CPU build lies there on CPU machines; elsewhere PyPI's torch (CUDA) is taken.
WHEELS := /opt/wheels
TORCH := $(if $(wildcard $(WHEELS)/torch-2.13.0+cpu-*.whl),torch==2.13.0+cpu,torch==2.13.0)
# --compile-bytecode: uv writes no .pyc otherwise, and every process (CLI, Dagster run, Ray worker) would compile
# dagster, torch and ray from source on each start.
UV_INSTALL = $(BIN)/uv pip install --quiet --compile-bytecode --python $(BIN)/python $(if $(wildcard $(WHEELS)),--find-links $(WHEELS))

$(INSTALLED): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet uv
	$(UV_INSTALL) $(TORCH)
	$(UV_INSTALL) -e '.[test]'
	touch $@

# Rewritten on every use, so that setting CA_DAGSTER_PG_URL (PostgreSQL storage) or MAX_CONCURRENT_RUNS takes effect.
$(DAGSTER_HOME_DIR)/dagster.yaml: $(INSTALLED) FORCE
	$(BIN)/ca-platform instance init --dagster-home $(DAGSTER_HOME_DIR) \
		$(if $(MAX_CONCURRENT_RUNS),--max-concurrent-runs $(MAX_CONCURRENT_RUNS))

# Debian's PostgreSQL server, for the test that runs a Dagster instance on it (CI starts from a clean machine).
postgres:
	@if command -v initdb >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then :; else \
		sudo=$$(test "$$(id -u)" = 0 || echo sudo); \
		$$sudo apt-get update && DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y --no-install-recommends postgresql; \
	fi

# Debian's Chromium and its ChromeDriver, for the test that drives the Dagster UI in a real browser.
browser:
	@if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then :; else \
		sudo=$$(test "$$(id -u)" = 0 || echo sudo); \
		$$sudo apt-get update && DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y --no-install-recommends chromium chromium-driver; \
	fi

demo: install $(DAGSTER_HOME_DIR)/dagster.yaml
	DAGSTER_HOME=$(DAGSTER_HOME_DIR) $(BIN)/ca-platform demo --dir $(DEMO_DIR)

# Two pytest-xdist workers, a test module at a time each (its module-scoped fixtures are built once): most tests
# keep one core busy at most, so two run side by side on a 2-core machine. PYTEST_WORKERS=0: one process.
PYTEST_WORKERS ?= 2
PYTEST = $(BIN)/python -m pytest $(if $(filter-out 0,$(PYTEST_WORKERS)),-n $(PYTEST_WORKERS) --dist loadscope)

test: install postgres browser
	$(PYTEST)

test-fast: install
	$(PYTEST) -m "not slow"

# The Dagster UI on the demo pool; the pool's images are served on 127.0.0.1:$(DEMO_PORT) meanwhile.
ui: install $(DAGSTER_HOME_DIR)/dagster.yaml
	$(BIN)/ca-platform demo --dir $(DEMO_DIR) --serve --port $(DEMO_PORT) & server=$$!; \
	trap "kill $$server" EXIT; \
	DAGSTER_HOME=$(DAGSTER_HOME_DIR) CA_POOL_URI=$(DEMO_DIR)/world/pool CA_DATA_URI=$(DEMO_DIR)/data \
	CA_ALLOW_HOSTS=127.0.0.1 $(BIN)/dagster dev -w workspace.yaml

benchmarks: install
	$(BIN)/python benchmarks/download.py
	$(BIN)/python benchmarks/scoring.py
	$(BIN)/python benchmarks/analytics.py

FORCE:

clean:
	rm -rf $(VENV) $(DEMO_DIR) $(DAGSTER_HOME_DIR) *.egg-info
