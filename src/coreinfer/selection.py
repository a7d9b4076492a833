"""Core-neuron selection: pure functions of an activation tensor.

An activation tensor is ``[tokens, neurons]``: the values that multiply the rows
of one layer's down projection while the prompt is processed. Every function
here is deterministic, including on ties, so the same prompt always selects the
same neurons on any device.
"""

from __future__ import annotations

from typing import Callable

import torch

Rule = Callable[[torch.Tensor, float, float], torch.Tensor]


def check_fraction(name: str, value: float) -> float:
    """Raise a clear error unless ``value`` lies in (0, 1]."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{name} must be a number in (0, 1], got {value!r}")
    if not 0.0 < float(value) <= 1.0:
        raise ValueError(f"{name} must lie in (0, 1], got {value}")
    return float(value)


def num_kept(num_neurons: int, keep: float) -> int:
    """How many neurons a layer keeps: round(keep * N), at least one."""
    check_fraction("keep", keep)
    return max(1, min(num_neurons, round(keep * num_neurons)))


def _descending_order(*keys: torch.Tensor) -> torch.Tensor:
    """Indices sorting by ``keys[0]`` descending, then ``keys[1]`` ..., then index ascending.

    Chained stable sorts, least significant key first, give a total order with
    no dependence on the sorting kernel's handling of ties.
    """
    order = torch.arange(keys[0].shape[-1], device=keys[0].device).expand_as(keys[0])
    for key in reversed(keys):
        _, pos = torch.sort(torch.gather(key, -1, order), dim=-1, descending=True, stable=True)
        order = torch.gather(order, -1, pos)
    return order


def _top_per_row(scores: torch.Tensor, k_per_row: torch.Tensor) -> torch.Tensor:
    """Boolean mask of the ``k_per_row[i]`` largest entries of each row (ties: lower index)."""
    order = _descending_order(scores)
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(scores.shape[-1], device=scores.device).expand_as(order))
    return rank < k_per_row.unsqueeze(-1)


def token_core_mask(acts: torch.Tensor, alpha: float) -> torch.Tensor:
    """Token-wise core neurons, Eq. 1: per token, the top alpha of its positive activations.

    Token i keeps k_i = round(alpha * |A_i+|) neurons, where |A_i+| is its count of
    positive activations. Returns a bool mask ``[tokens, neurons]``.
    """
    check_fraction("alpha", alpha)
    positive = acts > 0
    k = torch.round(alpha * positive.sum(-1).double()).long()
    return _top_per_row(acts.float(), k) & positive


def token_core_mask_official(acts: torch.Tensor, alpha: float) -> torch.Tensor:
    """The official code's variant: one k for all tokens, alpha times the mean positive count."""
    check_fraction("alpha", alpha)
    mean_positive = (acts > 0).sum(-1).double().mean()
    k = int(alpha * mean_positive.item())
    return _top_per_row(acts.float(), torch.full(acts.shape[:-1], k, device=acts.device))


def token_core_mask_magnitude(acts: torch.Tensor, alpha: float) -> torch.Tensor:
    """Per token, the top alpha of all neurons ranked by |activation|.

    In gated FFNs a negative product moves the output as much as a positive one,
    so ranking by sign throws information away.
    """
    check_fraction("alpha", alpha)
    k = max(1, round(alpha * acts.shape[-1]))
    return _top_per_row(acts.abs().float(), torch.full(acts.shape[:-1], k, device=acts.device))


def sentence_ranking(token_mask: torch.Tensor, acts: torch.Tensor) -> torch.Tensor:
    """Every neuron, best first by Eq. 2: core for the most tokens, then summed |activation|, then index."""
    counts = token_mask.sum(0).double()
    mass = acts.abs().double().sum(0)
    return _descending_order(counts, mass)


def take_top(ranking: torch.Tensor, keep: float) -> torch.Tensor:
    """The first round(keep * N) neurons of a ranking ``[N]``, as sorted indices."""
    return torch.sort(ranking[: num_kept(ranking.shape[-1], keep)]).values


def sentence_core(token_mask: torch.Tensor, acts: torch.Tensor, keep: float) -> torch.Tensor:
    """Sentence-wise core neurons, Eq. 2: those token-wise core for the most tokens.

    Keeps round(keep * N) neurons. Ties in the count go to the larger summed
    |activation|, then to the lower index. Returns sorted neuron indices ``[K]``.
    """
    return take_top(sentence_ranking(token_mask, acts), keep)


# Rankings: every neuron of a layer, best first, from the prompt's activations and alpha.
# A rule keeps a ranking's first round(keep * N); callers sweeping keep rank once.


def rank_coreinfer(acts: torch.Tensor, alpha: float) -> torch.Tensor:
    return sentence_ranking(token_core_mask(acts, alpha), acts)


def rank_official(acts: torch.Tensor, alpha: float) -> torch.Tensor:
    return sentence_ranking(token_core_mask_official(acts, alpha), acts)


def rank_magnitude(acts: torch.Tensor, alpha: float) -> torch.Tensor:
    return sentence_ranking(token_core_mask_magnitude(acts, alpha), acts)


def select_coreinfer(acts: torch.Tensor, keep: float, alpha: float) -> torch.Tensor:
    """CoreInfer per the paper, Eq. 1-2."""
    return take_top(rank_coreinfer(acts, alpha), keep)


