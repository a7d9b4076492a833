"""``keep="auto"``: choose each request's FFN density from a dense warm-up of its own answer.

Measured, not tabulated: the loop decodes the answer's first ``warmup`` tokens densely, then

1. one dense forward over prompt + warm-up records every layer's activations and the dense
   model's prediction at each warm-up position (and gives the cache decoding continues from);
2. for a candidate keep, the core neurons are selected from prompt + warm-up (so the answer's own
   tokens vote), and the sparse model re-reads the warm-up teacher-forced from the prompt's dense
   cache; it passes if its top-1 predictions match the dense ones on at least ``quality`` of the
   warm-up positions;
3. the lowest passing candidate (binary search: agreement grows with keep) decodes the rest of the
   answer; if none passes, the rest stays dense.

A batch shares one keep (compact weights need one size per layer): the lowest that every
unfinished sequence passes.

This is sentence-level ``keep="auto"``. Token-level ``keep="auto"`` (the default) needs no
warm-up: ``Engine.resolve`` takes the model's calibrated level for the request's ``quality``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace
from typing import Optional, Sequence

import torch

from ..config import AUTO_CANDIDATES
from .reference import ReferenceBackend


@dataclass
class AutoChoice:
    keep: float  # 1.0 when no candidate passed (the rest is dense)
    session: Optional[object]  # the SparseSession decoding continues with; None for dense
    logits: torch.Tensor  # [B, V]: dense next-token logits after prompt + warm-up
    cache: object  # dense HF cache over prompt + warm-up
    mask: torch.Tensor  # [B, T'] attention mask of prompt + warm-up
    dense_warm: list[torch.Tensor]  # per sequence, dense logits predicting warm-up tokens 1.. [W_b - 1, V]
    agreement: dict[float, float] = field(default_factory=dict)  # candidate -> worst sequence's agreement


@torch.inference_mode()
def choose_keep(
    engine,
    prompts: Sequence[Sequence[int]],
    warm: Sequence[Sequence[int]],
    sparsity,
    prompt_cache,
    prompt_mask: torch.Tensor,
    live: Optional[Sequence[bool]] = None,
    candidates: Sequence[float] = AUTO_CANDIDATES,
) -> AutoChoice:
    """The lowest candidate keep whose sparse model reproduces the dense warm-up predictions.

    ``warm[b]`` are sequence ``b``'s warm-up tokens (fed after its prompt); ``live[b]`` says
    whether it still decodes (finished sequences do not vote). ``prompt_cache`` is the dense cache
    after the prompts alone; it is copied, never changed.
    """
    live = list(live) if live is not None else [True] * len(prompts)
    ids, mask = engine.left_pad([list(p) + list(w) for p, w in zip(prompts, warm)])
    logits_all, cache, acts = engine.record_activations(ids, mask)
    width = ids.shape[1]
    # Dense predictions of warm-up tokens 1.. (token 0 came from the prompt's dense prefill).
    dense_warm = [logits_all[b, width - len(w) : width - 1] for b, w in enumerate(warm)]
    dense = [d.argmax(-1) for d in dense_warm]
    feed = torch.full((len(warm), max(len(w) for w in warm) - 1), engine.pad_id(), dtype=torch.long)
    for b, w in enumerate(warm):
        feed[b, : len(w) - 1] = torch.tensor(list(w[:-1]), dtype=torch.long)
    feed = feed.to(ids.device)
    masked = ReferenceBackend(engine, masked=True)
    agreement: dict[float, float] = {}

    def passes(keep: float):
        session = engine.select_from(acts, replace(sparsity, keep=keep), mask)
        state = masked.start(session, copy.deepcopy(prompt_cache), prompt_mask, 0)
        logits = engine.score_continuation(state, masked, feed)
        scores = [
            (logits[b, : len(d)].argmax(-1) == d).float().mean().item() if len(d) else 1.0
            for b, d in enumerate(dense)
            if live[b]
        ]
        agreement[keep] = min(scores, default=1.0)
        return session if agreement[keep] >= sparsity.quality else None

    # Agreement grows with keep (more neurons, closer to dense), so a binary search over the sorted
    # candidates finds the lowest passing one in ~log2(n) sparse passes instead of n.
    ordered = sorted(candidates)
    low, high, best = 0, len(ordered) - 1, None
    while low <= high:
        middle = (low + high) // 2
        session = passes(ordered[middle])
        if session is not None:
            best, high = (ordered[middle], session), middle - 1
        else:
            low = middle + 1
    if best is None:
        return AutoChoice(1.0, None, logits_all[:, -1], cache, mask, dense_warm, agreement)
    return AutoChoice(best[0], best[1], logits_all[:, -1], cache, mask, dense_warm, agreement)
