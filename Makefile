# `make demo` and `make test` create .venv on first use.
# Machine-local pip settings (a find-links folder with a CPU-only torch wheel) are ignored on
# purpose: torch and torchvision must come from the same registry build or torchvision fails to
# import, and a fresh machine elsewhere has no such folder.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP_ENV := env -u PIP_FIND_LINKS -u PIP_EXTRA_INDEX_URL PIP_CONFIG_FILE=/dev/null

.PHONY: demo test bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP_ENV) $(PY) -m pip install -q --upgrade pip
	$(PIP_ENV) $(PY) -m pip install -q -e '.[dev]'
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/curate demo --out demo-run

test: $(VENV)/.installed
	$(PY) -m pytest -q

bench: $(VENV)/.installed
	$(PY) bench/throughput/score_throughput.py

clean:
	rm -rf $(VENV) demo-run
