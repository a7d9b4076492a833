"""A GGUF file's own integer blocks as ``Int4Weight`` matrices, for ``--weights int4``.

GGUF's Q4_0, Q4_1 and Q4_K (in sub-blocks of 32) are affine per group of 32 weights, and Q5_0,
Q5_1 and Q8_0 are too with more bits: ``w = scale * q + offset``; Q6_K is, per group of 16.
``Int4Weight`` holds any of them exactly (wider codes as 4-bit planes), so the lean backend decodes
the very values llama.cpp decodes, without rounding them a second time. Q6_K's groups of 16 are read
only by coreinfer's dense int4 kernel (``int4_dense``); where it does not run, the lean backend keeps
them in bf16 (``weights.int4_runs``). Other types (F16, F32) are not read here: the caller keeps those
matrices in its dtype.

Each matrix is checked against the Hugging Face model's own (dequantised) weight before use, after
the row order transformers applies on load (llama's q and k are stored permuted for llama.cpp's
rope); a matrix that does not match is not used.
"""

from __future__ import annotations

import functools
import warnings
from pathlib import Path
from typing import Callable, Mapping, Optional

import numpy as np
import torch
from torch import nn

from ..process_memory import PageReleaser, release_free_memory
from .weights import Int4Weight, int4_fits

Blocks = tuple[np.ndarray, np.ndarray, np.ndarray, int]  # q [n, group] ints, scale [n], offset [n], bits


def _halves(d: np.ndarray) -> np.ndarray:
    return d.view(np.float16).astype(np.float32).reshape(-1)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """16 bytes per block: elements 0-15 in the low nibbles, 16-31 in the high."""
    return np.concatenate([qs & 15, qs >> 4], axis=1).astype(np.int32)


def _high_bits(qh: np.ndarray) -> np.ndarray:
    bits = qh.copy().view(np.uint32).reshape(-1, 1) >> np.arange(32, dtype=np.uint32)
    return (bits & 1).astype(np.int32)


def _q4_0(b: np.ndarray) -> Blocks:
    d = _halves(b[:, :2])
    return _nibbles(b[:, 2:]), d, -8 * d, 4


def _q4_1(b: np.ndarray) -> Blocks:
    return _nibbles(b[:, 4:]), _halves(b[:, :2]), _halves(b[:, 2:4]), 4


def _q5_0(b: np.ndarray) -> Blocks:
    d = _halves(b[:, :2])
    return _nibbles(b[:, 6:]) | (_high_bits(b[:, 2:6]) << 4), d, -16 * d, 5


def _q5_1(b: np.ndarray) -> Blocks:
    return _nibbles(b[:, 8:]) | (_high_bits(b[:, 4:8]) << 4), _halves(b[:, :2]), _halves(b[:, 2:4]), 5


def _q8_0(b: np.ndarray) -> Blocks:
    d = _halves(b[:, :2])
    return b[:, 2:].view(np.int8).astype(np.int32) + 128, d, -128 * d, 8


def _q4_k(b: np.ndarray) -> Blocks:
    """256 weights per block: 8 sub-blocks of 32, each ``d * sc * q - dmin * m`` (6-bit sc and m)."""
    from gguf.quants import Q4_K

    d, dmin = _halves(b[:, :2]), _halves(b[:, 2:4])
    sc, m = Q4_K.get_scale_min(b[:, 4:16])
    qs = b[:, 16:].reshape(-1, 4, 1, 32) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
    q = (qs & 15).reshape(-1, 32).astype(np.int32)  # sub-block j: the low (j even) or high nibbles of chunk j // 2
    return q, (d[:, None] * sc).reshape(-1), (-dmin[:, None] * m).reshape(-1), 4


def _q6_k(b: np.ndarray) -> Blocks:
    """256 weights per block: 16 sub-blocks of 16, each ``d * sc * (q - 32)`` (int8 sc, 6-bit q), in
    gguf-py's order (``gguf.quants.Q6_K.dequantize_blocks``)."""
    ql, qh, sc, d = b[:, :128], b[:, 128:192], b[:, 192:208].view(np.int8), _halves(b[:, 208:210])
    low = (ql.reshape(-1, 2, 1, 64) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)) & 15
    high = (qh.reshape(-1, 2, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)) & 3
    q = (low.reshape(-1, 8, 32) | (high.reshape(-1, 8, 32) << 4)).astype(np.int32).reshape(-1, 16)
    scale = (d[:, None] * sc.astype(np.float32)).reshape(-1)
    return q, scale, -32 * scale, 6


# GGML type name -> (bytes per block, weights per block, reader into groups of 32, or 16)
READERS: dict[str, tuple[int, int, Callable[[np.ndarray], Blocks]]] = {
    "Q4_0": (18, 32, _q4_0),
    "Q4_1": (20, 32, _q4_1),
    "Q4_K": (144, 256, _q4_k),
    "Q5_0": (22, 32, _q5_0),
    "Q5_1": (24, 32, _q5_1),
    "Q8_0": (34, 32, _q8_0),
    "Q6_K": (210, 256, _q6_k),
}


