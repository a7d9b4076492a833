"""Token-level sparsity: pure functions, calibration and allocation, and the decode paths against masked references."""

from __future__ import annotations

import pytest
import torch

from coreinfer import Engine
from coreinfer.config import SamplingConfig, SparsityConfig
from coreinfer.decode.lean import SUPPORTED_TYPES
from coreinfer.decode.weights import GatherWeight, gathered_linear
from coreinfer.token_sparsity import GROUPS, LEVELS, MIN_AUTO_KEEP, TokenProfile, TokenThresholds, kept_entries, level_thresholds, sparsify

from conftest import prompts, tiny_model


def calibrated(arch: str, monkeypatch, tmp_path) -> Engine:
    monkeypatch.setenv("COREINFER_CACHE", str(tmp_path))
    engine = Engine(tiny_model(arch), tokenizer=None, name=f"tiny-{arch}", weights="fp32")
    ps = prompts((9, 5, 12, 7), seed=3)
    engine.token_profile(ps, [p[::-1] * 2 for p in ps], progress=False)
    return engine


# Pure functions


def test_sparsify_drops_small_entries_and_zero_threshold_keeps_all():
    x = torch.tensor([[0.5, -0.1, 0.0, -2.0]])
    assert torch.equal(sparsify(x, 0.0), x)
    assert torch.equal(sparsify(x, 0.2), torch.tensor([[0.5, 0.0, 0.0, -2.0]]))
    assert kept_entries(x, 0.2).tolist() == [2]


def test_level_thresholds_drop_each_levels_share():
    magnitudes = torch.rand(10_000)
    thresholds = level_thresholds(magnitudes)
    assert thresholds[0] == 0
    for level, t in zip(LEVELS, thresholds):
        assert (magnitudes <= t).float().mean().item() == pytest.approx(level, abs=0.01)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("parts", [1, 2, 3, 5])  # 5 does not divide 24 outputs: one block then
def test_gathered_linear_equals_masked_dense(dtype, batch, parts):
    torch.manual_seed(0)
    w = torch.randn(24, 40).to(dtype)
    x = torch.randn(batch, 40).to(dtype)
    gather = GatherWeight.of(w, parts)
    assert gather.parts == (1 if parts == 5 else parts)
    out, kept = gathered_linear(x, gather, 0.7)
    reference = torch.nn.functional.linear(sparsify(x, 0.7).float(), w.float())
    tol = 1e-5 if dtype == torch.float32 else 0.1
    torch.testing.assert_close(out.float(), reference, atol=tol, rtol=tol)
    assert kept == kept_entries(x, 0.7).tolist()
    assert 0 < sum(kept) < batch * 40


def test_gathered_linear_with_nothing_kept_is_zero():
    for batch in (1, 2):
        out, kept = gathered_linear(torch.full((batch, 8), 0.1), GatherWeight.of(torch.randn(6, 8), 2), 1.0)
        assert kept == [0] * batch and torch.equal(out, torch.zeros(batch, 6))


def _profile(damage: torch.Tensor) -> TokenProfile:
    layers = damage.shape[0]
    thresholds = torch.arange(len(LEVELS)).float().expand(layers, len(GROUPS), -1).clone()
    return TokenProfile(thresholds, damage, torch.ones(layers, len(GROUPS)) * 100)


def test_allocation_spends_sparsity_where_it_costs_least():
    levels = torch.tensor(LEVELS)
    damage = torch.stack([levels * 10, levels * 0.1, levels * 10, levels * 10])  # input 1 is cheap
    damage = damage.unsqueeze(0).repeat(2, 1, 1)  # 2 layers
    damage[1] *= 5  # and layer 1 costlier than layer 0
    chosen = _profile(damage).allocate(0.75, "all")
    steps = chosen.values  # the thresholds equal the level index here
    assert steps[0, 1] > steps[0, 0] and steps[0, 1] >= steps[1, 1]
    skipped = (torch.tensor(LEVELS)[steps.long()] * 100).sum()
    assert skipped >= 0.25 * 800 - 1e-6


