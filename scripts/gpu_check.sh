#!/usr/bin/env bash
# Launcher of scripts/gpu_check.py on the device machine (issue 17), from the repository root:
#
#   bash scripts/gpu_check.sh                     # -> $OUT/gpu_check.json, gpu_check.log, nvidia_smi.csv
#   bash scripts/gpu_check.sh --only rl_step_7b   # extra arguments go to gpu_check.py
#
# lvr is used from the checkout (PYTHONPATH), not installed: the machine lacks av/duckdb/polars,
# which `pip install -e .` would want. Wheels carried in .whl/ (e.g. the transformers version the
# test suite uses; docs/performance.md) are installed into /tmp/site first.
set -u
out="${OUT:-runs/gpu_check}"
mkdir -p "$out"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm \
  --format=csv >"$out/nvidia_smi.csv" 2>&1 || true
python3 scripts/gpu_check.py --out "$out/gpu_check.json" "$@" 2>&1 | tee "$out/gpu_check.log"
exit "${PIPESTATUS[0]}"
