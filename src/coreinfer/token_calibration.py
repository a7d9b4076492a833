"""Calibrating token-level sparsity once per model: thresholds and what each one costs.

On the built-in calibration text (generic prompts and the model's own dense answers, as the
adaptive calibration uses; never an evaluation set):

1. one dense pass records, at the answer positions, every layer's four sparsifiable inputs;
   each input's magnitude quantiles give the threshold of every level in ``LEVELS``, and the
   relative error each level causes in the products reading that input gives the *shape* of its
   cost curve;
2. one pass per layer and input, that input alone sparsified at ``PROBE_LEVEL`` (the prompt dense,
   as in decoding), measures the KL from dense over the answers' first ``PROBE_TOKENS`` tokens:
   the input's *importance*;
3. the cost of level ``q`` is importance × error(q) / error(probe): a local curve scaled by a
   global measurement, so the greedy allocation (``TokenProfile.allocate``) spends sparsity where
   the model's output notices it least;
4. at each of ``AGREEMENT_KEEPS``, the allocated thresholds' top-1 agreement with the dense model
   on the same answers: ``keep="auto"`` takes the lowest level meeting its quality target.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Optional, Sequence

import torch

from .token_session import TokenSession
from .token_sparsity import GROUPS, LEVELS, TARGETS, TokenProfile, TokenThresholds, level_thresholds, relative_errors

if TYPE_CHECKING:  # the engine calls in here; nothing here imports it at run time
    from .engine import Engine

PROBE_LEVEL = 0.5
PROBE_TOKENS = 24  # answer tokens per prompt the KL probes score (each probe is a forward over them)
AGREEMENT_KEEPS = (0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9)  # levels whose agreement with dense is measured for keep="auto"
ERROR_TOKENS = 512  # answer positions per input used for the error curves (a matmul per level)


def _weights(engine: "Engine", layer: int, group: str) -> torch.Tensor:
    """Every matrix reading input ``group`` of ``layer``, stacked ``[out, in]``."""
    ffn = engine.ffns[layer].weights
    if group == "gate_up":
        return ffn.up if ffn.gate is None else torch.cat([ffn.gate, ffn.up])
    if group == "down":
        return ffn.down
    modules = engine.attention_modules()[layer][group]
    # GPT-2's Conv1D stores [in, out]
    return torch.cat([m.weight.t() if type(m).__name__ == "Conv1D" else m.weight for m in modules])


class _InputRecorder:
    """Captures each layer's four inputs at the answer positions during one dense forward."""

    def __init__(self, engine: "Engine", answer: torch.Tensor):
        self.engine, self.answer = engine, answer  # answer: [B, T] bool
        self.inputs: dict[tuple[int, str], torch.Tensor] = {}

    def _keep(self, layer: int, group: str, x: torch.Tensor) -> None:
        x = x.view(self.answer.shape[0], -1, x.shape[-1])
        self.inputs[(layer, group)] = x[self.answer].detach().float()

    def ffn(self, module, x: torch.Tensor) -> torch.Tensor:
        weights, layer = module.weights, module.layer_idx
        self._keep(layer, "gate_up", x)
        acts = weights.activations(x.view(self.answer.shape[0], -1, x.shape[-1]))
        self._keep(layer, "down", acts)
        return weights.project_down(acts).view(*x.shape[:-1], -1)

    def run(self, ids: torch.Tensor, mask: torch.Tensor) -> None:
        handles = []
        try:
            for layer, (ffn, attention) in enumerate(zip(self.engine.ffns, self.engine.attention_modules())):
                ffn.handler = self.ffn
                for group in ("qkv", "o"):
                    hook = lambda module, args, layer=layer, group=group: self._keep(layer, group, args[0])
                    handles.append(attention[group][0].register_forward_pre_hook(hook))
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            self.engine._forward(ids, mask, positions, None, logits_to_keep=1)
        finally:
            for ffn in self.engine.ffns:
                ffn.handler = None
            for handle in handles:
                handle.remove()


def _id_prompts(engine: "Engine", count: int = 8, length: int = 12, answer: int = 24):
    """Without a tokenizer (token-id engines): fixed pseudo-random prompts and the model's greedy answers."""
    from .config import SamplingConfig

    generator = torch.Generator().manual_seed(0)
    vocab = engine.model.config.vocab_size
    prompts = [torch.randint(1, vocab, (length,), generator=generator).tolist() for _ in range(count)]
    results = engine.generate_ids(prompts, None, SamplingConfig(max_new_tokens=answer), backend="reference", ignore_eos=True)
    return prompts, [r.token_ids for r in results]


def _kl(dense_logp: torch.Tensor, logits: torch.Tensor) -> float:
    logp = torch.log_softmax(logits.float(), -1)
    return float((dense_logp.exp() * (dense_logp - logp)).sum(-1).mean())


