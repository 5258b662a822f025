# make demo / make test work on a fresh machine: both install into .venv first.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test bench clean

install: $(STAMP)

$(STAMP): pyproject.toml scripts/install.sh
	PYTHON=$(PYTHON) VENV=$(VENV) bash scripts/install.sh
	touch $(STAMP)

demo: install
	PATH=$(CURDIR)/$(BIN):$$PATH bash scripts/demo.sh

test: install
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/python -m pytest -q -p no:cacheprovider --durations=15 tests

bench: install
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/ucluster bench --out bench_out

clean:
	rm -rf $(VENV) demo_out bench_out
