"""Prefill -> select -> compact -> decode, with per-request state held in plain objects.

The engine names its phases instead of guessing them from tensor shapes:

1. **prefill** the prompt densely while each sparse layer records which neurons
   its prompt tokens used (``SparseSession.record``);
2. **select** each layer's core neurons per sequence with the configured rule;
3. **compact**: gather those rows and columns once (``FFNWeights.gather``);
4. **decode** with the compact weights (``SparseSession.compact``).

All state of one request lives in its ``SparseSession`` and ``_Batch``; the
model's ``SparseFFN`` modules only hold a handler while a phase runs. One
``Engine`` runs one request at a time (``Engine.lock``); concurrent callers
queue on it.
"""

from __future__ import annotations

import inspect
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Callable, Iterator, Optional, Protocol, Sequence, Union

import torch

from .adapters import wrap_model
from .loading import load_model_and_tokenizer, model_identity, resolve_model_path
from .selection import check_fraction, default_sparse_layers, get_rule
from .sparse_ffn import CompactFFN, Handler, SparseFFN


# Rules that need more than one prompt's activations (a per-model calibration):
# the engine builds their selector. For them ``keep`` is the FFN density to aim
# for, averaged over all layers, and they choose which layers are sparse.
SELECTOR_RULES = ("adaptive",)


@dataclass(frozen=True)
class SparsityConfig:
    """What to keep. ``layers=None`` means all but roughly the first and last 15 %."""

    keep: float = 0.4
    alpha: float = 0.2
    rule: str = "coreinfer"
    layers: Optional[tuple[int, ...]] = None

    def __post_init__(self) -> None:
        check_fraction("keep", self.keep)
        check_fraction("alpha", self.alpha)
        if self.rule not in SELECTOR_RULES:
            get_rule(self.rule)

    def sparse_layers(self, num_layers: int) -> tuple[int, ...]:
        if self.layers is None:
            return default_sparse_layers(num_layers)
        bad = [i for i in self.layers if not 0 <= i < num_layers]
        if bad:
            raise ValueError(f"sparse layers {bad} out of range for a model with {num_layers} layers")
        return tuple(sorted(set(self.layers)))


