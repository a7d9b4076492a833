"""Time coreinfer's two int4 CPU kernels: the dense kernel, and the gather kernel at shares of the
inputs kept (token-level sparsity), on SmolLM2's and Llama-3.2-1B's shapes.

    python scripts/int4_kernel_bench.py [threads] [--big]

Random codes (speed does not need trained weights); enough distinct matrices that the weights come
from memory rather than cache (``--big`` adds the 1B shapes). Medians of 7 rounds, kernels alternated.
GB/s is the dense layout's bytes over its time; a gather column's ratio is its time over dense's.
"""

from __future__ import annotations

import statistics
import sys
import time

import torch

from coreinfer.decode import int4_dense, int4_gather
from coreinfer.decode.weights import Int4Weight

SHAPES = {"SmolLM2 gate+up [3072, 576]": (3072, 576, 60, 4), "SmolLM2 down [576, 1536]": (576, 1536, 60, 4)}
BIG = {"1B gate+up [16384, 2048]": (16384, 2048, 4, 4), "1B down [2048, 8192]": (2048, 8192, 8, 4),
       "1B qkv [3072, 2048]": (3072, 2048, 16, 4)}
KEEPS = (1.0, 0.7, 0.5, 0.3)


def matrices(out: int, inn: int, count: int, bits: int) -> list[Int4Weight]:
    g = torch.Generator().manual_seed(0)
    return [Int4Weight.from_integers(torch.randint(0, 2**bits, (out, inn), generator=g),
                                     (torch.rand(out, inn // 32, generator=g) * 0.01 + 0.001).half().float(),
                                     (-torch.rand(out, inn // 32, generator=g) * 0.05).half().float(), bits)
            for _ in range(count)]


def timed(fn, layouts) -> float:
    start = time.perf_counter()
    for layout in layouts:
        fn(layout)
    return (time.perf_counter() - start) / len(layouts)


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    torch.set_num_threads(int(args[0]) if args else 2)
    shapes = {**SHAPES, **(BIG if "--big" in sys.argv else {})}
    keeps = " | ".join(f"gather {k:.1f}" for k in KEEPS)
    print(f"| shape | batch | dense kernel | dense GB/s | {keeps} |\n|---|---|---|---|" + "---|" * len(KEEPS))
    for name, (out, inn, count, bits) in shapes.items():
        ws = matrices(out, inn, count, bits)
        gathered, dense = [w.gathered() for w in ws], [w.dense_layout() for w in ws]
        nbytes = sum(d.nbytes() for d in dense) / count
        for batch in (1, 4):
            x = torch.randn(batch, inn, generator=torch.Generator().manual_seed(1))
            # keep k: the threshold at the (1 - k) quantile of |x| (1.0: every input, threshold -1)
            thresholds = [-1.0 if k == 1.0 else float(x.abs().flatten().quantile(1 - k)) for k in KEEPS]
            times: dict[str, list[float]] = {"dense": [], **{str(k): [] for k in KEEPS}}
            for _ in range(7):
                times["dense"].append(timed(lambda d: int4_dense.dense_mm(x, d), dense))
                for k, t in zip(KEEPS, thresholds):
                    times[str(k)].append(timed(lambda g: int4_gather.gathered_mm(x, g, t), gathered))
            td = statistics.median(times["dense"])
            cells = " | ".join(f"{statistics.median(times[str(k)]) * 1e6:.0f} µs ×{statistics.median(times[str(k)]) / td:.2f}"
                               for k in KEEPS)
            print(f"| {name} | {batch} | {td * 1e6:.0f} µs | {nbytes / td / 1e9:.1f} | {cells} |", flush=True)


if __name__ == "__main__":
    main()
