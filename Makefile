# Two commands for a new user: `make demo` and `make test`. Both create .venv when it is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEMO_DIR ?= runs/demo
DATA_DIR ?= data/phantom

.PHONY: setup demo test test-slow bench clean

$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip >/dev/null
	$(PY) -m pip install -r requirements.txt -r requirements-dev.txt
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(PY) demo.py --data_dir $(DATA_DIR) --out $(DEMO_DIR)

# Lint first (ruff, settings in pyproject.toml); pytest's exit code 5 means no test ran: a failure, not a pass.
test: setup
	$(VENV)/bin/ruff check . || exit 1; \
	$(PY) -m pytest -q; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests were collected" >&2; exit 1; fi; exit $$rc

test-slow: setup
	$(PY) -m pytest -q -m slow

bench: setup
	for b in benchmarks/bench_*.py; do $(PY) -m benchmarks.$$(basename $$b .py) || exit 1; done

clean:
	rm -rf $(DEMO_DIR) $(DATA_DIR)
