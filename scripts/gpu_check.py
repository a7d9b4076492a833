"""Decode speed on CUDA, lean bf16 vs reference, dense vs sparse, on random weights at real models' shapes.

Speed only: random weights say nothing about quality (the CUDA test run checks the numbers).
Writes gpu_speed.json to $OUT (or here). Run: python3 scripts/gpu_check.py
"""
import json, os, statistics, torch
from transformers import AutoModelForCausalLM, LlamaConfig
from coreinfer import Engine
from coreinfer.config import SamplingConfig, SparsityConfig

res = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name()}
shapes = {
    "smollm2-135m-shape": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, vocab_size=49152),
    "llama-3.2-1b-shape": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, vocab_size=128256),
    "llama-8b-shape": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, vocab_size=128256),
}
for name, kw in shapes.items():
    torch.manual_seed(0)
    cfg = LlamaConfig(**kw, max_position_embeddings=2048, tie_word_embeddings=True)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()
    engine = Engine(model, tokenizer=None, name=name)
    rows = {}
    for batch in (1, 8):
        prompt = [list(range(5 + b, 69 + b)) for b in range(batch)]
        for label, sp in [("dense", None), ("keep0.6", SparsityConfig(keep=0.6)), ("keep0.4", SparsityConfig(keep=0.4))]:
            for backend in ("lean", "reference"):
                runs, out = [], None
                for _ in range(3):
                    out = engine.generate_ids(prompt, sp, SamplingConfig(max_new_tokens=64), backend=backend, ignore_eos=True)
                    runs.append(out[0].decode_tok_s * batch)
                rows[f"b{batch}/{label}/{backend}"] = {"tok_s": round(statistics.median(runs[1:]), 1), "density": round(out[0].ffn_density, 3), "weights": out[0].weights, "first_tokens": out[0].token_ids[:8]}
                print(name, f"b{batch}/{label}/{backend}", rows[f"b{batch}/{label}/{backend}"], flush=True)
    res[name] = rows
    del engine, model
    torch.cuda.empty_cache()
json.dump(res, open(os.path.join(os.environ.get("OUT", "."), "gpu_speed.json"), "w"), indent=1)
