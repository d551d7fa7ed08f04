#!/usr/bin/env bash
# Fan-out prefill on a lent H200 (the `device` tool): Llama-3.1-8B's shape with random bf16 weights, 16k-token
# prompts, 6 presses x 3 ratios + full, prefilled separately vs in one shared pass (bench/fanout_prefill.py).
# Staged like bench/device_matrix_gpu.sh:
#   carry: .whl (kvpress stack wheels for the device's Python), bench/.tokenizer (SmolLM2 tokenizer: `python bench/engine_sweep.py tokenizer bench/.tokenizer`), or TOK=DIR
#   usage: bash bench/device_fanout.sh [LENGTH]      rows -> $OUT/fanout_prefill.jsonl, log -> $OUT/fanout.log
set -euo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD/engines/kvpress PYTHONUNBUFFERED=1
L=${1:-16384}
timeout 400 python3 bench/fanout_prefill.py --llama8b-random --tokenizer "${TOK:-bench/.tokenizer}" --device cuda \
  --length "$L" --examples 2 --max-new-tokens 16 --budget-s 360 --out "$OUT" 2>&1 | tee "$OUT/fanout.log" || true
# decoding one by one (--decode-batch 1): answers_identical then tests the shared prefill alone (bf16 batched
# decoding may differ from decoding alone in the last bits, whatever the prefill)
timeout 120 python3 bench/fanout_prefill.py --llama8b-random --tokenizer "${TOK:-bench/.tokenizer}" --device cuda \
  --length 4096 --examples 1 --max-new-tokens 16 --decode-batch 1 --budget-s 100 --out "$OUT" 2>&1 \
  | tee -a "$OUT/fanout.log" || true
