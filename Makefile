# linflow. `make demo` / `make test` set everything up on a fresh machine (a .venv on top of the system's
# packages, torch + build tools, the extension built in place), then run. Repeat runs skip what is done.
#
#   make build       build the extension (CUDA sources too when nvcc is found; LINFLOW_FORCE_CPU=1 to skip them)
#   make test        build, then python -m pytest tests       (PYTEST_ARGS="-k nn -x" to narrow)
#   make demo        build, then python -m linflow.demo        (DEMO_ARGS="--gate" to pass options)
#   make gpu-check   set up the venv, then benchmarks/gpu_check.sh (which builds, tests and benchmarks)
#   make clean       remove .venv and build outputs
#
# Knobs (environment or make VAR=...): PYTHON, MAX_JOBS (default: core count), NVCC_THREADS,
# TORCH_CUDA_ARCH_LIST, LINFLOW_FORCE_CPU, LINFLOW_DEBUG (see setup.py).

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
VPY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.14.1
MAX_JOBS ?= $(shell nproc 2>/dev/null || getconf _NPROCESSORS_ONLN 2>/dev/null || echo 2)
export MAX_JOBS

DEPS_STAMP := $(VENV)/.deps-stamp
BUILD_STAMP := $(VENV)/.build-stamp
BUILD_CONFIG := $(VENV)/.build-config
SOURCES := setup.py pyproject.toml $(shell find csrc -type f 2>/dev/null)

# Rebuild when what decides the build changes (not only the sources): toolkit, archs, CPU-only, debug.
CONFIG := cuda=$(shell command -v nvcc 2>/dev/null) CUDA_HOME=$(CUDA_HOME) force_cpu=$(LINFLOW_FORCE_CPU) \
	archs=$(TORCH_CUDA_ARCH_LIST) debug=$(LINFLOW_DEBUG)
# A missing extension (e.g. deleted by hand) means the build stamp lies.
EXT := python/linflow/_C$(shell $(PYTHON) -c "import sysconfig; print(sysconfig.get_config_var('EXT_SUFFIX'))" 2>/dev/null)
ifeq ($(wildcard $(EXT)),)
$(shell rm -f $(BUILD_STAMP))
endif

.PHONY: all build test demo gpu-check clean FORCE
all: build

$(VPY):
	$(PYTHON) -m venv --system-site-packages $(VENV)

$(DEPS_STAMP): | $(VPY)
	$(VPY) -m pip install --disable-pip-version-check "$(TORCH_SPEC)" ninja pytest numpy
	@touch $@

$(BUILD_CONFIG): FORCE | $(VPY)
	@echo '$(CONFIG)' | cmp -s - $@ || echo '$(CONFIG)' > $@

$(BUILD_STAMP): $(DEPS_STAMP) $(BUILD_CONFIG) $(SOURCES)
	@echo "building linflow with MAX_JOBS=$(MAX_JOBS) ($(CONFIG))"
	@start=$$(date +%s); \
	$(VPY) -m pip install --disable-pip-version-check --no-build-isolation --no-deps -e . && \
	echo "build took $$(( $$(date +%s) - start )) s"
	@touch $@

build: $(BUILD_STAMP)

test: build
	$(VPY) -m pytest tests $(PYTEST_ARGS)

demo: build
	$(VPY) -m linflow.demo $(DEMO_ARGS)

gpu-check: $(DEPS_STAMP)
	PATH="$(abspath $(VENV))/bin:$$PATH" bash benchmarks/gpu_check.sh

clean:
	rm -rf $(VENV) build python/*.egg-info python/linflow/_C*.so
