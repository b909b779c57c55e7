# Two commands do everything: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
WORKDIR ?= workdir/demo
export TF_CPP_MIN_LOG_LEVEL := 2
export JAX_PLATFORMS ?= cpu

.PHONY: demo test lint bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

demo: $(VENV)/.installed
	$(PY) -m mrl_jax.demo --workdir=$(WORKDIR)

test: $(VENV)/.installed
	$(PY) -m pytest -q tests

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check mrl_jax tests configs benchmarks train.py

bench: $(VENV)/.installed
	$(PY) benchmarks/heads.py

clean:
	rm -rf $(VENV) workdir
