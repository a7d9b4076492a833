"""The FFN as coreinfer sees it: dense weights, activations, and compact copies.

``FFNWeights`` holds one layer's projections in ``nn.Linear`` layout (``[out, in]``),
as views of the model's own tensors, so wrapping a model copies no weights.
``CompactFFN`` holds, per sequence, only the kept neurons' rows and columns,
gathered once into contiguous ``[batch, K, hidden]`` tensors: decoding then runs
smaller matmuls rather than masking the full ones.
``SparseFFN`` is the module that replaces a layer's FFN. It is dense unless the
engine hands it a ``handler`` for the duration of one phase of one request.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

Activation = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class FFNWeights:
    """One layer's FFN: ``down(act(gate(x)) * up(x))`` or, without a gate, ``down(act(up(x)))``."""

    up: torch.Tensor  # [N, d]
    down: torch.Tensor  # [d, N]
    act: Activation
    gate: Optional[torch.Tensor] = None  # [N, d]
    up_bias: Optional[torch.Tensor] = None  # [N]
    gate_bias: Optional[torch.Tensor] = None  # [N]
    down_bias: Optional[torch.Tensor] = None  # [d]

    @property
    def num_neurons(self) -> int:
        return self.up.shape[0]

    @property
    def hidden_size(self) -> int:
        return self.up.shape[1]

    @property
    def gated(self) -> bool:
        return self.gate is not None

    def activations(self, x: torch.Tensor) -> torch.Tensor:
        """The value multiplying each row of the down projection: ``[..., N]``."""
        up = nn.functional.linear(x, self.up, self.up_bias)
        if self.gate is None:
            return self.act(up)
        return self.act(nn.functional.linear(x, self.gate, self.gate_bias)) * up

    def project_down(self, acts: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(acts, self.down, self.down_bias)

    def dense(self, x: torch.Tensor) -> torch.Tensor:
        return self.project_down(self.activations(x))

    def masked(self, x: torch.Tensor, keep_mask: torch.Tensor) -> torch.Tensor:
        """Reference for the compact path: dense, with unkept neurons zeroed.

        ``x`` is ``[B, T, d]`` and ``keep_mask`` ``[B, N]``.
        """
        return self.project_down(self.activations(x) * keep_mask[:, None, :].to(x.dtype))

    def gather(self, neurons: torch.Tensor) -> "CompactFFN":
        """Compact weights for each sequence's kept neurons; ``neurons`` is ``[B, K]``."""
        neurons = neurons.to(self.target_device)
        up = self._take(self.up, neurons)
        gate_up = up if self.gate is None else torch.cat([self._take(self.gate, neurons), up], dim=1)
        bias = None
        if self.up_bias is not None or self.gate_bias is not None:
            parts = [self._bias_or_zeros(self.up_bias, neurons)]
            if self.gate is not None:
                parts.insert(0, self._bias_or_zeros(self.gate_bias, neurons))
            bias = torch.cat(parts, dim=1)
        return CompactFFN(
            gate_up=gate_up.contiguous(),
            down=self._take(self.down.t(), neurons).contiguous(),
            act=self.act,
            gated=self.gated,
            gate_up_bias=bias,
            down_bias=self.down_bias,
        )

    # Where compact weights come from and go to; memory-limited mode overrides these.

    @property
    def target_device(self) -> torch.device:
        return self.up.device

    @property
    def target_dtype(self) -> torch.dtype:
        return self.up.dtype

    def _take(self, rows_of: torch.Tensor, neurons: torch.Tensor) -> torch.Tensor:
        """Rows ``neurons`` (``[B, K]``) of a ``[N, d]`` tensor, as ``[B, K, d]``."""
        return rows_of[neurons]

    def _bias_or_zeros(self, bias: Optional[torch.Tensor], neurons: torch.Tensor) -> torch.Tensor:
        if bias is None:
            return torch.zeros(neurons.shape, dtype=self.target_dtype, device=self.target_device)
        return bias[neurons]

    def num_weights(self) -> int:
        """Multiply-adds per token of the dense FFN (biases aside)."""
        projections = 3 if self.gated else 2
        return projections * self.num_neurons * self.hidden_size


@dataclass
class CompactFFN:
    """Per-sequence compact FFN: the gathered rows of up (and gate) and columns of down.

    ``gate_up`` is ``[B, K, d]``, or ``[B, 2K, d]`` with the gate rows first, so
    one batched matmul computes both; ``down`` is ``[B, K, d]``.
    """

    gate_up: torch.Tensor
    down: torch.Tensor
    act: Activation
    gated: bool
    gate_up_bias: Optional[torch.Tensor] = None  # [B, K] or [B, 2K]
    down_bias: Optional[torch.Tensor] = None  # [d]

    @property
    def batch_size(self) -> int:
        return self.down.shape[0]

    @property
    def num_neurons(self) -> int:
        return self.down.shape[1]

    def activations(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``[B, T, d]`` -> compact activations ``[B, T, K]``."""
        h = torch.bmm(x, self.gate_up.transpose(1, 2))
        if self.gate_up_bias is not None:
            h = h + self.gate_up_bias[:, None, :]
        if not self.gated:
            return self.act(h)
        gate, up = h.split(self.num_neurons, dim=-1)
        return self.act(gate) * up

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.bmm(self.activations(x), self.down)
        if self.down_bias is not None:
            out = out + self.down_bias
        return out


Handler = Callable[["SparseFFN", torch.Tensor], torch.Tensor]


class SparseFFN(nn.Module):
    """Drop-in replacement for one layer's FFN.

    Dense by default, so a wrapped model behaves exactly as before. During a
    request the engine sets ``handler`` (record, compact, masked ...) for one
    phase and clears it afterwards; the module itself keeps no request state.
    """

    def __init__(
        self,
        modules: dict[str, nn.Module],
        read: Callable[[nn.ModuleDict], FFNWeights],
        layer_idx: int,
        flat_input: bool = False,
    ):
        super().__init__()
        # The original modules stay registered here, so ``model.to(device)``,
        # ``state_dict`` and parameter counts still see the FFN weights.
        self.source = nn.ModuleDict(modules)
        self._read = read
        self.layer_idx = layer_idx
        # OPT flattens [B, T, d] to [B*T, d] before its FFN; handlers see [B, T, d].
        self.flat_input = flat_input
        self.handler: Optional[Handler] = None

    @property
    def weights(self) -> FFNWeights:
        return self._read(self.source)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.handler is None:
            return self.weights.dense(x)
        return self.handler(self, x)

    def extra_repr(self) -> str:
        w = self.weights
        return f"layer={self.layer_idx}, hidden={w.hidden_size}, neurons={w.num_neurons}, gated={w.gated}"
