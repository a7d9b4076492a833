"""Adaptive core neurons: per-layer budgets calibrated from each layer's sensitivity.

The published rule keeps the same fraction of every sparse layer and leaves a
fixed 15 % of layers at each end dense. On small models that wastes the budget:
some layers barely notice losing most of their neurons, others break at half.
This module measures, once per model, how much the next-token distribution
moves (KL to dense) when one layer alone is sparsified at a few keep levels,
then spends a total FFN budget where it hurts least (greedy on marginal KL,
optimal for convex per-layer curves). Within a layer, neurons are ranked by
the prompt's activation mass (sum of |a| over its tokens), blended with a small
prior: the same mass measured over the calibration text, which helps short
prompts that say little about themselves.

Calibration needs no data set: a few built-in instructions and the model's own
dense greedy continuations of them. The result is stored as safetensors + JSON
beside the model cache and reused.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence

import torch
from safetensors.torch import load_file, save_file

from .selection import check_fraction

if TYPE_CHECKING:  # pragma: no cover
    from .engine import Engine

CALIBRATION_FORMAT = 1
DEFAULT_LEVELS = (0.2, 0.4, 0.6)
DEFAULT_PRIOR_WEIGHT = 0.3
BUDGET_STEP = 0.05
MIN_KEEP = 0.1

# Diverse, generic instructions: calibration must not lean on any evaluation set.
CALIBRATION_PROMPTS = (
    "Explain how a refrigerator keeps food cold.",
    "Write a short poem about the sea at night.",
    "What are three good habits for staying healthy?",
    "Summarise the plot of a detective story in a few sentences.",
    "How do I reverse a list in Python? Give an example.",
    "Describe the water cycle to a ten-year-old.",
    "List some differences between cats and dogs as pets.",
    "Why did the Roman Empire fall? Give a brief answer.",
    "Give me a recipe for a simple tomato soup.",
    "What is the difference between weather and climate?",
    "Write an email asking a colleague to reschedule a meeting.",
    "If a train travels 60 km in 45 minutes, what is its speed in km/h?",
    "Tell me an interesting fact about the Moon.",
    "How does a bill become a law in a parliament?",
    "Translate 'good morning, how are you?' into French and Spanish.",
    "What should I consider when buying a used car?",
)


def activation_mass(acts: torch.Tensor) -> torch.Tensor:
    """Each neuron's share of the prompt's total |activation|: ``[T, N] -> [N]``, summing to 1."""
    mass = acts.abs().double().sum(0)
    return mass / mass.sum().clamp_min(1e-30)


def select_by_mass(acts: torch.Tensor, k: int, prior: Optional[torch.Tensor] = None, prior_weight: float = 0.0) -> torch.Tensor:
    """The ``k`` neurons of largest activation mass (blended with a prior), sorted; ties by index."""
    score = activation_mass(acts)
    if prior is not None and prior_weight > 0:
        score = score + prior_weight * prior.to(score)
    order = torch.sort(-score, stable=True).indices
    return torch.sort(order[:k]).values


def interpolate_curve(levels: Sequence[float], kl: torch.Tensor, keep: float) -> float:
    """KL of one layer at ``keep``, linear between measured levels, 0 at keep 1, extrapolated below."""
    xs = list(levels) + [1.0]
    ys = kl.tolist() + [0.0]
    if keep <= xs[0]:
        slope = (ys[1] - ys[0]) / (xs[1] - xs[0])
        return ys[0] + slope * (keep - xs[0])
    for (x0, y0), (x1, y1) in zip(zip(xs, ys), zip(xs[1:], ys[1:])):
        if keep <= x1:
            return y0 + (y1 - y0) * (keep - x0) / (x1 - x0)
    return 0.0


def allocate_budgets(
    levels: Sequence[float],
    sensitivity: torch.Tensor,
    density: float,
    step: float = BUDGET_STEP,
    min_keep: float = MIN_KEEP,
) -> list[float]:
    """Per-layer keep fractions whose mean is at most ``density``, minimising the summed KL.

    ``sensitivity`` is ``[layers, levels]``: the KL when that layer alone is
    sparsified at each level. Starts dense and repeatedly trims ``step`` from the
    layer whose KL grows least per neuron saved. Deterministic: ties go to the
    later layer index (late layers feed fewer others), then the earlier step.
    """
    check_fraction("density", density)
    layers = sensitivity.shape[0]
    keeps = [1.0] * layers
    steps_needed = round((1.0 - density) * layers / step - 1e-9)
    for _ in range(max(0, steps_needed)):
        best, best_cost = None, None
        for layer in range(layers):
            nxt = round(keeps[layer] - step, 6)
            if nxt < min_keep - 1e-9:
                continue
            cost = interpolate_curve(levels, sensitivity[layer], nxt) - interpolate_curve(
                levels, sensitivity[layer], keeps[layer]
            )
            if best_cost is None or cost <= best_cost:
                best, best_cost = layer, cost
        if best is None:
            break
        keeps[best] = round(keeps[best] - step, 6)
    return keeps


@dataclass
class Calibration:
    """One model's adaptive calibration: layer sensitivities and the activation-mass prior."""

    model: str
    levels: tuple[float, ...]
    sensitivity: torch.Tensor  # [layers, levels] KL(dense || one layer sparse)
    prior: torch.Tensor  # [layers, N] activation mass over the calibration text, rows sum to 1
    meta: dict = field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        return self.sensitivity.shape[0]

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        save_file(
            {"sensitivity": self.sensitivity.contiguous(), "prior": self.prior.contiguous()},
            str(directory / "adaptive.safetensors"),
        )
        meta = dict(self.meta, model=self.model, levels=list(self.levels), format=CALIBRATION_FORMAT)
        (directory / "adaptive.json").write_text(json.dumps(meta, indent=1))

    @classmethod
    def load(cls, directory: Path, expect_model: Optional[str] = None) -> "Calibration":
        meta = json.loads((directory / "adaptive.json").read_text())
        if meta.get("format") != CALIBRATION_FORMAT:
            raise ValueError(f"{directory} holds an adaptive calibration of another format")
        if expect_model is not None and meta["model"] != expect_model:
            raise ValueError(f"{directory} was calibrated for {meta['model']}, not {expect_model}")
        tensors = load_file(str(directory / "adaptive.safetensors"))
        return cls(meta["model"], tuple(meta["levels"]), tensors["sensitivity"], tensors["prior"], meta)