def test_allocation_of_ffn_targets_leaves_attention_dense_and_keep_one_is_dense():
    damage = torch.tensor(LEVELS).expand(3, len(GROUPS), -1).clone()
    profile = _profile(damage)
    ffn = profile.allocate(0.5, "ffn")
    assert torch.all(ffn.values[:, :2] == 0) and torch.all(ffn.values[:, 2:] > 0)
    assert torch.all(profile.allocate(1.0, "all").values == 0)
    with pytest.raises(ValueError, match="targets"):
        profile.allocate(0.5, "heads")
    with pytest.raises(ValueError, match="keep"):
        profile.allocate(0.0, "ffn")


def test_profile_round_trips_and_refuses_another_model(tmp_path):
    damage = torch.tensor(LEVELS).expand(2, len(GROUPS), -1).clone()
    profile = _profile(damage)
    profile.model, profile.meta = "m", {"agreement": {"ffn:0.5": 0.96, "ffn:0.7": 0.95, "ffn:0.9": 0.99}}
    profile.save(tmp_path)
    loaded = TokenProfile.load(tmp_path, expect_model="m")
    assert torch.equal(loaded.damage, profile.damage) and loaded.meta == profile.meta
    assert loaded.levels(0.9, "ffn") == [0.7, 0.9]  # 0.5 passes too, but auto never goes below MIN_AUTO_KEEP
    assert loaded.levels(0.97, "ffn") == [0.9]
    assert loaded.levels(0.999, "ffn") == []
    with pytest.raises(ValueError, match="calibrated for"):
        TokenProfile.load(tmp_path, expect_model="other")


def test_config_checks_mode_and_targets():
    with pytest.raises(ValueError, match="mode"):
        SparsityConfig(mode="neuron")
    with pytest.raises(ValueError, match="targets"):
        SparsityConfig(mode="token", targets="heads")
    with pytest.raises(ValueError, match="keep"):
        SparsityConfig(mode="token", keep=1.5)


# The engine: calibration, decoding, batches, backends


def test_calibration_is_cached_and_measures_every_input(monkeypatch, tmp_path):
    engine = calibrated("llama", monkeypatch, tmp_path)
    profile = engine.token_profile()
    assert profile.thresholds.shape == (4, len(GROUPS), len(LEVELS))
    assert torch.all(profile.thresholds[:, :, 1:] > 0) and torch.all(profile.damage[:, :, -1] > 0)
    assert set(profile.meta["agreement"]) >= {"ffn:0.5", "all:0.9"}
    again = Engine(tiny_model("llama"), name="tiny-llama").token_profile(progress=False)  # no prompts: must load
    assert torch.equal(again.thresholds, profile.thresholds)



def test_calibration_without_probes_drops_the_same_share_of_every_input(monkeypatch, tmp_path):
    """Speed runs on random weights (``probes=False``) thin every matrix's input alike, not the largest
    matrix's alone: there the FFN and the attention each read about the target."""
    from coreinfer.token_calibration import calibrate_tokens

    monkeypatch.setenv("COREINFER_CACHE", str(tmp_path))
    engine = Engine(tiny_model("llama"), tokenizer=None, name="tiny-llama", weights="fp32")
    ps = prompts((9, 5, 12, 7), seed=3)
    profile = calibrate_tokens(engine, ps, [p[::-1] * 2 for p in ps], progress=False, probes=False)
    for keep in (0.5, 0.7):
        chosen = profile.allocate(keep, "all").values
        level = (profile.thresholds == chosen[..., None]).float().argmax(-1)  # the level each input got
        assert set(level.flatten().tolist()) <= {round((1 - keep) * 20) + d for d in (-1, 0, 1)}, level


