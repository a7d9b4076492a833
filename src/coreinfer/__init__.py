"""coreinfer: training-free sentence-level sparse activation (CoreInfer) for faster LLM decoding."""

from .engine import Engine, GenerationResult, SamplingConfig, SparseSession, SparsityConfig, TokenEvent, load
from .selection import RULES

__version__ = "0.1.0"

__all__ = [
    "Engine",
    "GenerationResult",
    "RULES",
    "SamplingConfig",
    "SparseSession",
    "SparsityConfig",
    "TokenEvent",
    "load",
]
