"""``coreinfer.load``: a model path, GGUF file or the default model, as a ready ``Engine``."""

from __future__ import annotations

from typing import Optional, Union

import torch

from .engine import Engine
from .loading import load_model_and_tokenizer, model_identity, resolve_model_path
from .offload import load_memory_limited


def load(
    model: Union[str, None] = None,
    device: Union[str, torch.device, None] = None,
    dtype: Optional[torch.dtype] = torch.float32,
    memory_limit: bool = False,
    backend: str = "auto",
    weights: str = "auto",
) -> Engine:
    """Load a model directory, a GGUF file, or (``None``) the default SmolLM2-135M-Instruct.

    ``device=None`` picks CUDA when available, else the CPU. ``memory_limit=True``
    keeps the sparse layers' FFN weights in slow memory (see ``coreinfer.offload``);
    it decodes on the reference backend. ``backend`` and ``weights`` are the
    engine's defaults (see ``Engine``).
    """
    if memory_limit:
        if backend == "lean" or weights not in ("auto", "model"):
            raise ValueError("memory-limited mode decodes on the reference backend; drop backend/weights")
        return load_memory_limited(model, device, dtype)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    hf_model, tokenizer, _ = load_model_and_tokenizer(model, device, dtype)
    return Engine(hf_model, tokenizer, name=model_identity(resolve_model_path(model)), backend=backend, weights=weights)
