# Two entry points: `make demo` (main job on an embedded default) and `make test`.
# Both create .venv and install what they need; torch is pinned to the local CPU wheel.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
MAM := $(VENV)/bin/mam
DEMO ?= build/demo

.PHONY: install test lint demo bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed

lint: install
	$(PY) -m ruff check mamcli tests benchmarks

test: lint
	$(PY) -m pytest

demo: install
	bash docs/demo.sh $(DEMO) $(MAM) $(PY)

bench: install
	$(PY) benchmarks/merge_bench.py
	$(PY) benchmarks/eval_bench.py

clean:
	rm -rf build out $(VENV)
