"""A CPU kernel for dense int4 (and 8-bit) products: every input read, 16-bit integer activations.

``int4_gather`` stores a matrix input-major so token-level sparsity can skip inputs; read densely that
layout streams memory at a third of the machine's bandwidth, and its fp32 multiply-add per weight and
sequence makes a batch of 8 cost 5-10 single products. This kernel reads the same GGUF codes
output-major, one sequential stream per thread (the codes, scales and mins of each tile of 64 outputs
and group of 32 inputs together), and multiplies them as integers with the activations rounded per
group of 32 to int16 (``vpdpwssd``/``vpmaddwd``: two weights per 32-bit lane, no conversion to float).
int16 rounding errs at most 2**-16 of a group's largest input (llama.cpp rounds activations to int8).

``y = W @ x_hat`` exactly up to fp32 summation, where ``x_hat`` is ``x`` so rounded (``round_activations``
is the reference). Each sequence is rounded alone, so a batch gives each row its single run's numbers.
Weight scales come per 32 inputs, or per 16 (GGUF's Q6_K, which no other int4 path here reads).
The C++ source is ``int4_dense.cpp``, built with the other CPU kernels (``cpu_kernels``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from . import cpu_kernels
from .int4_gather import kernel_planes

GROUP = 32  # inputs per activation scale
GROUPS = (32, 16)  # inputs per weight scale the kernel takes (16: GGUF's Q6_K)
TILE = 64  # outputs per tile (int4_dense.cpp)


@dataclass
class Int4Dense:
    """An int4 matrix in the dense kernel's output-major stream (``of`` builds it from ``Int4Weight`` planes)."""

    stream: torch.Tensor  # [P, tiles * in / 32 * chunk] uint8: per tile and group, codes then fp16 scales and mins
    out_features: int
    outp: int  # outputs padded to a multiple of TILE
    bits: int  # per code: 4, or 8 (two 4-bit planes joined)
    group: int = GROUP  # inputs per weight scale: 32, or 16

    @classmethod
    def of(cls, codes: list[torch.Tensor], scale_zeros: list[torch.Tensor],
           rows_per_part: int = 256 * TILE) -> Optional["Int4Dense"]:
        """From ``Int4Weight``'s planes; None where a scale or min does not fit fp16 (``kernel_planes``).

        Built ``rows_per_part`` outputs at a time (the stream is tile-major, so the parts' streams
        joined are the whole's): each code widens to a byte and is copied twice on the way, which
        for Gemma 3's 262k-row head held 1 GB at once.
        """
        out_features = codes[0].shape[0]
        if out_features > rows_per_part:
            parts = [cls.of([c[r : r + rows_per_part] for c in codes], [sz[:, r : r + rows_per_part] for sz in scale_zeros],
                            rows_per_part) for r in range(0, out_features, rows_per_part)]
            if all(p is not None for p in parts) and len({(p.bits, p.group) for p in parts}) == 1:
                return cls(torch.cat([p.stream for p in parts], dim=1), out_features,
                           sum(p.outp for p in parts), parts[0].bits, parts[0].group)
            # Parts that disagree (one plane pair joinable as 8 bits, another not): build it whole.
        planes = kernel_planes(codes, scale_zeros)
        if planes is None:
            return None
        bits, values, scales, mins = planes
        out_features, in_features = values[0].shape
        group = in_features // scales[0].shape[0]
        if group not in GROUPS:
            return None
        outp = -(-out_features // TILE) * TILE
        streams = [_stream(code, scale, minimum, bits, outp) for code, scale, minimum in zip(values, scales, mins)]
        return cls(torch.stack(streams).contiguous(), out_features, outp, bits, group)

    def nbytes(self) -> int:
        return self.stream.numel()


def _stream(code: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor, bits: int, outp: int) -> torch.Tensor:
    """One plane: codes ``[out, in]`` (one per byte), fp16 ``[in / group, out]`` scales and mins, as the
    kernel's chunks (int4_dense.cpp's layout comment)."""
    out_features, in_features = code.shape
    tiles, groups = outp // TILE, in_features // GROUP
    sub = scale.shape[0] // groups  # weight scales per group of 32 inputs
    padded = code.new_zeros(outp, in_features)
    padded[:out_features] = code
    per_word = 32 // bits  # codes per 32-bit word, inputs in order: word u holds inputs per_word * u + k
    words = padded.view(tiles, TILE, groups, GROUP // per_word, per_word).permute(0, 2, 3, 1, 4)
    if bits == 4:  # nibble k of the word: byte k // 2, low nibble first
        words = words[..., 0::2] | (words[..., 1::2] << 4)
    chunks = [words.reshape(tiles, groups, -1)]
    for half in (scale, minimum):
        tiled = half.new_zeros(groups * sub, outp)
        tiled[:, :out_features] = half
        chunks.append(tiled.view(groups, sub, tiles, TILE).permute(2, 0, 1, 3).reshape(tiles, groups, -1)
                      .view(torch.uint8))
    return torch.cat(chunks, dim=-1).reshape(-1)


def dense_mm(x: torch.Tensor, w: Int4Dense) -> torch.Tensor:
    """``round_activations(x) @ W.T`` for ``x`` ``[B, in]`` (fp32 or bf16), in ``x``'s dtype. Needs
    ``cpu_kernels.available()``."""
    return cpu_kernels.module().dense_mm(x.contiguous(), w.stream, w.out_features, w.outp, w.bits, w.group)


def round_activations(x: torch.Tensor, levels: int = 32767) -> torch.Tensor:
    """What the kernel multiplies: ``x`` rounded per group of 32 to integer steps of the group's largest
    ``|x|`` / ``levels`` (fp32; the reference for tests). The dense kernel rounds to int16 (32767), the
    gather kernel to int8 (127)."""
    grouped = x.float().reshape(*x.shape[:-1], -1, GROUP)
    largest = grouped.abs().amax(-1, keepdim=True)
    inverse = torch.where(largest > 0, levels / largest, torch.zeros_like(largest))
    q = (grouped * inverse).round().clamp(-levels, levels)
    return (q * (largest / levels)).reshape(x.shape)
