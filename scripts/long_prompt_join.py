"""What a long prompt joining the server's batch costs the request already decoding, with the lean
prefill read in chunks (``LeanBackend.prefill_chunk``, the default) and in one piece.

    python scripts/long_prompt_join.py [--data-dir DIR] [--prompt-tokens 1000] [--rounds 2]

A chat request decodes 120 tokens on the default model; after its 10th, a WikiText-2 passage of
``--prompt-tokens`` tokens arrives. Prints the running request's longest and median gap between
tokens, the newcomer's time to its first token, and its tokens (the same either way).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import coreinfer
from coreinfer import SamplingConfig, evaluation_data
from coreinfer.decode.lean import PREFILL_CHUNK
from coreinfer.scheduler import Scheduler


def join(engine, running: list[int], late: list[int]) -> tuple[list[float], float, list[int]]:
    """The running request's token times, the newcomer's first-token delay and its tokens."""
    scheduler = Scheduler(engine, max_batch=4)
    stamps: list[float] = []
    first: list[float] = []
    try:
        decoding = scheduler.submit([running], None, SamplingConfig(max_new_tokens=120),
                                    on_token=lambda event: stamps.append(time.perf_counter()))
        while len(stamps) < 10:
            time.sleep(0.001)
        sent = time.perf_counter()
        newcomer = scheduler.submit([late], None, SamplingConfig(max_new_tokens=8),
                                    on_token=lambda event: first or first.append(time.perf_counter()))
        tokens = newcomer.wait(300)[0].token_ids
        decoding.wait(300)
    finally:
        scheduler.close()
    return stamps, first[0] - sent, tokens


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data-dir")
    parser.add_argument("--prompt-tokens", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(2)
    engine = coreinfer.load()
    passage = evaluation_data.wikitext2(args.data_dir)[5000:]
    late = engine.tokenizer(passage, add_special_tokens=False)["input_ids"][: args.prompt_tokens]
    running = engine.encode("Write a long story about a lighthouse keeper.", chat=True)
    backend = engine.backend()
    for _ in range(args.rounds):  # alternated
        for chunk in (len(late), PREFILL_CHUNK):
            backend.prefill_chunk = chunk
            stamps, first_token_s, tokens = join(engine, running, late)
            gaps = [b - a for a, b in zip(stamps, stamps[1:])]
            print(f"chunk {chunk:>5} columns: running request's longest gap {max(gaps) * 1e3:.0f} ms, median "
                  f"{statistics.median(gaps) * 1e3:.1f} ms; newcomer's first token {first_token_s * 1e3:.0f} ms, "
                  f"tokens {tokens}", flush=True)
    backend.prefill_chunk = PREFILL_CHUNK


if __name__ == "__main__":
    main()
