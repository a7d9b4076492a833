"""The reference backend: decode steps through the Hugging Face modules themselves.

It runs any architecture that has an adapter, in the model's own dtype, with
HF's dynamic cache. The sparse layers use the session's compact weights, or,
with ``masked=True``, the dense FFN with unkept neurons zeroed: slower, the
same numbers, the reference the compact path is tested against.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class ReferenceState:
    cache: object  # the HF cache, grown by the model each step
    mask: torch.Tensor  # [B, T] attention mask so far
    positions: torch.Tensor  # [B, 1]: position of the last token fed
    session: Optional[object]  # the request's SparseSession, or None for dense


class ReferenceBackend:
    name = "reference"
    weights = "model"  # the model's own parameters, in its own dtype
    prefills = False  # the engine's HF prefill is this backend's own

    def __init__(self, engine, masked: bool = False):
        self.engine = engine
        self.masked = masked

    @property
    def max_length(self) -> int:
        return getattr(self.engine.model.config, "max_position_embeddings", None) or 1 << 30

    def start(self, session, hf_cache, mask: torch.Tensor, length: int) -> ReferenceState:
        if session is not None and not self.masked:
            session.build_compacts()
        return ReferenceState(hf_cache, mask, mask.sum(-1, keepdim=True) - 1, session)

    def step(self, state: ReferenceState, tokens: torch.Tensor) -> torch.Tensor:
        state.positions = state.positions + 1
        state.mask = torch.cat([state.mask, state.mask.new_ones(state.mask.shape[0], 1)], dim=1)
        step_input = tokens.unsqueeze(1)
        session = state.session
        if session is None:
            logits, state.cache = self.engine._forward(step_input, state.mask, state.positions, state.cache)
        else:
            with session.decode_phase(self.masked):
                logits, state.cache = self.engine._forward(step_input, state.mask, state.positions, state.cache)
        return logits[:, -1, :]
