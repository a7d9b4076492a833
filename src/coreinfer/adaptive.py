"""Adaptive core neurons: calibrated dense layers, an even budget elsewhere, mass ranking.

The published rule keeps the same fraction of every sparse layer and leaves a
fixed 15 % of layers at each end dense. Measured on SmolLM2-135M, that spends
too much of the budget on the edges: only a few layers are truly fragile. This
module measures, once per model, how far the next-token distribution moves
(KL to dense) when one layer alone is sparsified; layers far above the median
stay dense and every other layer gets the same share of the FFN budget, so the
density (averaged over all layers) equals the requested ``keep``. Within a
layer, neurons are ranked by the prompt's activation mass (sum of |a| over its
tokens; negative products count, as they move the output too), blended with a
small prior: the same mass over the calibration text (the hybrid of a static
'hot' set and the prompt's own).

Calibration needs no data set: a few built-in instructions and the model's own
dense greedy continuations of them. The result is stored as safetensors + JSON
beside the model cache and reused; the default model's ships with the package.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence

import torch
from safetensors.torch import load_file, save_file

from .adapters import get_adapter
from .config import SamplingConfig, SparsityConfig
from .selection import check_fraction

if TYPE_CHECKING:  # pragma: no cover
    from .engine import Engine

CALIBRATION_FORMAT = 1
METHODS = ("fisher", "exact")
# "fisher" is linear in the layer count and 4-6x faster, but its probe noise moves layers that sit
# near the fragile threshold across it (README, "Calibration time"): opt-in until that is fixed.
DEFAULT_METHOD = "exact"
DEFAULT_PROBES = 8
PROBE_TOKENS = 256  # the Fisher's support at each position: the dense distribution's likeliest tokens
DEFAULT_WINDOW = 3  # layers a sparse layer's change is propagated exactly before linearising
FISHER_BATCH = 16  # sequences per dense pass
DEFAULT_LEVELS = (0.2,)
DEFAULT_PRIOR_WEIGHT = 0.3
FRAGILE_FACTOR = 2.0
MIN_KEEP = 0.2

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


def fragile_layers(sensitivity: torch.Tensor, factor: float = FRAGILE_FACTOR) -> list[int]:
    """Layers whose KL, sparsified alone at the lowest calibrated keep, exceeds ``factor`` x the median."""
    at_lowest = sensitivity[:, 0]
    return [i for i, kl in enumerate(at_lowest.tolist()) if kl > factor * float(at_lowest.median())]


def allocate_budgets(sensitivity: torch.Tensor, density: float, factor: float = FRAGILE_FACTOR) -> list[float]:
    """Per-layer keep fractions averaging ``density``: fragile layers dense, the rest an even share.

    ``sensitivity`` is ``[layers, levels]``, the KL when that layer alone is
    sparsified. Spending the budget by single-layer KL (greedy on marginal KL)
    was measured and lost to this: it starves early layers whose errors compound
    once every layer is sparse. When the budget cannot keep the fragile layers
    dense, every layer gets the same share.
    """
    check_fraction("density", density)
    layers = sensitivity.shape[0]
    dense = fragile_layers(sensitivity, factor)
    rest = layers - len(dense)
    share = (density * layers - len(dense)) / rest if rest else 1.0
    if share < MIN_KEEP or share > 1.0:
        return [density] * layers
    return [1.0 if i in dense else share for i in range(layers)]


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
        k = max(1, math.floor(self.keeps[layer] * acts.shape[-1] + 1e-9))  # never above the budget
        return select_by_mass(acts, k, self.prior[layer], self.prior_weight)


def shipped_calibration_dir(fingerprint: str) -> Path:
    """Where a calibration shipped inside the package would be (the default model's is)."""
    return Path(__file__).parent / "calibrations" / fingerprint


def model_fingerprint(engine: "Engine") -> str:
    """Name plus a hash of the architecture and a checksum of the weights.

    Not the whole config: it carries the transformers version, which must not
    invalidate a calibration. A weight checksum tells apart fine-tunes that
    share a name and shapes.
    """
    config = engine.model.config
    first = engine.ffns[0].weights.up
    identity = {
        "model_type": config.model_type,
        "layers": engine.num_layers,
        "vocab": getattr(config, "vocab_size", None),
        "ffn_shapes": [list(f.weights.up.shape) for f in engine.ffns],
        "checksum": f"{float(first.detach().double().abs().sum()):.6e}",
    }
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]
    # The fingerprint names a directory: a Hub id's "owner/name" becomes "owner--name", as in the HF cache.
    return f"{engine.name.replace('/', '--')}-{digest}"