def int4_from_gguf_tensor(kind: str, raw: np.ndarray, rows: int, cols: int,
                          dtype: torch.dtype = torch.bfloat16, rows_per_part: int = 4096) -> Optional[Int4Weight]:
    """One GGUF matrix (``[rows, cols]`` in nn.Linear's layout) as an ``Int4Weight``; None for other types.

    Read ``rows_per_part`` rows at a time: the readers widen every code to int32, which for a
    128k-token embedding would be 1 GB at once.
    """
    if kind not in READERS or not int4_fits(rows, cols):
        return None
    block_bytes, _, read = READERS[kind]
    blocks = np.ascontiguousarray(raw).reshape(rows, -1)  # each row's blocks, as bytes
    codes: list[torch.Tensor] = []
    scale_zeros: list[torch.Tensor] = []
    for start in range(0, rows, rows_per_part):
        part = blocks[start : start + rows_per_part]
        q, scale, offset, bits = read(part.reshape(-1, block_bytes))
        group, count = q.shape[1], part.shape[0]
        piece = Int4Weight.from_integers(
            torch.from_numpy(q.reshape(count, cols)),
            torch.from_numpy(scale.reshape(count, cols // group)),
            torch.from_numpy(offset.reshape(count, cols // group)),
            bits, group, dtype,
        )
        if not codes:  # the whole matrix's planes, filled part by part (joining parts would hold them twice)
            codes = [c.new_empty(rows, c.shape[1]) for c in piece.codes]
            scale_zeros = [sz.new_empty(sz.shape[0], rows, 2) for sz in piece.scale_zeros]
        for whole, c in zip(codes, piece.codes):
            whole[start : start + count] = c
        for whole, sz in zip(scale_zeros, piece.scale_zeros):
            whole[:, start : start + count] = sz
    return Int4Weight(codes, scale_zeros, group, dtype)


def _row_order(hf_model: nn.Module, gguf_name: str, rows: int) -> np.ndarray:
    """Which GGUF row each HF row is: transformers' own tensor processor applied to the row numbers."""
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor

    config = hf_model.config
    arch = {"gemma3_text": "gemma3"}.get(config.model_type, config.model_type)
    processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config={
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
    })
    index = np.arange(rows, dtype=np.float32).reshape(rows, 1)
    return processor.process(index, gguf_name).weights.reshape(-1).astype(np.int64)


def gguf_int4_weights(path: Path, hf_model: nn.Module, wanted: Mapping[str, torch.Tensor],
                      dtype: torch.dtype = torch.bfloat16, cache: Optional[Path] = None,
                      reference: Optional[Callable[[str, int, int], torch.Tensor]] = None) -> dict[str, Int4Weight]:
    """The GGUF's own blocks of each ``wanted`` matrix (transformers' parameter name -> the loaded
    weight) that they reproduce, by the same names; ``dtype`` is the activations'.

    Reading a GGUF takes seconds (gguf-py parses its whole vocabulary first); with ``cache`` (a
    safetensors file beside the dequantised model) the blocks are read and checked once, then loaded.
    ``reference(name, start, end)``, where given, reads rows ``[start, end)`` of the dequantised weight a
    block is checked against in place of ``wanted[name]``: the loaded model's weights are mapped from the
    dequantised cache, and reading them all would leave the whole fp32 model resident.
    """
    if cache is not None and cache.exists():
        try:
            return _load(cache, dtype)
        except (OSError, ValueError, KeyError):
            pass  # a damaged cache: read the GGUF again
    try:
        found = _read(path, hf_model, wanted, dtype, reference or (lambda name, start, end: wanted[name][start:end]))
    except (OSError, ValueError) as err:  # a file transformers read but gguf-py cannot: no blocks, bf16 throughout
        warnings.warn(f"int4: could not read the blocks of {path} ({err}); its matrices stay in bf16")
        return {}
    finally:
        release_free_memory()  # reading left freed blocks of every matrix's size in the allocator
    if cache is not None:
        _save(found, cache)
        try:  # the cache's mapped copy: rows that can be dropped and read back (Int4Weight.drop_rows)
            return _load(cache, dtype)
        except (OSError, ValueError, KeyError):
            pass
    return found


def _read(path: Path, hf_model: nn.Module, wanted: Mapping[str, torch.Tensor], dtype: torch.dtype,
          reference: Callable[[str, int, int], torch.Tensor]) -> dict[str, Int4Weight]:
    from gguf import GGUFReader

    hf_names = _gguf_names(hf_model.config, wanted)
    found = {}
    reader = GGUFReader(str(path))
    reader.fields.clear()  # the metadata, parsed token by token (0.5 GB for a 262k vocabulary), is not read here
    pages = PageReleaser(path)
    for tensor in reader.tensors:
        hf_name = hf_names.get(tensor.name)
        if hf_name is None or len(tensor.shape) != 2:
            continue
        cols, rows = (int(n) for n in tensor.shape)  # GGUF lists the fastest-moving dimension first
        weight = int4_from_gguf_tensor(tensor.tensor_type.name, tensor.data, rows, cols, dtype)
        if weight is None:
            continue
        order = _row_order(hf_model, tensor.name, rows)
        if not np.array_equal(order, np.arange(rows)):
            weight = weight.rows(torch.from_numpy(order), rows)
        if tuple(wanted[hf_name].shape) == weight.shape and _reproduces(weight, functools.partial(reference, hf_name)):
            found[hf_name] = weight
        pages.read(int(tensor.n_bytes))  # the GGUF's pages are read once: hand them back as it goes
    return found


def _gguf_names(config, hf_names) -> dict[str, str]:
    """GGUF tensor name -> transformers' name, from gguf-py's own table for the architecture."""
    from gguf import MODEL_ARCH_NAMES, get_tensor_name_map

    arch_name = {"gemma3_text": "gemma3", "qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe"}.get(
        config.model_type, config.model_type)
    arch = next((key for key, value in MODEL_ARCH_NAMES.items() if value == arch_name), None)
    if arch is None:
        return {}
    table = get_tensor_name_map(arch, config.num_hidden_layers)
    names = {}
    for hf_name in hf_names:
        gguf_name = table.get_name(hf_name.removesuffix(".weight"))
        if gguf_name is not None:
            names[gguf_name + ".weight"] = hf_name
    return names


def _save(found: dict[str, Int4Weight], cache: Path) -> None:
    from safetensors.torch import save_file

    tensors, planes = {}, {}
    for name, weight in found.items():
        planes[name] = f"{len(weight.codes)}:{weight.group}"
        for plane, (codes, scale_zeros) in enumerate(zip(weight.codes, weight.scale_zeros)):
            tensors[f"{name}/{plane}/codes"] = codes.contiguous()
            tensors[f"{name}/{plane}/scale_zeros"] = scale_zeros.contiguous()
    cache.parent.mkdir(parents=True, exist_ok=True)
    staging = cache.with_suffix(".partial")
    save_file(tensors, str(staging), metadata={"format": "2", **planes})
    staging.replace(cache)  # whole or absent: a process killed mid-write leaves no half cache


def _load(cache: Path, dtype: torch.dtype) -> dict[str, Int4Weight]:
    from safetensors import safe_open

    found = {}
    with safe_open(str(cache), "pt") as stored:
        metadata = stored.metadata()
        if metadata.pop("format", None) != "2":  # format 1 had no groups of 16: read the GGUF again
            raise ValueError(f"{cache}: not an int4 cache this version reads")
        for name, value in metadata.items():
            planes, group = (int(n) for n in value.split(":"))
            rows, half = stored.get_slice(f"{name}/0/codes").get_shape()
            # Read when first used, each matrix from its own mapping: the lean backend builds a layer,
            # packs it and drops its rows before the next, so the file is never resident as a whole.
            found[name] = Int4Weight.from_source(functools.partial(_planes_of, cache, name, planes),
                                                 (rows, 2 * half), group, dtype)
    return found


def _planes_of(cache: Path, name: str, planes: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """One matrix's planes from the int4 cache: views of the mapped file, read only when touched."""
    from safetensors import safe_open

    with safe_open(str(cache), "pt") as stored:
        return ([stored.get_tensor(f"{name}/{p}/codes") for p in range(planes)],
                [stored.get_tensor(f"{name}/{p}/scale_zeros") for p in range(planes)])


def _reproduces(weight: Int4Weight, reference: Callable[[int, int], torch.Tensor], rows: int = 4096) -> bool:
    """Whether ``weight`` dequantises to the rows ``reference(start, end)`` reads (within 1e-5 of their
    largest magnitude).

    Compared a block of rows at a time, each block read on its own: a 128k-token embedding is 1 GB in
    fp32, and a model's first load should not hold it, let alone three copies.
    """
    worst = largest = 0.0
    for start in range(0, weight.shape[0], rows):
        end = min(start + rows, weight.shape[0])
        expected = reference(start, end).detach().float().cpu()
        if tuple(expected.shape) != (end - start, weight.shape[1]):
            return False
        index = torch.arange(start, end, device=weight.codes[0].device)
        error = (weight.rows(index, len(index)).dequantize().cpu() - expected).abs().max()
        worst, largest = max(worst, float(error)), max(largest, float(expected.abs().max()))
    return worst <= 1e-5 * max(largest, 1e-30)


__all__ = ["READERS", "gguf_int4_weights", "int4_from_gguf_tensor"]
