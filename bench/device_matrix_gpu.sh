#!/usr/bin/env bash
# The GPU smoke matrix on a lent GPU machine (the `device` tool), through the process runtime:
# kvpress engine on CUDA, full + presses served by ONE engine per GPU set, NVML telemetry per GPU.
# The tiny model's wheel is too large to carry, so the engine loads a randomly initialised model with
# SmolLM2-135M's config and its real tokenizer (staged under .device/smol by the caller): answers are
# noise, the point is the lifecycle, the telemetry and the memory/speed numbers.
#   carry: .whl (kvpress stack wheels for Python 3.12), .device (config + tokenizer files)
#   usage: bash bench/device_matrix_gpu.sh [GPUS]        (GPUS default: every GPU NVML sees)
set -euo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD/harness:$PWD/engines/kvpress PYTHONUNBUFFERED=1 KVT_GIT_SHA=device
python3 - <<'PY'
import shutil, torch
from pathlib import Path
from transformers import AutoConfig, AutoModelForCausalLM
cfg = AutoConfig.from_pretrained(".device/smol")
torch.manual_seed(0)
AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).save_pretrained("/tmp/smol")
for f in Path(".device/smol").iterdir():
    if f.name != "config.json":
        shutil.copy(f, "/tmp/smol/" + f.name)
print("random-init model with SmolLM2-135M's config at /tmp/smol")
PY
O=(-o experiment.group_id=device_gpu -o model.path=/tmp/smol -o model.tokenizer.kind=hf
   -o model.tokenizer.name=SmolLM2-135M-Instruct -o model.tokenizer.path=/tmp/smol -o telemetry.interval_s=0.25)
GPUS=${1:-}
python3 -m kv_transition matrix run -c config/default.yaml "${O[@]}" -m config/matrix/gpu_smoke.yaml \
  ${GPUS:+--gpus "$GPUS"} --no-live || true
python3 -m kv_transition score -q -c config/default.yaml "${O[@]}"
python3 -m kv_transition analyze -c config/default.yaml "${O[@]}" >/dev/null
python3 -m kv_transition report -c config/default.yaml "${O[@]}"
DB=runs/device_gpu/kv_transition.sqlite
python3 - "$DB" <<'PY'
import sqlite3, sys
c = sqlite3.connect(sys.argv[1])
print("engine loads:", c.execute("SELECT COUNT(*) FROM matrix_engines").fetchone()[0])
print("per-GPU telemetry (all runs): gpu, samples, mem used min/max MiB, util max %, power max W, temp max C")
for r in c.execute("SELECT gpu_index, gpu_uuid, COUNT(*), MIN(mem_used)/1048576, MAX(mem_used)/1048576,"
                   " MAX(util_gpu), MAX(power_w), MAX(temp_c) FROM telemetry_gpu GROUP BY gpu_uuid"):
    print("  ", r)
print("per cell x bin: cell, bin, mean tokens, peak GPU MiB, KV bytes after (MiB), TTFT p50 s, prefill tok/s")
for r in c.execute("SELECT cell_id, bin_id, ROUND(mean_tokens), ROUND(peak_gpu_mem/1048576),"
                   " ROUND(kv_bytes_after/1048576, 1), ROUND(ttft_p50, 4), ROUND(prefill_tok_s) FROM analysis_bins"
                   " ORDER BY cell_id, bin_id"):
    print("  ", r)
PY
mkdir -p "${OUT:-/tmp/out}" && cp "$DB" runs/device_gpu/report/index.html "${OUT:-/tmp/out}/" || true
