"""Adaptive budgets: allocation on hand-made curves, mass ranking, calibration storage, end to end."""

import pytest
import torch

from coreinfer import Engine, SamplingConfig, SparsityConfig
from coreinfer.adaptive import (
    AdaptiveSelector,
    Calibration,
    allocate_budgets,
    calibrate,
    select_by_mass,
)

from conftest import prompts, tiny_model


def test_fragile_layers_stay_dense_and_the_rest_share_the_budget():
    sensitivity = torch.tensor([[10.0], [0.2], [0.3], [0.25], [0.2]])
    keeps = allocate_budgets(sensitivity, density=0.6)
    assert keeps[0] == 1.0
    assert keeps[1:] == [pytest.approx(0.5)] * 4
    assert sum(keeps) / 5 == pytest.approx(0.6)


def test_budget_too_small_for_the_fragile_layers_is_spread_evenly():
    sensitivity = torch.tensor([[10.0], [0.2], [0.3], [0.25]])
    assert allocate_budgets(sensitivity, density=0.25) == [0.25] * 4


def test_budget_of_one_keeps_everything_dense():
    assert allocate_budgets(torch.ones(4, 1), density=1.0) == [1.0] * 4


def test_budget_rejects_bad_density():
    with pytest.raises(ValueError, match="density"):
        allocate_budgets(torch.ones(4, 1), density=0.0)


def test_mass_ranking_counts_negative_activations_and_breaks_ties_by_index():
    acts = torch.tensor([[1.0, -5.0, 0.5, 1.0], [1.0, -5.0, 0.5, 1.0]])
    assert select_by_mass(acts, 2).tolist() == [0, 1]
    prior = torch.tensor([0.0, 0.0, 1.0, 0.0])
    assert select_by_mass(acts, 2, prior, prior_weight=1.0).tolist() == [1, 2]


@pytest.fixture
def calibrated_engine():
    engine = Engine(tiny_model("llama"), name="tiny-llama")
    ps, conts = prompts((8, 10, 6), seed=5), prompts((6, 6, 6), seed=6)
    calibration = calibrate(engine, ps, conts, levels=(0.3, 0.6), progress=False)
    engine._calibration = calibration
    return engine, calibration


def test_calibration_measures_every_layer_and_round_trips(calibrated_engine, tmp_path):
    engine, calibration = calibrated_engine
    assert calibration.sensitivity.shape == (4, 2)
    assert (calibration.sensitivity[:, 0] >= calibration.sensitivity[:, 1]).all()  # less kept, more KL
    assert (calibration.sensitivity > 0).all()
    torch.testing.assert_close(calibration.prior.sum(-1), torch.ones(4))
    calibration.save(tmp_path)
    loaded = Calibration.load(tmp_path, expect_model=calibration.model)
    assert torch.equal(loaded.sensitivity, calibration.sensitivity) and loaded.levels == (0.3, 0.6)
    with pytest.raises(ValueError, match="calibrated for"):
        Calibration.load(tmp_path, expect_model="another-model")


def test_adaptive_rule_meets_its_density_target_end_to_end(calibrated_engine):
    engine, _ = calibrated_engine
    result = engine.generate_ids(prompts(), SparsityConfig(rule="adaptive", keep=0.6), SamplingConfig(max_new_tokens=6))[0]
    assert result.ffn_density <= 0.6 + 1e-6 and result.ffn_density > 0.5
    selector = engine.adaptive_selector(0.6)
    compact, _ = engine.continuation_logits(prompts(), [[3, 4, 5]] * 3, SparsityConfig(rule="adaptive", keep=0.6))
    masked, _ = engine.continuation_logits(prompts(), [[3, 4, 5]] * 3, SparsityConfig(rule="adaptive", keep=0.6), reference=True)
    for c, m in zip(compact, masked):
        torch.testing.assert_close(c, m, rtol=1e-4, atol=1e-4)
    assert isinstance(selector, AdaptiveSelector) and len(selector.keeps) == 4


def test_adaptive_at_density_one_is_dense(calibrated_engine):
    engine, _ = calibrated_engine
    ps, conts = prompts(), prompts((4, 4, 4), seed=9)
    dense, _ = engine.continuation_logits(ps, conts, None)
    full, _ = engine.continuation_logits(ps, conts, SparsityConfig(rule="adaptive", keep=1.0))
    for d, f in zip(dense, full):
        torch.testing.assert_close(f, d)


def test_calibration_is_cached_on_disk_and_reused(monkeypatch, tmp_path):
    monkeypatch.setenv("COREINFER_CACHE", str(tmp_path))
    engine = Engine(tiny_model("llama"), name="tiny-llama")
    ps, conts = prompts((8, 10), seed=5), prompts((6, 6), seed=6)
    first = engine.calibration(ps, conts, progress=False)
    assert list(tmp_path.glob("calibration/*/adaptive.safetensors"))
    again = Engine(tiny_model("llama"), name="tiny-llama").calibration(progress=False)  # no prompts: must load
    assert torch.equal(again.sensitivity, first.sensitivity)
