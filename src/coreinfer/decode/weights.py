"""Weight formats of the lean backend: fp32, bf16, and weight-only int8.

``Int8Weight`` keeps ``nn.Linear``'s ``[out, in]`` layout with one scale per
output channel, so selecting rows (gate/up neurons) or columns (down inputs)
keeps the scales valid and quantisation composes with CoreInfer's gathering.

PyTorch's CPU int8 kernel (``torch._weight_int8pack_mm``) returns wrong numbers,
without an error, when the inner dimension is not a multiple of 16 (measured on
torch 2.13, AVX-512: relative error ~1 for K = 921, 920 or 136; 0.2 % for 928).
Dense layers of real models are multiples of 16, but a compact FFN keeps any
number of neurons. So every int8 matrix is stored with its inner dimension
padded by zero columns to ``INT8_ALIGN``, and compact FFNs pad their kept
neurons with zero rows and columns (a zero neuron contributes exactly nothing).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import torch
from torch.nn import functional as F

WEIGHT_FORMATS = ("fp32", "bf16", "int8")
INT8_ALIGN = 16
GATHER_KERNEL = "embedding_bag-blocks"  # what gathered_linear runs; names measured speed verdicts


def cpu_has_native_bf16() -> bool:
    """Whether this CPU runs bf16 matmuls natively (AVX-512 BF16 or AMX)."""
    try:
        with open("/proc/cpuinfo") as info:
            flags = next((line.split() for line in info if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def default_weights(device: torch.device) -> str:
    """The weight format the lean backend uses unless told otherwise.

    bf16 on CUDA and on a CPU with native bf16; fp32 elsewhere. int8 (about twice
    bf16's speed on such a CPU) stays opt-in: read on everyday prompts, dense int8
    on SmolLM2 turned "Give me three tips for sleeping better." into a loop of
    "1.1.1.1..." where fp32 and bf16 answer properly. A default must not write that.
    """
    if device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16()):
        return "bf16"
    return "fp32"


def activation_dtype(weights: str) -> torch.dtype:
    check_weights(weights)
    return torch.float32 if weights == "fp32" else torch.bfloat16


def check_weights(weights: str) -> None:
    if weights not in WEIGHT_FORMATS:
        raise ValueError(f"weights must be one of {', '.join(WEIGHT_FORMATS)}, not {weights!r}")


def padded(size: int, multiple: int) -> int:
    return -(-size // multiple) * multiple


@dataclass
class Int8Weight:
    """Weight-only int8 ``[out, in_padded]`` with one scale per output channel.

    ``in_features`` is the true inner size; columns past it are zero.
    """

    q: torch.Tensor  # [out, in_padded] int8
    scale: torch.Tensor  # [out], the activation dtype
    in_features: int

    @classmethod
    def quantize(cls, w: torch.Tensor, dtype: torch.dtype) -> "Int8Weight":
        w = w.detach().float()
        # Few passes over the matrix: quantising the whole model is on the first request's path.
        scale = torch.linalg.vector_norm(w, ord=float("inf"), dim=1).clamp_(min=1e-12) / 127.0
        q = (w * scale.reciprocal()[:, None]).round_().clamp_(-127, 127).to(torch.int8)
        return cls(_pad_columns(q, padded(w.shape[1], INT8_ALIGN)), scale.to(dtype), w.shape[1])

    def cols(self, index: torch.Tensor, width: int) -> "Int8Weight":
        """Columns ``index`` as a new matrix whose inner size is ``width`` (zero columns past ``len(index)``)."""
        return Int8Weight(_pad_columns(self.q[:, index], width), self.scale, width)

    def dequantize(self) -> torch.Tensor:
        return self.q[:, : self.in_features].float() * self.scale.float()[:, None]

    def numel(self) -> int:
        return self.q.shape[0] * self.in_features

    def nbytes(self) -> int:
        return self.q.numel() + self.scale.numel() * self.scale.element_size()


Weight = Union[torch.Tensor, Int8Weight]


def _pad_columns(q: torch.Tensor, width: int) -> torch.Tensor:
    if q.shape[1] == width:
        return q.contiguous()
    out = q.new_zeros(q.shape[0], width)
    out[:, : q.shape[1]] = q
    return out


def quantize(w: torch.Tensor, weights: str) -> Weight:
    """One matrix in a weight format (``nn.Linear`` layout)."""
    dtype = activation_dtype(weights)
    return Int8Weight.quantize(w, dtype) if weights == "int8" else w.detach().to(dtype).contiguous()


def linear(x: torch.Tensor, w: Weight) -> torch.Tensor:
    """``x @ w.T`` for ``x`` ``[M, in]``."""
    if not isinstance(w, Int8Weight):
        return F.linear(x, w)
    if x.shape[-1] != w.q.shape[1]:
        x = F.pad(x, (0, w.q.shape[1] - x.shape[-1]))
    if x.device.type == "cpu":
        return torch._weight_int8pack_mm(x, w.q, w.scale)
    return int8_linear_portable(x, w)


def int8_linear_portable(x: torch.Tensor, w: Int8Weight) -> torch.Tensor:
    """The same product on any device: dequantise to the activation dtype, then scale the output."""
    return F.linear(x, w.q.to(x.dtype)) * w.scale


def rows_padded(w: Weight, index: torch.Tensor, count: int) -> Weight:
    """Rows ``index`` of ``w`` followed by zero rows up to ``count`` rows."""
    if isinstance(w, Int8Weight):
        q = w.q.new_zeros(count, w.q.shape[1])
        scale = w.scale.new_zeros(count)
        q[: len(index)], scale[: len(index)] = w.q[index], w.scale[index]
        return Int8Weight(q, scale, w.in_features)
    out = w.new_zeros(count, w.shape[1])
    out[: len(index)] = w[index]
    return out


def cat_rows(parts: list[Weight]) -> Weight:
    if isinstance(parts[0], Int8Weight):
        return Int8Weight(
            torch.cat([p.q for p in parts]), torch.cat([p.scale for p in parts]), parts[0].in_features
        )
    return torch.cat(parts)


def take_cols(w: Weight, index: torch.Tensor, width: int) -> Weight:
    """Columns ``index`` of ``w``, zero-padded to ``width`` columns."""
    if isinstance(w, Int8Weight):
        return w.cols(index, width)
    return _pad_columns(w[:, index], width)


@dataclass
class GatherWeight:
    """A matrix laid out for token-level products: ``W.T`` ``[in, out]`` cut into ``parts`` column
    blocks stacked as rows, ``blocks`` ``[parts * in, out / parts]``.

    Row ``p * in + i`` holds input ``i``'s weights to outputs ``p * out/parts`` onward, so one kept
    input is ``parts`` contiguous rows. ``embedding_bag`` spreads its bags over threads but runs each
    bag on one; one bag per block lets every thread sum its own outputs. Measured on a 2-core AVX2
    CPU, fp32, kept rows read from memory: two blocks took SmolLM2's gate+up at 0.7 kept from 1.11 ms
    to 0.76 ms and a Llama-3.2-1B gate+up at 0.5 from 10.7 ms (``torch.sparse.mm``, faster than one
    bag there) to 8.4 ms.
    """

    blocks: torch.Tensor
    parts: int
    block_index: torch.Tensor  # [parts]: 0, 1, ...
    block_starts: torch.Tensor  # [parts]: each block's first row, p * in

    @classmethod
    def of(cls, w: torch.Tensor, parts: int) -> "GatherWeight":
        """``w`` in ``nn.Linear``'s ``[out, in]`` layout; ``parts`` falls back to 1 where it does not divide ``out``."""
        out_features, in_features = w.shape
        parts = parts if parts > 0 and out_features % parts == 0 else 1
        blocks = w.t().reshape(in_features, parts, out_features // parts).transpose(0, 1)
        blocks = blocks.reshape(parts * in_features, out_features // parts).contiguous()
        block_index = torch.arange(parts, device=w.device)
        return cls(blocks, parts, block_index, block_index * in_features)

    @property
    def in_features(self) -> int:
        return self.blocks.shape[0] // self.parts


def gather_parts(device: torch.device) -> int:
    """Column blocks per gathered matrix: one per CPU thread; CUDA's kernel already spreads one bag."""
    return torch.get_num_threads() if device.type == "cpu" else 1


def gathered_linear(x: torch.Tensor, w: GatherWeight, threshold: float) -> tuple[torch.Tensor, list[int]]:
    """``sparsify(x, threshold) @ W.T`` reading only the weights of the inputs that survive.

    ``x`` is ``[B, in]``; each sequence keeps its own entries. Returns the product ``[B, out]`` and
    the number of inputs kept per sequence. ``embedding_bag`` sums the selected rows, weighted by
    their inputs, in one fused kernel (one bag per sequence and block), so dropped rows are never read.
    """
    parts, width = w.parts, w.in_features
    mask = x.abs() > threshold
    if x.shape[0] == 1:  # the common case, in fewer ops: each one costs microseconds per layer
        column = mask[0].nonzero().squeeze(1)
        kept = [column.numel()]
        index = (column + w.block_starts[:, None]).flatten()
        offsets = w.block_index * kept[0]
        values = x[0].index_select(0, column).expand(parts, -1).reshape(-1)
    else:
        # Bag (b, p) is sequence b's kept inputs, shifted into block p.
        bag_mask = mask[:, None, :].expand(-1, parts, -1)
        bag, block, column = bag_mask.nonzero().unbind(1)
        index = column + block * width
        counts = bag_mask.sum(-1).flatten()
        kept = counts[::parts].tolist()
        offsets = counts.cumsum(0) - counts
        values = x[bag, column]
    out = F.embedding_bag(index, w.blocks, offsets, mode="sum", per_sample_weights=values.to(w.blocks.dtype))
    return out.view(x.shape[0], -1).to(x.dtype), kept


def nbytes(w: Weight) -> int:
    return w.nbytes() if isinstance(w, Int8Weight) else w.numel() * w.element_size()


def alignment(w: Weight) -> int:
    """The multiple a compact inner dimension must be padded to for this format."""
    return INT8_ALIGN if isinstance(w, Int8Weight) else 1
