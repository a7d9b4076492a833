"""``coreinfer.load``: a model path, GGUF file, Hub id or the default model, as a ready ``Engine``."""

from __future__ import annotations

from typing import Optional, Union

import torch

from .engine import Engine
from .loading import ModelArg, load_model_and_tokenizer, parse_dtype, resolve_model
from .offload import load_memory_limited


def load(
    model: ModelArg = None,
    device: Union[str, torch.device, None] = None,
    dtype: Union[str, torch.dtype, None] = torch.float32,
    memory_limit: bool = False,
    backend: str = "auto",
    weights: str = "auto",
    revision: Optional[str] = None,
    gguf_file: Optional[str] = None,
) -> Engine:
    """Load a model directory, a GGUF file, a Hub id, or (``None``) the default SmolLM2-135M-Instruct.

    A path that exists wins; otherwise a Hub id (``owner/name``) is fetched through
    huggingface_hub's cache, at ``revision`` (branch, tag or commit) if given;
    ``gguf_file`` picks one GGUF file of a Hub repo (or of a directory).
    ``device=None`` picks CUDA when available, else the CPU. ``dtype`` is what the
    model is loaded in: ``"float32"`` (or ``torch.float32``), ``"bfloat16"``,
    ``"float16"`` or ``"auto"`` (the checkpoint's dtype on CUDA, float32 on the
    CPU); the lean backend keeps its own copy in ``weights``. ``memory_limit=True``
    keeps the sparse layers' FFN weights in slow memory (see ``coreinfer.offload``);
    it decodes on the reference backend. ``backend`` and ``weights`` are the
    engine's defaults (see ``Engine``).
    """
    parse_dtype(dtype)  # refuse a bad dtype before any download
    source = resolve_model(model, revision, gguf_file)
    if memory_limit:
        if backend == "lean" or weights not in ("auto", "model"):
            raise ValueError("memory-limited mode decodes on the reference backend; drop backend/weights")
        return load_memory_limited(source, device, dtype)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    hf_model, tokenizer, _ = load_model_and_tokenizer(source, device, dtype)
    gguf = source.path if source.path.suffix == ".gguf" else None
    return Engine(hf_model, tokenizer, name=source.name, backend=backend, weights=weights, gguf=gguf)
