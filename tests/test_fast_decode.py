"""The lean decode path: same greedy tokens as the reference path; int8 composes with gathering."""

from __future__ import annotations

import pytest
import torch

from coreinfer import Engine
from coreinfer.engine import SamplingConfig, SparsityConfig
from coreinfer.fast_decode import SUPPORTED_TYPES, Int8Weight, LeanModel, lean_generate, linear

from conftest import prompts, tiny_model


@pytest.mark.parametrize("arch", SUPPORTED_TYPES)
@pytest.mark.parametrize("keep", [None, 0.4])
@pytest.mark.parametrize("lengths", [(9,), (9, 5, 12)])
def test_lean_fp32_tokens_equal_reference(arch, keep, lengths):
    engine = Engine(tiny_model(arch), tokenizer=None)
    lean = LeanModel(engine.model, "fp32")
    sparsity = None if keep is None else SparsityConfig(keep=keep)
    sampling = SamplingConfig(max_new_tokens=10)
    batch = prompts(lengths, seed=2)
    reference = engine.generate_ids(batch, sparsity, sampling)
    got = lean_generate(engine, lean, batch, sparsity, sampling)
    assert [r.token_ids for r in got] == [r.token_ids for r in reference]
    assert [r.finish_reason for r in got] == [r.finish_reason for r in reference]
    assert got[0].ffn_density == pytest.approx(reference[0].ffn_density)


def test_sparse_lean_differs_from_dense_lean():
    """Guards the test above: the compact weights are really used."""
    engine = Engine(tiny_model("llama"), tokenizer=None)
    lean = LeanModel(engine.model, "fp32")
    sampling = SamplingConfig(max_new_tokens=10)
    dense = lean_generate(engine, lean, prompts((9,), seed=2), None, sampling, ignore_eos=True)[0]
    sparse = lean_generate(engine, lean, prompts((9,), seed=2), SparsityConfig(keep=0.1, layers=(0, 1, 2, 3)), sampling, ignore_eos=True)[0]
    assert dense.token_ids != sparse.token_ids


def test_ignore_eos_gives_fixed_length():
    engine = Engine(tiny_model("llama"), tokenizer=None)
    lean = LeanModel(engine.model, "fp32")
    result = lean_generate(engine, lean, prompts((9,)), None, SamplingConfig(max_new_tokens=7), ignore_eos=True)[0]
    assert result.new_tokens == 7 and result.finish_reason == "length"


@pytest.mark.parametrize("weights", ["bf16", "int8"])
def test_low_precision_logits_stay_close(weights):
    """bf16/int8 change the numbers (documented), but only slightly: first-step logits within a few %."""
    torch.manual_seed(0)
    engine = Engine(tiny_model("llama"), tokenizer=None)
    exact = LeanModel(engine.model, "fp32")
    low = LeanModel(engine.model, weights)
    x = torch.randn(2, 32)
    for index in range(len(exact.layers)):
        want = linear(x, exact.layers[index].w13)
        got = linear(x.to(low.dtype), low.layers[index].w13).float()
        assert (got - want).norm() / want.norm() < 0.02


def test_int8_scales_survive_row_and_column_selection():
    w = torch.randn(16, 8)
    q = Int8Weight.quantize(w, torch.float32)
    rows = torch.tensor([1, 5, 7])
    assert torch.equal(q.rows(rows).q, Int8Weight.quantize(w[rows], torch.float32).q)
    cols = torch.tensor([0, 3, 6])
    dequant = q.q.float() * q.scale[:, None]
    picked = q.cols(cols)
    assert torch.allclose(picked.q.float() * picked.scale[:, None], dequant[:, cols])


def test_weight_bytes_per_token_counts_lm_head_and_density():
    engine = Engine(tiny_model("llama"), tokenizer=None)
    lean = LeanModel(engine.model, "fp32")
    params = sum(p.numel() for n, p in engine.model.named_parameters() if "embed" not in n and "lm_head" not in n)
    lm_head = engine.model.get_output_embeddings().weight.numel()
    assert lean.weight_bytes_per_token() == 4 * (params + lm_head)
    assert lean.weight_bytes_per_token(0.5) < lean.weight_bytes_per_token()
    assert LeanModel(engine.model, "bf16").weight_bytes_per_token() == 2 * (params + lm_head)


def test_unsupported_family_is_refused():
    with pytest.raises(ValueError, match="lean path supports"):
        LeanModel(tiny_model("gpt2"))


@pytest.mark.real_model
def test_real_model_lean_tokens_equal_reference(real_engine):
    ids = [real_engine.encode("Why is the sky blue?")]
    sampling = SamplingConfig(max_new_tokens=8)
    sparsity = SparsityConfig(keep=0.4)
    lean = LeanModel(real_engine.model, "fp32")
    reference = real_engine.generate_ids(ids, sparsity, sampling)[0]
    assert lean_generate(real_engine, lean, ids, sparsity, sampling)[0].token_ids == reference.token_ids