@dataclass(frozen=True)
class SamplingConfig:
    """Decoding settings. ``temperature=0`` is greedy."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    seed: Optional[int] = None
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must lie in (0, 1], got {self.top_p}")


class Selector(Protocol):
    """Chooses one layer's kept neurons from one sequence's prompt activations ``[T, N]``.

    Returns sorted neuron indices ``[K]``. K may differ between layers but not
    between the sequences of a batch.
    """

    def __call__(self, layer: int, acts: torch.Tensor) -> torch.Tensor: ...


def finalize_selection(selector: Selector, neurons: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
    """Let a selector revise every layer's choice once the whole prompt has been seen.

    A selector may define ``finalize(neurons) -> neurons`` (``{layer: [B, K]}``):
    similarity-guided selection uses it to swap in its cluster's sets once the
    prompt's features at the clustering layer are known.
    """
    finalize = getattr(selector, "finalize", None)
    return finalize(neurons) if finalize is not None else neurons


@dataclass(frozen=True)
class RuleSelector:
    """The default selector: one rule from ``selection.RULES`` with one keep for every layer."""

    rule: str
    keep: float
    alpha: float

    def __call__(self, layer: int, acts: torch.Tensor) -> torch.Tensor:
        return get_rule(self.rule)(acts, self.keep, self.alpha)


class SparseSession:
    """One request's sparse state: its core neurons and compact weights, per layer.

    ``neurons[layer]`` is ``[B, K]``: each sequence's kept neurons, selected
    from its own (unpadded) prompt tokens by ``selector`` (by default the
    config's rule; calibrated or static selectors plug in here).
    """

    def __init__(
        self,
        config: SparsityConfig,
        ffns: Sequence[SparseFFN],
        prompt_mask: torch.Tensor,
        selector: Optional[Selector] = None,
    ):
        self.config = config
        self.ffns = list(ffns)
        self.layers = config.sparse_layers(len(self.ffns))
        self.prompt_mask = prompt_mask.bool()  # [B, T]
        self.selector = selector or RuleSelector(config.rule, config.keep, config.alpha)
        self.neurons: dict[int, torch.Tensor] = {}
        self.compacts: dict[int, CompactFFN] = {}

    @property
    def batch_size(self) -> int:
        return self.prompt_mask.shape[0]

    def _batched(self, x: torch.Tensor) -> torch.Tensor:
        return x if x.dim() == 3 else x.view(self.batch_size, -1, x.shape[-1])

    # Handlers, one per phase. Each takes and returns the FFN's input/output shapes.

    def record(self, ffn: SparseFFN, x: torch.Tensor) -> torch.Tensor:
        weights = ffn.weights
        acts = weights.activations(self._batched(x))  # [B, T, N]
        layer = ffn.layer_idx
        chosen = [self.selector(layer, acts[b, self.prompt_mask[b]]) for b in range(self.batch_size)]
        self.neurons[layer] = torch.stack(chosen)
        return weights.project_down(acts).view(*x.shape[:-1], -1)

    def compact(self, ffn: SparseFFN, x: torch.Tensor) -> torch.Tensor:
        return self.compacts[ffn.layer_idx](self._batched(x)).view_as(x)

    def masked(self, ffn: SparseFFN, x: torch.Tensor) -> torch.Tensor:
        """Reference for ``compact``: the dense FFN with unkept neurons zeroed."""
        weights = ffn.weights
        mask = torch.zeros(self.batch_size, weights.num_neurons, device=x.device)
        mask.scatter_(1, self.neurons[ffn.layer_idx], 1.0)
        return weights.masked(self._batched(x), mask).view_as(x)

    def build_compacts(self) -> None:
        """Gather each sparse layer's core rows and columns once, per sequence."""
        self.compacts = {layer: self.ffns[layer].weights.gather(self.neurons[layer]) for layer in self.layers}

    @contextmanager
    def phase(self, handler: Handler):
        """Route the sparse layers through ``handler`` (a bound method of this session)."""
        try:
            for layer in self.layers:
                self.ffns[layer].handler = handler
            yield
        finally:
            for layer in self.layers:
                self.ffns[layer].handler = None

    def ffn_density(self) -> float:
        """Fraction of the FFN's multiply-adds computed per decoded token, averaged over all layers."""
        fractions = [1.0] * len(self.ffns)
        for layer in self.layers:
            fractions[layer] = self.neurons[layer].shape[1] / self.ffns[layer].weights.num_neurons
        return sum(fractions) / len(fractions)


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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Engine:
    """A causal LM wrapped for CoreInfer decoding.

    >>> engine = coreinfer.load()                       # default model
    >>> engine.generate("Why is the sky blue?", sparsity=SparsityConfig(keep=0.4))
    """

    def __init__(self, model, tokenizer=None, name: str = "model"):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name
        self.ffns = wrap_model(model)
        self.lock = threading.RLock()  # re-entrant: calibration runs inside a request
        self._calibration = None
        params = inspect.signature(model.forward).parameters
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def num_layers(self) -> int:
        return len(self.ffns)

    def eos_ids(self) -> set[int]:
        ids = self.model.generation_config.eos_token_id if self.model.generation_config else None
        if ids is None:
            ids = self.model.config.eos_token_id
        ids = set(ids if isinstance(ids, (list, tuple)) else [ids] if ids is not None else [])
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return ids

    def pad_id(self) -> int:
        for candidate in (
            getattr(self.tokenizer, "pad_token_id", None),
            self.model.config.pad_token_id,
            *sorted(self.eos_ids()),
        ):
            if candidate is not None:
                return int(candidate)
        return 0

    # Text <-> ids

    def uses_chat(self, chat: Optional[bool]) -> bool:
        has_template = bool(getattr(self.tokenizer, "chat_template", None))
        if chat and not has_template:
            raise ValueError("this model's tokenizer has no chat template; use chat=False")
        return has_template if chat is None else chat

    def encode(self, prompt: str, chat: Optional[bool] = None) -> list[int]:
        if self.tokenizer is None:
            raise ValueError("this engine has no tokenizer; pass token ids to generate_ids()")
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError("the prompt is empty")
        if self.uses_chat(chat):
            return self.encode_chat([{"role": "user", "content": prompt}])
        return self.tokenizer(prompt)["input_ids"]

    def encode_chat(self, messages: Sequence[dict]) -> list[int]:
        """A whole conversation (``[{"role", "content"}, ...]``) in the chat template, ready for the reply."""
        if self.tokenizer is None:
            raise ValueError("this engine has no tokenizer; pass token ids to generate_ids()")
        if not messages:
            raise ValueError("no messages given")
        self.uses_chat(True)
        text = self.tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def decode_text(self, ids: Sequence[int]) -> str:
        if self.tokenizer is None:
            return ""
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    # Batched forward passes

    def _left_pad(self, prompts: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        if not prompts:
            raise ValueError("no prompts given")
        if any(len(p) == 0 for p in prompts):
            raise ValueError("the prompt is empty (no tokens)")
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id(), dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids[row, width - len(prompt):] = torch.tensor(list(prompt), dtype=torch.long)
            mask[row, width - len(prompt):] = 1
        return ids.to(self.device), mask.to(self.device)

    def _forward(self, ids, mask, positions, cache, logits_to_keep: int = 1):
        # transformers 5.x renamed past_key_values to cache; accept both generations.
        cache_kw = {self._cache_kwarg: cache} if cache is not None else {}
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            logits_to_keep=logits_to_keep,
            **cache_kw,
        )
        new_cache = getattr(out, "cache", None)
        return out.logits, new_cache if new_cache is not None else out.past_key_values

    def new_session(
        self, sparsity: Optional[SparsityConfig], mask: torch.Tensor, selector: Optional[Selector] = None
    ) -> Optional[SparseSession]:
        """A request's sparse state, or ``None`` for dense decoding."""
        if sparsity is None:
            if selector is not None:
                raise ValueError("a selector needs a SparsityConfig (it names the sparse layers)")
            return None
        if sparsity.rule == "adaptive" and selector is None:
            selector = self.adaptive_selector(sparsity.keep)
            sparsity = replace(sparsity, layers=selector.sparse_layers())
        return SparseSession(sparsity, self.ffns, mask, selector)

    def adaptive_selector(self, density: float, prior_weight: Optional[float] = None):
        """The calibrated adaptive selector for an FFN density target (calibrating on first use)."""
        from .adaptive import DEFAULT_PRIOR_WEIGHT, AdaptiveSelector, allocate_budgets

        calibration = self.calibration()
        keeps = allocate_budgets(calibration.sensitivity, density)
        weight = DEFAULT_PRIOR_WEIGHT if prior_weight is None else prior_weight
        return AdaptiveSelector(tuple(keeps), calibration.prior, weight)

    def calibration(self, prompts=None, continuations=None, progress: bool = True):
        """This model's adaptive calibration: loaded from the cache, else measured once and stored.

        ``prompts``/``continuations`` (token ids) replace the built-in calibration text.
        """
        if self._calibration is None:
            from .adaptive import Calibration, calibrate, model_fingerprint, shipped_calibration_dir
            from .loading import cache_root

            fingerprint = model_fingerprint(self)
            directory = cache_root() / "calibration" / fingerprint
            # The default model's calibration ships with the package, so its first use is instant.
            for candidate in (directory, shipped_calibration_dir(fingerprint)):
                try:
                    self._calibration = Calibration.load(candidate, expect_model=fingerprint)
                    break
                except (OSError, ValueError, KeyError):
                    continue
            else:
                self._calibration = calibrate(self, prompts, continuations, progress=progress)
                self._calibration.save(directory)
        return self._calibration

    @torch.inference_mode()
    def core_neurons(
        self,
        prompts: Sequence[Sequence[int]],
        sparsity: SparsityConfig,
        selector: Optional[Selector] = None,
    ) -> SparseSession:
        """Prefill only: each prompt's selected neurons per sparse layer, in ``session.neurons``."""
        with self.lock:
            ids, mask = self._left_pad(prompts)
            session = self.new_session(sparsity, mask, selector)
            self.prefill(ids, mask, session)
            return session

    def prefill(self, ids, mask, session: Optional[SparseSession], logits_to_keep: int = 1):
        """Dense forward over the prompt; a session records and selects its core neurons."""
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        if session is None:
            return self._forward(ids, mask, positions, None, logits_to_keep)
        with session.phase(session.record):
            logits, cache = self._forward(ids, mask, positions, None, logits_to_keep)
        session.neurons = finalize_selection(session.selector, session.neurons)
        return logits, cache

    # Generation

    @torch.inference_mode()
    def generate_ids(
        self,
        prompts: Sequence[Sequence[int]],
        sparsity: Optional[SparsityConfig] = None,
        sampling: SamplingConfig = SamplingConfig(),
        on_token: Optional[Callable[[TokenEvent], None]] = None,
        reference: bool = False,
        selector: Optional[Selector] = None,
    ) -> list[GenerationResult]:
        """Generate for a batch of token-id prompts; ``sparsity=None`` decodes densely.

        ``reference=True`` decodes with the masked dense FFN instead of compact
        weights: slower, same numbers, for tests.
        """
        with self.lock:
            return self._generate(prompts, sparsity, sampling, on_token, reference, selector)

    def _generate(self, prompts, sparsity, sampling, on_token, reference, selector) -> list[GenerationResult]:
        device = self.device
        ids, mask = self._left_pad(prompts)
        seqs = [_Sequence(len(p), self._generator(sampling.seed)) for p in prompts]
        eos = self.eos_ids()

        start = time.perf_counter()
        session = self.new_session(sparsity, mask, selector)
        logits, cache = self.prefill(ids, mask, session)
        _sync(device)
        prefill_s = time.perf_counter() - start

        start = time.perf_counter()
        if session is not None and not reference:
            session.build_compacts()
        _sync(device)
        select_s = time.perf_counter() - start

        start = time.perf_counter()
        positions = (mask.sum(-1, keepdim=True) - 1)  # [B, 1]
        steps = 0
        while True:
            next_ids = self._advance(seqs, logits[:, -1, :], sampling, eos, on_token)
            if all(s.finish_reason for s in seqs):
                break
            steps += 1
            positions = positions + 1
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
            step_input = torch.tensor(next_ids, device=device).unsqueeze(1)
            if session is None:
                logits, cache = self._forward(step_input, mask, positions, cache)
            else:
                with session.phase(session.masked if reference else session.compact):
                    logits, cache = self._forward(step_input, mask, positions, cache)
        _sync(device)
        decode_s = time.perf_counter() - start

        density = session.ffn_density() if session is not None else 1.0
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
                ffn_density=density,
                keep=sparsity.keep if sparsity is not None else None,
            )
            for s in seqs
        ]

    @torch.inference_mode()
    def continuation_logits(
        self,
        prompts: Sequence[Sequence[int]],
        continuations: Sequence[Sequence[int]],
        sparsity: Optional[SparsityConfig] = None,
        reference: bool = False,
        selector: Optional[Selector] = None,
    ) -> tuple[list[torch.Tensor], Optional[SparseSession]]:
        """Teacher-forced logits predicting each continuation token, ``[len(cont), V]`` each.

        The prompt is prefilled densely and selects the core neurons; the
        continuation is then scored by the sparse model in one forward pass,
        exactly as decoding would see it token by token.
        """
        if len(prompts) != len(continuations):
            raise ValueError("need one continuation per prompt")
        if any(len(c) == 0 for c in continuations):
            raise ValueError("a continuation is empty")
        with self.lock:
            ids, mask = self._left_pad(prompts)
            session = self.new_session(sparsity, mask, selector)
            first, cache = self.prefill(ids, mask, session)
            if session is not None and not reference:
                session.build_compacts()
            width = max(len(c) for c in continuations)
            cont = torch.full((len(prompts), width), self.pad_id(), dtype=torch.long)
            for row, c in enumerate(continuations):
                cont[row, : len(c)] = torch.tensor(list(c))
            cont = cont.to(self.device)
            # Right padding after the continuation cannot affect earlier positions.
            full_mask = torch.cat([mask, torch.ones_like(cont)], dim=1)
            positions = mask.sum(-1, keepdim=True) + torch.arange(width, device=self.device)
            if session is None:
                logits, _ = self._forward(cont, full_mask, positions, cache, logits_to_keep=0)
            else:
                with session.phase(session.masked if reference else session.compact):
                    logits, _ = self._forward(cont, full_mask, positions, cache, logits_to_keep=0)
            logits = torch.cat([first[:, -1:, :], logits[:, :-1, :]], dim=1)
            return [logits[row, : len(c)] for row, c in enumerate(continuations)], session

    def _generator(self, seed: Optional[int]) -> Optional[torch.Generator]:
        # One generator per sequence, each seeded alike, so a batch samples what singles would.
        if seed is None:
            return None
        return torch.Generator().manual_seed(seed)

    def _advance(self, seqs, last_logits, sampling, eos, on_token) -> list[int]:
        """Choose each unfinished sequence's next token and update its text and status."""
        next_ids = []
        for index, seq in enumerate(seqs):
            if seq.finish_reason:
                next_ids.append(self.pad_id())
                continue
            token = sample_next(last_logits[index], sampling, seq.generator)
            next_ids.append(token)
            previous_text = seq.text
            if token in eos:
                seq.finish_reason = "eos"
            else:
                seq.ids.append(token)
                seq.text = self.decode_text(seq.ids)
                cut = _find_stop(seq.text, sampling.stop)
                if cut is not None:
                    seq.text, seq.finish_reason = seq.text[:cut], "stop"
                elif len(seq.ids) >= sampling.max_new_tokens:
                    seq.finish_reason = "length"
            if on_token is not None:
                delta = seq.text[len(previous_text):] if seq.text.startswith(previous_text) else seq.text
                on_token(TokenEvent(index, token, delta, bool(seq.finish_reason)))
        return next_ids

    def generate(
        self,
        prompt: Union[str, Sequence[str]],
        sparsity: Optional[SparsityConfig] = None,
        sampling: SamplingConfig = SamplingConfig(),
        chat: Optional[bool] = None,
        on_token: Optional[Callable[[TokenEvent], None]] = None,
    ) -> Union[GenerationResult, list[GenerationResult]]:
        """Generate from one prompt (returns one result) or a list (returns a list)."""
        single = isinstance(prompt, str)
        prompts = [prompt] if single else list(prompt)
        results = self.generate_ids([self.encode(p, chat) for p in prompts], sparsity, sampling, on_token)
        return results[0] if single else results

    def stream(
        self,
        prompt: str,
        sparsity: Optional[SparsityConfig] = None,
        sampling: SamplingConfig = SamplingConfig(),
        chat: Optional[bool] = None,
    ) -> Iterator[str]:
        """Yield the text of one prompt's completion piece by piece as tokens are produced."""
        events: list[TokenEvent] = []
        done = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            try:
                self.generate(prompt, sparsity, sampling, chat, on_token=events.append)
            except BaseException as err:  # re-raised in the caller's thread
                failure.append(err)
            finally:
                done.set()

        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        sent = 0
        while not (done.is_set() and sent == len(events)):
            if sent < len(events):
                event = events[sent]
                sent += 1
                if event.text:
                    yield event.text
            else:
                done.wait(0.005)
        worker.join()
        if failure:
            raise failure[0]


def _find_stop(text: str, stops: Sequence[str]) -> Optional[int]:
    hits = [text.find(s) for s in stops if s and s in text]
    return min(hits) if hits else None


def load(
    model: Union[str, None] = None,
    device: Union[str, torch.device, None] = None,
    dtype: Optional[torch.dtype] = torch.float32,
    memory_limit: bool = False,
) -> Engine:
    """Load a model directory, a GGUF file, or (``None``) the default SmolLM2-135M-Instruct.

    ``device=None`` picks CUDA when available, else the CPU. ``memory_limit=True``
    keeps the sparse layers' FFN weights in slow memory (see ``coreinfer.offload``).
    """
    if memory_limit:
        from .offload import load_memory_limited  # offload builds on Engine, so imported late

        return load_memory_limited(model, device, dtype)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    hf_model, tokenizer, _ = load_model_and_tokenizer(model, device, dtype)
    return Engine(hf_model, tokenizer, name=model_identity(resolve_model_path(model)))
