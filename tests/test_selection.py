"""Selection on hand-made activation tensors: Eq. 1-2, ties, alpha and keep edges."""

import pytest
import torch

from coreinfer.selection import (
    RULES,
    default_sparse_layers,
    get_rule,
    num_kept,
    select_coreinfer,
    sentence_core,
    token_core_mask,
    token_core_mask_magnitude,
    token_core_mask_official,
)


def test_token_core_counts_only_positive_activations():
    acts = torch.tensor([[5.0, -9.0, 3.0, 1.0, -2.0, 4.0]])  # 4 positives
    # alpha 0.5 -> k = round(0.5 * 4) = 2: the two largest positives, 5 and 4.
    assert token_core_mask(acts, 0.5).nonzero()[:, 1].tolist() == [0, 5]
    # alpha 1.0 keeps every positive and never a negative, however large.
    assert token_core_mask(acts, 1.0)[0].tolist() == [True, False, True, True, False, True]


def test_token_core_k_is_per_token():
    acts = torch.tensor([[1.0, 2.0, 3.0, 4.0], [1.0, -1.0, -1.0, -1.0]])
    mask = token_core_mask(acts, 0.5)
    assert mask.sum(-1).tolist() == [2, 0]  # round(0.5*4)=2, round(0.5*1)=0 (half to even)


def test_token_core_ties_go_to_lower_index():
    acts = torch.tensor([[2.0, 2.0, 2.0, 2.0]])
    assert token_core_mask(acts, 0.5).nonzero()[:, 1].tolist() == [0, 1]


def test_token_with_no_positive_activation_has_no_core():
    acts = -torch.rand(3, 10) - 0.1
    assert token_core_mask(acts, 1.0).sum() == 0


def test_official_variant_uses_one_k_from_mean_positive_count():
    acts = torch.tensor([[4.0, 3.0, 2.0, 1.0], [-1.0, -2.0, 9.0, -3.0]])  # 4 and 1 positives: mean 2.5
    mask = token_core_mask_official(acts, 0.8)  # k = int(0.8 * 2.5) = 2 for both tokens
    assert mask.sum(-1).tolist() == [2, 2]
    assert mask[1].nonzero().flatten().tolist() == [0, 2]  # top-2 values, sign ignored by the official code


def test_magnitude_variant_ranks_absolute_values():
    acts = torch.tensor([[0.1, -5.0, 3.0, 0.2]])
    assert token_core_mask_magnitude(acts, 0.5).nonzero()[:, 1].tolist() == [1, 2]


def test_sentence_core_keeps_most_frequent_neurons():
    # Neuron 2 is core for all 3 tokens, neuron 0 for 2, neuron 3 for 1, neuron 1 never.
    mask = torch.tensor([[1, 0, 1, 0], [1, 0, 1, 1], [0, 0, 1, 0]], dtype=torch.bool)
    acts = torch.ones(3, 4)
    assert sentence_core(mask, acts, keep=0.5).tolist() == [0, 2]
    assert sentence_core(mask, acts, keep=0.75).tolist() == [0, 2, 3]


def test_sentence_core_breaks_count_ties_by_activation_mass_then_index():
    mask = torch.tensor([[1, 1, 1, 1]], dtype=torch.bool)
    acts = torch.tensor([[1.0, 3.0, 3.0, 2.0]])
    assert sentence_core(mask, acts, keep=0.5).tolist() == [1, 2]
    acts = torch.tensor([[1.0, 1.0, 1.0, 1.0]])
    assert sentence_core(mask, acts, keep=0.5).tolist() == [0, 1]


def test_keep_one_returns_every_neuron_and_keep_tiny_returns_one():
    acts = torch.randn(7, 50)
    assert select_coreinfer(acts, 1.0, 0.2).tolist() == list(range(50))
    assert len(select_coreinfer(acts, 1e-6, 0.2)) == 1


@pytest.mark.parametrize("rule", sorted(RULES))
@pytest.mark.parametrize("keep", [0.2, 0.4, 0.6, 1.0])
def test_every_rule_keeps_the_stated_number_sorted_and_unique(rule, keep):
    acts = torch.randn(11, 100, generator=torch.Generator().manual_seed(0))
    chosen = get_rule(rule)(acts, keep, 0.2)
    assert len(chosen) == num_kept(100, keep) == round(keep * 100)
    assert chosen.tolist() == sorted(set(chosen.tolist()))


def test_selection_is_deterministic_and_independent_of_token_order():
    acts = torch.randn(20, 64, generator=torch.Generator().manual_seed(3))
    first = select_coreinfer(acts, 0.4, 0.2)
    assert torch.equal(first, select_coreinfer(acts.clone(), 0.4, 0.2))
    assert torch.equal(first, select_coreinfer(acts[torch.randperm(20)], 0.4, 0.2))


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.01, 2])
def test_fractions_outside_unit_interval_are_rejected(bad):
    acts = torch.randn(3, 10)
    with pytest.raises(ValueError, match="keep must lie in"):
        select_coreinfer(acts, bad, 0.2)
    with pytest.raises(ValueError, match="alpha must lie in"):
        select_coreinfer(acts, 0.4, bad)


def test_unknown_rule_names_the_known_ones():
    with pytest.raises(ValueError, match="coreinfer"):
        get_rule("nope")


def test_default_layers_leave_the_edges_dense():
    assert default_sparse_layers(30) == tuple(range(4, 26))  # as the harness issue's layers 4-25
    assert default_sparse_layers(32) == tuple(range(4, 28))
    assert default_sparse_layers(4) == (0, 1, 2, 3)


def test_wina_prefers_the_neuron_with_the_longer_down_column():
    from coreinfer.selection import griffin_scores, wina_scores

    acts = torch.tensor([[1.0, 1.0, 0.5], [1.0, 1.0, 0.5]])
    norms = torch.tensor([0.1, 2.0, 1.0])
    # Equal activations tie under GRIFFIN; the column norm breaks the tie towards neuron 1.
    assert griffin_scores(acts)[0] == griffin_scores(acts)[1]
    scores = wina_scores(acts, norms)
    assert scores.argmax().item() == 1 and scores[0] < scores[2]


def test_coverage_keeps_the_fewest_neurons_holding_the_share():
    from coreinfer.selection import coverage_core, coverage_count

    scores = torch.tensor([1.0, 6.0, 3.0, 0.0])  # total 10
    assert coverage_count(scores, 0.6) == 1  # 6 alone is 60 %
    assert coverage_count(scores, 0.61) == 2  # 6 + 3
    assert coverage_count(scores, 0.99) == 3  # the zero adds nothing
    assert coverage_count(scores, 1.0) == 4  # a full share is dense, silent neurons too
    assert coverage_core(scores, 0.9).tolist() == [1, 2]
    with pytest.raises(ValueError, match="share"):
        coverage_count(scores, 1.5)


def test_fused_scores_move_from_prompt_to_prior_with_the_weight():
    from coreinfer.selection import fused_scores

    local, prior = torch.tensor([3.0, 1.0]), torch.tensor([0.0, 5.0])
    assert torch.allclose(fused_scores(local, prior, 0.0), torch.tensor([0.75, 0.25], dtype=torch.float64))
    assert torch.allclose(fused_scores(local, prior, 1.0), torch.tensor([0.0, 1.0], dtype=torch.float64))
    assert fused_scores(local, prior, 0.5).sum().item() == pytest.approx(1.0)
