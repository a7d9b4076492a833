"""The one decode loop: prefill -> select -> start the backend -> one token at a time.

Everything a request sees besides the numbers lives here, once, for every
backend: sampling, end-of-sequence, stop strings, streaming events, finish
reasons and timings. A backend (``DecodeBackend``) only knows how to take the
prompt's prefill into its own cache and weights (``start``) and how to run one
token per sequence through the model (``step``).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Protocol, Sequence

import torch

from ..config import SamplingConfig
from .auto import choose_keep


class DecodeBackend(Protocol):
    name: str
    weights: str
    max_length: int
    prefills: bool  # whether dense prompts prefill on the backend itself (its ``prefill``), not the HF model

    def start(self, session, hf_cache, mask: torch.Tensor, length: int): ...

    def step(self, state, tokens: torch.Tensor) -> torch.Tensor: ...


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    new_tokens: int
    finish_reason: str  # "eos", "stop" or "length"
    prefill_s: float = 0.0
    select_s: float = 0.0
    decode_s: float = 0.0
    ffn_density: float = 1.0
    keep: Optional[float] = None
    backend: str = "reference"
    weights: str = "model"
    dense_tokens: int = 0  # keep="auto": the answer's first tokens, decoded densely before the choice
    mode: str = "dense"  # what decoded the answer (after any warm-up): dense, sentence or token
    weight_share: float = 1.0  # share of all decode-time weights (attention, FFN, LM head) read per token

    @property
    def decode_tok_s(self) -> float:
        """Tokens per second after the first (which comes from the prefill logits)."""
        steps = self.new_tokens - 1
        return steps / self.decode_s if steps > 0 and self.decode_s > 0 else 0.0

    def to_dict(self) -> dict:
        return {
            "text": self.text,
            "prompt_tokens": self.prompt_tokens,
            "new_tokens": self.new_tokens,
            "finish_reason": self.finish_reason,
            "prefill_s": round(self.prefill_s, 5),
            "select_s": round(self.select_s, 5),
            "decode_s": round(self.decode_s, 5),
            "decode_tok_s": round(self.decode_tok_s, 3),
            "keep": self.keep,
            "ffn_density": round(self.ffn_density, 5),
            "weight_share": round(self.weight_share, 5),
            "mode": self.mode,
            "backend": self.backend,
            "weights": self.weights,
            "dense_tokens": self.dense_tokens,
        }


@dataclass
class TokenEvent:
    """One generated token of one sequence, as streaming callers see it."""

    index: int
    token_id: int
    text: str  # new text since the previous event of this sequence
    finished: bool


@dataclass
class _Sequence:
    """Decoding state of one sequence of a batch."""

    prompt_len: int
    generator: Optional[torch.Generator]
    ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: Optional[str] = None


def sample_next(logits: torch.Tensor, sampling: SamplingConfig, generator: Optional[torch.Generator]) -> int:
    """Pick the next token from one row of logits ``[V]``: greedy, or temperature + top-p."""
    if sampling.temperature == 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / sampling.temperature, dim=-1)
    if sampling.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        outside = torch.cumsum(sorted_probs, -1) - sorted_probs > sampling.top_p
        sorted_probs[outside] = 0.0
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


def pick_tokens(logits: torch.Tensor, sampling: SamplingConfig, seqs: Sequence[_Sequence]) -> list[int]:
    """Next token per sequence; greedy stays one batched argmax."""
    if sampling.temperature == 0:
        return logits.argmax(-1).tolist()
    return [sample_next(row, sampling, s.generator) for row, s in zip(logits, seqs)]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _find_stop(text: str, stops: Sequence[str]) -> Optional[int]:
    hits = [text.find(s) for s in stops if s and s in text]
    return min(hits) if hits else None


class _Tracker:
    """Turns chosen tokens into each sequence's ids, text, finish reason and streaming events."""

    def __init__(self, engine, seqs, sampling: SamplingConfig, eos: set[int], on_token):
        self.engine, self.seqs, self.sampling, self.eos, self.on_token = engine, seqs, sampling, eos, on_token
        # Text is decoded per token only when someone reads it before the end.
        self.live_text = on_token is not None or bool(sampling.stop)

    def advance(self, tokens: list[int]) -> bool:
        """Record one token per sequence; returns whether every sequence has finished."""
        for index, (seq, token) in enumerate(zip(self.seqs, tokens)):
            if seq.finish_reason:
                continue
            previous_text = seq.text
            if token in self.eos:
                seq.finish_reason = "eos"
            else:
                seq.ids.append(token)
                if self.live_text:
                    seq.text = self.engine.decode_text(seq.ids)
                    cut = _find_stop(seq.text, self.sampling.stop)
                    if cut is not None:
                        seq.text, seq.finish_reason = seq.text[:cut], "stop"
                if not seq.finish_reason and len(seq.ids) >= self.sampling.max_new_tokens:
                    seq.finish_reason = "length"
            if self.on_token is not None:
                delta = seq.text[len(previous_text):] if seq.text.startswith(previous_text) else seq.text
                self.on_token(TokenEvent(index, token, delta, bool(seq.finish_reason)))
        return all(s.finish_reason for s in self.seqs)

    def finish(self) -> None:
        if not self.live_text:
            for seq in self.seqs:
                seq.text = self.engine.decode_text(seq.ids)


