"""Adaptive budgets: allocation on hand-made curves, mass ranking, calibration storage, end to end."""

import pytest
import torch

from coreinfer import Engine, SamplingConfig, SparsityConfig
from coreinfer.adaptive import (
    AdaptiveSelector,
    Calibration,
    allocate_budgets,
    calibrate,
    compare_methods,
    select_by_mass,
    spearman,
)

from conftest import prompts, save_tiny_model, tiny_model


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


# Fast calibration: the Fisher estimate from one dense pass, against the exact single-layer KL.


def _old_measure(engine, ps, conts, level):
    """The exact measure as it was first written: one continuation_logits pass per layer."""
    dense, _ = engine.continuation_logits(ps, conts, None)
    layers, out = engine.num_layers, []
    for layer in range(layers):
        selector = AdaptiveSelector(tuple(level if i == layer else 1.0 for i in range(layers)), torch.zeros(layers, 64), 0.0)
        sparse, _ = engine.continuation_logits(ps, conts, SparsityConfig(keep=level, layers=(layer,)), selector=selector)
        total = sum(
            (torch.log_softmax(d, -1).exp() * (torch.log_softmax(d, -1) - torch.log_softmax(s, -1))).sum().item()
            for d, s in zip(dense, sparse)
        )
        out.append(total / sum(len(c) for c in conts))
    return torch.tensor(out)


def test_exact_method_is_the_old_measure():
    engine = Engine(tiny_model("llama"), name="tiny-llama")
    ps, conts = prompts((8, 10, 6), seed=5), prompts((6, 6, 6), seed=6)
    exact = calibrate(engine, ps, conts, levels=(0.3,), method="exact", progress=False)
    torch.testing.assert_close(exact.sensitivity[:, 0], _old_measure(engine, ps, conts, 0.3), rtol=1e-5, atol=1e-8)
    assert exact.meta["method"] == "exact"


def test_fisher_calibration_shape_prior_and_seed(calibrated_engine):
    engine, default = calibrated_engine
    assert default.meta["method"] == "exact"  # fisher stays opt-in: its probe noise moves borderline layers
    ps, conts = prompts((8, 10, 6), seed=5), prompts((6, 6, 6), seed=6)
    fisher = calibrate(engine, ps, conts, levels=(0.3, 0.6), progress=False, method="fisher")
    assert fisher.sensitivity.shape == (4, 2) and (fisher.sensitivity > 0).all()
    assert (fisher.sensitivity[:, 0] >= fisher.sensitivity[:, 1]).all()
    again = calibrate(engine, ps, conts, levels=(0.3, 0.6), progress=False, method="fisher")
    assert torch.equal(fisher.sensitivity, again.sensitivity)  # seeded: the same numbers every time
    other = calibrate(engine, ps, conts, levels=(0.3, 0.6), progress=False, seed=1, method="fisher")
    assert not torch.equal(other.sensitivity, fisher.sensitivity)
    # The prior comes from the same dense pass and equals the one measured on its own.
    reference = calibrate(engine, ps, conts, levels=(0.3,), method="exact", progress=False)
    torch.testing.assert_close(fisher.prior, reference.prior, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="method"):
        calibrate(engine, ps, conts, method="guess", progress=False)


def test_fisher_estimate_matches_the_exact_kl_for_small_changes(arch):
    # Keeping 90 % of the neurons changes the output little, where the second-order estimate is
    # accurate; many probes make the estimate's own noise small. Every family; a window of 0 (linear
    # from the sparse layer on) and one of 2 (exact for 2 layers, reaching the last from layer 1 on).
    engine = Engine(tiny_model(arch), name=f"tiny-{arch}")
    ps, conts = prompts((8, 10, 6, 12), seed=5), prompts((6, 9, 6, 7), seed=6)
    exact = calibrate(engine, ps, conts, levels=(0.9,), method="exact", progress=False).sensitivity[:, 0]
    for window in (0, 2):
        fisher = calibrate(engine, ps, conts, levels=(0.9,), probes=120, window=window, progress=False)
        torch.testing.assert_close(fisher.sensitivity[:, 0], exact, rtol=0.3, atol=1e-4)


def test_hidden_states_and_output_head_give_the_model_logits(tiny_engine):
    ids, mask = tiny_engine.left_pad(prompts())
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    logits, _ = tiny_engine._forward(ids, mask, positions, None, logits_to_keep=0)
    weight, bias, softcap = tiny_engine.output_head()
    with torch.no_grad():
        z = torch.nn.functional.linear(tiny_engine.hidden_states(ids, mask, positions, None), weight, bias)
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    torch.testing.assert_close(z, logits)


_AUTOGRAD_GRAD = torch.autograd.grad


