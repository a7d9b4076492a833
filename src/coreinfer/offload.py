"""Memory-limited mode: sparse layers' FFN weights stay in slow memory.

The paper's largest gains come when the model does not fit in fast memory.
Here the FFN weights of the sparse layers never become ordinary resident
tensors:

* on a CPU-only machine they are **memory-mapped** from the model's
  safetensors file(s) (``MappedSafetensors``): tensors are zero-copy views of
  a private mapping, a page is read only when touched, and pages are handed
  back (``madvise(MADV_DONTNEED)``) as soon as a chunk has been used, so they
  leave the process's resident set;
* with a GPU they live in **pinned CPU RAM**, and chunks or gathered rows go to
  the GPU with ``non_blocking`` copies.

``OffloadedFFNWeights`` computes with them without materialising a layer:
prefill streams chunks of neurons (bounded prefill), and compaction gathers
only the core rows and columns and puts those on the compute device.
Attention, embeddings and the dense layers are loaded normally.
The model is built with its parameters on the meta device, so the offloaded
weights are never allocated.
"""

from __future__ import annotations

import json
import mmap
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from torch import nn

from .adapters import get_adapter
from .engine import Engine
from .loading import ModelArg, cached_model_dir, load_dtype, resolve_model
from .selection import default_sparse_layers
from .sparse_ffn import FFNWeights, SparseFFN

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
DEFAULT_CHUNK = 256
COPY_BLOCK_BYTES = 8 * 1024 * 1024  # loading copies resident tensors from the mapping this much at a time  # neurons per prefill chunk: ~0.6 MB of fp32 weights for a 576-wide layer

_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


# Device selection


def pin_available(device: torch.device) -> bool:
    """Pinned host memory helps (and exists) only for copies to a CUDA device."""
    return device.type == "cuda" and torch.cuda.is_available()


def slow_memory_kind(device: torch.device) -> str:
    """Where offloaded weights live for a compute device: ``mmap`` (CPU) or ``pinned`` (CUDA)."""
    return "pinned" if pin_available(device) else "mmap"


def resolve_device(device: Union[str, torch.device, None]) -> torch.device:
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device)


# Memory-mapped safetensors


def _page_floor(offset: int) -> int:
    return offset - offset % mmap.PAGESIZE


