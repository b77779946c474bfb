# Flagella: `make setup` prepares this machine, `make test` runs the suite, `make demo` the demo.
PY      ?= /usr/bin/python3
VENV    := .venv
BIN     := $(VENV)/bin

.PHONY: setup system venv test test-fast lint demo bench clean

setup: system venv

system:
	bash scripts/setup-system.sh

venv: $(BIN)/flagella

$(BIN)/flagella: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	# bcc comes from Debian (python3-bpfcc): link the package into the venv
	ln -sfn /usr/lib/python3/dist-packages/bcc \
	  "$$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/bcc"
	$(BIN)/python -c 'import bcc'
	touch $(BIN)/flagella

lint: venv
	$(BIN)/ruff check src tests bench
	$(BIN)/mypy
	$(BIN)/lint-imports

test: setup lint
	$(BIN)/pytest -q -p no:cacheprovider

test-fast: venv
	$(BIN)/pytest -q -m "not root"

demo: setup
	bash scripts/demo.sh

bench: setup
	$(BIN)/python bench/policy.py
	$(BIN)/python bench/datapath.py

clean:
	rm -rf $(VENV) build src/*.egg-info
