"""GPU memory of one Llama-3.1-8B-Instruct request at 32k and 128k context, measured (README: "LongBench v2
at 128k"). The model is built from its architecture with random bf16 weights (no download: memory does not
depend on the values), then one prefill of N random token ids into a full DynamicCache; prints the
weights, the KV cache bytes (per token and total) and the peak allocated memory.

    python3 bench/kv_memory_128k.py            # on a GPU host with torch + transformers
"""

from __future__ import annotations

import argparse
import time


def main() -> None:
    import torch
    from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, nargs="+", default=[32768, 131072])
    args = ap.parse_args()
    cfg = LlamaConfig(  # meta-llama/Llama-3.1-8B-Instruct's config.json
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=131072,
        rope_theta=500000.0, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                           "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        tie_word_embeddings=False)
    cfg._attn_implementation = "sdpa"
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg)
    model.eval()
    gib = 2**30
    weights = torch.cuda.memory_allocated()
    print(f"{torch.cuda.get_device_name()}: params {sum(p.numel() for p in model.parameters()):,}, "
          f"weights {weights / gib:.2f} GiB")
    for n in args.tokens:
        ids = torch.randint(0, cfg.vocab_size, (1, n), device="cuda")
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        cache = DynamicCache()
        t = time.perf_counter()
        with torch.no_grad():
            out = model.model(input_ids=ids, past_key_values=cache, use_cache=True)
            model.lm_head(out.last_hidden_state[:, -1:])
        torch.cuda.synchronize()
        kv = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
        peak = torch.cuda.max_memory_allocated()
        print(f"n={n}: prefill {time.perf_counter() - t:.1f} s, KV {kv / gib:.3f} GiB ({kv / n / 1024:.1f} KiB/token), "
              f"peak {peak / gib:.2f} GiB (activations {(peak - weights - kv) / gib:.2f} GiB)")
        del out, cache, ids
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