class MappedSafetensors:
    """Zero-copy tensor views of one or more safetensors files.

    Each file is mapped privately (``ACCESS_COPY``: writable views for torch,
    never written back), so a view costs no memory until its pages are touched,
    and ``release`` returns touched pages to the OS.
    """

    def __init__(self, files: Sequence[Path]):
        self._maps: list[tuple[mmap.mmap, int, int]] = []  # (mapping, base address, length)
        self._tensors: dict[str, torch.Tensor] = {}
        for path in files:
            self._map_file(Path(path))

    @classmethod
    def from_dir(cls, hf_dir: Path) -> "MappedSafetensors":
        """Every safetensors file of a Hugging Face model directory (single or sharded)."""
        index = hf_dir / "model.safetensors.index.json"
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return cls([hf_dir / name for name in shards])
        files = sorted(hf_dir.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(
                f"memory-limited mode needs safetensors weights; {hf_dir} has no *.safetensors file"
            )
        return cls(files)

    def _map_file(self, path: Path) -> None:
        with open(path, "rb") as fh:
            header_len = struct.unpack("<Q", fh.read(8))[0]
            header = json.loads(fh.read(header_len))
            mapping = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
        whole = torch.frombuffer(mapping, dtype=torch.uint8)
        self._maps.append((mapping, whole.data_ptr(), len(mapping)))
        data_start = 8 + header_len
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            dtype = _SAFETENSORS_DTYPES[meta["dtype"]]
            begin, end = meta["data_offsets"]
            count = (end - begin) // dtype.itemsize
            flat = torch.frombuffer(mapping, dtype=dtype, count=count, offset=data_start + begin)
            self._tensors[name] = flat.view(meta["shape"])

    def keys(self) -> list[str]:
        return list(self._tensors)

    def __contains__(self, name: str) -> bool:
        return name in self._tensors

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._tensors[name]

    def _mapping_of(self, address: int) -> Optional[tuple[mmap.mmap, int, int]]:
        return next((m for m in self._maps if m[1] <= address < m[1] + m[2]), None)

    def is_view(self, tensor: torch.Tensor) -> bool:
        """True when ``tensor``'s data lies in one of the mapped files (not a copy)."""
        return tensor.numel() > 0 and self._mapping_of(tensor.data_ptr()) is not None

    def release(self, tensor: torch.Tensor) -> None:
        """Drop the pages under ``tensor`` (a view of a mapping) from the resident set.

        The data stays in the file (and usually the page cache); the next touch
        reads it again. A tensor that is not a mapped view is left alone.
        """
        if not hasattr(mmap, "MADV_DONTNEED") or tensor.numel() == 0:
            return
        start = tensor.data_ptr()
        span = sum((size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride()))
        end = start + (span + 1) * tensor.element_size()
        found = self._mapping_of(start)
        if found is not None:
            mapping, base, length = found
            offset = _page_floor(start - base)
            mapping.madvise(mmap.MADV_DONTNEED, offset, min(end - base, length) - offset)


# Computing with offloaded weights


@dataclass
class Placement:
    """Where offloaded weights live and where their chunks are computed."""

    device: torch.device  # the compute device
    dtype: torch.dtype  # the compute dtype
    chunk: int = DEFAULT_CHUNK  # neurons per prefill chunk
    store: Optional[MappedSafetensors] = None  # the mapping slow tensors may be views of

    def __post_init__(self) -> None:
        if self.chunk < 1:
            raise ValueError(f"chunk must be at least 1 neuron, got {self.chunk}")

    @property
    def pin(self) -> bool:
        return pin_available(self.device)

    def release(self, slow: torch.Tensor) -> None:
        """Hand the pages under a used slice of slow memory back to the OS (mapped views only)."""
        if self.store is not None:
            self.store.release(slow)

    def fetch(self, slow: torch.Tensor) -> torch.Tensor:
        """A slice of slow memory on the compute device (a no-op view on the CPU in the same dtype)."""
        return slow.to(self.device, self.dtype, non_blocking=True)


@dataclass
class OffloadedFFNWeights(FFNWeights):
    """``FFNWeights`` whose projections stay in slow memory and are streamed.

    Biases are small and resident on the compute device. Every method returns
    what the base class returns, computed chunk by chunk.
    """

    offloaded = True  # token-level sparsity needs every weight resident; the engine refuses it here


    placement: Optional[Placement] = None

    @classmethod
    def wrap(cls, weights: FFNWeights, placement: Placement) -> "OffloadedFFNWeights":
        return cls(
            up=weights.up, down=weights.down, act=weights.act, gate=weights.gate,
            up_bias=weights.up_bias, gate_bias=weights.gate_bias, down_bias=weights.down_bias,
            placement=placement,
        )

    def _linear(self, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        out = nn.functional.linear(x, self.placement.fetch(weight), bias)
        self.placement.release(weight)
        return out

    def activations(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., N]``, computed ``chunk`` neurons at a time."""
        pieces = []
        for start in range(0, self.num_neurons, self.placement.chunk):
            part = slice(start, start + self.placement.chunk)
            up = self._linear(x, self.up[part], _part(self.up_bias, part))
            if self.gate is None:
                pieces.append(self.act(up))
            else:
                pieces.append(self.act(self._linear(x, self.gate[part], _part(self.gate_bias, part))) * up)
        return torch.cat(pieces, dim=-1)

    def project_down(self, acts: torch.Tensor) -> torch.Tensor:
        """``[..., d]``, streaming the down projection by output rows (contiguous in ``[d, N]``)."""
        rows = max(1, self.placement.chunk * self.hidden_size // self.num_neurons)
        pieces = []
        for start in range(0, self.hidden_size, rows):
            part = slice(start, start + rows)
            pieces.append(self._linear(acts, self.down[part], _part(self.down_bias, part)))
        return torch.cat(pieces, dim=-1)

    def _take(self, slow: torch.Tensor, neurons: torch.Tensor) -> torch.Tensor:
        """Rows ``neurons`` (``[B, K]``) of a slow ``[N, d]`` tensor as ``[B, K, d]`` on the compute device.

        Gathered into pinned memory when the device is CUDA, so the copy is asynchronous.
        """
        flat = neurons.reshape(-1).cpu()
        staging = torch.empty((flat.numel(), slow.shape[1]), dtype=slow.dtype, pin_memory=self.placement.pin)
        torch.index_select(slow, 0, flat, out=staging)
        self.placement.release(slow)
        return self.placement.fetch(staging).view(*neurons.shape, -1)

    @property
    def target_device(self) -> torch.device:
        return self.placement.device

    @property
    def target_dtype(self) -> torch.dtype:
        return self.placement.dtype


def _part(bias: Optional[torch.Tensor], part: slice) -> Optional[torch.Tensor]:
    return None if bias is None else bias[part]


# Building a model whose offloaded weights are never allocated


def _renamings(model: nn.Module) -> list[tuple[str, str]]:
    """transformers' own checkpoint-key renames for this model (e.g. GPT-NeoX ``embed_out`` -> ``lm_head``)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming
    except ImportError:  # transformers 4.x renames nothing we support
        return []
    return [
        (source, rename.target_patterns[0])
        for rename in get_model_conversion_mapping(model)
        if isinstance(rename, WeightRenaming)
        for source in rename.source_patterns
    ]


def checkpoint_keys(model: nn.Module, store: MappedSafetensors) -> dict[str, str]:
    """Model parameter name -> checkpoint key, after transformers' renames and the base-model prefix."""
    renames = _renamings(model)
    prefix = model.base_model_prefix
    names = {name for name, _ in model.named_parameters()}
    found = {}
    for key in store.keys():
        name = key
        for source, target in renames:
            name = re.sub(source, target, name)
        # Some checkpoints (GPT-2's) omit the base-model prefix.
        if name not in names and prefix and f"{prefix}.{name}" in names:
            name = f"{prefix}.{name}"
        found[name] = key
    return found


def _set_tensor(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name)
    module._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)


def _resident_copy(mapped: torch.Tensor, placement: Placement, pin: bool = False) -> torch.Tensor:
    """A copy of a mapped tensor on ``placement.device``, made block by block so touched pages never pile up."""
    copy = torch.empty(mapped.shape, dtype=placement.dtype, device=placement.device, pin_memory=pin)
    if mapped.dim() == 0:
        return copy.copy_(mapped)
    rows = max(1, COPY_BLOCK_BYTES // max(1, mapped[0].numel() * mapped.element_size()))
    for start in range(0, mapped.shape[0], rows):
        block = mapped[start:start + rows]
        copy[start:start + rows].copy_(block)
        placement.release(block)
    return copy


def _slow_copy(mapped: torch.Tensor, placement: Placement) -> torch.Tensor:
    """An offloaded tensor: the mapped view itself on the CPU, a pinned copy for CUDA."""
    if not placement.pin:
        return mapped
    return _resident_copy(mapped, Placement(torch.device("cpu"), placement.dtype, store=placement.store), pin=True)


def offloaded_parameter_names(model: nn.Module, layers: Sequence[int]) -> set[str]:
    """Names of the FFN weight matrices (not biases) of ``layers``, per the model's adapter."""
    adapter = get_adapter(model.config.model_type)
    decoder = adapter.layers(model)
    wanted = {
        id(param)
        for idx in layers
        for module in adapter.ffn_modules(decoder[idx]).values()
        for param in module.parameters()
        if param.dim() >= 2
    }
    return {name for name, param in model.named_parameters() if id(param) in wanted}


def build_offloaded_model(
    hf_dir: Path,
    device: torch.device,
    dtype: Union[str, torch.dtype, None],
    layers: Optional[Sequence[int]] = None,
    chunk: int = DEFAULT_CHUNK,
) -> nn.Module:
    """A causal LM whose ``layers`` (default: the default sparse layers) keep their FFN in slow memory.

    Parameters are created on the meta device (buffers such as rotary
    frequencies are computed normally), then resident ones are copied from the
    mapped checkpoint onto ``device`` in ``dtype`` (see ``loading.load_dtype``)
    and offloaded ones are bound to slow memory: on the CPU the mapped file's
    own bytes, converted to ``dtype`` chunk by chunk as they are used.
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(hf_dir)
    dtype = load_dtype(dtype, config, device)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    adapter = get_adapter(config.model_type)
    num_layers = len(adapter.layers(model))
    layers = default_sparse_layers(num_layers) if layers is None else tuple(layers)
    store = MappedSafetensors.from_dir(hf_dir)
    placement = Placement(device, dtype, chunk, store)
    slow = offloaded_parameter_names(model, layers)

    keys = checkpoint_keys(model, store)
    for name, _ in list(model.named_parameters()):
        key = keys.get(name)
        if key is None:
            continue  # tied weights, tied below; anything else is caught by the meta check
        mapped = store[key]
        if name in slow:
            _set_tensor(model, name, _slow_copy(mapped, placement))
        else:
            _set_tensor(model, name, _resident_copy(mapped, placement))
    model.tie_weights()
    missing = [name for name, param in model.named_parameters() if param.device.type == "meta"]
    if missing:
        raise ValueError(f"{hf_dir}: the checkpoint lacks {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    for module in model.modules():
        for name, buffer in module._buffers.items():
            if buffer is not None:
                module._buffers[name] = buffer.to(device)

    def read(modules: nn.ModuleDict) -> FFNWeights:
        return OffloadedFFNWeights.wrap(adapter.read_ffn(modules), placement)

    decoder = adapter.layers(model)
    for idx in layers:
        adapter.install(decoder[idx], SparseFFN(adapter.ffn_modules(decoder[idx]), read, idx))
    model.offloaded_layers = tuple(layers)
    return model.eval()


def _generation_config(hf_dir: Path):
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(hf_dir)
    except OSError:
        return None


def load_memory_limited(
    model: ModelArg = None,
    device: Union[str, torch.device, None] = None,
    dtype: Union[str, torch.dtype, None] = torch.float32,
    layers: Optional[Sequence[int]] = None,
    chunk: int = DEFAULT_CHUNK,
    revision: Optional[str] = None,
    gguf_file: Optional[str] = None,
) -> Engine:
    """Like ``coreinfer.load`` but with the sparse layers' FFN weights in slow memory.

    ``model`` is a Hugging Face directory with safetensors weights, a GGUF file
    (its float32 safetensors cache is mapped), a Hub id (``revision``,
    ``gguf_file`` as for ``load``) or ``None`` for the default model.
    ``layers`` names the offloaded layers (default: the default sparse layers).
    """
    from transformers import AutoTokenizer

    compute = resolve_device(device)
    source = resolve_model(model, revision, gguf_file)
    path = source.path
    hf_dir = cached_model_dir(path) if path.is_file() else path
    hf_model = build_offloaded_model(hf_dir, compute, dtype, layers, chunk)
    generation_config = _generation_config(hf_dir)
    if generation_config is not None:
        hf_model.generation_config = generation_config
    # A weights-only directory (as tests save) gives an engine that takes token ids.
    has_tokenizer = any((hf_dir / name).is_file() for name in TOKENIZER_FILES)
    tokenizer = AutoTokenizer.from_pretrained(hf_dir) if has_tokenizer else None
    # The lean backend would copy every weight into fast memory: the opposite of this mode.
    return Engine(hf_model, tokenizer, name=source.name, backend="reference")


__all__ = [
    "DEFAULT_CHUNK",
    "MappedSafetensors",
    "OffloadedFFNWeights",
    "Placement",
    "build_offloaded_model",
    "load_memory_limited",
    "offloaded_parameter_names",
    "pin_available",
    "resolve_device",
    "slow_memory_kind",
]
