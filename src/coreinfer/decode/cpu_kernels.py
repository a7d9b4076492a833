"""coreinfer's own CPU kernels, one C++ extension built on first use.

- ``int4_gather.cpp``: the int4 product that reads only the kept inputs' codes (``int4_gather``);
- ``int4_dense.cpp``: dense int4's product, output-major with int16 activations (``int4_dense``);
- ``decode_ops.cpp``: the small pieces of an fp32 decode step, each one call (``residual_norm``,
  ``attend``). Measured on SmolLM2 int4 (2-core AVX2 CPU, one token): the weight products took
  10.9 of 23.8 ms; the rest was ~450 ATen ops, among them 30 ``scaled_dot_product_attention`` calls at
  ~70 us and 61 RMSNorms at ~29 us each (five ops apiece) for vectors of 576 floats.

The sources are compiled with ``torch.utils.cpp_extension.load_inline`` into torch's extension
directory (``TORCH_EXTENSIONS_DIR``, about a minute, once) and reused after. Where they cannot be
built (no compiler, no AVX2/FMA/F16C, another architecture) ``available()`` is False after one
warning, and callers keep the ATen path. ``COREINFER_INT4_GATHER=0`` turns them off.
"""

from __future__ import annotations

import os
import threading
import warnings
from pathlib import Path
from typing import Optional

import torch


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as info:
            return set(next((line.split() for line in info if line.startswith("flags")), []))
    except OSError:
        return set()


# The kernels run 512-bit vectors where the CPU has AVX-512 with VNNI (int4_dense's vpdpwssd; the gather
# kernel's two rows per vector). On a 2-core Xeon, SmolLM2 dense int4 with the gather kernel, 64 tokens
# greedy (alternated): 94.9 and 93.8 tok/s against the AVX2 build's 90.7.
# COREINFER_CPU_ISA=avx2 builds the AVX2 code anyway (to compare, or to test it on such a CPU).
_AVX512 = ("avx512f", "avx512bw", "avx512vl", "avx512_vnni")
ISA = os.environ.get("COREINFER_CPU_ISA") or ("avx512" if set(_AVX512) <= _cpu_flags() else "avx2")
if ISA not in ("avx2", "avx512"):
    raise ValueError(f"COREINFER_CPU_ISA must be avx2 or avx512, not {ISA!r}")
# Names speed verdicts measured with these kernels, dense int4 included (Engine.token_pays).
KERNEL = f"coreinfer-cpu-{ISA}-v8"
SOURCES = [Path(__file__).with_name(name) for name in ("int4_gather.cpp", "int4_dense.cpp", "decode_ops.cpp")]
FUNCTIONS = ["gather_mm", "dense_mm", "set_tuning", "residual_norm", "attend"]
FLAGS = frozenset(("avx2", "fma", "f16c") + (_AVX512 if ISA == "avx512" else ()))  # what the build needs

_lock = threading.Lock()
_module = None
_failed: Optional[str] = None


def _build():
    from torch.utils import cpp_extension

    return cpp_extension.load_inline(
        name=f"coreinfer_cpu_kernels_{ISA}",  # one build per instruction set: a shared cache never mixes them
        cpp_sources=[source.read_text() for source in SOURCES],
        functions=FUNCTIONS,
        extra_cflags=["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp"]
        + (["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni"] if ISA == "avx512" else []),
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
                warnings.warn(f"coreinfer's CPU kernels are unavailable, {reason}: int4 decodes with torch's "
                              "kernel and token-level sparsity on int4 weights decodes densely",
                              RuntimeWarning, stacklevel=3)
        return _module


def available() -> bool:
    return module() is not None


def residual_norm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float,
                  post: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x += rms_norm(delta, post)`` (``delta`` itself without ``post``) in place, then
    ``rms_norm(x, weight)``; fp32 ``[B, d]``. Needs ``available()``."""
    return module().residual_norm(x, delta.contiguous(), post, weight, eps)


def attend(qkv: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
           valid: torch.Tensor, heads: int, kv_heads: int, slot: int, first: int, scale: float,
           q_norm: Optional[torch.Tensor], k_norm: Optional[torch.Tensor], eps: float) -> torch.Tensor:
    """One new token per sequence through attention (fp32): optional per-head q/k RMSNorm, rope
    (``signed_sin`` as in ``lean._rotate``), its key and value written into the cache at ``slot``,
    softmax over the valid cached slots in ``[first, slot]``. ``qkv`` ``[B, (H + 2 KV) * hd]``,
    ``cos``/``signed_sin`` ``[B, hd]``, cache ``[B, KV, S, hd]``, ``valid`` ``[B, S]``; returns
    ``[B, H * hd]``. Needs ``available()``."""
    return module().attend(qkv.contiguous(), cos.contiguous(), signed_sin.contiguous(), keys, values, valid,
                           heads, kv_heads, slot, first, scale, q_norm, k_norm, eps)
