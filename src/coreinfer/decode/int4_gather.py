"""A CPU kernel for int4 products that read only the kept inputs' weights (token-level sparsity).

PyTorch's int4 CPU kernel (``_weight_int4pack_mm_for_cpu``) takes a packed layout that interleaves
blocks of output rows, so it cannot skip inputs. This one stores the same GGUF codes input-major:
for each input, its codes over all outputs are contiguous, so a dropped input's weights are never
read. The scale and min of each group of 32 inputs per output (``w = scale * code + min``) are
fp16, ``[in / 32, out]``; GGUF stores them in fp16 (Q4_0, Q4_1, Q5_0, Q8_0) or as products of fp16
and 6-bit integers (Q4_K), which fp16 holds to 2**-11 (the torch kernel rounds them to bf16, 2**-8).

Codes are 4-bit, or 8-bit where ``Int4Weight`` splits a wider format into two 4-bit planes (Q5_0,
Q5_1, Q8_0: the LM head of both verified models). One 8-bit plane is the same numbers in half the
kernel's arithmetic (one unpack and multiply-add per weight instead of two) and 10 % fewer bytes.

The C++ source is ``int4_gather.cpp``, built with the other CPU kernels (``cpu_kernels``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from . import cpu_kernels

GROUPS = (32, 16)  # inputs per weight scale the kernel takes (16: GGUF's Q6_K)
BLOCK = 64  # outputs per block of one input's codes (32 bytes of 4-bit codes, 64 of 8-bit)
MAX_TILE_BLOCKS = 256  # see Int4Gather.of


@dataclass
class Int4Gather:
    """An int4 matrix in the kernel's input-major layout (``of`` builds it from ``Int4Weight`` planes)."""

    codes: torch.Tensor  # [P, in * outp * bits / 8] uint8: per tile of outputs, its rows (one per input) in one slab
    scales: torch.Tensor  # [P, in / 32, outp] fp16
    mins: torch.Tensor  # [P, in / 32, outp] fp16
    out_features: int
    tile_blocks: int  # 64-output blocks per tile (the last tile may have fewer)
    bits: int = 4  # per code: 4, or 8 (two 4-bit planes joined)

    @classmethod
    def of(cls, codes: list[torch.Tensor], scale_zeros: list[torch.Tensor]) -> Optional["Int4Gather"]:
        """From ``Int4Weight``'s planes (``kernel_planes``); None where a scale or min does not fit fp16.

        Each input's codes over all outputs (up to ``MAX_TILE_BLOCKS`` blocks) are one contiguous run,
        and the kernel cuts the inputs, not the outputs, between threads. Why: with runs of 256-512
        bytes (a tile of outputs per thread), reading half the rows took as long as reading all of
        them here; the hardware prefetchers fetch the rows in between anyway."""
        planes = kernel_planes(codes, scale_zeros)
        if planes is None:
            return None
        bits, values, scales, mins = planes
        out_features, in_features = values[0].shape
        outp = -(-out_features // BLOCK) * BLOCK
        tile_blocks = tile_width(outp // BLOCK)
        layouts = []
        for code in values:
            code_t = code.new_zeros(in_features, outp)
            code_t[:, :out_features] = code.t()
            layouts.append(_blocked(code_t, bits, tile_blocks))
        return cls(torch.stack(layouts).contiguous(), _padded(scales, outp), _padded(mins, outp), out_features,
                   tile_blocks, bits)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scales, self.mins))


