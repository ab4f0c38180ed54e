# The two commands of the README: `make demo` and `make test`.
PYTHON ?= python3

.PHONY: install test test-fast demo bench

# The package builds with the environment's setuptools where it has one recent enough: pip's
# isolated build environment cost ~3 s of CPU at every `make`.
NO_ISOLATION = $(shell $(PYTHON) -c "import setuptools, sys; sys.exit(int(setuptools.__version__.split('.')[0]) < 68)" \
                 2>/dev/null && echo --no-build-isolation)

# torch first, and only when none is installed: torch==2.13.0, a pin that pip resolves to the
# CPU wheel here (a bare `torch` requirement would pull a multi-GB CUDA build). A machine
# that already has torch (CUDA or CPU) keeps its own. Looked up, not imported (~2 s).
install:
	@$(PYTHON) -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('torch') is None)" \
		|| $(PYTHON) -m pip install -q "torch==2.13.0"
	@$(PYTHON) -m pip install -q $(NO_ISOLATION) -e ".[test]"

test: install
	$(PYTHON) -m pytest -q

test-fast: install
	$(PYTHON) -m pytest -q -m "not slow"

demo: install
	$(PYTHON) -m dcfeat demo

bench: install
	$(PYTHON) -m pipelines.benchmarks run cpu
	$(PYTHON) -m pipelines.benchmarks render