def test_attention_density_is_what_a_results_two_shares_leave_for_the_attention(monkeypatch, tmp_path):
    """FFN-only targets read the attention whole; thinning it too shows below 1."""
    engine = calibrated("llama", monkeypatch, tmp_path)
    assert engine.attention_density(1.0, 1.0) == pytest.approx(1.0)
    sampling = SamplingConfig(max_new_tokens=8)
    for targets in ("ffn", "all"):
        result = engine.generate_ids(prompts((9,)), SparsityConfig(mode="token", keep=0.5, targets=targets), sampling,
                                     backend="lean", weights="fp32")[0]
        density = engine.attention_density(result.ffn_density, result.weight_share)
        assert result.ffn_density < 0.9
        assert density == pytest.approx(1.0, abs=1e-6) if targets == "ffn" else 0.0 < density < 0.9

@pytest.mark.parametrize("arch", ["llama", "gemma3_text", "opt", "gpt2", "gpt_neox"])
def test_keep_one_reproduces_dense_logits(arch, monkeypatch, tmp_path):
    engine = calibrated(arch, monkeypatch, tmp_path)
    ps, conts = prompts((9, 5), seed=4), prompts((6, 6), seed=5)
    dense, _ = engine.continuation_logits(ps, conts, None)
    token, session = engine.continuation_logits(ps, conts, SparsityConfig(mode="token", keep=1.0))
    for a, b in zip(dense, token):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert session.ffn_density() == pytest.approx(1.0)


@pytest.mark.parametrize("arch", SUPPORTED_TYPES)
def test_lean_token_path_equals_masked_reference_and_batch_equals_singles(arch, monkeypatch, tmp_path):
    engine = calibrated(arch, monkeypatch, tmp_path)
    sparsity = SparsityConfig(mode="token", keep=0.5, targets="all")
    batch, conts = prompts((9, 5, 12), seed=2), prompts((7, 7, 7), seed=6)
    reference, _ = engine.continuation_logits(batch, conts, sparsity, backend="reference")
    lean, session = engine.continuation_logits(batch, conts, sparsity, backend="lean", weights="fp32")
    for a, b in zip(reference, lean):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    dense, _ = engine.continuation_logits(batch, conts, None)
    assert any((a - b).abs().max() > 1e-3 for a, b in zip(dense, lean))  # the thresholds really bite
    assert session.ffn_density() < 0.9

    sampling = SamplingConfig(max_new_tokens=10)
    together = engine.generate_ids(batch, sparsity, sampling, backend="lean", weights="fp32")
    alone = [engine.generate_ids([p], sparsity, sampling, backend="lean", weights="fp32")[0] for p in batch]
    assert [r.token_ids for r in together] == [r.token_ids for r in alone]
    masked = engine.generate_ids(batch, sparsity, sampling, backend="reference")
    assert [r.token_ids for r in together] == [r.token_ids for r in masked]
    for a, b in zip(together, alone):
        assert a.ffn_density == pytest.approx(b.ffn_density)
        assert a.mode == "token" and a.weight_share < 1.0


def test_ffn_targets_read_attention_in_full(monkeypatch, tmp_path):
    engine = calibrated("llama", monkeypatch, tmp_path)
    result = engine.generate_ids(prompts((9,)), SparsityConfig(mode="token", keep=0.5, targets="ffn"),
                                 SamplingConfig(max_new_tokens=8), backend="lean", weights="fp32")[0]
    assert result.weight_share == pytest.approx(engine.weight_share(result.ffn_density))


