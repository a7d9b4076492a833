"""llama.cpp's decode speed on a random-weight Q4_0 GGUF at a real model's shape, written with the
``gguf`` package: the llama.cpp side of ``coreinfer bench --shape SHAPE --weights int4``.

    python scripts/shape_gguf_llamacpp.py llama-3.2-1b [--tokens 64] [--repeats 3] [--keep FILE]

Every matrix (the tied embedding too) is Q4_0, the norms F32; the vocabulary is placeholder tokens.
Speed does not need trained weights. Greedy decoding of ``--tokens`` tokens after a 13-token prompt,
two threads, median of ``--repeats`` runs; prints tok/s. The GGUF (~0.7 GB for the 1B shape) goes to
a temporary directory unless ``--keep`` names a path.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def write_gguf(path: Path, shape: dict, seed: int = 0) -> None:
    import gguf
    from gguf.quants import quantize

    rng = np.random.default_rng(seed)
    d, ffn, layers = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
    heads, kv_heads, vocab = shape["num_attention_heads"], shape["num_key_value_heads"], shape["vocab_size"]
    head_dim = shape.get("head_dim") or d // heads
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(4096)
    writer.add_embedding_length(d)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(500000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_0)
    writer.add_vocab_size(vocab)
    writer.add_tokenizer_model("llama")
    writer.add_token_list([f"<t{i}>".encode() for i in range(vocab)])
    writer.add_token_scores([0.0] * vocab)
    writer.add_token_types([gguf.TokenType.NORMAL] * vocab)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)

    def matrix(name: str, rows: int, cols: int) -> None:
        weight = (rng.standard_normal((rows, cols), dtype=np.float32) * 0.02)
        writer.add_tensor(name, quantize(weight, gguf.GGMLQuantizationType.Q4_0), raw_dtype=gguf.GGMLQuantizationType.Q4_0)

    matrix("token_embd.weight", vocab, d)
    writer.add_tensor("output_norm.weight", np.ones(d, dtype=np.float32))
    for i in range(layers):
        at = f"blk.{i}."
        writer.add_tensor(at + "attn_norm.weight", np.ones(d, dtype=np.float32))
        writer.add_tensor(at + "ffn_norm.weight", np.ones(d, dtype=np.float32))
        matrix(at + "attn_q.weight", heads * head_dim, d)
        matrix(at + "attn_k.weight", kv_heads * head_dim, d)
        matrix(at + "attn_v.weight", kv_heads * head_dim, d)
        matrix(at + "attn_output.weight", d, heads * head_dim)
        matrix(at + "ffn_gate.weight", ffn, d)
        matrix(at + "ffn_up.weight", ffn, d)
        matrix(at + "ffn_down.weight", d, ffn)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def decode_tok_s(path: Path, tokens: int, threads: int = 2) -> float:
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=256, n_threads=threads, n_threads_batch=threads, verbose=False)
    llm.eval(list(range(3, 16)))  # the prompt
    token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    start = time.perf_counter()
    for _ in range(tokens):
        llm.eval([token])
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    return tokens / (time.perf_counter() - start)


def main() -> None:
    from coreinfer.bench import SHAPES

    parser = argparse.ArgumentParser()
    parser.add_argument("shape", choices=sorted(SHAPES))
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--keep", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        path = args.keep or Path(scratch) / f"random-{args.shape}-q4_0.gguf"
        if not path.exists():
            write_gguf(path, SHAPES[args.shape])
        runs = [decode_tok_s(path, args.tokens) for _ in range(args.repeats)]
    print(f"llama.cpp {args.shape} Q4_0: {statistics.median(runs):.2f} tok/s (runs: {', '.join(f'{r:.2f}' for r in runs)})")


if __name__ == "__main__":
    main()
