# The two commands a newcomer runs (see README):
#   make demo   set up, then run the main job end to end on phantoms
#   make test   set up, then run the test suite
PYTHON ?= python3
PIP := $(PYTHON) -m pip
DEMO_DIR ?= demo
# The versions CI passed with (refresh: make lock).
LOCK := constraints.txt

.PHONY: install demo test lint lock

# torch first, pinned: the local CPU wheel. An unpinned torch would pull GBs of CUDA packages.
install:
	$(PIP) install -q -c $(LOCK) torch==2.13.0
	$(PIP) install -q -c $(LOCK) -e ".[dev,pacs]"
	PYTHON=$(PYTHON) CONSTRAINTS=$(LOCK) bash scripts/install_gptq.sh

demo: install
	bash scripts/demo.sh $(DEMO_DIR)

test: install
	$(PYTHON) -m pytest -q

lint:
	ruff check . && ruff format --check .

# Resolve the newest allowed releases in a new virtual environment and rewrite constraints.txt.
lock:
	PYTHON=$(PYTHON) bash scripts/lock.sh