def calibration_prompts(engine: "Engine", max_new_tokens: int = 64) -> tuple[list[list[int]], list[list[int]]]:
    """Built-in prompts and the model's own dense greedy continuations of them."""
    prompts = [engine.encode(p) for p in CALIBRATION_PROMPTS]
    # The continuations are only text to measure on (every KL is taken against the dense model as
    # loaded), so they come from the fastest faithful path: lean bf16 where the CPU or GPU has it,
    # never int8 (it can fall into loops), and the reference backend where the engine keeps to it
    # (memory-limited mode).
    fast = {} if engine.backend_name == "reference" else {"backend": "auto", "weights": engine.default_weights()}
    results = engine.generate_ids(prompts, None, SamplingConfig(max_new_tokens=max_new_tokens), **fast)
    pairs = [(p, r.token_ids) for p, r in zip(prompts, results) if len(r.token_ids) >= 4]
    return [p for p, _ in pairs], [c for _, c in pairs]


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Rank correlation of two score vectors (ties broken by position; the KLs here have none)."""
    ranks = [torch.argsort(torch.argsort(x.double(), stable=True)).double() for x in (a, b)]
    ranks = [r - r.mean() for r in ranks]
    return float((ranks[0] * ranks[1]).sum() / (ranks[0].norm() * ranks[1].norm()))


def compare_methods(
    engine: "Engine", seeds: Sequence[int] = (0, 1, 2, 3), progress: bool = True, prompts=None, continuations=None
) -> dict:
    """The exact and the Fisher measure on the same calibration text, timed.

    Reports each one's per-layer sensitivity and fragile (kept dense) layers, the
    Fisher's rank correlation with the exact measure per probe seed, and the exact
    measure's own split-half correlation (first half of the sequences against the
    second): how far its ranking is a property of the model rather than of the text.
    Nothing is stored. ``prompts``/``continuations`` (token ids) replace the built-in text.
    """
    start = time.perf_counter()
    if prompts is None:
        prompts, continuations = calibration_prompts(engine)
    text_s = time.perf_counter() - start
    tokens = sum(len(c) for c in continuations)
    half = len(prompts) // 2

    def summary(kl: torch.Tensor, seconds: float) -> dict:
        sensitivity = _per_token(kl, tokens)[:, 0]
        return {"seconds": round(seconds, 1), "fragile": fragile_layers(sensitivity[:, None].float()),
                "sensitivity": [float(f"{x:.4g}") for x in sensitivity.tolist()]}

    start = time.perf_counter()
    exact = exact_kl(engine, prompts, continuations, DEFAULT_LEVELS, progress)
    report = {
        "model": engine.name, "layers": engine.num_layers, "sequences": len(prompts), "tokens": tokens,
        "text_seconds": round(text_s, 1), "exact": summary(exact, time.perf_counter() - start),
        "fisher": [],
    }
    report["exact"]["split_half_spearman"] = round(spearman(exact[:, 0, :half].sum(-1), exact[:, 0, half:].sum(-1)), 3)
    for seed in seeds:
        start = time.perf_counter()
        kl, _ = fisher_kl(engine, prompts, continuations, DEFAULT_LEVELS, seed=seed, progress=progress)
        row = summary(kl, time.perf_counter() - start)
        row.update(seed=seed, spearman_with_exact=round(spearman(kl[:, 0].sum(-1), exact[:, 0].sum(-1)), 3))
        report["fisher"].append(row)
    return report


def _per_token(kl: torch.Tensor, tokens: int) -> torch.Tensor:
    """Per-sequence KL sums ``[layers, levels, B]`` as each layer's KL per continuation token ``[layers, levels]``."""
    return kl.sum(-1) / max(tokens, 1)


