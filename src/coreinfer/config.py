"""What a request asks for: which neurons to keep (``SparsityConfig``) and how to decode (``SamplingConfig``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

from .selection import RULES, check_fraction, default_sparse_layers

# Rules that need more than the prompt's activations, so the engine builds their selector:
# `adaptive` (a per-model calibration; its keep is the FFN density averaged over all layers, and
# it chooses which layers are sparse) and `wina` (the model's down-projection column norms).
SELECTOR_RULES = ("adaptive", "wina")
# Every rule a SparsityConfig takes: the one list the unknown-rule error names.
RULE_NAMES = tuple(sorted([*RULES, *SELECTOR_RULES]))


MODES = ("sentence", "token")
# What token-level sparsity thins: the FFN's inputs, or the attention's as well (token_sparsity.TARGETS).
TOKEN_TARGETS = ("ffn", "all")

AUTO = "auto"
# Densities keep="auto" tries, lowest first; past the last it decodes densely.
AUTO_CANDIDATES = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


@dataclass(frozen=True)
class SparsityConfig:
    """What to keep. ``layers=None`` means all but roughly the first and last 15 %.

    ``keep="auto"`` chooses the density per request: the answer's first ``warmup`` tokens are
    decoded densely, every layer's neurons are then selected from prompt + warm-up at each of
    ``AUTO_CANDIDATES``, and the lowest keep whose sparse model reproduces at least ``quality``
    of the dense warm-up predictions (teacher-forced top-1) decodes the rest; if none does, the
    rest stays dense. ``quality`` and ``warmup`` only matter for ``keep="auto"``.

    ``mode="token"`` is token-level sparsity instead (``token_sparsity``): each decoded token
    drops the small entries of the inputs to its weight matrices, with thresholds calibrated per
    model; ``keep`` is then the share of the ``targets`` weights read per token, spread over the
    layers by the calibration (``rule``, ``alpha`` and ``layers`` do not apply).
    """

    keep: Union[float, str] = 0.4
    alpha: float = 0.2
    rule: str = "coreinfer"
    layers: Optional[tuple[int, ...]] = None
    quality: float = 0.95
    warmup: int = 16
    mode: str = "sentence"
    targets: str = "all"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, not {self.mode!r}")
        if self.targets not in TOKEN_TARGETS:
            raise ValueError(f"targets must be one of {', '.join(TOKEN_TARGETS)}, not {self.targets!r}")
        if self.keep != AUTO:
            try:
                check_fraction("keep", self.keep)
            except TypeError:
                raise TypeError(f'keep must be a number in (0, 1] or "auto", got {self.keep!r}') from None
        check_fraction("alpha", self.alpha)
        check_fraction("quality", self.quality)
        if not isinstance(self.warmup, int) or self.warmup < 2:
            raise ValueError(f"warmup must be an integer of at least 2 tokens, got {self.warmup!r}")
        if self.rule not in RULE_NAMES:
            raise ValueError(f"unknown selection rule {self.rule!r}; choose one of {list(RULE_NAMES)}")

    @property
    def auto(self) -> bool:
        return self.keep == AUTO

    @property
    def token(self) -> bool:
        return self.mode == "token"

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


def mode_for(mode: Optional[str], keep: Union[float, str]) -> str:
    """The mode a front end runs when told ``mode`` (None: not told) and ``keep``.

    Not told, ``keep="auto"`` is the default's token-level sparsity and a number keeps that share
    of each sparse layer's neurons for the whole answer (sentence-level), as it always has.
    """
    if mode is not None:
        return mode
    return "token" if keep == AUTO else "sentence"


# What `coreinfer generate`, the server and `coreinfer eval` run when told nothing: token-level
# sparsity of the FFN inputs at the model's calibrated level for `quality`, checked on a dense
# warm-up of each answer (keep="auto"). `rule` is what a sentence-level request ranks by.
DEFAULT_SPARSITY = SparsityConfig(keep=AUTO, rule="griffin", mode="token", targets="ffn", quality=0.85)
