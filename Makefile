# fieldline: `make setup` once (root or sudo), then `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.setup-stamp

.PHONY: setup system venv test unit integration lint typecheck schemas clean demo

setup: $(STAMP)

$(STAMP): pyproject.toml deploy/setup/install-system.sh deploy/setup/build-timescaledb.sh
	bash deploy/setup/install-system.sh
	$(PYTHON) -m venv $(VENV)
# -qq: pip's warnings (setuptools' build notes, index notices) are not for the user; its
# errors still print, and a failed install still stops make
	$(BIN)/pip install -qq --disable-pip-version-check --upgrade pip
	$(BIN)/pip install -qq --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

system:
	bash deploy/setup/install-system.sh

# two worker processes, each test file whole on one (module fixtures are shared within a file):
# most of the suite waits on real servers, so two processes on two cores halve its time
test: setup
	$(BIN)/pytest -n 2 --dist loadfile

unit: setup
	$(BIN)/pytest tests/unit

integration: setup
	$(BIN)/pytest tests/integration

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: setup
	$(BIN)/mypy

schemas: setup
	$(BIN)/fieldline schemas export

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache .hypothesis

# the whole pipeline on this machine, with a live view; Ctrl-C stops it
demo: setup
	$(BIN)/fieldline up
