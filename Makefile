# Two commands for a fresh machine: `make demo` and `make test`. Both create .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.cloudgpu-installed

.PHONY: demo test lint bench bench-quick venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else "cloudgpu needs Python >= 3.10; set PYTHON=python3.X")'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	@touch $@

## Run examples/quickstart.ipynb headless on the embedded local default and print every output
## (the executed notebook goes to build/demo/, leaving the example as it is).
demo: $(STAMP)
	$(VENV)/bin/cloudgpu run --stream examples/quickstart.ipynb -o build/demo/quickstart.ipynb

## Lint and type-check, then run the whole test suite.
test: lint
	$(PY) -m pytest

## ruff on the tree; mypy on the package as installed (where every subpackage sits under
## cloudgpu/, so calls between them are checked), built fresh into build/typed.
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	rm -rf build/lib build/typed && mkdir -p build
	$(PY) -m pip install --quiet --no-deps --no-build-isolation --target build/typed . \
		>build/typed.log 2>&1 || (cat build/typed.log; exit 1)
	cd build/typed && ../../$(VENV)/bin/mypy --config-file ../../pyproject.toml -p cloudgpu

BENCHES := cell_overhead transfer unchanged start streaming pool_bench

## Every benchmark (several minutes); tables print and collect in bench/last-run.md.
bench: $(STAMP)
	$(PY) -m pip install --quiet -e '.[test,bench]'
	rm -f bench/last-run.md
	cd bench && for b in $(BENCHES); do ../$(PY) $$b.py || exit 1; done

## The same, shortened to run in under two minutes.
bench-quick: $(STAMP)
	$(PY) -m pip install --quiet -e '.[test,bench]'
	rm -f bench/last-run.md
	cd bench && for b in $(BENCHES); do ../$(PY) $$b.py --quick || exit 1; done

clean:
	rm -rf $(VENV) build dist *.egg-info
