# Quick start: `make train` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
STAMP_DEV := $(VENV)/.installed-dev
STAMP_DOCS := $(VENV)/.installed-docs
# pytest-xdist workers: the suite is sized for 2 cores
JOBS ?= 2

.PHONY: train test lint bench gradcheck docs clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e .
	touch $@

$(STAMP_DEV): pyproject.toml $(STAMP)
	$(PY) -m pip install -q -e '.[dev,rl,docs]'
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $@

$(STAMP_DOCS): pyproject.toml $(STAMP)
	$(PY) -m pip install -q -e '.[docs]'
	touch $@

train: $(STAMP)
	$(VENV)/bin/jax-lstm train $(ARGS)

test: $(STAMP_DEV)
	$(PY) -m pytest -q -n $(JOBS) $(PYTEST_ARGS)

lint: $(STAMP_DEV)
	$(VENV)/bin/ruff check .

bench: $(STAMP)
	$(VENV)/bin/jax-lstm bench $(ARGS)

gradcheck: $(STAMP)
	$(VENV)/bin/jax-lstm gradcheck $(ARGS)

# the documentation site, from docs/ and the docstrings, into site/ (strict: any warning fails)
docs: $(STAMP_DOCS)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --clean --site-dir site

clean:
	rm -rf $(VENV) runs .pytest_cache site
