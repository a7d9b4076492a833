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
import json
import threading
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterator, Optional, Protocol, Sequence, Union

import torch

from . import adaptive
from .adapters import attention_inputs, wrap_model
from .config import SELECTOR_RULES, SamplingConfig, SparsityConfig
from .decode import loop
from .decode.lean import SUPPORTED_TYPES as LEAN_TYPES
from .decode.lean import LeanBackend, LeanModel
from .decode.auto import choose_keep
from .decode.loop import DecodeBackend, GenerationResult, TokenEvent, forced_logits, sample_next
from .decode.reference import ReferenceBackend
from .decode.weights import auto_gathers, check_weights, default_weights, gather_kernel
from .loading import cache_root, cached_tensors, gguf_int4_cache
from .process_memory import release_file_pages
from .selection import get_rule, top_neurons, wina_scores
from .sparse_ffn import CompactFFN, Handler, SparseFFN
from .token_calibration import calibrate_tokens
from .token_session import TokenSession
from .token_sparsity import GROUPS, TokenProfile, TokenThresholds

BACKENDS = ("auto", "lean", "reference")
# Token-level keep="auto" decodes densely unless the sparse step is at least this much faster (Engine.token_pays).
TOKEN_SPEEDUP = 1.1

__all__ = [
    "BACKENDS",
    "Engine",
    "GenerationResult",
    "RuleSelector",
    "SamplingConfig",
    "Selector",
    "SparseSession",
    "SparsityConfig",
    "TokenEvent",
    "sample_next",
]


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


class ActivationRecorder:
    """A selector that keeps every layer's activations per sequence (``acts[layer][b]``) and selects all."""

    def __init__(self) -> None:
        self.acts: dict[int, list[torch.Tensor]] = {}

    def __call__(self, layer: int, acts: torch.Tensor) -> torch.Tensor:
        self.acts.setdefault(layer, []).append(acts)
        return torch.arange(acts.shape[-1], device=acts.device)


@dataclass(frozen=True)
class RuleSelector:
    """The default selector: one rule from ``selection.RULES`` with one keep for every layer."""

    rule: str
    keep: float
    alpha: float

    def __call__(self, layer: int, acts: torch.Tensor) -> torch.Tensor:
        return get_rule(self.rule)(acts, self.keep, self.alpha)


@dataclass(frozen=True)
class WinaSelector:
    """WINA-style ranking: GRIFFIN's statistic over activations weighted by the down projection's column norms."""

    column_norms: Sequence[torch.Tensor]  # per layer, [N]
    keep: float

    def __call__(self, layer: int, acts: torch.Tensor) -> torch.Tensor:
        return top_neurons(wina_scores(acts, self.column_norms[layer]), self.keep)


