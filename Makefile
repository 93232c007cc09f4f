# The two commands: `make serve` and `make test`. Both set everything up first
# and are idempotent: with nothing changed, the set-up steps take seconds.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# A CUDA build of torch, so the CUDA kernels compile even on a machine with no GPU.
# Override with TORCH_SPEC=torch==2.13.0 (a CPU build) for a CPU-only extension.
TORCH_SPEC ?= torch==2.14.1
HOST ?= 127.0.0.1
PORT ?= 8080
STATE_DIR ?= var
PYTEST_ARGS ?=

DEPS_STAMP := $(VENV)/.deps-$(subst =,_,$(TORCH_SPEC))
EXT_SOURCES := $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/*.cpp csrc/cuda/*.cpp kernels/*.cu kernels/*.cuh kernels/*.h) setup.py

.PHONY: serve test build bench bench-serving cmake-test gpu-wheels clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch first (its own step: it is 5 GB), then the project editable with its
# dependencies, without building the extension (that is `build`, incremental).
$(DEPS_STAMP): $(PY) pyproject.toml
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	MSC_NO_EXTENSION=1 $(PY) -m pip install -q --no-build-isolation -e ".[test]"
	touch $@

# ninja rebuilds only what changed; with nothing changed this is a few seconds.
build: $(DEPS_STAMP)
	$(PY) setup.py -q build_ext --inplace

# The supervisor, one engine process and WORKERS front processes (default: one per core, at least 2).
serve: build
	$(PY) -m msmartcompute.cli serve --host $(HOST) --port $(PORT) --state-dir $(STATE_DIR) $(if $(WORKERS),--workers $(WORKERS))

test: build
	$(PY) -m pytest -q tests benchmarks --benchmark-disable $(PYTEST_ARGS)

# Every pytest-benchmark suite in benchmarks/ (kernels, runtime, http), JSON saved for
# benchmarks/render_results.py; the load benchmark (servers under load, minutes) is bench-serving.
BENCH_JSON ?= benchmarks/results/pytest-$(shell uname -m)-latest.json
bench: build
	mkdir -p benchmarks/results
	$(PY) -m pytest -q benchmarks --benchmark-only --benchmark-json=$(BENCH_JSON)

bench-serving: build
	$(PY) -m benchmarks.serving.run --out benchmarks/results/serving-load-latest.json
	$(PY) benchmarks/render_results.py

# The server stack the GPU machine lacks (Python 3.12 there, no network), as wheels in .whl for
# the device call to carry: benchmarks/gpu/run_all.sh installs them for bench_fronts.py. The
# versions are this venv's.
GPU_WHEELS := falcon waitress orjson msgspec greenlet
gpu-wheels: $(DEPS_STAMP)
	rm -rf .whl && mkdir -p .whl
	for name in $(GPU_WHEELS); do \
	  $(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
	    -d .whl "$$name==$$($(PY) -c "import importlib.metadata as m; print(m.version('$$name'))")" || exit 1; \
	done
	ls .whl

cmake-test: $(DEPS_STAMP)
	PY=$(abspath $(PY)) bash tests/cpp/run_cmake.sh

clean:
	rm -rf build build-cmake msmartcompute/_C*.so