@torch.inference_mode()
def calibrate_tokens(
    engine: "Engine",
    prompts: Optional[Sequence[Sequence[int]]] = None,
    continuations: Optional[Sequence[Sequence[int]]] = None,
    progress: bool = True,
    probes: bool = True,
) -> TokenProfile:
    """Measure the ``TokenProfile`` of ``engine``'s model (see the module docstring).

    ``probes=False`` keeps step 1's thresholds only (every input and level alike, no agreement table):
    enough for speed measurements on random weights, where the measured costs would take minutes and
    mean nothing.
    """
    from tqdm.auto import tqdm

    from .adaptive import calibration_prompts, model_fingerprint

    if prompts is None or continuations is None:
        prompts, continuations = calibration_prompts(engine) if engine.tokenizer is not None else _id_prompts(engine)
    num_layers = engine.num_layers
    bar = tqdm(total=1 + num_layers * len(GROUPS) + len(TARGETS) * len(AGREEMENT_KEEPS), desc="token-level calibration", disable=not progress, unit="pass")

    # 1. Inputs at the answer positions: thresholds and error curves.
    full = [list(p) + list(c) for p, c in zip(prompts, continuations)]
    ids, mask = engine.left_pad(full)
    answer = torch.zeros_like(mask, dtype=torch.bool)
    for row, c in enumerate(continuations):
        answer[row, ids.shape[1] - len(c) :] = True
    recorder = _InputRecorder(engine, answer)
    recorder.run(ids, mask)
    thresholds = torch.zeros(num_layers, len(GROUPS), len(LEVELS))
    errors = torch.zeros(num_layers, len(GROUPS), len(LEVELS))
    sizes = torch.zeros(num_layers, len(GROUPS))
    for (layer, group), x in recorder.inputs.items():
        g = GROUPS.index(group)
        thresholds[layer, g] = level_thresholds(x.abs()).cpu()
        weight = _weights(engine, layer, group)
        sizes[layer, g] = weight.numel()
        if not probes:
            # Every input alike: a cost per weight that grows with the share dropped, the same curve for
            # every matrix, so the greedy allocation drops the same share of every input. (A cost that
            # grew linearly would cost the same per weight at every level, and the allocation, taking
            # the largest savings first, would empty the largest matrix's input before touching the rest.)
            errors[layer, g] = torch.tensor(LEVELS) ** 2 * weight.numel()
            continue
        sample = x[torch.linspace(0, len(x) - 1, min(len(x), ERROR_TOKENS), device=x.device).long()]
        errors[layer, g] = relative_errors(sample, weight, thresholds[layer, g].to(x.device))
    del recorder
    bar.update()
    if not probes:
        bar.close()
        damage = torch.cummax(errors, dim=-1).values
        return TokenProfile(thresholds, damage, sizes, model_fingerprint(engine), {"probes": False})

    # 2. Importance: KL from dense with one input sparsified at the probe level, prompt dense.
    probe_set = _ProbeSet(engine, prompts, [list(c)[:PROBE_TOKENS] for c in continuations])
    dense_logp = torch.log_softmax(probe_set.logits(None).float(), -1)
    probe = LEVELS.index(PROBE_LEVEL)
    importance = torch.zeros(num_layers, len(GROUPS))
    for layer in range(num_layers):
        for g, group in enumerate(GROUPS):
            values = torch.zeros(num_layers, len(GROUPS))
            values[layer, g] = thresholds[layer, g, probe]
            session = engine.token_session(TokenThresholds(values, 1.0), len(prompts))
            importance[layer, g] = max(_kl(dense_logp, probe_set.logits(session)), 1e-12)
            bar.update()

    # 3. Cost of each level: the local error curve, scaled so the probe level costs its KL.
    curve = errors / errors[:, :, probe : probe + 1].clamp_min(1e-12)
    damage = torch.cummax(importance.unsqueeze(-1) * curve, dim=-1).values  # never cheaper to drop more
    damage[:, :, 0] = 0.0
    meta = {"prompts": len(prompts), "answer_tokens": int(sum(len(c) for c in continuations)),
            "probe_level": PROBE_LEVEL, "probe_tokens": PROBE_TOKENS, "importance": importance.tolist()}
    profile = TokenProfile(thresholds, damage, sizes, model_fingerprint(engine), meta)

    # 4. What each allocated level keeps of the model's own answers: keep="auto" picks from this.
    meta["agreement"] = measure_agreement(engine, profile, probe_set, dense_logp.argmax(-1), bar)
    bar.close()
    return profile


def measure_agreement(engine: "Engine", profile: TokenProfile, probe_set: "_ProbeSet", dense_top: torch.Tensor, bar=None) -> dict:
    """Top-1 agreement with the dense model of every ``AGREEMENT_KEEPS`` level, per targets (``"ffn:0.7"``)."""
    agreement = {}
    for targets in TARGETS:
        for keep in AGREEMENT_KEEPS:
            session = engine.token_session(profile.allocate(keep, targets), len(probe_set.cont))
            agreement[f"{targets}:{keep}"] = float((probe_set.logits(session).argmax(-1) == dense_top).float().mean())
            if bar is not None:
                bar.update()
    return agreement


class _ProbeSet:
    """The calibration answers scored teacher-forced after their densely prefilled prompts."""

    def __init__(self, engine: "Engine", prompts, continuations):
        self.engine = engine
        self.mask = engine.left_pad(prompts)[1]
        ids = engine.left_pad(prompts)[0]
        _, self.cache = engine.prefill(ids, self.mask, None)
        width = max(len(c) for c in continuations)
        cont = torch.full((len(prompts), width), engine.pad_id(), dtype=torch.long)
        self.scored = torch.zeros(len(prompts), width, dtype=torch.bool)
        for row, c in enumerate(continuations):
            cont[row, : len(c)] = torch.tensor(list(c))
            self.scored[row, : len(c) - 1] = True  # the logits after token t predict t + 1
        self.cont = cont.to(engine.device)
        self.scored = self.scored.to(engine.device)
        self.positions = self.mask.sum(-1, keepdim=True) + torch.arange(width, device=engine.device)

    def logits(self, session: Optional[TokenSession]) -> torch.Tensor:
        """Logits at the scored positions ``[P, V]``, densely or under ``session``."""
        full_mask = torch.cat([self.mask, torch.ones_like(self.cont)], dim=1)
        cache = copy.deepcopy(self.cache)
        if session is None:
            logits, _ = self.engine._forward(self.cont, full_mask, self.positions, cache, logits_to_keep=0)
        else:
            with session.decode_phase():
                logits, _ = self.engine._forward(self.cont, full_mask, self.positions, cache, logits_to_keep=0)
        return logits[self.scored]
