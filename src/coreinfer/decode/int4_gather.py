"""A CPU kernel for int4 products that read only the kept inputs' weights (token-level sparsity).

PyTorch's int4 CPU kernel (``_weight_int4pack_mm_for_cpu``) takes a packed layout that interleaves
blocks of output rows, so it cannot skip inputs. This one stores the same GGUF codes input-major:
for each input, its 4-bit codes over all outputs are contiguous, so a dropped input's weights are
never read. The scale and min of each group of 32 inputs per output (``w = scale * code + min``)
are fp16, ``[in / 32, out]``; GGUF stores them in fp16 (Q4_0, Q4_1) or as products of fp16 and
6-bit integers (Q4_K), which fp16 holds to 2**-11 (the torch kernel rounds them to bf16, 2**-8).

The C++ source is ``int4_gather.cpp``, built with the other CPU kernels (``cpu_kernels``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from . import cpu_kernels

GROUP = 32
BLOCK = 64  # outputs per 32-byte block of one input's codes
MAX_TILE_BLOCKS = 16  # a tile's fp32 sums (1024 outputs, 4 KB) stay in L1 while its rows stream


@dataclass
class Int4Gather:
    """An int4 matrix in the kernel's input-major layout (``of`` builds it from ``Int4Weight`` planes)."""

    codes: torch.Tensor  # [P, in * outp / 2] uint8: per tile of outputs, its rows (one per input) in one slab
    scales: torch.Tensor  # [P, in / 32, outp] fp16
    mins: torch.Tensor  # [P, in / 32, outp] fp16
    out_features: int
    tile_blocks: int  # 64-output blocks per tile (the last tile may have fewer)

    @classmethod
    def of(cls, codes: list[torch.Tensor], scale_zeros: list[torch.Tensor],
           threads: Optional[int] = None) -> Optional["Int4Gather"]:
        """From ``Int4Weight``'s planes (codes ``[out, in / 2]``, ``(scale, zero)`` ``[in / 32, out, 2]``,
        ``w = (code - 8) * scale + zero``); None where a scale or min does not fit fp16 to 2**-10."""
        out_features, in_features = codes[0].shape[0], codes[0].shape[1] * 2
        outp = -(-out_features // BLOCK) * BLOCK
        tile_blocks = tile_width(outp // BLOCK, threads or torch.get_num_threads())
        planes, scales, mins = [], [], []
        for c, sz in zip(codes, scale_zeros):
            code = torch.stack([c & 15, c >> 4], dim=-1).view(out_features, in_features)
            code_t = code.new_zeros(in_features, outp)
            code_t[:, :out_features] = code.t()
            # Block of 64 outputs: word l holds outputs 8k + l in nibble k, so byte j holds k = 2j and 2j + 1.
            c5 = code_t.view(in_features, outp // BLOCK, 8, 8).transpose(2, 3).reshape(in_features, outp // BLOCK, 8, 4, 2)
            blocked = (c5[..., 0] | (c5[..., 1] << 4)).reshape(in_features, outp // BLOCK, 32)
            planes.append(torch.cat([blocked[:, t : t + tile_blocks].reshape(-1)
                                     for t in range(0, outp // BLOCK, tile_blocks)]))
            scale, minimum = sz[..., 0].float(), sz[..., 1].float() - 8 * sz[..., 0].float()
            for value, into in ((scale, scales), (minimum, mins)):
                half = value.to(torch.float16)
                error = (half.float() - value).abs()
                if not torch.isfinite(half).all() or bool((error > value.abs() * 2.0 ** -10 + 1e-30).any()):
                    return None
                padded = half.new_zeros(in_features // GROUP, outp)
                padded[:, :out_features] = half
                into.append(padded)
        return cls(torch.stack(planes).contiguous(), torch.stack(scales).contiguous(),
                   torch.stack(mins).contiguous(), out_features, tile_blocks)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scales, self.mins))


def gathered_mm(x: torch.Tensor, w: Int4Gather, threshold: float) -> tuple[torch.Tensor, list[int]]:
    """``sparsify(x, threshold) @ W.T`` for ``x`` ``[B, in]`` (fp32 or bf16), reading only the kept
    inputs' codes; ``threshold < 0`` keeps every input. Returns ``[B, out]`` in ``x``'s dtype and
    the inputs kept per sequence. Needs ``cpu_kernels.available()``."""
    return cpu_kernels.module().gather_mm(x.contiguous(), w.codes, w.scales, w.mins, w.out_features, w.tile_blocks,
                                           float(threshold))


def tile_width(blocks: int, threads: int, widest: int = MAX_TILE_BLOCKS) -> int:
    """Blocks per tile: tiles of at most ``widest`` blocks, as many as a multiple of ``threads``, near equal."""
    threads = max(1, threads)
    tiles = threads * -(-blocks // (threads * widest))
    return max(1, -(-blocks // tiles))
