# The project's commands. `make demo` runs the whole job on real MNIST; `make test` runs the tests.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
DATA ?= data

.PHONY: venv demo-venv data demo test soak tools lint protos check-protos bench containers client-only clean

# A strict editable install (a tree of links to the checkout's files, so that a folder named
# digitserve beside a script cannot shadow the package): edits are live, a module added or removed
# needs the install again, hence the package folders (their times change when a file comes or goes).
PACKAGE_DIRS := $(wildcard core/digitserve core/digitserve/inference protos/digitserve/* \
                  server/digitserve/server client/digitserve/* trainer/digitserve/trainer)

$(BIN)/.installed: pyproject.toml $(PACKAGE_DIRS)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[server,trainer,plot,loadtest,dev]' --config-settings editable_mode=strict
	touch $@

venv: $(BIN)/.installed

# What `make demo` uses (server, trainer, the evaluate plot): no dev or load-test extras.
$(BIN)/.demo-installed: pyproject.toml $(PACKAGE_DIRS)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[server,trainer,plot]' --config-settings editable_mode=strict
	touch $@

demo-venv: $(BIN)/.demo-installed

data: venv
	$(BIN)/mnist-train fetch --data-dir $(DATA)

# MNIST_PORT (50051), MNIST_RETRAIN=1 (train even when a version is published), MNIST_PRESET, ...:
# see .ci/demo.sh.
demo:
	@VENV=$(VENV) PYTHON=$(PYTHON) bash .ci/demo.sh

# The test command: unit and server tests plus one end-to-end run on real MNIST. Every test must run
# (MNIST_REQUIRE_E2E=1): one whose tool is missing fails; `make tools` installs curl, node, npm
# and perf_analyzer.
test: data
	MNIST_DATA_DIR=$(DATA) MNIST_REQUIRE_E2E=1 $(BIN)/pytest

# The crash soak of tests/server/test_crash.py SOAK_RUNS times in a row (issue 21: 20), stopping at
# the first failure: `make soak SOAK_RUNS=20`.
SOAK_RUNS ?= 20
soak: venv
	@for i in $$(seq 1 $(SOAK_RUNS)); do \
	  echo "soak run $$i of $(SOAK_RUNS)"; \
	  $(BIN)/pytest -q -p no:cacheprovider tests/server/test_crash.py -k soak -s || exit 1; \
	done

# buf lint and buf breaking (against the previous commit) on protos/; .ci/buf.sh installs buf.
lint: venv
	$(BIN)/ruff check .
	$(BIN)/mypy core protos server client trainer bench
	PYTHON=$(BIN)/python .ci/gen-protos.sh --check
	bash .ci/buf.sh

# Issue 3's benchmark: null, naive and digitserve servers under the same load → BENCHMARKS.md.
# BENCH_ARGS="--duration 3" for a quick run; `python -m bench --help` lists the options.
bench: data
	$(BIN)/python -m bench --data-dir $(DATA) $(BENCH_ARGS)

protos: venv
	PYTHON=$(BIN)/python .ci/gen-protos.sh

# curl, node and npm for the tests (apt-get, as root), or a line naming what is missing; Triton's
# perf_analyzer in .perf-venv (tests/interop/test_perf_analyzer.py, bench/perf_analyzer.py).
tools:
	bash .ci/tools.sh
	bash .ci/perf-analyzer.sh

containers:
	bash .ci/containers.sh

# `pip install .` (no extra) in a fresh venv: only digitserve.* installed, no TensorFlow, and
# mnist-serve / mnist-train train / mnist-client loadtest exit 2 naming their extra.
client-only:
	bash .ci/client-only.sh

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
