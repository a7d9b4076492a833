"""What a request asks for: which neurons to keep (``SparsityConfig``) and how to decode (``SamplingConfig``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .selection import check_fraction, default_sparse_layers, get_rule

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