def _kl_to_dense(dense: Sequence[torch.Tensor], sparse: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per sequence, the KL(dense || sparse) summed over its continuation tokens: ``[B]``."""
    sums = []
    for d, s in zip(dense, sparse):
        log_d, log_s = torch.log_softmax(d.float(), -1), torch.log_softmax(s.float(), -1)
        sums.append((log_d.exp() * (log_d - log_s)).sum().item())
    return torch.tensor(sums, dtype=torch.float64)


def calibrate(
    engine: "Engine",
    prompts: Optional[Sequence[Sequence[int]]] = None,
    continuations: Optional[Sequence[Sequence[int]]] = None,
    levels: Sequence[float] = DEFAULT_LEVELS,
    progress: bool = True,
    method: str = DEFAULT_METHOD,
    probes: int = DEFAULT_PROBES,
    seed: int = 0,
    window: int = DEFAULT_WINDOW,
) -> Calibration:
    """Measure each layer's sensitivity and the activation-mass prior.

    ``method="fisher"`` estimates every layer's KL from one dense pass and
    ``probes`` backward passes (``fisher_kl``): its cost grows linearly with the layer count.
    ``method="exact"`` (the default) runs one full pass per layer and level with that layer alone sparsified
    (``exact_kl``): the measure itself, quadratic in the layer count.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, not {method!r}")
    if prompts is None:
        prompts, continuations = calibration_prompts(engine)
    if method == "exact":
        kl = exact_kl(engine, prompts, continuations, levels, progress)
        prior = _prior(engine, prompts, continuations)
    else:
        kl, prior = fisher_kl(engine, prompts, continuations, levels, probes, seed, progress, window)
    tokens = sum(len(c) for c in continuations)
    sensitivity = _per_token(kl, tokens).float()
    # Sensitivity must not grow with keep; measurement noise at tiny KLs can make it wobble.
    sensitivity = torch.flip(torch.cummax(torch.flip(sensitivity, [1]), 1).values, [1])
    meta = {"prompts": len(prompts), "continuation_tokens": tokens, "method": method}
    if method == "fisher":
        meta.update(probes=probes, seed=seed, window=window)
    return Calibration(model_fingerprint(engine), tuple(levels), sensitivity, prior.float(), meta)


def exact_kl(engine: "Engine", prompts, continuations, levels: Sequence[float], progress: bool = True) -> torch.Tensor:
    """KL(dense || one layer sparse) summed per sequence: ``[layers, levels, B]``, one pass per layer and level."""
    from tqdm.auto import tqdm

    layers = engine.num_layers
    dense, _ = engine.continuation_logits(prompts, continuations, None)
    prior = torch.zeros(layers, max(f.weights.num_neurons for f in engine.ffns))  # unused with weight 0
    kl = torch.zeros(layers, len(levels), len(prompts), dtype=torch.float64)
    # Said once, where the wait is: the opt-in estimate takes a fraction of this.
    desc = "calibrating layer sensitivity, exact (coreinfer calibrate --method fisher: 4-6x faster, noisier)"
    bar = tqdm(total=layers * len(levels), desc=desc, disable=not progress)
    for layer in range(layers):
        for j, level in enumerate(levels):
            selector = AdaptiveSelector(tuple(level if i == layer else 1.0 for i in range(layers)), prior, 0.0)
            sparse, _ = engine.continuation_logits(
                prompts, continuations, SparsityConfig(keep=level, layers=(layer,)), selector=selector
            )
            kl[layer, j] = _kl_to_dense(dense, sparse)
            bar.update()
    bar.close()
    return kl


def fisher_kl(
    engine: "Engine",
    prompts,
    continuations,
    levels: Sequence[float],
    probes: int = DEFAULT_PROBES,
    seed: int = 0,
    progress: bool = True,
    window: int = DEFAULT_WINDOW,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every layer's KL(dense || that layer alone sparsified), to second order, at a cost linear in layers.

    Returns the per-sequence KL sums ``[layers, levels, B]`` and the activation-mass prior ``[layers, N]``.

    Sparsifying layer L changes the residual stream. That change is propagated exactly through
    ``window`` more layers (``Δ_L``, at the output of layer ``M = min(L + window, last)``), and
    linearly from there: to second order the KL it causes is ``½ Σ_t Δz_tᵀ F_t Δz_t``, with
    ``Δz = J_M Δ_L`` the logit change and ``F_t`` the Fisher of the dense softmax at position t.
    A probe ``v_t`` with covariance ``F_t`` (Gaussian, on the dense distribution's
    ``PROBE_TOKENS`` likeliest tokens), back-propagated once, gives ``g_M = J_Mᵀ v`` at every
    layer at once, and ``E[(g_M · Δ_L)²] = Σ_t Δz_tᵀ F_t Δz_t``.

    Cost: one dense forward with autograd, ``window + 1`` forwards per level (layers L, L + window
    + 1, ... are sparsified in the same pass, each reset to dense once measured, so their windows
    never overlap) and ``probes`` backward passes, each through every layer once: linear in the
    layer count, where the exact measure runs the whole model once per layer. Probes are seeded.
    """
    from tqdm.auto import tqdm

    layers = engine.num_layers
    kl = torch.zeros(layers, len(levels), len(prompts), dtype=torch.float64)
    prior = torch.stack([torch.zeros(f.weights.num_neurons, dtype=torch.float64) for f in engine.ffns])
    generator = torch.Generator().manual_seed(seed)
    chunks = range(0, len(prompts), FISHER_BATCH)
    passes = 1 + len(levels) * min(window + 1, layers) + probes
    bar = tqdm(total=len(chunks) * passes, desc="calibrating layer sensitivity", disable=not progress)
    with engine.lock, torch.inference_mode(False):
        for start in chunks:
            rows = slice(start, start + FISHER_BATCH)
            batch = _FisherBatch(engine, prompts[rows], continuations[rows], levels, window)
            batch.dense_pass(prior, bar)
            batch.window_passes(bar)
            batch.probe(probes, generator, kl[:, :, rows], bar)
    bar.close()
    return kl, prior / prior.sum(-1, keepdim=True)


class _FisherBatch:
    """``fisher_kl`` over one batch of sequences: dense prefill, then the passes over the continuation."""

    def __init__(self, engine: "Engine", prompts, continuations, levels, window: int):
        self.engine, self.levels, self.window = engine, tuple(levels), window
        self.layers = engine.num_layers
        self.decoder_layers = get_adapter(engine.model.config.model_type).layers(engine.model)
        batch = len(prompts)
        # Dense prefill: each layer's kept neurons per level, selected from the prompt's activations
        # exactly as the exact measure selects them, and the prompt's share of the prior.
        self.ids, self.mask = engine.left_pad(prompts)
        device = self.ids.device
        self.keep = [torch.zeros(len(levels), batch, f.weights.num_neurons, device=device) for f in engine.ffns]
        self.prompt_abs: list[list[torch.Tensor]] = [[] for _ in range(self.layers)]
        every = SparsityConfig(keep=1.0, layers=tuple(range(self.layers)))
        with torch.no_grad():
            _, self.cache = engine.prefill(self.ids, self.mask, engine.new_session(every, self.mask, self._select))
        width = max(len(c) for c in continuations)
        cont = torch.full((batch, width), engine.pad_id(), dtype=torch.long)
        for b, c in enumerate(continuations):
            cont[b, : len(c)] = torch.tensor(list(c))
        self.cont = cont.to(device)
        lengths = torch.tensor([len(c) for c in continuations], device=device)
        steps = torch.arange(width, device=device)[None, :]
        self.fed = steps < lengths[:, None]  # real continuation tokens
        self.scored = steps < lengths[:, None] - 1  # positions whose logits predict one of them
        self.positions = self.mask.sum(-1, keepdim=True) + steps
        self.full_mask = torch.cat([self.mask, torch.ones_like(self.cont)], 1)

    def _select(self, layer: int, acts: torch.Tensor) -> torch.Tensor:
        b = len(self.prompt_abs[layer])
        self.prompt_abs[layer].append(acts.abs().sum(0).double())
        for j, level in enumerate(self.levels):
            k = max(1, math.floor(level * acts.shape[-1] + 1e-9))
            self.keep[layer][j, b, select_by_mass(acts, k)] = 1.0
        return torch.arange(acts.shape[-1], device=acts.device)

    def _run(self, ffn_handler, layer_hook) -> torch.Tensor:
        """One forward over the continuation from a copy of the prompt's cache, with handlers installed."""
        hooks = [layer.register_forward_hook(lambda m, a, out, i=i: layer_hook(i, out))
                 for i, layer in enumerate(self.decoder_layers)]
        for ffn in self.engine.ffns:
            ffn.handler = ffn_handler
        try:
            return self.engine.hidden_states(self.cont, self.full_mask, self.positions, copy.deepcopy(self.cache))
        finally:
            for ffn in self.engine.ffns:
                ffn.handler = None
            for hook in hooks:
                hook.remove()

    def dense_pass(self, prior: torch.Tensor, bar) -> None:
        """Dense, with autograd: a zero "tap" on each layer's output receives the gradient there."""
        self.dense_out: dict[int, torch.Tensor] = {}
        self.taps: dict[int, torch.Tensor] = {}

        def ffn(module, x: torch.Tensor) -> torch.Tensor:
            weights = module.weights
            acts = weights.activations(_batched(x, self.cont.shape[0]))
            with torch.no_grad():  # the prior: activation mass over prompt + continuation, per sequence
                total = (acts.abs() * self.fed[..., None]).sum(1).double() + torch.stack(self.prompt_abs[module.layer_idx])
                prior[module.layer_idx] += (total / total.sum(-1, keepdim=True).clamp_min(1e-30)).sum(0).to(prior)
            return weights.project_down(acts).view(*x.shape[:-1], -1)

        def tap(layer: int, out):
            hidden = _hidden(out)
            self.dense_out[layer] = hidden.detach()
            self.taps[layer] = torch.zeros_like(hidden, requires_grad=True)
            return _replace_hidden(out, hidden + self.taps[layer])

        with torch.enable_grad():
            self.hidden = self._run(ffn, tap)
        bar.update()

    def window_passes(self, bar) -> None:
        """``Δ_L`` per layer and level: layers L ≡ r (mod window + 1) sparsified together, each
        measured at the end of its window and reset to dense there."""
        stride = self.window + 1
        self.ends = [min(layer + self.window, self.layers - 1) for layer in range(self.layers)]
        self.deltas: dict[tuple[int, int], torch.Tensor] = {}
        for j in range(len(self.levels)):
            for residue in range(min(stride, self.layers)):
                sources = {self.ends[l]: l for l in range(residue, self.layers, stride)}

                def ffn(module, x: torch.Tensor, j=j, residue=residue) -> torch.Tensor:
                    weights = module.weights
                    acts = weights.activations(_batched(x, self.cont.shape[0]))
                    if module.layer_idx % stride == residue:
                        acts = acts * self.keep[module.layer_idx][j][:, None, :]
                    return weights.project_down(acts).view(*x.shape[:-1], -1)

                def measure(layer: int, out, j=j, sources=sources):
                    if layer not in sources:
                        return out
                    dense = self.dense_out[layer]
                    self.deltas[sources[layer], j] = _hidden(out) - dense
                    return _replace_hidden(out, dense)

                with torch.no_grad():
                    self._run(ffn, measure)
                bar.update()

    def probe(self, probes: int, generator: torch.Generator, kl: torch.Tensor, bar) -> None:
        """Probes from the dense distribution's likeliest tokens, mapped through the LM head by
        hand (a gather, not a vocabulary-sized matmul), one backward pass each."""
        weight, bias, softcap = self.engine.output_head()
        h = self.hidden.detach()[self.scored]  # [R, d]
        top_z, top_i, log_norm = [], [], []
        for part in h.split(256):
            z = torch.nn.functional.linear(part, weight, bias).float()
            if softcap is not None:
                z = softcap * torch.tanh(z / softcap)
            values, index = z.topk(min(PROBE_TOKENS, z.shape[-1]), -1)
            top_z.append(values), top_i.append(index), log_norm.append(torch.logsumexp(z, -1, keepdim=True))
        top_z, top_i = torch.cat(top_z), torch.cat(top_i)
        p = (top_z - torch.cat(log_norm)).exp()  # [R, r]
        mass = p.sum(-1, keepdim=True)
        q = p / mass
        # logits = softcap·tanh(u / softcap), so d logits / du = 1 - (logits / softcap)²
        chain = 1 - (top_z / softcap) ** 2 if softcap is not None else 1.0
        ends = sorted(set(self.ends))
        for k in range(probes):
            noise = q.sqrt() * torch.randn(q.shape, generator=generator).to(q)
            v = mass.sqrt() * (noise - q * noise.sum(-1, keepdim=True)) * chain  # covariance: the Fisher on top
            grad_h = torch.zeros_like(self.hidden)
            grad_h[self.scored] = torch.nn.functional.embedding_bag(
                top_i, weight, per_sample_weights=v.to(weight.dtype), mode="sum"
            )
            grads = dict(zip(ends, torch.autograd.grad(
                self.hidden, [self.taps[m] for m in ends], grad_h, retain_graph=k < probes - 1
            )))
            for (layer, j), delta in self.deltas.items():
                projection = (grads[self.ends[layer]] * delta).sum(-1).double().sum(-1)  # [B]: g·Δ
                kl[layer, j] += projection.cpu() ** 2 / (2 * probes)
            bar.update()


def _batched(x: torch.Tensor, batch: int) -> torch.Tensor:
    """An FFN input as ``[B, T, d]`` (OPT hands its FFN ``[B*T, d]``)."""
    return x if x.dim() == 3 else x.view(batch, -1, x.shape[-1])


def _hidden(out) -> torch.Tensor:
    """A decoder layer's output hidden states (some families return a tuple)."""
    return out[0] if isinstance(out, tuple) else out


def _replace_hidden(out, hidden: torch.Tensor):
    return (hidden,) + tuple(out[1:]) if isinstance(out, tuple) else hidden


def _prior(engine: "Engine", prompts, continuations) -> torch.Tensor:
    """Activation mass of every layer over the calibration text (prompts and continuations)."""
    mass = [torch.zeros(f.weights.num_neurons, dtype=torch.float64) for f in engine.ffns]

    def record(layer: int, acts: torch.Tensor) -> torch.Tensor:
        mass[layer] += activation_mass(acts)
        return torch.arange(acts.shape[-1])

    full = [list(p) + list(c) for p, c in zip(prompts, continuations)]
    engine.core_neurons(full, SparsityConfig(keep=1.0, layers=tuple(range(engine.num_layers))), selector=record)
    prior = torch.stack(mass)
    return prior / prior.sum(-1, keepdim=True)