def generate(
    engine,
    backend: DecodeBackend,
    prompts: Sequence[Sequence[int]],
    sparsity=None,
    sampling: SamplingConfig = SamplingConfig(),
    on_token: Optional[Callable[[TokenEvent], None]] = None,
    selector=None,
    ignore_eos: bool = False,
) -> list[GenerationResult]:
    """Generate for a batch of token-id prompts on ``backend``; the caller holds ``engine.lock``.

    ``ignore_eos`` always produces ``max_new_tokens`` tokens (benchmarks).
    """
    device = engine.device
    ids, mask = engine.left_pad(prompts)
    seqs = [_Sequence(len(p), engine.generator(sampling.seed)) for p in prompts]
    tracker = _Tracker(engine, seqs, sampling, set() if ignore_eos else engine.eos_ids(), on_token)

    auto = sparsity is not None and sparsity.auto  # sentence-level: token-level auto is resolved per model
    if auto and sparsity.token:
        raise ValueError('token-level keep="auto" is resolved by Engine.resolve before decoding')
    if auto and selector is not None:
        raise ValueError('keep="auto" chooses the keep itself; it does not take a custom selector')

    start = time.perf_counter()
    session = None if auto else engine.new_session(sparsity, mask, selector)
    # keep="auto" re-prefills from the HF cache after its warm-up, so its prompt stays on the HF model.
    logits, hf_cache = engine.prefill(ids, mask, session, backend=None if auto else backend)
    prompt_cache = copy.deepcopy(hf_cache) if auto else None  # the reference backend grows hf_cache
    sync(device)
    prefill_s = time.perf_counter() - start

    start = time.perf_counter()
    state = backend.start(session, hf_cache, mask, ids.shape[1] + sampling.max_new_tokens)
    del hf_cache  # the backend holds what it needs; the lean one has copied it
    sync(device)
    select_s = time.perf_counter() - start

    start = time.perf_counter()
    logits = logits[:, -1, :]
    pad = engine.pad_id()
    # keep="auto" decides once, after the warm-up; until then (or if the answer ends first) it is dense.
    keep = 1.0 if auto else sparsity.keep if sparsity is not None else None
    warming = auto
    while True:
        tokens = pick_tokens(logits, sampling, seqs)
        if tracker.advance(tokens):
            break
        if warming and max(len(s.ids) for s in seqs) >= sparsity.warmup:
            # Warm-up done: measure the density this answer allows, then decode the rest with it.
            warming = False
            chosen = time.perf_counter()
            live = [not s.finish_reason for s in seqs]
            choice = choose_keep(engine, prompts, [s.ids for s in seqs], sparsity, prompt_cache, mask, live=live)
            session, keep, logits = choice.session, choice.keep, choice.logits
            remaining = sampling.max_new_tokens - sparsity.warmup + 1
            state = backend.start(session, choice.cache, choice.mask, choice.mask.shape[1] + remaining)
            select_s += time.perf_counter() - chosen
            start += time.perf_counter() - chosen  # decode time excludes the choice
            continue
        feed = [pad if s.finish_reason else t for s, t in zip(seqs, tokens)]
        logits = backend.step(state, torch.tensor(feed, device=device))
    sync(device)
    decode_s = time.perf_counter() - start
    tracker.finish()

    results = results_for(engine, backend, seqs, session, prefill_s, select_s, decode_s, keep)
    if auto:
        for result in results:
            result.dense_tokens = min(sparsity.warmup, result.new_tokens)
    return results


def results_for(engine, backend: DecodeBackend, seqs: Sequence[_Sequence], session, prefill_s: float,
                select_s: float, decode_s: float, keep: Optional[float]) -> list[GenerationResult]:
    """Each finished sequence's ``GenerationResult``, with the weights its session read."""
    mode = "dense" if session is None else session.mode
    return [
        GenerationResult(
            text=s.text,
            token_ids=s.ids,
            prompt_tokens=s.prompt_len,
            new_tokens=len(s.ids),
            finish_reason=s.finish_reason or "length",
            prefill_s=prefill_s,
            select_s=select_s,
            decode_s=decode_s,
            ffn_density=_share(session, row, "ffn_density"),
            weight_share=_share(session, row, "weight_share", engine),
            keep=keep,
            backend=backend.name,
            weights=backend.weights,
            mode=mode,
        )
        for row, s in enumerate(seqs)
    ]


def _share(session, row: int, measure: str, engine=None) -> float:
    """One sequence's share of weights read per decode step (``ffn_density`` or ``weight_share``).

    A token-level session counts what its own steps read; a sentence-level one reads a fixed share.
    """
    if session is None:
        return 1.0
    if session.mode == "token":
        return getattr(session, measure)(row)
    density = session.ffn_density()
    return density if measure == "ffn_density" else engine.weight_share(density)


def forced_logits(backend: DecodeBackend, state, tokens: torch.Tensor) -> torch.Tensor:
    """Teacher forcing one step at a time: feed ``tokens`` ``[B, W]``, return the logits after each ``[B, W, V]``.

    Exactly what decoding computes when it happens to choose these tokens.
    """
    return torch.stack([backend.step(state, tokens[:, t]) for t in range(tokens.shape[1])], dim=1)
