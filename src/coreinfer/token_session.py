"""One request's token-level sparsity: thresholds applied while decoding, and the weights it read.

The prompt is prefilled densely; during decoding (and teacher-forced scoring, which computes the
same per-position numbers) every sparse input drops its entries at or below the layer's
threshold. On the reference backend this is done in the Hugging Face modules themselves: the
FFN through its ``SparseFFN`` handler, the attention through forward pre-hooks on its
projections; those are dense products of zeroed inputs, the masked reference the lean backend's
gathered kernels are tested against. The session also counts, per sequence, the weights its
decoded tokens actually read (``ffn_density``, ``weight_share``).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Optional, Sequence

import torch
from torch import nn

from .sparse_ffn import SparseFFN
from .token_sparsity import FFN_GROUPS, GROUPS, TokenThresholds, group_index, kept_entries, sparsify


def projection_size(modules: Sequence[nn.Module]) -> int:
    return sum(m.weight.numel() for m in modules)


class TokenSession:
    """Token-level sparsity for one batch of ``batch_size`` sequences.

    ``attention[l]`` maps ``"qkv"``/``"o"`` to layer ``l``'s projections (``adapters.attention_inputs``);
    ``head_size`` counts the LM head's weights (read in full every token).
    """

    mode = "token"

    def __init__(
        self,
        config,
        thresholds: TokenThresholds,
        ffns: Sequence[SparseFFN],
        attention: Sequence[dict[str, list[nn.Module]]],
        batch_size: int,
        head_size: int,
    ):
        if thresholds.num_layers != len(ffns):
            raise ValueError(f"thresholds for {thresholds.num_layers} layers, the model has {len(ffns)}")
        self.config = config
        self.thresholds = thresholds
        self.ffns = list(ffns)
        self.attention = list(attention)
        self.batch_size = batch_size
        self.layers = tuple(range(len(self.ffns)))
        self.values = thresholds.values.tolist()  # [L][G] floats: read per step without a tensor op
        self.sizes = [self._sizes(i) for i in self.layers]  # [L][G] weight elements per input
        self.widths = [self._widths(i) for i in self.layers]  # [L][G] input widths
        self.head_size = head_size
        self.read = [[0.0] * len(GROUPS) for _ in range(batch_size)]  # per sequence, weights read
        self.tokens = [0] * batch_size  # per sequence, tokens decoded (or scored) sparsely

    def _sizes(self, layer: int) -> list[float]:
        ffn = self.ffns[layer].weights
        projections = 2 if ffn.gated else 1
        sizes = {
            "qkv": projection_size(self.attention[layer]["qkv"]),
            "o": projection_size(self.attention[layer]["o"]),
            "gate_up": projections * ffn.num_neurons * ffn.hidden_size,
            "down": ffn.num_neurons * ffn.hidden_size,
        }
        return [float(sizes[g]) for g in GROUPS]

    def _widths(self, layer: int) -> list[int]:
        ffn = self.ffns[layer].weights
        o = self.attention[layer]["o"][0]
        o_width = o.weight.shape[0] if type(o).__name__ == "Conv1D" else o.weight.shape[1]
        return [ffn.hidden_size, o_width, ffn.hidden_size, ffn.num_neurons]

    def threshold(self, layer: int, group: str) -> float:
        return self.values[layer][group_index(group)]

    # Accounting

    def count(self, layer: int, group: int, kept: Sequence[int], tokens: Optional[Sequence[int]] = None) -> None:
        """Record ``kept[b]`` input entries of ``group`` read by sequence ``b`` (summed over its positions)."""
        factor = self.sizes[layer][group] / self.widths[layer][group]
        for b, k in enumerate(kept):
            self.read[b][group] += k * factor
        if tokens is not None:
            for b, t in enumerate(tokens):
                self.tokens[b] += t

    def count_tokens(self, batch: int) -> None:
        """One more sparse token for each of ``batch`` sequences (the lean backend's step)."""
        for b in range(batch):
            self.tokens[b] += 1

    def _count_tensor(self, layer: int, group: str, x: torch.Tensor, new_tokens: bool = False) -> None:
        """Count from the input ``x`` ``[B, T, n]`` itself (the reference backend's path)."""
        kept = kept_entries(x, self.threshold(layer, group)).sum(-1).tolist()
        tokens = [x.shape[1]] * x.shape[0] if new_tokens else None
        self.count(layer, group_index(group), kept, tokens)

    def ffn_density(self, sequence: Optional[int] = None) -> float:
        """Share of the FFN weights read per sparse token: one sequence's, or the batch's."""
        rows = range(self.batch_size) if sequence is None else [sequence]
        tokens = sum(self.tokens[b] for b in rows)
        if tokens == 0:
            return 1.0
        groups = [group_index(g) for g in FFN_GROUPS]
        total = sum(self.sizes[l][g] for l in self.layers for g in groups)
        return sum(self.read[b][g] for b in rows for g in groups) / (tokens * total)

    def weight_share(self, sequence: Optional[int] = None) -> float:
        """Share of all decode-time weights read per sparse token: attention, FFN and LM head."""
        rows = range(self.batch_size) if sequence is None else [sequence]
        tokens = sum(self.tokens[b] for b in rows)
        if tokens == 0:
            return 1.0
        total = sum(sum(s) for s in self.sizes) + self.head_size
        return (sum(sum(self.read[b]) for b in rows) + tokens * self.head_size) / (tokens * total)

    # The reference backend: the HF modules with zeroed inputs

    def ffn(self, module: SparseFFN, x: torch.Tensor) -> torch.Tensor:
        """The FFN handler: zero the small entries of its input and of its intermediate."""
        weights, layer = module.weights, module.layer_idx
        batched = x if x.dim() == 3 else x.view(self.batch_size, -1, x.shape[-1])
        self._count_tensor(layer, "gate_up", batched, new_tokens=layer == 0)
        acts = weights.activations(sparsify(batched, self.threshold(layer, "gate_up")))
        self._count_tensor(layer, "down", acts)
        return weights.project_down(sparsify(acts, self.threshold(layer, "down"))).view(*x.shape[:-1], -1)

    def _attention_hook(self, layer: int, group: str, count: bool):
        threshold = self.threshold(layer, group)

        def hook(module: nn.Module, args):
            x = args[0]
            if count:
                batched = x if x.dim() == 3 else x.view(self.batch_size, -1, x.shape[-1])
                self._count_tensor(layer, group, batched)
            return (sparsify(x, threshold), *args[1:])

        return hook

    @contextmanager
    def decode_phase(self, masked: bool = True):
        """Route the model's projections through the thresholds for one forward pass (or several)."""
        handles = []
        try:
            for layer, ffn in zip(self.layers, self.ffns):
                ffn.handler = self.ffn
                for group in ("qkv", "o"):
                    # q, k and v read the same input: count it once.
                    for i, module in enumerate(self.attention[layer][group]):
                        handles.append(module.register_forward_pre_hook(self._attention_hook(layer, group, i == 0)))
            yield
        finally:
            for ffn in self.ffns:
                ffn.handler = None
            for handle in handles:
                handle.remove()

    def build_compacts(self) -> None:
        """Nothing to gather: token-level sparsity selects anew at every token."""