def select_official(acts: torch.Tensor, keep: float, alpha: float) -> torch.Tensor:
    """CoreInfer as the official code computes it (averaged k per token)."""
    return take_top(rank_official(acts, alpha), keep)


def select_magnitude(acts: torch.Tensor, keep: float, alpha: float) -> torch.Tensor:
    """Eq. 2 over token-wise sets ranked by |activation|."""
    return take_top(rank_magnitude(acts, alpha), keep)


def top_neurons(scores: torch.Tensor, keep: float) -> torch.Tensor:
    """The round(keep * N) highest-scoring neurons of ``scores`` ``[N]`` (ties: lower index), sorted."""
    return take_top(_descending_order(scores.double()), keep)


def griffin_scores(acts: torch.Tensor) -> torch.Tensor:
    """GRIFFIN's prompt statistic: each token's activation vector L2-normalised, squares summed over tokens.

    Normalising per token stops a few high-norm tokens (often the first) from
    deciding the whole set. Returns ``[N]``.
    """
    unit = torch.nn.functional.normalize(acts.double(), dim=-1)
    return unit.square().sum(0)


def rank_griffin(acts: torch.Tensor, alpha: float) -> torch.Tensor:
    return _descending_order(griffin_scores(acts))


def select_griffin(acts: torch.Tensor, keep: float, alpha: float) -> torch.Tensor:
    """GRIFFIN-style (Dong et al. 2024): top-k of ``griffin_scores``; alpha is unused."""
    return take_top(rank_griffin(acts, alpha), keep)


def wina_scores(acts: torch.Tensor, column_norms: torch.Tensor) -> torch.Tensor:
    """WINA-style (arXiv 2505.19427): GRIFFIN's statistic over activations weighted by ``‖W_down[:, n]‖``.

    A neuron's effect on the layer's output is its activation times its column of the down
    projection, so a large activation on a short column matters less. ``column_norms`` is ``[N]``.
    """
    return griffin_scores(acts * column_norms.to(acts))


def coverage_count(scores: torch.Tensor, share: float) -> int:
    """The fewest top-scoring neurons whose scores sum to at least ``share`` of the total (at least one).

    ``share=1`` keeps every neuron, zero-scored ones too: a neuron silent over the prompt can
    still fire while decoding, and a full share must reproduce dense.
    """
    check_fraction("share", share)
    if share >= 1.0:
        return scores.shape[-1]
    ranked = torch.sort(scores.double(), descending=True).values
    cumulative = ranked.cumsum(0)
    return max(1, int(torch.searchsorted(cumulative, share * cumulative[-1]).item()) + 1)


def coverage_core(scores: torch.Tensor, share: float) -> torch.Tensor:
    """The ``coverage_count`` top-scoring neurons (ties: lower index), as sorted indices."""
    order = _descending_order(scores.double())
    return torch.sort(order[: coverage_count(scores, share)]).values


def fused_scores(local: torch.Tensor, prior: torch.Tensor, prior_weight: float) -> torch.Tensor:
    """GLASS-style (arXiv 2508.14302): the prompt's scores blended with a model-wide prior, each summing to 1."""
    local = local.double() / local.double().sum().clamp_min(1e-30)
    prior = prior.double().to(local.device) / prior.double().sum().clamp_min(1e-30)
    return (1 - prior_weight) * local + prior_weight * prior


RANDOM_SEED = 0


def rank_random(acts: torch.Tensor, alpha: float) -> torch.Tensor:
    """A seeded permutation, the same for every prompt and layer width."""
    generator = torch.Generator().manual_seed(RANDOM_SEED)
    return torch.randperm(acts.shape[-1], generator=generator).to(acts.device)


def select_random(acts: torch.Tensor, keep: float, alpha: float) -> torch.Tensor:
    """The floor: a seeded random set of round(keep * N) neurons, the same for every prompt."""
    return take_top(rank_random(acts, alpha), keep)


RULES: dict[str, Rule] = {
    "coreinfer": select_coreinfer,
    "official": select_official,
    "magnitude": select_magnitude,
    "griffin": select_griffin,
    "random": select_random,
}

RANKINGS: dict[str, Callable[[torch.Tensor, float], torch.Tensor]] = {
    "coreinfer": rank_coreinfer,
    "official": rank_official,
    "magnitude": rank_magnitude,
    "griffin": rank_griffin,
    "random": rank_random,
}

# Rules whose choice depends on alpha; the others ignore it.
ALPHA_RULES = ("coreinfer", "official", "magnitude")


def get_rule(name: str) -> Rule:
    try:
        return RULES[name]
    except KeyError:
        # Not "unknown selection rule": config.RULE_NAMES also holds rules that are not per-prompt functions.
        raise ValueError(f"{name!r} is not a per-prompt selection rule; those are {sorted(RULES)}") from None


def default_sparse_layers(num_layers: int, edge: float = 0.15) -> tuple[int, ...]:
    """All layers but roughly the first and last ``edge`` fraction, which stay dense.

    For 32 layers this leaves 4..27 sparse; the paper's 6..26 is as close as a
    single fraction gets. Early and late layers are the least stable.
    """
    skip = int(num_layers * edge)
    return tuple(range(skip, num_layers - skip))
