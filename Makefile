# Two commands on a fresh Linux or macOS machine with Python 3.11:
#   make demo   set up .venv and run every notebook headlessly into runs/demo/
#   make test   set up .venv and run the test suite
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.sdwork-installed
NOTEBOOKS := $(sort $(wildcard notebooks/[0-9][0-9]_*.ipynb))
DEMO_OUT := runs/demo
# the demo and the tests never download
OFFLINE := HF_HUB_OFFLINE=1

.PHONY: setup demo test test-fast strip lab clean-venv

setup: $(STAMP)

# Re-installs only when pyproject.toml changes (or .venv is new): cheap when up to date.
$(STAMP): pyproject.toml
	@test -n "$(PYTHON)" || { echo "error: no python3.11 or python3 on PATH; install Python 3.11" >&2; exit 1; }
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info[:2] < (3, 11))' || \
		{ echo "error: $(PYTHON) is older than Python 3.11; install 3.11 or run make PYTHON=python3.11" >&2; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	@mkdir -p $(DEMO_OUT)
	@touch $(DEMO_OUT)/.started
	@for nb in $(NOTEBOOKS); do \
		echo "== $$nb"; \
		$(OFFLINE) $(BIN)/papermill "$$nb" "$(DEMO_OUT)/$$(basename $$nb)" --cwd notebooks -k python3 || exit 1; \
	done
	@echo
	@echo "Executed notebooks:"; for nb in $(NOTEBOOKS); do echo "  $(DEMO_OUT)/$$(basename $$nb)"; done
	@echo "Results tables written by this run:"
	@find runs -newer $(DEMO_OUT)/.started -type f \( -name '*.csv' -o -name '*.parquet' -o -name '*.jsonl' \) | sort | sed 's/^/  /'

# Tests write nothing into the checkout: caches go to a temporary folder (tests/conftest.py),
# no bytecode, no pytest cache; tests/check_clean.sh proves it after the run.
TEST_ENV := $(OFFLINE) PYTHONDONTWRITEBYTECODE=1

test: $(STAMP)
	$(TEST_ENV) $(BIN)/python -m pytest
	@bash tests/check_clean.sh

test-fast: $(STAMP)
	$(TEST_ENV) $(BIN)/python -m pytest -m "not slow"

strip: $(STAMP)
	$(BIN)/nbstripout --extra-keys "metadata.papermill cell.metadata.papermill" $(NOTEBOOKS)

# JupyterLab refuses to start as root without --allow-root (containers often run as root);
# the check runs when the target does, so `sudo make lab` and a plain user both work.
# Extra options: make lab LAB_ARGS="--no-browser --port 8899"
lab: $(STAMP)
	$(BIN)/jupyter lab $$(test "$$(id -u)" = 0 && echo --allow-root) $(LAB_ARGS)

clean-venv:
	rm -rf $(VENV)