def test_auto_token_mode_takes_the_calibrated_level_for_its_quality(monkeypatch, tmp_path):
    engine = calibrated("llama", monkeypatch, tmp_path)
    monkeypatch.setattr(engine, "token_pays", lambda backend, sparsity: True)  # speed is the next test's
    agreement = engine.token_profile().meta["agreement"]
    sampling = SamplingConfig(max_new_tokens=12)
    lowest = min(float(k.split(":")[1]) for k in agreement if k.startswith("ffn:") and float(k.split(":")[1]) >= MIN_AUTO_KEEP)
    loose = engine.generate_ids(prompts((9, 5)), SparsityConfig(keep="auto", mode="token", targets="ffn", quality=0.01),
                                sampling, backend="lean", weights="fp32", ignore_eos=True)
    for r in loose:
        assert (r.mode, r.keep, r.dense_tokens) == ("token", lowest, 0) and r.ffn_density < 1.0
    fixed = engine.generate_ids(prompts((9, 5)), SparsityConfig(keep=lowest, mode="token", targets="ffn"),
                                sampling, backend="lean", weights="fp32", ignore_eos=True)
    assert [r.token_ids for r in loose] == [r.token_ids for r in fixed]
    # A target no level reaches decodes densely, and says so.
    impossible = SparsityConfig(keep="auto", mode="token", quality=1.0)
    if max(agreement.values()) < 1.0:
        result = engine.generate_ids(prompts((9,)), impossible, sampling, backend="lean", weights="fp32")[0]
        assert result.mode == "dense" and result.ffn_density == 1.0


@pytest.mark.parametrize("speedup, mode", [(0.9, "dense"), (1.5, "token")])
def test_auto_token_mode_decodes_densely_where_it_is_not_faster(speedup, mode, monkeypatch, tmp_path):
    engine = calibrated("llama", monkeypatch, tmp_path)
    measured = []
    monkeypatch.setattr(engine, "_measure_token_speedup", lambda backend, sparsity: measured.append(1) or speedup)
    sparsity = SparsityConfig(keep="auto", mode="token", targets="ffn", quality=0.01)
    for _ in range(2):
        result = engine.generate_ids(prompts((9,)), sparsity, SamplingConfig(max_new_tokens=6), backend="lean",
                                     weights="fp32")[0]
        assert result.mode == mode and (result.ffn_density == 1.0) == (mode == "dense")
    assert measured == [1]  # measured once, then read back from beside the calibration
    assert list((tmp_path / "calibration").glob("*/speed.json"))
    # The reference backend only masks: token-level never pays there and is not measured.
    assert engine.generate_ids(prompts((9,)), sparsity, SamplingConfig(max_new_tokens=4), backend="reference")[0].mode == "dense"
    # Scoring follows what decodes: on the reference backend, the lean verdict for the model's own weights.
    assert (engine.resolve_scored(sparsity, engine.backend("reference")) is not None) == (mode == "token")
    assert measured == [1]


def test_scoring_the_default_where_only_the_reference_backend_decodes_scores_dense(monkeypatch, tmp_path):
    """An engine on the reference backend decodes token-level auto densely, so its quality rows score dense."""
    engine = calibrated("llama", monkeypatch, tmp_path)
    engine.backend_name = "reference"
    monkeypatch.setattr(engine, "_measure_token_speedup", lambda backend, sparsity: pytest.fail("not measured"))
    sparsity = SparsityConfig(keep="auto", mode="token", targets="ffn", quality=0.01)
    assert engine.resolve_scored(sparsity, engine.backend()) is None
    assert engine.generate_ids(prompts((9,)), sparsity, SamplingConfig(max_new_tokens=4))[0].mode == "dense"


def test_token_mode_needs_float_lean_weights(monkeypatch, tmp_path):
    engine = calibrated("llama", monkeypatch, tmp_path)
    with pytest.raises(ValueError, match="int8"):
        engine.generate_ids(prompts((9,)), SparsityConfig(mode="token", keep=0.5), SamplingConfig(max_new_tokens=4),
                            backend="lean", weights="int8")


def test_token_mode_takes_no_selector(monkeypatch, tmp_path):
    engine = calibrated("llama", monkeypatch, tmp_path)
    with pytest.raises(ValueError, match="selector"):
        engine.generate_ids(prompts((9,)), SparsityConfig(mode="token", keep=0.5), SamplingConfig(max_new_tokens=4),
                            selector=lambda layer, acts: torch.arange(2))