@dataclass(frozen=True)
class AdaptiveSelector:
    """Per-layer budgets, mass ranking, and the calibration prior."""

    keeps: tuple[float, ...]  # per layer; 1.0 = dense
    prior: torch.Tensor  # [layers, N]
    prior_weight: float = DEFAULT_PRIOR_WEIGHT

    def sparse_layers(self) -> tuple[int, ...]:
        return tuple(i for i, k in enumerate(self.keeps) if k < 1.0)

    def __call__(self, layer: int, acts: torch.Tensor) -> torch.Tensor:
        k = max(1, round(self.keeps[layer] * acts.shape[-1]))
        return select_by_mass(acts, k, self.prior[layer], self.prior_weight)


def shipped_calibration_dir(fingerprint: str) -> Path:
    """Where a calibration shipped inside the package would be (the default model's is)."""
    return Path(__file__).parent / "calibrations" / fingerprint


def model_fingerprint(engine: "Engine") -> str:
    """Name plus a hash of the config and FFN shapes: a calibration fits only its own model."""
    shapes = [tuple(f.weights.up.shape) for f in engine.ffns]
    text = engine.model.config.to_json_string(use_diff=False) + repr(shapes)
    return f"{engine.name}-{hashlib.sha256(text.encode()).hexdigest()[:12]}"


def calibration_prompts(engine: "Engine", max_new_tokens: int = 64) -> tuple[list[list[int]], list[list[int]]]:
    """Built-in prompts and the model's own dense greedy continuations of them."""
    from .engine import SamplingConfig

    prompts = [engine.encode(p) for p in CALIBRATION_PROMPTS]
    results = engine.generate_ids(prompts, None, SamplingConfig(max_new_tokens=max_new_tokens))
    pairs = [(p, r.token_ids) for p, r in zip(prompts, results) if len(r.token_ids) >= 4]
    return [p for p, _ in pairs], [c for _, c in pairs]


def _kl_to_dense(dense: Sequence[torch.Tensor], sparse: Sequence[torch.Tensor]) -> float:
    total, count = 0.0, 0
    for d, s in zip(dense, sparse):
        log_d, log_s = torch.log_softmax(d.float(), -1), torch.log_softmax(s.float(), -1)
        total += (log_d.exp() * (log_d - log_s)).sum().item()
        count += d.shape[0]
    return total / max(count, 1)


def calibrate(
    engine: "Engine",
    prompts: Optional[Sequence[Sequence[int]]] = None,
    continuations: Optional[Sequence[Sequence[int]]] = None,
    levels: Sequence[float] = DEFAULT_LEVELS,
    progress: bool = True,
) -> Calibration:
    """Measure each layer's sensitivity and the activation-mass prior (one pass per layer and level)."""
    from tqdm.auto import tqdm

    from .engine import SparsityConfig

    if prompts is None:
        prompts, continuations = calibration_prompts(engine)
    layers = engine.num_layers
    dense, _ = engine.continuation_logits(prompts, continuations, None)
    prior = _prior(engine, prompts, continuations)
    sensitivity = torch.zeros(layers, len(levels))
    bar = tqdm(total=layers * len(levels), desc="calibrating layer sensitivity", disable=not progress)
    for layer in range(layers):
        for j, level in enumerate(levels):
            selector = AdaptiveSelector(tuple(level if i == layer else 1.0 for i in range(layers)), prior, 0.0)
            sparse, _ = engine.continuation_logits(
                prompts, continuations, SparsityConfig(keep=level, layers=(layer,)), selector=selector
            )
            sensitivity[layer, j] = _kl_to_dense(dense, sparse)
            bar.update()
    bar.close()
    # Sensitivity must not grow with keep; measurement noise at tiny KLs can make it wobble.
    sensitivity = torch.flip(torch.cummax(torch.flip(sensitivity, [1]), 1).values, [1])
    meta = {"prompts": len(prompts), "continuation_tokens": sum(len(c) for c in continuations)}
    return Calibration(model_fingerprint(engine), tuple(levels), sensitivity, prior.float(), meta)


def _prior(engine: "Engine", prompts, continuations) -> torch.Tensor:
    """Activation mass of every layer over the calibration text (prompts and continuations)."""
    from .engine import SparsityConfig

    mass = [torch.zeros(f.weights.num_neurons, dtype=torch.float64) for f in engine.ffns]

    def record(layer: int, acts: torch.Tensor) -> torch.Tensor:
        mass[layer] += activation_mass(acts)
        return torch.arange(acts.shape[-1])

    full = [list(p) + list(c) for p, c in zip(prompts, continuations)]
    engine.core_neurons(full, SparsityConfig(keep=1.0, layers=tuple(range(engine.num_layers))), selector=record)
    prior = torch.stack(mass)
    return prior / prior.sum(-1, keepdim=True)
