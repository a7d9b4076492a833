"""Time coreinfer's two int4 CPU kernels densely (every input kept) on SmolLM2's shapes, batch 1-8.

    python scripts/int4_kernel_bench.py [threads]

Random codes (speed does not need trained weights); 60 distinct gate+up and down matrices and two
LM heads (8-bit, as SmolLM2's Q8_0 embedding), so the weights come from memory rather than cache.
Medians of 7 rounds, the two kernels alternated. GB/s is the dense layout's bytes over its time.
"""

from __future__ import annotations

import statistics
import sys
import time

import torch

from coreinfer.decode import int4_dense, int4_gather
from coreinfer.decode.weights import Int4Weight

SHAPES = {"gate+up [3072, 576]": (3072, 576, 60, 4), "down [576, 1536]": (576, 1536, 60, 4),
          "LM head [49152, 576], 8-bit": (49152, 576, 2, 8)}


def matrices(out: int, inn: int, count: int, bits: int) -> list[Int4Weight]:
    g = torch.Generator().manual_seed(0)
    return [Int4Weight.from_integers(torch.randint(0, 2**bits, (out, inn), generator=g),
                                     (torch.rand(out, inn // 32, generator=g) * 0.01 + 0.001).half().float(),
                                     (-torch.rand(out, inn // 32, generator=g) * 0.05).half().float(), bits)
            for _ in range(count)]


def main() -> None:
    torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 2)
    print("| shape | batch | gather kernel | dense kernel | dense GB/s | × gather |\n|---|---|---|---|---|---|")
    for name, (out, inn, count, bits) in SHAPES.items():
        ws = matrices(out, inn, count, bits)
        gathered, dense = [w.gathered() for w in ws], [w.dense_layout() for w in ws]
        nbytes = sum(d.nbytes() for d in dense) / count
        for batch in (1, 2, 4, 8):
            x = torch.randn(batch, inn)
            times: dict[str, list[float]] = {"gather": [], "dense": []}
            for _ in range(7):
                start = time.perf_counter()
                for layout in gathered:
                    int4_gather.gathered_mm(x, layout, -1.0)
                times["gather"].append((time.perf_counter() - start) / count)
                start = time.perf_counter()
                for layout in dense:
                    int4_dense.dense_mm(x, layout)
                times["dense"].append((time.perf_counter() - start) / count)
            tg, td = statistics.median(times["gather"]), statistics.median(times["dense"])
            print(f"| {name} | {batch} | {tg * 1e6:.0f} µs | {td * 1e6:.0f} µs | {nbytes / td / 1e9:.1f} | ×{tg / td:.2f} |")


if __name__ == "__main__":
    main()
