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

.PHONY: install demo test test-fast ui benchmarks clean

install: $(INSTALLED)

$(INSTALLED): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

$(DAGSTER_HOME_DIR)/dagster.yaml:
	mkdir -p $(DAGSTER_HOME_DIR) && printf 'telemetry:\n  enabled: false\n' > $@

demo: install $(DAGSTER_HOME_DIR)/dagster.yaml
	DAGSTER_HOME=$(DAGSTER_HOME_DIR) $(BIN)/ca-platform demo --dir $(DEMO_DIR)

test: install
	$(BIN)/python -m pytest

test-fast: install
	$(BIN)/python -m pytest -m "not slow"

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

clean:
	rm -rf $(VENV) $(DEMO_DIR) $(DAGSTER_HOME_DIR) *.egg-info
