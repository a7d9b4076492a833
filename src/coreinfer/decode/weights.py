"""Weight formats of the lean backend: fp32, bf16, weight-only int8 and group-wise int4.

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
from typing import Callable, Optional, Union

import torch
from torch.nn import functional as F

from . import cpu_kernels, int4_dense, int4_gather

Planes = tuple[list[torch.Tensor], list[torch.Tensor]]  # Int4Weight's codes and scale_zeros, per plane
WEIGHT_FORMATS = ("fp32", "bf16", "int8", "int4")
INT4_GROUP = 32  # weights per scale and offset: GGUF's Q4_0/Q4_1 blocks and Q4_K's sub-blocks
INT8_ALIGN = 16
GATHER_KERNEL = "embedding_bag-blocks"  # what gathered_linear runs; names measured speed verdicts
# Formats token-level sparsity reads row by row with stock kernels (gathered_linear). int4 does too
# on a CPU where coreinfer's own kernel builds (decode.int4_gather; see gathers); int8 does not: its
# stock kernel takes whole matrices.
GATHER_FORMATS = ("fp32", "bf16")


def gathers(weights: str, device: torch.device) -> bool:
    """Whether token-level sparsity reads only the kept inputs' weights in this format on ``device``:
    fp32 and bf16 everywhere (``gathered_linear``), int4 on a CPU where ``int4_gather`` builds."""
    if weights in GATHER_FORMATS:
        return True
    return weights == "int4" and device.type == "cpu" and cpu_kernels.available()


# Formats where keep="auto" may decode token-level, each model and machine deciding by measurement
# (Engine.token_pays: at least TOKEN_SPEEDUP x dense). int4 since the v8 gather kernel: on a 2-core Zen 4,
# `coreinfer bench`, token-level at half the FFN and attention weights decodes a Llama-3.2-1B shape at
# 1.28-1.39x dense int4, while SmolLM2's small matrices still decode at 0.84x dense (token 0.7), so
# there the default stays dense.
AUTO_GATHER_FORMATS = ("fp32", "bf16", "int4")


def auto_gathers(weights: str, device: torch.device) -> bool:
    """Whether ``keep="auto"`` may choose token-level sparsity in this format (see ``AUTO_GATHER_FORMATS``)."""
    return weights in AUTO_GATHER_FORMATS and gathers(weights, device)


def gather_kernel(weights: str) -> str:
    """The name of the kernel token-level products run in this format (speed verdicts are kept per kernel)."""
    return cpu_kernels.KERNEL if weights == "int4" else GATHER_KERNEL


def cpu_has_native_bf16() -> bool:
    """Whether this CPU runs bf16 matmuls natively (AVX-512 BF16 or AMX)."""
    try:
        with open("/proc/cpuinfo") as info:
            flags = next((line.split() for line in info if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def default_weights(device: torch.device, gguf: bool = False) -> str:
    """The weight format the lean backend uses unless told otherwise (``--weights auto``): the fastest
    that reproduces the model's own weights.

    - A GGUF source on a CPU where coreinfer's kernels build: int4, the file's own 4-bit blocks
      (codes exact, scales fp16). On a 2-core Zen 4 it decoded SmolLM2 at 152-159 tok/s (the dense
      int4 kernel, ``decode.int4_dense``), teacher-forced agreement with fp32 1.00. Where they do
      not build, int4 would run torch's kernel with bf16 scales and activations, which answered
      "Give me three tips for sleeping better." with the "1. **1.1.1.1" near-tie loop: the rules
      below apply instead (``weights="int4"`` still opts in).
    - CUDA, or a CPU with native bf16 (AVX-512 BF16 or AMX): bf16.
    - Elsewhere fp32. bf16 is faster even here (2.3x on SmolLM2), but it rounds an fp32
      checkpoint's weights: opt in with ``weights="bf16"``.

    int8 stays opt-in. On SmolLM2, "Give me three tips for sleeping better." reaches a near-tie
    after "1. **" (fp32: "Avoid" over "1" by 0.031 logits); per-channel int8 rounds each weight
    row by about 1 % (bf16: 0.14 %), which moves that margin by 0.16 the wrong way, and greedy
    decoding then repeats "1." for ever. Group-32 int8 (0.6 %) flipped it too. Not a kernel fault:
    the dequantised int8 values in bf16 matmuls loop the same way.
    """
    if device.type == "cpu" and gguf and cpu_kernels.available():
        return "int4"
    if device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16()):
        return "bf16"
    return "fp32"


def activation_dtype(weights: str) -> torch.dtype:
    """The dtype a format's dense matrices are held in and torch's kernels compute in: fp32 for fp32
    weights, else bf16. int4 too: PyTorch's CPU int4 kernel takes fp32 activations (with fp32 scales)
    but ran 11x slower than with bf16 ones on a 2-core AVX2 CPU (SmolLM2's gate+up: 2.24 ms against
    0.20 ms); fp16 was slower still. (Where coreinfer's own kernels build, int4 decodes in fp32:
    ``LeanModel.fused``.)"""
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


@dataclass
class Int4Weight:
    """Group-wise affine 4-bit ``[out, in]``: ``w = sum_p (code_p - 8) * scale_p + zero_p``, one scale
    and zero per plane, output row and group of ``group`` inputs.

    One plane holds a 4-bit format exactly: GGUF's Q4_0, Q4_1 and Q4_K, or a checkpoint rounded to
    nearest. A wider integer format is split into 4-bit planes (code = code_0 + 16 code_1: GGUF's
    Q5_0, Q5_1 and Q8_0), so the same kernel reads it exactly, at 4 bits per plane. ``codes`` keeps
    two codes per byte in row order, so rows can be gathered; ``kernel()`` is the CPU kernel's own
    layout of the same codes (it interleaves blocks of rows).
    """

    codes: list[torch.Tensor]  # per plane [out, in / 2] uint8: column 2j in the low nibble, 2j + 1 in the high
    scale_zeros: list[torch.Tensor]  # per plane [in / group, out, 2] fp32: scale, zero (the kernel's layout)
    group: int = INT4_GROUP
    dtype: torch.dtype = torch.bfloat16
    # What the CPU kernel reads, per plane: torch._convert_weight_to_int4pack_for_cpu's layout of the
    # codes and the scales in the activation dtype (bf16: rounded from fp32). Made on first use, so
    # the parts of a stacked matrix (gate and up rows of a compact FFN) are never packed alone.
    _kernel: Optional[list[tuple[torch.Tensor, torch.Tensor]]] = None
    # The same codes input-major for token-level products (int4_gather.Int4Gather), made on first use.
    _gather: Optional[int4_gather.Int4Gather] = None
    _gather_tried: bool = False
    # And output-major for dense products (int4_dense.Int4Dense), made on first use.
    _dense: Optional[int4_dense.Int4Dense] = None
    _dense_tried: bool = False
    # Where the row layout can be read again (a GGUF's int4 cache file). With one, ``drop_rows`` frees
    # it once the kernels' own layouts are built, and the next reader of ``codes`` reads it back.
    source: Optional[Callable[[], Planes]] = None
    _dims: Optional[tuple[int, int]] = None  # the shape, while the row layout is dropped

    def __getattr__(self, name: str):
        # Only reached for an attribute the instance lacks: the row layout, after drop_rows.
        source = self.__dict__.get("source")
        if name in ("codes", "scale_zeros") and source is not None:
            try:
                self.codes, self.scale_zeros = source()
            except OSError as err:
                raise RuntimeError(f"the int4 row layout is read back from its cache file, which is gone ({err}); "
                                   "load the model again") from err
            return self.__dict__[name]
        raise AttributeError(name)

    @classmethod
    def from_source(cls, source: Callable[[], Planes], dims: tuple[int, int], group: int,
                    dtype: torch.dtype) -> "Int4Weight":
        """A matrix whose row layout is read from ``source`` when first used (its shape is ``dims``)."""
        weight = cls([], [], group, dtype, source=source, _dims=dims)
        del weight.codes, weight.scale_zeros
        return weight

    def drop_rows(self) -> bool:
        """Free the row layout (two codes a byte, fp32 scales and zeros) where the dense kernel's layout
        holds the same weights and ``source`` can read it back: a second copy of every matrix that a
        dense decode never reads (1.2 GB of a 1.5B model). Sentence-level compaction (``rows``) and the
        token-level layout (``gathered``) read it back when first needed. Whether it was dropped."""
        if self.source is None or self._dense is None or "codes" not in self.__dict__:
            return False
        self._dims = self.shape
        del self.codes, self.scale_zeros
        return True

    @classmethod
    def from_integers(cls, q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, bits: int,
                      group: int = INT4_GROUP, dtype: torch.dtype = torch.bfloat16) -> "Int4Weight":
        """``w = scale * q + offset`` for integer ``q`` ``[out, in]`` in ``[0, 2**bits)``; ``scale`` and
        ``offset`` ``[out, in / group]``."""
        q = q.to(torch.int32)
        codes, scale_zeros = [], []
        for plane in range(-(-bits // 4)):
            code = (q >> (4 * plane)) & 15
            plane_scale = scale.float() * 16.0 ** plane
            zero = 8 * plane_scale + (offset.float() if plane == 0 else 0.0)
            codes.append((code[:, 0::2] | (code[:, 1::2] << 4)).to(torch.uint8))
            scale_zeros.append(torch.stack([plane_scale.t(), zero.t()], dim=-1).contiguous())
        return cls(codes, scale_zeros, group, dtype)

    def kernel(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """torch's packed layout (per plane), built on first use: what every product reads where
        coreinfer's int4 kernel does not run (``int4_linear``)."""
        if self._kernel is None:
            self._kernel = [(_int4_pack(c), sz.to(self.dtype)) for c, sz in zip(self.codes, self.scale_zeros)]
        return self._kernel

    def gathered(self) -> Optional[int4_gather.Int4Gather]:
        """This matrix in ``int4_gather``'s input-major layout, built once on first use; None where the
        kernel is unavailable, the matrix is not on the CPU, or a scale does not fit fp16."""
        if not self._gather_tried:
            self._gather_tried = True
            if self.group in int4_gather.GROUPS and self.codes[0].device.type == "cpu" and cpu_kernels.available():
                self._gather = int4_gather.Int4Gather.of(self.codes, self.scale_zeros)
                if self._dims is not None:  # it was dropped before: the layouts hold what products read
                    self.drop_rows()
        return self._gather

    def dense_layout(self) -> Optional[int4_dense.Int4Dense]:
        """This matrix in ``int4_dense``'s layout, which dense products read, built once on first use;
        None where the kernel is unavailable, the matrix is not on the CPU, its groups are neither 32 nor
        16, a scale does not fit fp16, or the product's scales are not bf16 (which fp16 holds at least
        as well)."""
        if not self._dense_tried:
            self._dense_tried = True
            if self.dtype == torch.bfloat16 and self.codes[0].device.type == "cpu" and cpu_kernels.available():
                self._dense = int4_dense.Int4Dense.of(self.codes, self.scale_zeros)  # None for other groups
        return self._dense

    @classmethod
    def quantize(cls, w: torch.Tensor, group: int = INT4_GROUP, dtype: torch.dtype = torch.bfloat16) -> "Int4Weight":
        """Round to nearest, one scale and offset per group (asymmetric: the group's min to max in 15 steps)."""
        out_features, in_features = w.shape
        grouped = w.detach().float().view(out_features, in_features // group, group)
        low, high = grouped.amin(-1), grouped.amax(-1)
        scale = ((high - low) / 15).clamp_(min=torch.finfo(torch.float32).tiny)
        q = ((grouped - low[..., None]) / scale[..., None]).round_().clamp_(0, 15)
        return cls.from_integers(q.view(out_features, in_features), scale, low, 4, group, dtype)

    @property
    def shape(self) -> tuple[int, int]:
        if "codes" not in self.__dict__ and self._dims is not None:
            return self._dims
        return self.codes[0].shape[0], self.codes[0].shape[1] * 2

    def dequantize(self) -> torch.Tensor:
        out_features, in_features = self.shape
        w = torch.zeros(out_features, in_features // self.group, self.group, device=self.codes[0].device)
        for codes, scale_zeros in zip(self.codes, self.scale_zeros):
            code = _unpack(codes).view(out_features, -1, self.group).float()
            w += (code - 8) * scale_zeros[..., 0].t()[..., None] + scale_zeros[..., 1].t()[..., None]
        return w.view(out_features, in_features)

    def rows(self, index: torch.Tensor, count: int) -> "Int4Weight":
        """Rows ``index`` followed by zero rows (scale and zero 0) up to ``count`` rows."""
        codes, scale_zeros = [], []
        for c, sz in zip(self.codes, self.scale_zeros):
            codes.append(c.new_zeros(count, c.shape[1]))
            codes[-1][: len(index)] = c[index]
            scale_zeros.append(sz.new_zeros(sz.shape[0], count, 2))
            scale_zeros[-1][:, : len(index)] = sz[:, index]
        return Int4Weight(codes, scale_zeros, self.group, self.dtype)

    def numel(self) -> int:
        out_features, in_features = self.shape
        return out_features * in_features

    def nbytes(self) -> int:
        """What one product reads: the codes, and the scales in the activation dtype (coreinfer's kernel's
        layouts where they are built: one 8-bit plane for two joined 4-bit ones, fp16 scales and mins)."""
        for layout in (self._dense, self._gather):
            if layout is not None:
                return layout.nbytes()
        return sum(c.numel() + sz.numel() * self.dtype.itemsize for c, sz in zip(self.codes, self.scale_zeros))


def _unpack(codes: torch.Tensor) -> torch.Tensor:
    """``[out, in / 2]`` bytes as ``[out, in]`` codes (low nibble first)."""
    return torch.stack([codes & 15, codes >> 4], dim=-1).view(codes.shape[0], -1)


def _int4_pack(codes: torch.Tensor) -> torch.Tensor:
    return torch._convert_weight_to_int4pack_for_cpu(_unpack(codes).to(torch.int32), 1)


def _cat_int4(parts: list[Int4Weight]) -> Int4Weight:
    """Row-concatenated int4 matrices; a part with fewer planes reads zero planes (scale and zero 0).
    Where every part can read its rows back, so can the result (from the parts' sources, not their tensors)."""
    joined = Int4Weight(*_cat_planes([(p.codes, p.scale_zeros) for p in parts]), parts[0].group, parts[0].dtype)
    sources = [p.source for p in parts]
    if all(source is not None for source in sources):
        joined.source = lambda: _cat_planes([source() for source in sources])
    return joined


def _cat_planes(parts: list[Planes]) -> Planes:
    planes = max(len(codes) for codes, _ in parts)
    codes, scale_zeros = [], []
    for plane in range(planes):
        codes.append(torch.cat([c[plane] if plane < len(c) else torch.zeros_like(c[0]) for c, _ in parts]))
        scale_zeros.append(torch.cat([sz[plane] if plane < len(sz) else torch.zeros_like(sz[0]) for _, sz in parts],
                                     dim=1))
    return codes, scale_zeros


def int4_runs(w: Int4Weight) -> bool:
    """Whether a product can read ``w``: groups of 32 (every int4 kernel, and dequantising on CUDA), or
    of 16 (GGUF's Q6_K) where coreinfer's dense kernel builds."""
    return w.group == INT4_GROUP or w.dense_layout() is not None


def int4_fits(rows: int, cols: int, group: int = INT4_GROUP) -> bool:
    """The CPU kernel needs whole groups per row and output rows in multiples of 16."""
    return cols % group == 0 and rows % 16 == 0


Weight = Union[torch.Tensor, Int8Weight, Int4Weight]


def _pad_columns(q: torch.Tensor, width: int) -> torch.Tensor:
    if q.shape[1] == width:
        return q.contiguous()
    out = q.new_zeros(q.shape[0], width)
    out[:, : q.shape[1]] = q
    return out


def quantize(w: torch.Tensor, weights: str) -> Weight:
    """One matrix in a weight format (``nn.Linear`` layout)."""
    dtype = activation_dtype(weights)
    if weights == "int8":
        return Int8Weight.quantize(w, dtype)
    if weights == "int4" and w.dim() == 2 and int4_fits(*w.shape):
        return Int4Weight.quantize(w, dtype=dtype)
    return w.detach().to(dtype).contiguous()


def linear(x: torch.Tensor, w: Weight) -> torch.Tensor:
    """``x @ w.T`` for ``x`` ``[M, in]``."""
    if isinstance(w, Int4Weight):
        return int4_linear(x, w)
    if not isinstance(w, Int8Weight):
        if w.dtype != x.dtype:  # a bf16 matrix among int4 ones (a GGUF's Q6_K) under fp32 activations
            return F.linear(x.to(w.dtype), w).to(x.dtype)
        return F.linear(x, w)
    if x.shape[-1] != w.q.shape[1]:
        x = F.pad(x, (0, w.q.shape[1] - x.shape[-1]))
    if x.device.type == "cpu":
        return torch._weight_int8pack_mm(x, w.q, w.scale)
    return int8_linear_portable(x, w)


def int4_linear(x: torch.Tensor, w: Int4Weight) -> torch.Tensor:
    """On the CPU, coreinfer's dense int4 kernel (``int4_dense``: 2.3-3.1x the gather kernel's dense
    product on SmolLM2's shapes, 5-6x at batch 4-8), else one torch int4 kernel call per plane;
    elsewhere (CUDA) the honest fallback: dequantise, then matmul."""
    if x.device.type != "cpu":
        return F.linear(x, w.dequantize().to(x.dtype))
    # Batches too: torch's kernel rounds the scales to bf16, and under load that turned "three tips for
    # sleeping better" into the "1. **1.1.1.1" near-tie loop that coreinfer's fp16 scales avoid; each row
    # also gets exactly its single run's numbers this way.
    layout = w.dense_layout()
    if layout is not None:
        return int4_dense.dense_mm(x, layout)
    out = None
    x_in = x.to(w.dtype)  # torch's kernel computes in the matrix's dtype (bf16: fp32 ran 11x slower)
    for packed, scale_zeros in w.kernel():
        part = torch._weight_int4pack_mm_for_cpu(x_in, packed, w.group, scale_zeros)
        out = part if out is None else out.add_(part)
    return out.to(x.dtype)


def int8_linear_portable(x: torch.Tensor, w: Int8Weight) -> torch.Tensor:
    """The same product on any device: dequantise to the activation dtype, then scale the output."""
    return F.linear(x, w.q.to(x.dtype)) * w.scale


def rows_padded(w: Weight, index: torch.Tensor, count: int) -> Weight:
    """Rows ``index`` of ``w`` followed by zero rows up to ``count`` rows."""
    if isinstance(w, Int4Weight):
        return w.rows(index, count)
    if isinstance(w, Int8Weight):
        q = w.q.new_zeros(count, w.q.shape[1])
        scale = w.scale.new_zeros(count)
        q[: len(index)], scale[: len(index)] = w.q[index], w.scale[index]
        return Int8Weight(q, scale, w.in_features)
    out = w.new_zeros(count, w.shape[1])
    out[: len(index)] = w[index]
    return out


def cat_rows(parts: list[Weight]) -> Weight:
    if isinstance(parts[0], Int4Weight):
        return _cat_int4(parts)
    if isinstance(parts[0], Int8Weight):
        return Int8Weight(
            torch.cat([p.q for p in parts]), torch.cat([p.scale for p in parts]), parts[0].in_features
        )
    return torch.cat(parts)


def take_cols(w: Weight, index: torch.Tensor, width: int) -> Weight:
    """Columns ``index`` of ``w``, zero-padded to ``width`` columns.

    Int4 columns come back dequantised, in the activation dtype: a group of 32 inputs shares one
    scale per row, and the kept columns of a compact FFN come from any groups.
    """
    if isinstance(w, Int4Weight):
        if width == w.shape[1] and torch.equal(index.cpu(), torch.arange(width)):
            return w  # every column in order (keep=1.0): the matrix itself, so dense numbers stay dense's
        return _pad_columns(w.dequantize()[:, index].to(w.dtype), width)
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
    return w.nbytes() if isinstance(w, (Int8Weight, Int4Weight)) else w.numel() * w.element_size()


def alignment(w: Weight) -> int:
    """The multiple a compact inner dimension must be padded to for this format (int4: its gate and up
    rows, twice the width, go to a kernel that takes output rows in multiples of 16)."""
    return INT8_ALIGN if isinstance(w, Int8Weight) else 8 if isinstance(w, Int4Weight) else 1
