# The two commands of the README: `make demo` and `make test`.
PYTHON ?= python3

.PHONY: install test test-fast demo bench

# torch first, and only when none is installed: torch==2.13.0, a pin that pip resolves to the
# CPU wheel here (a bare `torch` requirement would pull a multi-GB CUDA build). A machine
# that already has torch (CUDA or CPU) keeps its own.
install:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install -q "torch==2.13.0"
	@$(PYTHON) -m pip install -q -e ".[test]"

test: install
	$(PYTHON) -m pytest -q

test-fast: install
	$(PYTHON) -m pytest -q -m "not slow"

demo: install
	$(PYTHON) -m dcfeat demo

bench: install
	$(PYTHON) pipelines/bench.py
