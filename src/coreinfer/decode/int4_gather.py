"""A CPU kernel for int4 products that read only the kept inputs' weights (token-level sparsity).

PyTorch's int4 CPU kernel (``_weight_int4pack_mm_for_cpu``) takes a packed layout that interleaves
blocks of output rows, so it cannot skip inputs. This one stores the same GGUF codes input-major:
for each input, its 4-bit codes over all outputs are contiguous, so a dropped input's weights are
never read. The scale and min of each group of 32 inputs per output (``w = scale * code + min``)
are fp16, ``[in / 32, out]``; GGUF stores them in fp16 (Q4_0, Q4_1) or as products of fp16 and
6-bit integers (Q4_K), which fp16 holds to 2**-11 (the torch kernel rounds them to bf16, 2**-8).

The C++ source (``int4_gather.cpp``, AVX2 + FMA + F16C) is compiled on first use with
``torch.utils.cpp_extension.load`` into torch's extension directory (``TORCH_EXTENSIONS_DIR``) and
reused after. Where it cannot be built (no compiler, no AVX2, another architecture) ``available()``
is False after one warning, and callers keep today's dense path. ``COREINFER_INT4_GATHER=0`` turns
it off.
"""

from __future__ import annotations

import os
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

KERNEL = "int4-gather-avx2-v2"  # names speed verdicts measured with this kernel, dense int4 included (Engine.token_pays)
GROUP = 32
BLOCK = 64  # outputs per 32-byte block of one input's codes
MAX_TILE_BLOCKS = 16  # a tile's fp32 sums (1024 outputs, 4 KB) stay in L1 while its rows stream
SOURCE = Path(__file__).with_name("int4_gather.cpp")
FLAGS = frozenset(("avx2", "fma", "f16c"))

_lock = threading.Lock()
_module = None
_failed: Optional[str] = None


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as info:
            return set(next((line.split() for line in info if line.startswith("flags")), []))
    except OSError:
        return set()


def _build():
    from torch.utils import cpp_extension

    return cpp_extension.load_inline(
        name="coreinfer_int4_gather",
        cpp_sources=[SOURCE.read_text()],
        functions=["gather_mm", "set_tuning"],
        extra_cflags=["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp"],
        extra_ldflags=["-fopenmp"],
        verbose=False,
    )


def module():
    """The compiled extension, or None (after one warning) where it cannot be built or is turned off."""
    global _module, _failed
    if _module is not None or _failed is not None:
        return _module
    with _lock:
        if _module is not None or _failed is not None:
            return _module
        reason = None
        if os.environ.get("COREINFER_INT4_GATHER", "1") == "0":
            reason = "turned off by COREINFER_INT4_GATHER=0"
        elif not FLAGS <= _cpu_flags():
            reason = f"this CPU lacks {', '.join(sorted(set(FLAGS) - _cpu_flags()))}"
        else:
            try:
                _module = _build()
            except Exception as error:  # a compiler missing or failing: fall back, never crash
                reason = f"could not build it ({type(error).__name__}: {str(error).strip().splitlines()[-1:] or ''})"
        if reason is not None:
            _failed = reason
            if not reason.startswith("turned off"):
                warnings.warn(f"coreinfer's int4 gather kernel is unavailable, {reason}: token-level sparsity "
                              "on int4 weights decodes densely", RuntimeWarning, stacklevel=3)
        return _module


def available() -> bool:
    return module() is not None


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
    the inputs kept per sequence. Needs ``available()``."""
    return (_module or module()).gather_mm(x.contiguous(), w.codes, w.scales, w.mins, w.out_features, w.tile_blocks,
                                           float(threshold))


def tile_width(blocks: int, threads: int, widest: int = MAX_TILE_BLOCKS) -> int:
    """Blocks per tile: tiles of at most ``widest`` blocks, as many as a multiple of ``threads``, near equal."""
    threads = max(1, threads)
    tiles = threads * -(-blocks // (threads * widest))
    return max(1, -(-blocks // tiles))
