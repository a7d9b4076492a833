"""Memory-limited mode: offloaded FFN weights give the same tokens as the resident sparse path."""

import pytest
import torch
from safetensors.torch import save_file

from coreinfer import Engine, SamplingConfig, SparsityConfig
from coreinfer.offload import (
    MappedSafetensors,
    OffloadedFFNWeights,
    Placement,
    load_memory_limited,
    pin_available,
    slow_memory_kind,
)
from coreinfer.offload_bench import add_ratios, markdown_table
from coreinfer.sparse_ffn import FFNWeights

from conftest import prompts, tiny_model

LAYERS = (1, 2)
SPARSITY = SparsityConfig(keep=0.5, alpha=0.3, layers=LAYERS)
SAMPLING = SamplingConfig(max_new_tokens=8)


def _saved_tiny(arch, tmp_path):
    model = tiny_model(arch)
    model.save_pretrained(tmp_path)
    return model


def _offloaded(tmp_path, device="cpu", chunk=16) -> Engine:
    # chunk=16 of 64 neurons: prefill really streams several chunks per layer
    return load_memory_limited(tmp_path, device=device, layers=LAYERS, chunk=chunk)


def test_memory_limited_tokens_match_the_resident_sparse_path(arch, tmp_path):
    resident = Engine(_saved_tiny(arch, tmp_path), weights="fp32")
    offloaded = _offloaded(tmp_path)
    batch = prompts()
    expected = resident.generate_ids(batch, SPARSITY, SAMPLING)
    got = offloaded.generate_ids(batch, SPARSITY, SAMPLING)
    assert [r.token_ids for r in got] == [r.token_ids for r in expected]
    assert [r.ffn_density for r in got] == [r.ffn_density for r in expected]


def test_memory_limited_dense_and_scoring_match(arch, tmp_path):
    resident = Engine(_saved_tiny(arch, tmp_path), weights="fp32")
    offloaded = _offloaded(tmp_path, chunk=24)  # 24 does not divide 64: a short last chunk
    batch = prompts((7, 4))
    dense = [r.token_ids for r in resident.generate_ids(batch, None, SAMPLING)]
    assert [r.token_ids for r in offloaded.generate_ids(batch, None, SAMPLING)] == dense
    conts = prompts((5, 3), seed=2)
    want, _ = resident.continuation_logits(batch, conts, SPARSITY)
    got, _ = offloaded.continuation_logits(batch, conts, SPARSITY)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_only_the_sparse_layers_ffn_weights_are_mapped_views(tmp_path):
    _saved_tiny("llama", tmp_path)
    engine = _offloaded(tmp_path)
    for idx, ffn in enumerate(engine.ffns):
        weights = ffn.weights
        if idx in LAYERS:
            assert isinstance(weights, OffloadedFFNWeights)
            store = weights.placement.store
            assert all(store.is_view(t) for t in (weights.up, weights.gate, weights.down))
        else:
            assert type(weights) is FFNWeights
    assert not any(p.device.type == "meta" for p in engine.model.parameters())
    store = engine.ffns[LAYERS[0]].weights.placement.store
    attention = engine.model.model.layers[LAYERS[0]].self_attn.q_proj.weight
    assert not store.is_view(attention)  # attention is resident, a copy


def test_release_keeps_the_data(tmp_path):
    tensors = {"a": torch.randn(300, 70), "b": torch.arange(5000, dtype=torch.float32)}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    store = MappedSafetensors.from_dir(tmp_path)
    for name, value in tensors.items():
        assert store.is_view(store[name])
        torch.testing.assert_close(store[name], value)
        store.release(store[name][3:40])
        store.release(store[name].t() if store[name].dim() == 2 else store[name])
        torch.testing.assert_close(store[name], value)  # read again from the file
    assert not store.is_view(tensors["a"])


def test_directory_without_safetensors_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="safetensors"):
        MappedSafetensors.from_dir(tmp_path)


def test_device_selection_on_cpu_and_when_cuda_is_present(monkeypatch):
    cpu = torch.device("cpu")
    assert slow_memory_kind(cpu) == "mmap" and not pin_available(cpu)
    assert not Placement(cpu, torch.float32).pin
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert slow_memory_kind(torch.device("cuda")) == "pinned"
    assert slow_memory_kind(cpu) == "mmap"
    with pytest.raises(ValueError, match="chunk"):
        Placement(cpu, torch.float32, chunk=0)


def test_fetch_converts_dtype_and_keeps_cpu_views():
    placement = Placement(torch.device("cpu"), torch.float32)
    slow = torch.randn(4, 3)
    assert placement.fetch(slow) is slow  # same device and dtype: no copy
    half = slow.to(torch.bfloat16)
    assert placement.fetch(half).dtype == torch.float32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_path_uses_pinned_memory_and_matches(tmp_path):
    model = _saved_tiny("llama", tmp_path)
    resident = Engine(model.to("cuda"), weights="fp32")
    offloaded = _offloaded(tmp_path, device="cuda")
    weights = offloaded.ffns[LAYERS[0]].weights
    assert weights.up.device.type == "cpu" and weights.up.is_pinned()
    assert offloaded.device.type == "cuda"
    batch = prompts()
    expected = resident.generate_ids(batch, SPARSITY, SAMPLING)
    got = offloaded.generate_ids(batch, SPARSITY, SAMPLING)
    assert [r.token_ids for r in got] == [r.token_ids for r in expected]


@pytest.mark.real_model
def test_memory_limited_default_model_matches_sparse(real_engine):
    import coreinfer

    engine = coreinfer.load(device="cpu", memory_limit=True)
    ids = real_engine.encode("Capital of France?")
    sampling = SamplingConfig(max_new_tokens=5)
    expected = real_engine.generate_ids([ids], SparsityConfig(keep=0.4), sampling)[0]
    got = engine.generate_ids([ids], SparsityConfig(keep=0.4), sampling)[0]
    assert got.token_ids == expected.token_ids


def test_bench_ratios_and_table():
    rows = [
        {"mode": "baseline", "keep": None, "peak_rss_mb": 100.0},
        {"mode": "dense", "keep": None, "peak_rss_mb": 500.0, "decode_tok_s": 10.0, "ffn_density": 1.0},
        {"mode": "memory-limited", "keep": 0.4, "peak_rss_mb": 300.0, "decode_tok_s": 12.0, "ffn_density": 0.5},
    ]
    rows = add_ratios(rows)
    limited = rows[2]
    assert limited["rss_vs_dense"] == 0.6 and limited["model_mb"] == 200.0
    assert limited["model_mb_vs_dense"] == 0.5 and limited["speed_vs_dense"] == 1.2
    table = markdown_table(rows).splitlines()
    assert len(table) == 5 and table[-1].startswith("| memory-limited | 0.4 | 300.0 | 0.6 |")
    assert "GPU" not in table[0]


def test_cli_memory_limit_flag_and_bench_errors():
    from typer.testing import CliRunner

    from coreinfer.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["generate", "hi", "--memory-limit", "--model", "/nonexistent/m.gguf"])
    assert result.exit_code == 2 and "no model at" in result.output
    result = runner.invoke(app, ["bench-memory", "--keeps", "0.4,abc"])
    assert result.exit_code == 2 and "--keeps" in result.output