def _layer_work(monkeypatch, layers, method):
    """Decoder-layer forward calls and backward passes of one calibration of a ``layers``-layer model."""
    from conftest import GATED
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**dict(GATED, num_hidden_layers=layers))).eval()
    engine = Engine(model, name=f"tiny-{layers}")
    calls = {"forward": 0, "backward": 0}
    for layer in model.model.layers:
        layer.register_forward_hook(lambda *_: calls.__setitem__("forward", calls["forward"] + 1))
    grad = _AUTOGRAD_GRAD

    def counted(*args, **kwargs):  # each call back-propagates through every layer once
        calls["backward"] += 1
        return grad(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", counted)  # undone after the test
    calibrate(engine, prompts((8, 6), seed=5), prompts((5, 5), seed=6), levels=(0.3,), method=method, probes=4, progress=False)
    return calls


def test_fisher_calibration_cost_is_linear_in_layers(monkeypatch):
    small, double, quadruple = (_layer_work(monkeypatch, n, "fisher") for n in (4, 8, 16))
    assert double["forward"] == 2 * small["forward"] and quadruple["forward"] == 4 * small["forward"]
    assert small["backward"] == double["backward"] == quadruple["backward"] == 4  # one per probe
    exact_small, exact_double = (_layer_work(monkeypatch, n, "exact") for n in (4, 8))
    assert exact_double["forward"] > 3 * exact_small["forward"]  # the exact measure: quadratic


def test_spearman_on_hand_made_scores():
    assert spearman(torch.tensor([0.1, 0.5, 0.3]), torch.tensor([1.0, 9.0, 2.0])) == pytest.approx(1.0)
    assert spearman(torch.tensor([0.1, 0.5, 0.3]), torch.tensor([3.0, 1.0, 2.0])) == pytest.approx(-1.0)
    assert spearman(torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([1.0, 3.0, 2.0, 4.0])) == pytest.approx(0.8)


def test_compare_reports_both_methods_on_the_same_text():
    engine = Engine(tiny_model("llama"), name="tiny-llama")
    ps, conts = prompts((8, 10, 6, 12), seed=5), prompts((6, 9, 6, 7), seed=6)
    report = compare_methods(engine, seeds=(0, 1), progress=False, prompts=ps, continuations=conts)
    assert report["layers"] == 4 and report["sequences"] == 4 and report["tokens"] == 28
    exact = calibrate(engine, ps, conts, method="exact", progress=False)
    assert report["exact"]["sensitivity"] == pytest.approx(exact.sensitivity[:, 0].tolist(), rel=1e-3)
    assert [row["seed"] for row in report["fisher"]] == [0, 1]
    assert report["fisher"][0]["sensitivity"] != report["fisher"][1]["sensitivity"]  # seeds differ
    for row in report["fisher"]:
        assert -1.0 <= row["spearman_with_exact"] <= 1.0 and row["seconds"] >= 0
    assert -1.0 <= report["exact"]["split_half_spearman"] <= 1.0


def test_refresh_measures_again_and_replaces_the_stored_calibration(monkeypatch, tmp_path):
    monkeypatch.setenv("COREINFER_CACHE", str(tmp_path))
    ps, conts = prompts((8, 10, 6), seed=5), prompts((6, 6, 6), seed=6)
    engine = Engine(tiny_model("llama"), name="tiny-llama")
    first = engine.calibration(ps, conts, progress=False)
    assert first.meta["method"] == "exact"
    again = engine.calibration(ps, conts, progress=False, refresh=True, method="fisher")
    assert again.meta["method"] == "fisher" and again is engine.calibration(progress=False)
    stored = Engine(tiny_model("llama"), name="tiny-llama").calibration(progress=False)  # loads, measures nothing
    assert stored.meta["method"] == "fisher" and torch.equal(stored.sensitivity, again.sensitivity)


def test_calibrate_command_stores_compares_and_refuses_a_bad_method(monkeypatch, tmp_path):
    import json

    from typer.testing import CliRunner

    from coreinfer.cli import app

    monkeypatch.setenv("COREINFER_CACHE", str(tmp_path / "cache"))
    save_tiny_model(tmp_path / "tiny")
    runner = CliRunner()
    # --json into a folder that does not exist yet: made, not a traceback after the run
    result = runner.invoke(app, ["calibrate", "--model", str(tmp_path / "tiny"), "--json", str(tmp_path / "new" / "c.json")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "new" / "c.json").read_text())
    assert report["method"] == "exact" and len(report["sensitivity"]) == 4
    assert list((tmp_path / "cache" / "calibration").glob("*/adaptive.safetensors"))
    result = runner.invoke(app, ["calibrate", "--model", str(tmp_path / "tiny"), "--method", "fisher"])
    assert result.exit_code == 0 and json.loads(result.stdout)["method"] == "fisher"
    result = runner.invoke(app, ["calibrate", "--model", str(tmp_path / "tiny"), "--compare", "--seeds", "3"])
    assert result.exit_code == 0, result.output
    assert "split-half" in result.stdout and "fisher, seed 3" in result.stdout
    result = runner.invoke(app, ["calibrate", "--model", str(tmp_path / "tiny"), "--method", "guess"])
    assert result.exit_code == 2 and "fisher, exact" in result.output