def kernel_planes(codes: list[torch.Tensor], scale_zeros: list[torch.Tensor]
                  ) -> Optional[tuple[int, list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]]:
    """``Int4Weight``'s planes (codes ``[out, in / 2]``, ``(scale, zero)`` ``[in / group, out, 2]``,
    ``w = (code - 8) * scale + zero``) as the CPU kernels read them: ``(bits, codes, scales, mins)`` with
    codes ``[out, in]`` (one per byte) and fp16 ``[in / group, out]`` scales and mins, ``w = scale * code + min``.
    Two 4-bit planes whose second scale is 16x the first are one 8-bit plane (Q5_0, Q5_1, Q8_0). None
    where a scale or min does not fit fp16 to 2**-10."""
    out_features, in_features = codes[0].shape[0], codes[0].shape[1] * 2
    values = [torch.stack([c & 15, c >> 4], dim=-1).view(out_features, in_features) for c in codes]
    affine = [(sz[..., 0].float(), sz[..., 1].float() - 8 * sz[..., 0].float()) for sz in scale_zeros]
    bits = 4
    if len(codes) == 2 and torch.equal(affine[1][0], 16 * affine[0][0]):
        # code_0 + 16 code_1 under plane 0's scale, the planes' mins summed: one 8-bit plane.
        bits, values = 8, [values[0] | (values[1] << 4)]
        affine = [(affine[0][0], affine[0][1] + affine[1][1])]
    halves: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])
    for pair in affine:
        for value, into in zip(pair, halves):
            half = value.to(torch.float16)
            error = (half.float() - value).abs()
            if not torch.isfinite(half).all() or bool((error > value.abs() * 2.0 ** -10 + 1e-30).any()):
                return None
            into.append(half)
    return bits, values, halves[0], halves[1]


def _padded(halves: list[torch.Tensor], outp: int) -> torch.Tensor:
    """Per-plane ``[in / 32, out]`` fp16 as ``[P, in / 32, outp]``, zero past ``out``."""
    padded = halves[0].new_zeros(len(halves), halves[0].shape[0], outp)
    for plane, half in enumerate(halves):
        padded[plane, :, : half.shape[1]] = half
    return padded


def _block_order(bits: int) -> torch.Tensor:
    """Which output of a 64-output block each code position holds (int4_gather.cpp's permutation, undone
    by the kernel's interleaving): 4-bit ``[32, 2]`` (byte, nibble), 8-bit ``[64]`` (byte)."""
    o = torch.arange(BLOCK)
    v, lane = o // 8, o % 8
    if bits == 4:
        order = torch.empty(32, 2, dtype=torch.long)
        order[16 * (lane // 4) + 4 * (v // 2) + lane % 4, v % 2] = o
    else:
        order = torch.empty(64, dtype=torch.long)
        order[32 * (v // 4) + 16 * (lane // 4) + 4 * (v % 4) + lane % 4] = o
    return order


def _blocked(code_t: torch.Tensor, bits: int, tile_blocks: int) -> torch.Tensor:
    """Codes ``[in, outp]`` (one per byte) in the kernel's blocks, cut into tiles of ``tile_blocks``
    blocks, each tile one slab of rows, one per input (see int4_gather.cpp)."""
    in_features, nblocks = code_t.shape[0], code_t.shape[1] // BLOCK
    by_block = code_t.view(in_features, nblocks, BLOCK)[..., _block_order(bits)]
    blocked = by_block[..., 0] | (by_block[..., 1] << 4) if bits == 4 else by_block  # [in, blocks, bytes]
    return torch.cat([blocked[:, t : t + tile_blocks].reshape(-1) for t in range(0, nblocks, tile_blocks)])


def gathered_mm(x: torch.Tensor, w: Int4Gather, threshold: float) -> tuple[torch.Tensor, list[int]]:
    """``sparsify(x, threshold) @ W.T`` for ``x`` ``[B, in]`` (fp32 or bf16), reading only the kept
    inputs' codes; ``threshold < 0`` keeps every input. Returns ``[B, out]`` in ``x``'s dtype and
    the inputs kept per sequence. Needs ``cpu_kernels.available()``."""
    return cpu_kernels.module().gather_mm(x.contiguous(), w.codes, w.scales, w.mins, w.out_features, w.tile_blocks,
                                           float(threshold), w.bits)


def tile_width(blocks: int, widest: int = MAX_TILE_BLOCKS) -> int:
    """Blocks per tile: as few tiles as hold at most ``widest`` blocks each, near equal."""
    return -(-blocks // -(-blocks // widest))
