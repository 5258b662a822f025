# make demo / make test work on a fresh machine: both install into .venv first.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test bench clean

install: $(STAMP)

$(STAMP): pyproject.toml scripts/install.sh ucluster_jax/native/keep_alloc.c
	PYTHON=$(PYTHON) VENV=$(VENV) bash scripts/install.sh
	touch $(STAMP)

demo: install
	PATH=$(CURDIR)/$(BIN):$$PATH bash scripts/demo.sh

# Two workers (2 cores: one test's compile overlaps another's MPI run); whole files per worker, so a
# module's background reference run (tests/test_data_global.py) is shared by its tests.
test: install
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/python -m pytest -q -p no:cacheprovider -n 2 --dist loadfile --durations=15 tests

bench: install
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/ucluster bench --out bench_out

clean:
	rm -rf $(VENV) demo_out bench_out
