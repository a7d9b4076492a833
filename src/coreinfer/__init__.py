"""coreinfer: training-free sentence-level sparse activation (CoreInfer) for faster LLM decoding."""

from .api import load
from .engine import (
    Engine,
    GenerationResult,
    RuleSelector,
    SamplingConfig,
    Selector,
    SparseSession,
    SparsityConfig,
    TokenEvent,
)
from .selection import RULES

__version__ = "0.1.0"

__all__ = [
    "Engine",
    "GenerationResult",
    "RULES",
    "RuleSelector",
    "Selector",
    "SamplingConfig",
    "SparseSession",
    "SparsityConfig",
    "TokenEvent",
    "load",
]