class SparseSession:
    """One request's sentence-level sparse state: its core neurons and compact weights, per layer.

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

    mode = "sentence"

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

    def decode_phase(self, masked: bool = False):
        """The decode-time handler on the sparse layers: compact weights, or their masked dense reference."""
        return self.phase(self.masked if masked else self.compact)

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


def auto_reads_rows(backend: DecodeBackend) -> bool:
    """Whether token-level ``keep="auto"`` may decode sparsely on ``backend``: the reference backend
    masks; the lean one where its format gathers rows and that was measured to pay
    (``decode.weights.auto_gathers``: fp32, bf16 and int4, not int8)."""
    return backend.name != "lean" or auto_gathers(backend.weights, backend.model.device)


class Engine:
    """A causal LM wrapped for CoreInfer decoding.

    >>> engine = coreinfer.load()                       # default model
    >>> engine.generate("Why is the sky blue?", sparsity=SparsityConfig(keep=0.4))

    ``backend`` chooses how tokens are decoded: ``"lean"`` (fused weights, static
    cache; Llama, Mistral, Qwen2, Qwen3), ``"reference"`` (the HF modules, any family),
    or ``"auto"``: lean where it applies. ``weights`` is the lean backend's weight
    format, ``"auto"`` meaning ``decode.weights.default_weights`` for the device and source.
    """

    def __init__(self, model, tokenizer=None, name: str = "model", backend: str = "auto", weights: str = "auto",
                 gguf: Optional[Path] = None):
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
        if weights != "auto":
            check_weights(weights)
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name
        self.ffns = wrap_model(model)
        self.lock = threading.RLock()  # re-entrant: calibration runs inside a request
        self.backend_name = backend
        self.weights = weights
        self.gguf = gguf  # the GGUF file the model was dequantised from, if any: int4 reads its own blocks
        self._lean: dict[str, LeanBackend] = {}
        self._calibration = None
        self._token_profile: Optional[TokenProfile] = None
        self._attention: Optional[list] = None
        self._token_speed: Optional[dict[str, float]] = None  # token_pays' verdicts, from speed.json
        self._column_norms: Optional[list[torch.Tensor]] = None
        params = inspect.signature(model.forward).parameters
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def num_layers(self) -> int:
        return len(self.ffns)

    # Backends

    def lean_supported(self) -> bool:
        return self.model.config.model_type in LEAN_TYPES

    def backend(
        self, name: Optional[str] = None, weights: Optional[str] = None, masked: bool = False, length: int = 0
    ) -> DecodeBackend:
        """The decode backend a request runs on: ``name``/``weights`` override the engine's defaults.

        ``length`` (prompt + answer tokens) lets ``auto`` fall back to the reference
        backend where the lean one cannot go (sliding windows past their span).
        """
        name = "reference" if masked else name or self.backend_name
        weights = weights or self.weights
        if name == "auto":
            # Auto may fall back to the reference backend, which runs the model's own weights.
            lean_fits = self.lean_supported() and length <= self._lean_backend(weights).max_length
            return self._lean_backend(weights) if lean_fits else ReferenceBackend(self)
        if name == "reference":
            if weights not in ("auto", "model", self.own_weights):
                raise ValueError(
                    f"the reference backend runs the model's own weights; weights={weights!r} needs backend='lean'"
                )
            return ReferenceBackend(self, masked=masked)
        if name != "lean":
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, not {name!r}")
        if not self.lean_supported():
            raise ValueError(
                f"the lean backend supports {', '.join(LEAN_TYPES)}, not {self.model.config.model_type}; "
                "use backend='reference'"
            )
        return self._lean_backend(weights)

    @property
    def own_weights(self) -> Optional[str]:
        """The lean weight format of the model's own parameters (what the reference backend runs)."""
        return {torch.float32: "fp32", torch.bfloat16: "bf16"}.get(self.model.dtype)

    def default_weights(self) -> str:
        """What ``weights="auto"`` means for this engine: ``decode.weights.default_weights``."""
        return default_weights(self.device, gguf=self.gguf is not None)

    def _lean_backend(self, weights: str) -> LeanBackend:
        if weights in ("auto", "model"):
            weights = self.default_weights()
        check_weights(weights)
        if weights not in self._lean:
            cache = gguf_int4_cache(self.gguf) if self.gguf is not None else None
            # The GGUF's blocks are checked against its dequantised cache read tensor by tensor, not
            # through this model, whose parameters map that cache: read whole, they would stay resident.
            hf_dir = cache.parent if cache is not None and (cache.parent / "config.json").is_file() else None
            reference = cached_tensors(hf_dir) if hf_dir is not None else None
            self._lean[weights] = LeanBackend(LeanModel(self.model, weights, gguf=self.gguf, gguf_cache=cache,
                                                        reference=reference))
        return self._lean[weights]

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

    def left_pad(self, prompts: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and attention mask ``[B, T]``, prompts aligned to the right."""
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

    def hidden_states(self, ids, mask, positions, cache) -> torch.Tensor:
        """The last hidden states ``[B, T, d]`` the LM head reads, continuing ``cache`` (grad-safe)."""
        cache_kw = {self._cache_kwarg: cache} if cache is not None else {}  # the base model's name is the LM's
        out = self.model.base_model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **cache_kw)
        return out.last_hidden_state

    def output_head(self) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[float]]:
        """The LM head as ``(weight [V, d], bias, softcap)``: logits = ``softcap·tanh((h·Wᵀ + b)/softcap)``."""
        head = self.model.get_output_embeddings()
        return head.weight, getattr(head, "bias", None), getattr(self.model.config, "final_logit_softcapping", None)

    def new_session(
        self, sparsity: Optional[SparsityConfig], mask: torch.Tensor, selector: Optional[Selector] = None
    ) -> Optional[SparseSession]:
        """A request's sparse state, or ``None`` for dense decoding."""
        if sparsity is None:
            if selector is not None:
                raise ValueError("a selector needs a SparsityConfig (it names the sparse layers)")
            return None
        if sparsity.auto:
            raise ValueError('keep="auto" is chosen while generating; give a number here')
        if sparsity.token:
            if getattr(self.ffns[0].weights, "offloaded", False):
                raise ValueError(
                    "memory-limited mode keeps only each prompt's core rows in fast memory; token-level sparsity "
                    "reads different rows every token: use mode='sentence' with a numeric keep"
                )
            if selector is not None:
                raise ValueError("token-level sparsity selects by calibrated thresholds; it takes no selector")
            return self.token_session(self.token_thresholds(sparsity.keep, sparsity.targets), mask.shape[0], sparsity)
        if sparsity.rule == "adaptive" and selector is None:
            selector = self.adaptive_selector(sparsity.keep)
            sparsity = replace(sparsity, layers=selector.sparse_layers())
        if sparsity.rule == "wina" and selector is None:
            selector = WinaSelector(self.down_column_norms(), sparsity.keep)
        return SparseSession(sparsity, self.ffns, mask, selector)

    # Token-level sparsity

    def attention_modules(self) -> list[dict[str, list[torch.nn.Module]]]:
        """Per layer, the attention projections by the input they read (``adapters.attention_inputs``)."""
        if self._attention is None:
            self._attention = attention_inputs(self.model)
        return self._attention

    def head_size(self) -> int:
        return self.model.get_output_embeddings().weight.numel()

    def weight_sizes(self) -> tuple[int, int, int]:
        """Decode-time weight elements: the attention projections', the FFNs' and the LM head's."""
        attention = sum(m.weight.numel() for layer in self.attention_modules() for ms in layer.values() for m in ms)
        return attention, sum(f.weights.num_weights() for f in self.ffns), self.head_size()

    def weight_share(self, ffn_density: float) -> float:
        """Share of all decode-time weights read per token when the FFNs read ``ffn_density`` of theirs."""
        attention, ffn, head = self.weight_sizes()
        return (attention + ffn * ffn_density + head) / (attention + ffn + head)

    def attention_density(self, ffn_density: float, weight_share: float) -> float:
        """The share of the attention projections' weights read per token, from a result's two shares
        (the LM head is always read whole)."""
        attention, ffn, head = self.weight_sizes()
        return (weight_share * (attention + ffn + head) - ffn * ffn_density - head) / attention

    def token_session(
        self, thresholds: TokenThresholds, batch_size: int, config: Optional[SparsityConfig] = None
    ) -> TokenSession:
        return TokenSession(config, thresholds, self.ffns, self.attention_modules(), batch_size, self.head_size())

    def token_thresholds(self, keep: float, targets: str = "all") -> TokenThresholds:
        """Thresholds reading about ``keep`` of the ``targets`` weights per token (calibrating on first use)."""
        if keep >= 1.0:
            return TokenThresholds(torch.zeros(self.num_layers, len(GROUPS)), 1.0, targets)
        return self.token_profile().allocate(keep, targets)

    def resolve(self, sparsity: Optional[SparsityConfig], backend: Optional[DecodeBackend] = None) -> Optional[SparsityConfig]:
        """Token-level ``keep="auto"`` made concrete: the model's calibrated level for the request's
        ``quality`` (``TokenProfile.levels``), or ``None`` (dense) where no level reaches it or where,
        on ``backend``, that level decodes no faster than dense (``token_pays``).
        Anything else is returned as it is."""
        if sparsity is None or not (sparsity.auto and sparsity.token):
            return sparsity
        levels = self.token_profile().levels(sparsity.quality, sparsity.targets)
        if not levels:
            return None
        chosen = replace(sparsity, keep=levels[0])
        return chosen if backend is None or self.token_pays(backend, chosen) else None

    def resolve_scored(self, sparsity: Optional[SparsityConfig], backend: DecodeBackend) -> Optional[SparsityConfig]:
        """What teacher-forced scoring of ``sparsity`` on ``backend`` scores: what generation with the same
        weights decodes (``resolve``, its speed verdict included), so that a quality figure belongs to the
        path that was timed. The reference backend stands in for the engine's own decode backend of its
        weights (the lean one where the model has it): it masks the same products, but never pays itself."""
        if sparsity is None or not (sparsity.auto and sparsity.token) or backend.name == "lean":
            return self.resolve(sparsity, backend)
        lean = self.own_weights is not None and self.lean_supported() and self.backend_name != "reference"
        return self.resolve(sparsity, self.backend("lean", self.own_weights) if lean else backend)

    def token_pays(self, backend: DecodeBackend, sparsity: SparsityConfig) -> bool:
        """Whether token-level decoding at ``sparsity`` is at least ``TOKEN_SPEEDUP`` times as fast as dense
        on ``backend``: measured once per machine, weights and level, and stored beside the calibration.

        Reading fewer weights only pays where the gathered kernel reads them near the memory's speed; on
        some CPUs ``embedding_bag`` does not, and a default slower than dense would be no default.
        """
        if backend.name != "lean" or not auto_reads_rows(backend):
            # The reference backend only masks its dense products; int8 has no row gather
            # (decode.weights.AUTO_GATHER_FORMATS).
            return False
        capability = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else torch.backends.cpu.get_cpu_capability()
        # The kernel's name too: a verdict measured with another gather kernel says nothing of this one.
        key = (f"{self.device.type}:{capability}:{torch.get_num_threads()}t:{gather_kernel(backend.weights)}:{backend.weights}:"
               f"{sparsity.targets}:{sparsity.keep:g}")
        if self._token_speed is None:  # read once per engine, not per request
            try:
                self._token_speed = json.loads(self._speed_path().read_text())
            except (OSError, ValueError):
                self._token_speed = {}
        if key not in self._token_speed:
            self._token_speed[key] = self._measure_token_speedup(backend, sparsity)
            path = self._speed_path()
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(self._token_speed, indent=1) + "\n")
        return self._token_speed[key] >= TOKEN_SPEEDUP

    def _speed_path(self):
        return cache_root() / "calibration" / adaptive.model_fingerprint(self) / "speed.json"

    def _measure_token_speedup(self, backend: DecodeBackend, sparsity: SparsityConfig, rounds: int = 2) -> float:
        """Dense decode time over token-level decode time, best of ``rounds`` alternated short runs."""
        prompt = [list(range(1, 17))]
        sampling = SamplingConfig(max_new_tokens=10)
        best = {"dense": float("inf"), "token": float("inf")}
        for _ in range(rounds + 1):  # the first round warms both paths up (and builds the gather-layout weights)
            for name, config in (("dense", None), ("token", sparsity)):
                result = loop.generate(self, backend, prompt, config, sampling, ignore_eos=True)[0]
                best[name] = min(best[name], result.decode_s)
        return round(best["dense"] / best["token"], 3)

    def token_profile(
        self, prompts=None, continuations=None, progress: bool = True, refresh: bool = False, probes: bool = True
    ) -> TokenProfile:
        """This model's token-level calibration: from the cache or the package, else measured once and stored.

        ``probes=False`` measures thresholds only and keeps them in this engine (speed runs on random weights).
        """
        if not probes:
            self._token_profile = calibrate_tokens(self, prompts, continuations, progress=progress, probes=False)
            return self._token_profile
        if self._token_profile is None or refresh:
            self._token_profile = self._stored_or_measured(
                TokenProfile.load, lambda: calibrate_tokens(self, prompts, continuations, progress=progress), refresh
            )
        return self._token_profile

    def _stored_or_measured(self, load, measure, refresh: bool):
        """A calibration from this model's cache directory or the package's (the default model's ships),
        else ``measure()``d and stored in the cache; ``refresh`` always measures."""
        fingerprint = adaptive.model_fingerprint(self)
        directory = cache_root() / "calibration" / fingerprint
        stored = () if refresh else (directory, adaptive.shipped_calibration_dir(fingerprint))
        for candidate in stored:
            try:
                return load(candidate, expect_model=fingerprint)
            except (OSError, ValueError, KeyError):
                continue
        measured = measure()
        measured.save(directory)
        self.release_model_pages()  # the calibration ran the fp32 model; int4 decoding does not read it
        return measured

    def release_model_pages(self) -> int:
        """Drop the pages of the model's memory-mapped weights that a run through the Hugging Face model
        read (a calibration, a dense reference) from the resident set; they are read again from their
        files when next needed. Returns the bytes released (0 for a model not loaded from files)."""
        where = getattr(self.model, "name_or_path", "") or ""
        return release_file_pages(Path(where)) if where and Path(where).is_dir() else 0

    def down_column_norms(self) -> list[torch.Tensor]:
        """Each layer's ``‖W_down[:, n]‖`` per neuron, computed once (WINA's weighting)."""
        if self._column_norms is None:
            self._column_norms = [f.weights.down.detach().float().norm(dim=0) for f in self.ffns]
        return self._column_norms

    def adaptive_selector(self, density: float, prior_weight: Optional[float] = None) -> adaptive.AdaptiveSelector:
        """The calibrated adaptive selector for an FFN density target (calibrating on first use)."""
        calibration = self.calibration()
        keeps = adaptive.allocate_budgets(calibration.sensitivity, density)
        weight = adaptive.DEFAULT_PRIOR_WEIGHT if prior_weight is None else prior_weight
        return adaptive.AdaptiveSelector(tuple(keeps), calibration.prior, weight)

    def calibration(
        self, prompts=None, continuations=None, progress: bool = True, refresh: bool = False, method: Optional[str] = None
    ) -> adaptive.Calibration:
        """This model's adaptive calibration: loaded from the cache, else measured once and stored.

        ``prompts``/``continuations`` (token ids) replace the built-in calibration text;
        ``refresh`` measures again (with ``method``, default ``adaptive.DEFAULT_METHOD``) and replaces the stored one.
        """
        if self._calibration is None or refresh:
            self._calibration = self._stored_or_measured(
                adaptive.Calibration.load,
                lambda: adaptive.calibrate(
                    self, prompts, continuations, progress=progress, method=method or adaptive.DEFAULT_METHOD
                ),
                refresh,
            )
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
            ids, mask = self.left_pad(prompts)
            session = self.new_session(sparsity, mask, selector)
            self.prefill(ids, mask, session)
            return session

    @torch.inference_mode()
    def record_activations(self, ids: torch.Tensor, mask: torch.Tensor):
        """Dense forward over ``ids`` keeping every position's logits and every layer's activations.

        Returns ``(logits [B, T, V], cache, acts)`` with ``acts[layer][b]`` the ``[T_b, N]``
        activations of sequence ``b``'s real (unpadded) tokens.
        """
        recorder = ActivationRecorder()
        every_layer = SparsityConfig(keep=1.0, layers=tuple(range(self.num_layers)))
        session = SparseSession(every_layer, self.ffns, mask, recorder)
        logits, cache = self.prefill(ids, mask, session, logits_to_keep=0)
        return logits, cache, recorder.acts

    def select_from(
        self, acts: dict[int, list[torch.Tensor]], sparsity: SparsityConfig, mask: torch.Tensor,
        selector: Optional[Selector] = None,
    ) -> SparseSession:
        """A session whose core neurons are selected from recorded activations (``record_activations``)."""
        session = self.new_session(sparsity, mask, selector)
        neurons = {
            layer: torch.stack([session.selector(layer, a) for a in acts[layer]]) for layer in session.layers
        }
        session.neurons = finalize_selection(session.selector, neurons)
        return session

    def prefill(self, ids, mask, session: Optional[SparseSession], logits_to_keep: int = 1, backend=None):
        """Dense forward over the prompt; a session records and selects its core neurons. A dense or
        token-level prompt prefills on ``backend`` where it ``prefills`` (int4 on coreinfer's CPU
        kernels: the last column's logits and a cache ``backend.start`` reads); else on the HF model."""
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        if session is None or session.mode == "token":  # token-level sparsity reads the prompt densely
            if backend is not None and backend.prefills and logits_to_keep == 1:
                return backend.prefill(ids, mask)
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
        backend: Optional[str] = None,
        weights: Optional[str] = None,
        ignore_eos: bool = False,
    ) -> list[GenerationResult]:
        """Generate for a batch of token-id prompts; ``sparsity=None`` decodes densely.

        ``backend``/``weights`` override the engine's defaults for this request.
        ``reference=True`` decodes on the reference backend with the masked dense
        FFN instead of compact weights: slower, same numbers, for tests.
        ``ignore_eos`` always produces ``max_new_tokens`` tokens (benchmarks).
        """
        length = max((len(p) for p in prompts), default=0) + sampling.max_new_tokens
        with self.lock:
            chosen = self.backend(backend, weights, masked=reference, length=length)
            sparsity = self.resolve(sparsity, chosen)
            return loop.generate(self, chosen, prompts, sparsity, sampling, on_token, selector, ignore_eos)

    @torch.inference_mode()
    def continuation_logits(
        self,
        prompts: Sequence[Sequence[int]],
        continuations: Sequence[Sequence[int]],
        sparsity: Optional[SparsityConfig] = None,
        reference: bool = False,
        selector: Optional[Selector] = None,
        backend: Optional[str] = "reference",
        weights: Optional[str] = None,
    ) -> tuple[list[torch.Tensor], Optional[SparseSession]]:
        """Teacher-forced logits predicting each continuation token, ``[len(cont), V]`` each.

        The prompt is prefilled densely and selects the core neurons; the
        continuation is then scored by the sparse model exactly as decoding
        would see it token by token. The reference backend scores it in one
        forward pass; others (``backend=None`` is the engine's default) step
        through it one token at a time.
        """
        if len(prompts) != len(continuations):
            raise ValueError("need one continuation per prompt")
        if any(len(c) == 0 for c in continuations):
            raise ValueError("a continuation is empty")
        if sparsity is not None and sparsity.auto and not sparsity.token:  # sentence-level auto: chosen per item
            if selector is not None:
                raise ValueError('keep="auto" chooses the keep itself; it does not take a custom selector')
            scored = [self.auto_continuation_logits(p, c, sparsity, backend, weights) for p, c in zip(prompts, continuations)]
            return [logits for logits, _, _ in scored], None
        width = max(len(c) for c in continuations)
        length = max(len(p) for p in prompts) + width
        with self.lock:
            chosen = self.backend(backend, weights, masked=reference, length=length)
            sparsity = self.resolve_scored(sparsity, chosen)  # token-level auto: one calibrated level
            ids, mask = self.left_pad(prompts)
            session = self.new_session(sparsity, mask, selector)
            first, cache = self.prefill(ids, mask, session)
            cont = torch.full((len(prompts), width), self.pad_id(), dtype=torch.long)
            for row, c in enumerate(continuations):
                cont[row, : len(c)] = torch.tensor(list(c))
            cont = cont.to(self.device)
            state = chosen.start(session, cache, mask, length)
            if isinstance(chosen, ReferenceBackend):
                logits = self.score_continuation(state, chosen, cont)
            else:
                logits = forced_logits(chosen, state, cont[:, :-1]) if width > 1 else first[:, :0]
            logits = torch.cat([first[:, -1:, :].to(logits.dtype), logits[:, : width - 1, :]], dim=1).float()
            return [logits[row, : len(c)] for row, c in enumerate(continuations)], session

    @torch.inference_mode()
    def auto_continuation_logits(
        self, prompt: Sequence[int], continuation: Sequence[int], sparsity: SparsityConfig,
        backend: Optional[str] = None, weights: Optional[str] = None,
    ) -> tuple[torch.Tensor, Optional[SparseSession], float]:
        """``keep="auto"`` teacher-forced, as generation runs it: the continuation's first ``warmup``
        tokens are read densely, the keep is chosen on them, and the sparse model reads the rest.

        Returns the logits ``[C, V]``, the session decoding continued with (None: dense) and the keep.
        """
        cont = list(continuation)
        warm = sparsity.warmup
        if len(cont) <= warm:  # the whole continuation falls in the dense warm-up
            logits, _ = self.continuation_logits([prompt], [cont], None, backend="reference")
            return logits[0], None, 1.0
        with self.lock:
            ids, mask = self.left_pad([prompt])
            first, cache = self.prefill(ids, mask, None)
            choice = choose_keep(self, [prompt], [cont[:warm]], sparsity, cache, mask)
            rest = torch.tensor([cont[warm:]], device=self.device)
            chosen = self.backend(backend, weights, length=choice.mask.shape[1] + rest.shape[1])
            state = chosen.start(choice.session, choice.cache, choice.mask, choice.mask.shape[1] + rest.shape[1])
            sparse = forced_logits(chosen, state, rest[:, :-1]).float()[0]
            logits = torch.cat([first[0, -1:].float(), choice.dense_warm[0].float(), choice.logits.float(), sparse])
            return logits, choice.session, choice.keep

    def score_continuation(self, state, backend: ReferenceBackend, cont: torch.Tensor) -> torch.Tensor:
        """All continuation tokens in one forward pass of the HF modules: logits ``[B, W, V]``."""
        # Right padding after the continuation cannot affect earlier positions.
        full_mask = torch.cat([state.mask, torch.ones_like(cont)], dim=1)
        positions = state.positions + 1 + torch.arange(cont.shape[1], device=cont.device)
        session = state.session
        if session is None:
            logits, _ = self._forward(cont, full_mask, positions, state.cache, logits_to_keep=0)
        else:
            with session.decode_phase(backend.masked):
                logits, _ = self._forward(cont, full_mask, positions, state.cache, logits_to_keep=0)
        return logits

    def generator(self, seed: Optional[int]) -> Optional[torch.Generator]:
        """One generator per sequence, each seeded alike, so a batch samples what singles would."""
        if seed is None:
            return None
        return torch.Generator().manual_seed(seed)

    def generate(
        self,
        prompt: Union[str, Sequence[str]],
        sparsity: Optional[SparsityConfig] = None,
        sampling: SamplingConfig = SamplingConfig(),
        chat: Optional[bool] = None,
        on_token: Optional[Callable[[TokenEvent], None]] = None,
        backend: Optional[str] = None,
        weights: Optional[str] = None,
    ) -> Union[GenerationResult, list[GenerationResult]]:
        """Generate from one prompt (returns one result) or a list (returns a list)."""
        single = isinstance(prompt, str)
        prompts = [prompt] if single else list(prompt)
        results = self.generate_ids(
            [self.encode(p, chat) for p in prompts], sparsity, sampling, on_token, backend=backend, weights=weights
        )
        return results[0] if single else results

    def stream(
        self,
        prompt: str,
        sparsity: Optional[SparsityConfig] = None,
        sampling: SamplingConfig = SamplingConfig(),
        chat: Optional[bool] = None,
        backend: Optional[str] = None,
        weights: Optional[str] = None,
    ) -> Iterator[str]:
        """Yield the text of one prompt's completion piece by piece as tokens are produced."""
        events: list[TokenEvent] = []
        done = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            try:
                self.generate(prompt, sparsity, sampling, chat, on_token=events.append, backend=backend, weights=weights)
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
