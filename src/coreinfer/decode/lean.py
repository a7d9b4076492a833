"""The lean backend: a gpt-fast-style one-token step for Llama, Mistral, Qwen2, Qwen3 and Gemma 3.

The reference backend decodes through Hugging Face modules: a dynamic KV cache
that grows by ``torch.cat`` every token, separate q/k/v projections, mask
building and Python bookkeeping per layer. Decoding a small model is bound by
reading the weights once per token, so all that overhead shows. Here:

- ``LeanModel`` holds the weights in a few contiguous tensors per layer (fused
  qkv, fused gate+up), in fp32, bf16 or int8 (``decode.weights``), built once
  from a Hugging Face model;
- ``KVCache`` is allocated once per request (``[B, kv_heads, max_len, head_dim]``)
  and written in place; the prompt's keys and values are copied in from the
  engine's (dense, recording) prefill, so selection is exactly the reference's;
- each sparse layer's kept neurons are gathered once per sequence into compact
  matrices (``LeanModel.gather``).

In fp32 the greedy tokens equal the reference backend's (tested).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Generator, Optional

import torch
from torch import nn
from torch.nn import functional as F

from ..token_sparsity import group_index
from . import cpu_kernels, int4_gather
from .gguf_blocks import gguf_int4_weights
from .weights import (
    GatherWeight, Int4Weight, Int8Weight, Weight, activation_dtype, alignment, cat_rows, cpu_has_native_bf16,
    gather_parts, gathered_linear, int4_runs, linear, nbytes, padded, quantize, rows_padded, take_cols,
)

# The matrices reading each token-level input (token_sparsity.GROUPS), as LeanLayer attributes.
TOKEN_WEIGHTS = {"qkv": "wqkv", "o": "wo", "gate_up": "w13", "down": "w2"}

# Prompt columns the lean prefill takes at a time (``prefill_steps``): a server decodes its other
# requests between chunks. SmolLM2 int4 here: about 70 ms a chunk of one 128-token prompt.
PREFILL_CHUNK = 128
NEAR_TIE = 2.0 ** -6  # logits this close to the best (relative) are recomputed in fp32 (exact_top_logits)
SUPPORTED_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text")
# Gemma 3 differs in a few declared places: RMSNorm scales by (1 + w), norms after attention and
# FFN too, a scaled embedding, its own query scale, and sliding-window layers with their own rope.
GEMMA_TYPES = ("gemma3_text",)


@dataclass
class LeanLayer:
    attn_norm: torch.Tensor  # [d]
    wqkv: Weight  # [(H + 2 KV) * hd, d]
    bqkv: Optional[torch.Tensor]  # [(H + 2 KV) * hd] (Qwen2)
    wo: Weight  # [d, H * hd]
    ffn_norm: torch.Tensor  # [d]
    w13: Weight  # [2N, d]: gate rows, then up rows
    w2: Weight  # [d, N]
    q_norm: Optional[torch.Tensor] = None  # [hd] (Qwen3, Gemma 3: RMSNorm of each head's query and key)
    k_norm: Optional[torch.Tensor] = None
    attn_out_norm: Optional[torch.Tensor] = None  # [d] (Gemma 3: norms of the attention and FFN outputs)
    ffn_out_norm: Optional[torch.Tensor] = None
    window: Optional[int] = None  # sliding-window span of this layer (Gemma 3's local layers)
    rope: str = "default"  # which rope table this layer uses


@dataclass
class CompactLayer:
    """One layer's kept neurons per sequence: ``[2K', d]`` and ``[d, K']``, K' = K padded (zero neurons)."""

    w13: list[Weight]
    w2: list[Weight]


@dataclass
class TokenLayer:
    """One layer's token-level decode: a threshold per input and, where it is above 0, the
    matrices reading that input in a gather layout, a kept input's weights contiguous: ``GatherWeight``
    for fp32 and bf16, ``int4_gather.Int4Gather`` for int4. An input left out is read densely (and counted so)."""

    thresholds: dict[str, float]
    gathered: dict[str, "GatherWeight | int4_gather.Int4Gather"]


class LeanModel:
    """Contiguous decode-time weights of a Llama-family HF model."""

    def __init__(self, hf_model: nn.Module, weights: str = "fp32", gguf: Optional[Path] = None,
                 gguf_cache: Optional[Path] = None, reference: Optional[Callable[[str], torch.Tensor]] = None):
        config = hf_model.config
        if config.model_type not in SUPPORTED_TYPES:
            raise ValueError(f"the lean backend supports {', '.join(SUPPORTED_TYPES)}, not {config.model_type}")
        self.weights = weights
        # What dense matrices are held in (and torch's int4 kernel computes in): bf16 unless fp32.
        self.store_dtype = activation_dtype(weights)
        # int4 on a CPU where coreinfer's kernels build: fp32 activations (the kernel reads fp32 as fast
        # as bf16, and bf16 elementwise ops are slow without native bf16), and each layer's small
        # pieces as single calls (cpu_kernels: residual_norm, attend). SmolLM2, one token on a 2-core
        # AVX2 CPU: 28.5 ms with bf16 activations and ATen pieces, 23.8 ms fp32, 16.4 ms fused (bench: 60.8 tok/s).
        self.fused = weights == "int4" and hf_model.device.type == "cpu" and cpu_kernels.available()
        self.dtype = torch.float32 if self.fused else self.store_dtype
        # Attention's own dtype (queries, keys, values, cache). On a CPU without native bf16, bf16
        # attention is the slow part: one query against 100 keys took 131 us in bf16 and 35 us in
        # fp32 on a 2-core AVX2 CPU (SmolLM2's heads), 30 layers a token.
        native = hf_model.device.type != "cpu" or cpu_has_native_bf16()
        self.attn_dtype = self.dtype if native else torch.float32
        self.gemma = config.model_type in GEMMA_TYPES
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = config.num_key_value_heads or self.n_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.n_heads
        self.scale = config.query_pre_attn_scalar ** -0.5 if self.gemma else None  # None: 1/sqrt(hd)
        self.softcap = getattr(config, "final_logit_softcapping", None)
        self.eps = config.rms_norm_eps
        windowed = config.model_type == "mistral" or getattr(config, "use_sliding_window", False)
        # Gemma's windows are per layer (below); others have one for the whole model, or none.
        self.sliding_window = getattr(config, "sliding_window", None) if windowed else None
        self.max_positions = config.max_position_embeddings
        self.layer_types = list(getattr(config, "layer_types", None) or []) if self.gemma else []
        self.act = _mlp(hf_model.model.layers[0]).act_fn
        # int4 from a GGUF: the file's own blocks where they hold a matrix exactly, bf16 where they cannot.
        # (Held only while the matrices are built: _matrix and _fused read it.)
        # ``reference`` reads the dequantised weights a GGUF's blocks are checked against (see gguf_blocks).
        self._gguf = (gguf_int4_weights(gguf, hf_model, _matrices(hf_model), self.store_dtype, gguf_cache, reference)
                      if weights == "int4" and gguf else None)
        self.layers = []
        for i, layer in enumerate(hf_model.model.layers):  # packed one by one: see _pack
            self.layers.append(self._layer(i, layer))
            _pack([self.layers[-1].wqkv, self.layers[-1].wo, self.layers[-1].w13, self.layers[-1].w2])
        self.norm = self._norm(hf_model.model.norm)
        tied = hf_model.get_output_embeddings().weight is hf_model.model.embed_tokens.weight
        self.lm_head = self._matrix("model.embed_tokens.weight" if tied else "lm_head.weight",
                                    hf_model.get_output_embeddings().weight)
        self._gguf = None  # the layers hold what they use
        _pack([self.lm_head])
        # The model's own LM head (not a copy), read for a few rows per token: see exact_top_logits.
        self.head_exact = None if self.dtype == torch.float32 else hf_model.get_output_embeddings().weight.detach()
        embed = hf_model.model.embed_tokens
        self.embed = embed.weight  # read one row per token: keep the model's own
        self.embed_scale = float(getattr(embed, "scalar_embed_scale", 1.0))
        self.rotary = hf_model.model.rotary_emb
        self.device = self.norm.device
        self._gathered: dict[tuple[int, str], GatherWeight] = {}

    def _norm(self, module: nn.Module, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        weight = module.weight.detach().float()
        return _c(1.0 + weight if self.gemma else weight, dtype or self.dtype)

    def _layer(self, index: int, layer: nn.Module) -> LeanLayer:
        attn, mlp = layer.self_attn, _mlp(layer)
        biases = [attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias]
        kind = self.layer_types[index] if self.layer_types else "default"
        gemma = self.gemma
        at = f"model.layers.{index}."
        qkv = [(at + f"self_attn.{n}_proj.weight", getattr(attn, f"{n}_proj").weight) for n in "qkv"]
        gate_up = [(at + f"mlp.{n}_proj.weight", getattr(mlp, f"{n}_proj").weight) for n in ("gate", "up")]
        return LeanLayer(
            attn_norm=self._norm(layer.input_layernorm),
            wqkv=self._fused(qkv),
            bqkv=None if biases[0] is None else _c(torch.cat(biases), self.dtype),
            wo=self._matrix(at + "self_attn.o_proj.weight", attn.o_proj.weight),
            ffn_norm=self._norm(layer.pre_feedforward_layernorm if gemma else layer.post_attention_layernorm),
            w13=self._fused(gate_up),
            w2=self._matrix(at + "mlp.down_proj.weight", mlp.down_proj.weight),
            q_norm=self._norm(attn.q_norm, self.attn_dtype) if hasattr(attn, "q_norm") else None,
            k_norm=self._norm(attn.k_norm, self.attn_dtype) if hasattr(attn, "k_norm") else None,
            attn_out_norm=self._norm(layer.post_attention_layernorm) if gemma else None,
            ffn_out_norm=self._norm(layer.post_feedforward_layernorm) if gemma else None,
            window=getattr(attn, "sliding_window", None) if gemma else None,
            rope=kind,
        )

    def _matrix(self, name: str, weight: torch.Tensor) -> Weight:
        """One matrix in this model's format: from a GGUF's blocks where read (and a kernel reads them:
        ``int4_runs``), in the activation dtype (bf16) where the GGUF holds it in a type int4 cannot
        (F16, or Q6_K without coreinfer's kernels), else quantised from the loaded weight."""
        if self._gguf is None:
            return quantize(weight, self.weights)
        found = self._gguf.pop(name, None)  # each is used once; held no longer than its layer's build
        return found if found is not None and int4_runs(found) else _c(weight, self.store_dtype)

    def _fused(self, parts: list[tuple[str, torch.Tensor]]) -> Weight:
        """Matrices stacked by rows (q, k, v; gate, up); dense if any part is dense."""
        if self._gguf is None:
            return quantize(torch.cat([w for _, w in parts]), self.weights)
        matrices = [self._matrix(name, w) for name, w in parts]
        if all(isinstance(m, Int4Weight) and m.group == matrices[0].group for m in matrices):
            return cat_rows(matrices)
        return _c(torch.cat([w for _, w in parts]), self.store_dtype)

    def matrices(self) -> list[Weight]:
        """Every decode-time weight matrix: the LM head, then each layer's."""
        return [self.lm_head] + [w for layer in self.layers for w in (layer.wqkv, layer.wo, layer.w13, layer.w2)]

    @property
    def num_neurons(self) -> int:
        return mlp_width(self.layers[0])

    @property
    def max_length(self) -> int:
        """Longest prompt + answer this backend decodes (it has no sliding-window attention)."""
        return min(self.max_positions, self.sliding_window or self.max_positions)

    def weight_bytes_per_token(self, ffn_density: float = 1.0) -> int:
        """Bytes of weights one decode step reads: every layer, the final norm and the LM head.

        ``ffn_density`` is ``GenerationResult.ffn_density``: the FFNs' share read, averaged over layers.
        """
        norm_bytes = self.norm.element_size() * self.norm.numel()
        ffn = sum(nbytes(layer.w13) + nbytes(layer.w2) for layer in self.layers)
        rest = sum(2 * norm_bytes + nbytes(layer.wqkv) + nbytes(layer.wo) for layer in self.layers)
        return round(nbytes(self.lm_head) + norm_bytes + rest + ffn * ffn_density)

    def gather(self, neurons: dict[int, torch.Tensor]) -> dict[int, CompactLayer]:
        """Each sparse layer's kept neurons (``{layer: [B, K]}``) as contiguous per-sequence weights."""
        n = self.num_neurons
        compacts = {}
        for index, kept in neurons.items():
            layer = self.layers[index]
            width = padded(kept.shape[1], alignment(layer.w2))
            w13, w2 = [], []
            for k in kept.to(self.device):
                w13.append(cat_rows([rows_padded(layer.w13, k, width), rows_padded(layer.w13, k + n, width)]))
                w2.append(take_cols(layer.w2, k, width))
            _pack(w13)  # per request, with the gather: not in the first decode step
            compacts[index] = CompactLayer(w13, w2)
        return compacts

    def token_layers(self, thresholds) -> list[TokenLayer]:
        """Each layer's thresholds (a ``TokenThresholds``) with the gather-layout weights they need.

        A gather-layout copy is made once per matrix, on the first request that sparsifies its input,
        and kept: dense requests go on reading the row layout.
        """
        layers = []
        for index, layer in enumerate(self.layers):
            values = thresholds.layer(index)
            gathered = {}
            for group, threshold in values.items():
                if threshold <= 0:
                    continue
                weight = getattr(layer, TOKEN_WEIGHTS[group])
                if isinstance(weight, Int8Weight) or (isinstance(weight, Int4Weight) and not cpu_kernels.available()):
                    raise ValueError("token-level sparsity on the lean backend needs fp32, bf16 or (on a CPU with "
                                     f"AVX2, where coreinfer's int4 kernel builds) int4 weights, not {self.weights}")
                if isinstance(weight, Int4Weight):
                    layout = weight.gathered()  # built once per matrix, kept by the matrix itself
                    if layout is not None:
                        gathered[group] = layout
                    continue
                key = (index, group)
                if key not in self._gathered:
                    self._gathered[key] = GatherWeight.of(weight, gather_parts(self.device))
                gathered[group] = self._gathered[key]
            layers.append(TokenLayer(values, gathered))
        return layers

    def rope_tables(self, length: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """cos and signed sin ``[length, hd]`` per rope kind, from the HF model's own rotary module (any scaling)."""
        positions = torch.arange(length, device=self.device)[None]
        probe = torch.zeros(1, dtype=torch.float32, device=self.device)
        tables = {}
        for kind in sorted({layer.rope for layer in self.layers}):
            cos, sin = self.rotary(probe, positions, kind) if self.gemma else self.rotary(probe, positions)
            sin = sin[0].clone()
            sin[:, : self.head_dim // 2] *= -1  # see _rotate
            tables[kind] = (cos[0].to(self.attn_dtype), sin.to(self.attn_dtype))
        return tables


def mlp_width(layer: LeanLayer) -> int:
    w2 = layer.w2
    return w2.in_features if hasattr(w2, "in_features") else w2.shape[1]


def _pack(weights: list[Weight]) -> None:
    """Build the layout an int4 product reads now (it is otherwise made on first use), and drop the row
    layout where it can be read back (``Int4Weight.drop_rows``): a layer at a time while a model is
    built, so its row layouts and kernel layouts are never all in memory together."""
    for w in weights:
        if not isinstance(w, Int4Weight):
            continue
        if w.dense_layout() is None and w.codes[0].device.type == "cpu":
            w.kernel()
        w.drop_rows()


def _matrices(hf_model: nn.Module) -> dict[str, torch.Tensor]:
    """Every decode-time matrix under transformers' own names (the engine's FFN wrappers looked through)."""
    matrices = {"model.embed_tokens.weight": hf_model.model.embed_tokens.weight,
                "lm_head.weight": hf_model.get_output_embeddings().weight}
    for index, layer in enumerate(hf_model.model.layers):
        attn, mlp, at = layer.self_attn, _mlp(layer), f"model.layers.{index}."
        for name in ("q", "k", "v", "o"):
            matrices[at + f"self_attn.{name}_proj.weight"] = getattr(attn, f"{name}_proj").weight
        for name in ("gate", "up", "down"):
            matrices[at + f"mlp.{name}_proj.weight"] = getattr(mlp, f"{name}_proj").weight
    return matrices


def _mlp(layer: nn.Module) -> nn.Module:
    # The engine wraps each FFN in a SparseFFN that keeps the original module as ``source["mlp"]``.
    mlp = layer.mlp
    return mlp.source["mlp"] if hasattr(mlp, "source") else mlp


def _c(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.detach().to(dtype).contiguous()


@dataclass
class KVCache:
    """Static per-request cache; slot ``t`` holds column ``t`` of the left-padded batch."""

    keys: list[torch.Tensor]  # per layer [B, KV, S, hd]
    values: list[torch.Tensor]
    valid: torch.Tensor  # [B, S] bool: slots that hold real (not padding) tokens

    @classmethod
    def allocate(cls, model: LeanModel, batch: int, length: int) -> "KVCache":
        shape = (batch, model.n_kv_heads, length, model.head_dim)
        keys = [torch.zeros(shape, dtype=model.attn_dtype, device=model.device) for _ in model.layers]
        values = [torch.zeros(shape, dtype=model.attn_dtype, device=model.device) for _ in model.layers]
        return cls(keys, values, torch.zeros(batch, length, dtype=torch.bool, device=model.device))

    def fill(self, hf_cache, mask: torch.Tensor) -> None:
        """Copy the prompt's keys and values out of the HF prefill cache."""
        width = mask.shape[1]
        for index, layer in enumerate(hf_cache.layers):
            kept = layer.keys.shape[2]  # a sliding-window layer's cache holds only the last tokens
            self.keys[index][:, :, width - kept : width] = layer.keys
            self.values[index][:, :, width - kept : width] = layer.values
        self.valid[:, :width] = mask.bool()


@dataclass
class _Step:
    """What every layer of one decode step shares: the slot written, rope rows, attention mask."""

    slot: int
    rope: dict[str, tuple[torch.Tensor, torch.Tensor]]  # kind -> cos, sin [B, 1, 1, hd]
    mask: Optional[torch.Tensor]  # [B, 1, 1, slot + 1] bool, or None when nothing is padding
    token: Optional[list[TokenLayer]] = None  # token-level sparsity: each layer's thresholds and weights
    session: Optional[object] = None  # the TokenSession counting the weights read


def _rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rope in three ops: ``signed_sin`` carries the minus sign of rotate_half's first half."""
    half = x.shape[-1] // 2
    swapped = x.unflatten(-1, (2, half)).flip(-2).flatten(-2)
    return torch.addcmul(x * cos, swapped, signed_sin)


def _project(x: torch.Tensor, w: Weight, group: str, index: int, step: "_Step") -> torch.Tensor:
    """``x @ w.T``; under token-level sparsity, only the rows of the kept inputs are read (and counted)."""
    token = step.token[index] if step.token is not None else None
    if token is None or group not in token.gathered:
        if token is not None:
            step.session.count(index, group_index(group), [x.shape[-1]] * x.shape[0])
        return linear(x, w)
    layout = token.gathered[group]
    if isinstance(layout, int4_gather.Int4Gather):
        out, kept = int4_gather.gathered_mm(x, layout, token.thresholds[group])
    else:
        out, kept = gathered_linear(x, layout, token.thresholds[group])
    step.session.count(index, group_index(group), kept)
    return out


def _attention(model: LeanModel, layer: LeanLayer, x: torch.Tensor, cache: KVCache, index: int, step: _Step):
    """The attention block's output for one new token per sequence (before Gemma's output norm)."""
    batch = x.shape[0]
    h, kv, hd = model.n_heads, model.n_kv_heads, model.head_dim
    qkv = _project(x, layer.wqkv, "qkv", index, step)
    if layer.bqkv is not None:
        qkv = qkv + layer.bqkv
    # A sliding-window layer sees the last ``window`` slots (left padding keeps slot distances).
    first = max(0, step.slot + 1 - layer.window) if layer.window else 0
    cos, sin = step.rope[layer.rope]
    if model.fused:
        out = cpu_kernels.attend(qkv, cos.view(batch, hd), sin.view(batch, hd), cache.keys[index],
                                 cache.values[index], cache.valid, h, kv, step.slot, first,
                                 model.scale or hd ** -0.5, layer.q_norm, layer.k_norm, model.eps)
        return _project(out, layer.wo, "o", index, step)
    qkv = qkv.to(model.attn_dtype)
    qkv = qkv.view(batch, 1, h + 2 * kv, hd).transpose(1, 2)  # [B, H+2KV, 1, hd]
    qk, v = qkv[:, : h + kv], qkv[:, h + kv :]
    if layer.q_norm is not None:
        qk = torch.cat([F.rms_norm(qk[:, :h], (hd,), layer.q_norm, model.eps),
                        F.rms_norm(qk[:, h:], (hd,), layer.k_norm, model.eps)], dim=1)
    qk = _rotate(qk, cos, sin)  # queries and keys together
    q = qk[:, :h]
    cache.keys[index][:, :, step.slot : step.slot + 1] = qk[:, h:]
    cache.values[index][:, :, step.slot : step.slot + 1] = v
    keys = cache.keys[index][:, :, first : step.slot + 1]
    values = cache.values[index][:, :, first : step.slot + 1]
    mask = None if step.mask is None else step.mask[..., first:]
    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=kv != h, scale=model.scale)
    return _project(out.transpose(1, 2).reshape(batch, h * hd).to(model.dtype), layer.wo, "o", index, step)


def _gated(model: LeanModel, x: torch.Tensor, w13: Weight, w2: Weight) -> torch.Tensor:
    gate, up = linear(x, w13).chunk(2, dim=-1)
    return linear(model.act(gate).mul_(up), w2)


def _token_gated(model: LeanModel, layer: LeanLayer, x: torch.Tensor, index: int, step: "_Step") -> torch.Tensor:
    gate, up = _project(x, layer.w13, "gate_up", index, step).chunk(2, dim=-1)
    return _project(model.act(gate).mul_(up), layer.w2, "down", index, step)


def _ffn(
    model: LeanModel, layer: LeanLayer, compact: Optional[CompactLayer], x: torch.Tensor, index: int, step: "_Step"
) -> torch.Tensor:
    """The FFN block's output (before Gemma's output norm)."""
    if step.token is not None:
        return _token_gated(model, layer, x, index, step)
    if compact is None:
        return _gated(model, x, layer.w13, layer.w2)
    if x.shape[0] == 1:
        return _gated(model, x, compact.w13[0], compact.w2[0])
    # Each sequence has its own kept neurons; batches are small, so one matmul pair per sequence.
    return torch.cat([_gated(model, x[b : b + 1], compact.w13[b], compact.w2[b]) for b in range(x.shape[0])])


def _add_norm(model: LeanModel, x: torch.Tensor, out: Optional[torch.Tensor], out_norm: Optional[torch.Tensor],
              norm: torch.Tensor) -> torch.Tensor:
    """The residual stream ``x += out`` (``out`` first normed by ``out_norm``: Gemma 3), in place;
    returns ``rms_norm(x, norm)``, the next block's input."""
    if out is not None and model.fused:
        return cpu_kernels.residual_norm(x, out, norm, model.eps, out_norm)
    if out is not None:
        x.add_(out if out_norm is None else F.rms_norm(out, (out.shape[-1],), out_norm, model.eps))
    return F.rms_norm(x, (x.shape[-1],), norm, model.eps)


def decode_step(
    model: LeanModel, tokens: torch.Tensor, cache: KVCache, compacts: dict[int, CompactLayer], step: _Step
) -> torch.Tensor:
    """One token per sequence (``tokens`` ``[B]``) through the whole model; returns logits ``[B, V]``."""
    x = model.embed[tokens].to(model.dtype)  # [B, d]
    if model.embed_scale != 1.0:
        x = x * torch.tensor(model.embed_scale, dtype=model.embed.dtype).to(model.dtype)
    out, out_norm = None, None  # the previous block's output, added to x by the next _add_norm
    for index, layer in enumerate(model.layers):
        attn_in = _add_norm(model, x, out, out_norm, layer.attn_norm)
        out, out_norm = _attention(model, layer, attn_in, cache, index, step), layer.attn_out_norm
        ffn_in = _add_norm(model, x, out, out_norm, layer.ffn_norm)
        out, out_norm = _ffn(model, layer, compacts.get(index), ffn_in, index, step), layer.ffn_out_norm
    x = _add_norm(model, x, out, out_norm, model.norm)
    return _logits(model, x)


@dataclass
class LayerCache:
    keys: torch.Tensor  # [B, KV, T, hd]
    values: torch.Tensor


@dataclass
class PromptCache:
    """A prompt's keys and values per layer, as ``KVCache.fill`` reads a Hugging Face cache (``layers[i].keys``)."""

    layers: list[LayerCache]

    def columns(self, count: int) -> "PromptCache":
        """The first ``count`` columns (views: ``prefill_steps`` copies a kept prefix into its own cache)."""
        return PromptCache([LayerCache(layer.keys[:, :, :count], layer.values[:, :, :count]) for layer in self.layers])

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.layers for t in (layer.keys, layer.values))

    @classmethod
    def rows_of(cls, cache, rows: slice) -> "PromptCache":
        """Rows ``rows`` of this or a Hugging Face cache."""
        return cls([LayerCache(layer.keys[rows], layer.values[rows]) for layer in cache.layers])


def prefill(model: LeanModel, ids: torch.Tensor, mask: torch.Tensor, chunk: int = PREFILL_CHUNK,
            past: Optional[PromptCache] = None) -> tuple[torch.Tensor, PromptCache]:
    """The left-padded prompts ``ids`` ``[B, T]`` (``mask`` 1 on real tokens) through the lean model,
    densely, ``chunk`` columns at a time: the last column's logits ``[B, 1, V]`` and every layer's
    keys and values (``prefill_steps``, run to its end).

    Why: on int4 the HF prefill runs the fp32 dequantised model (SmolLM2: ~0.15 s for a 36-token chat
    prompt, as long as ~25 decode steps), while the int4 kernels take the whole prompt as one batch
    whose rows share each load of the codes. Each row's products are its single run's."""
    steps = prefill_steps(model, ids, mask, chunk, past)
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value


def prefill_steps(model: LeanModel, ids: torch.Tensor, mask: torch.Tensor, chunk: int = PREFILL_CHUNK,
                  past: Optional[PromptCache] = None) -> Generator[None, None, tuple[torch.Tensor, PromptCache]]:
    """``prefill``, pausing (``yield``) after each ``chunk`` columns but the last, so that a server can
    decode its other requests' next tokens in between: a long prompt then delays them by a chunk at a
    time, not by its whole prefill. Each chunk attends to the keys and values of the chunks before it,
    so the result is the unchunked prefill's up to float rounding; a prompt of at most ``chunk``
    columns is one chunk, and the same numbers.

    ``past``: the keys and values of the first columns of a single prompt (``ids`` ``[1, T]``, no
    padding), kept from an earlier prefill of a prompt that began with the same tokens; those columns
    are not read again (a chat template's shared system prompt)."""
    if chunk < 1:
        raise ValueError(f"chunk must be at least 1 column, not {chunk}")
    batch, width = ids.shape
    reused = past.layers[0].keys.shape[2] if past is not None else 0
    if past is not None and (batch != 1 or not bool(mask.all()) or not 0 < reused < width):
        raise ValueError("a kept prefix needs one unpadded prompt longer than the prefix")
    kv, hd = model.n_kv_heads, model.head_dim
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    tables = model.rope_tables(width)
    # Query i sees keys j <= i that hold real tokens; a padding query sees itself (its output is unused).
    query, key = torch.arange(width, device=ids.device)[:, None], torch.arange(width, device=ids.device)[None]
    visible = (key <= query) & mask.bool()[:, None, :] | (key == query)  # [B, T, T]
    windows = {layer.window: visible & (query - key < layer.window) for layer in model.layers if layer.window}
    cache = PromptCache([LayerCache(torch.empty(batch, kv, width, hd, dtype=model.attn_dtype, device=ids.device),
                                    torch.empty(batch, kv, width, hd, dtype=model.attn_dtype, device=ids.device))
                         for _ in model.layers])
    if past is not None:
        for layer_cache, kept in zip(cache.layers, past.layers):
            layer_cache.keys[:, :, :reused], layer_cache.values[:, :, :reused] = kept.keys, kept.values
    for first in range(reused, width, chunk):
        last = min(width, first + chunk)
        rows = positions[:, first:last]
        rope = {kind: (cos[rows][:, None], sin[rows][:, None]) for kind, (cos, sin) in tables.items()}  # [B, 1, C, hd]
        x = model.embed[ids[:, first:last].reshape(-1)].to(model.dtype)
        if model.embed_scale != 1.0:
            x = x * torch.tensor(model.embed_scale, dtype=model.embed.dtype).to(model.dtype)
        out, out_norm = None, None
        for layer, layer_cache in zip(model.layers, cache.layers):
            attn_in = _add_norm(model, x, out, out_norm, layer.attn_norm)
            allowed = (windows[layer.window] if layer.window else visible)[:, first:last, :last]
            out = _prompt_attention(model, layer, attn_in, batch, rope, allowed, layer_cache, first, last)
            out_norm = layer.attn_out_norm
            ffn_in = _add_norm(model, x, out, out_norm, layer.ffn_norm)
            out, out_norm = _gated(model, ffn_in, layer.w13, layer.w2), layer.ffn_out_norm
        if last < width:
            yield
    columns = last - first
    final, final_out = (t.view(batch, columns, -1)[:, -1].contiguous() for t in (x, out))
    x = _add_norm(model, final, final_out, out_norm, model.norm)
    return _logits(model, x)[:, None], cache


def _prompt_attention(model: LeanModel, layer: LeanLayer, x: torch.Tensor, batch: int,
                      rope: dict[str, tuple[torch.Tensor, torch.Tensor]], allowed: torch.Tensor,
                      cache: LayerCache, first: int, last: int) -> torch.Tensor:
    """The attention block over columns ``[first, last)`` of the prompts (``x`` ``[B * C, d]``): their
    keys and values go into ``cache`` there, and they attend to every column before ``last``."""
    h, kv, hd = model.n_heads, model.n_kv_heads, model.head_dim
    qkv = linear(x, layer.wqkv)
    if layer.bqkv is not None:
        qkv = qkv + layer.bqkv
    qkv = qkv.to(model.attn_dtype).view(batch, -1, h + 2 * kv, hd).transpose(1, 2)  # [B, H+2KV, C, hd]
    qk, v = qkv[:, : h + kv], qkv[:, h + kv :]
    if layer.q_norm is not None:
        qk = torch.cat([F.rms_norm(qk[:, :h], (hd,), layer.q_norm, model.eps),
                        F.rms_norm(qk[:, h:], (hd,), layer.k_norm, model.eps)], dim=1)
    qk = _rotate(qk, *rope[layer.rope])
    cache.keys[:, :, first:last], cache.values[:, :, first:last] = qk[:, h:], v
    out = F.scaled_dot_product_attention(qk[:, :h], cache.keys[:, :, :last], cache.values[:, :, :last],
                                         attn_mask=allowed[:, None], enable_gqa=kv != h, scale=model.scale)
    return linear(out.transpose(1, 2).reshape(x.shape[0], h * hd).to(model.dtype), layer.wo)


def _logits(model: LeanModel, x: torch.Tensor) -> torch.Tensor:
    """The LM head on the final normed states ``x`` ``[B, d]``."""
    logits = linear(x, model.lm_head)
    if model.head_exact is not None:
        logits = exact_top_logits(logits, x, model.head_exact)
    if model.softcap:
        logits = torch.tanh(logits / model.softcap) * model.softcap
    return logits


def exact_top_logits(logits: torch.Tensor, x: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
    """fp32 logits ``[B, V]``, those within bf16's rounding of each row's best recomputed in fp32
    from the model's own head rows.

    bf16 logits are rounded to steps of 0.125 at magnitudes 16-32, so near-ties between the top
    tokens are decided by rounding. On SmolLM2, "Give me three tips for sleeping better." reaches
    one after "1. **": fp32 prefers "Avoid" over "1" by 0.031; bf16 logits tied them (0.000) and
    greedy took "1", after which the model repeats "1." for ever. Recomputing the few candidates
    costs a row of the head each (``topk`` of the whole vocabulary cost 0.8 ms a token).
    """
    logits = logits.float()
    best = logits.amax(-1, keepdim=True)
    near = logits >= best - best.abs() * NEAR_TIE - NEAR_TIE  # a few bf16 steps (2**-8 relative)
    rows, tokens = near.nonzero().unbind(1)
    logits[rows, tokens] = (x[rows].float() * head[tokens].float()).sum(-1)
    return logits


@dataclass
class LeanState:
    """One request's decode state on the lean backend."""

    cache: KVCache
    compacts: dict[int, CompactLayer]
    rope: dict[str, tuple[torch.Tensor, torch.Tensor]]  # kind -> cos, sin [length, hd]
    positions: torch.Tensor  # [B]: rope position of the last token fed
    slot: int  # the next cache slot to write
    padded: bool  # whether any prompt is left-padded (then attention needs a mask)
    token: Optional[list[TokenLayer]] = None  # token-level sparsity's per-layer decode
    session: Optional[object] = None


class LeanBackend:
    """Decode steps over a ``LeanModel``; built once per engine and weight format."""

    name = "lean"

    def __init__(self, model: LeanModel):
        self.model = model
        self.weights = model.weights
        self.prefill_chunk = PREFILL_CHUNK  # one number for every request, so each gets its single run's

    @property
    def max_length(self) -> int:
        return self.model.max_length

    @property
    def prefills(self) -> bool:
        """Whether dense prompts prefill here (int4 on coreinfer's CPU kernels: ``prefill``) rather
        than in the engine's HF model."""
        return self.model.fused

    def prefill(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, PromptCache]:
        """The last column's logits ``[B, 1, V]`` and the cache ``start`` reads (``prefill``)."""
        return prefill(self.model, ids, mask, self.prefill_chunk)

    def prefill_steps(self, ids: torch.Tensor, mask: torch.Tensor, past: Optional[PromptCache] = None):
        """``prefill``, pausing between chunks of the prompt (``prefill_steps``); ``past``: a kept prefix."""
        return prefill_steps(self.model, ids, mask, self.prefill_chunk, past)

    def start(self, session, hf_cache, mask: torch.Tensor, length: int) -> LeanState:
        """Copy the prompt's cache in and gather each sparse layer's kept neurons."""
        if length > self.max_length:
            raise ValueError(
                f"the lean backend decodes up to {self.max_length} tokens (prompt + answer), not {length}; "
                "use backend='reference'"
            )
        model = self.model
        token = session is not None and session.mode == "token"
        sentence = session is not None and not token
        compacts = model.gather({layer: session.neurons[layer] for layer in session.layers}) if sentence else {}
        cache = KVCache.allocate(model, mask.shape[0], length)
        cache.fill(hf_cache, mask)
        state = LeanState(cache, compacts, model.rope_tables(length), mask.sum(-1) - 1, mask.shape[1], not bool(mask.all()))
        if token:
            state.token, state.session = model.token_layers(session.thresholds), session
        return state

    def step(self, state: LeanState, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per sequence (``[B]``); logits ``[B, V]`` for the next."""
        slot = state.slot
        state.positions = state.positions + 1
        state.cache.valid[:, slot] = True
        rows = state.positions
        step = _Step(
            slot=slot,
            rope={kind: (cos[rows][:, None, None], sin[rows][:, None, None]) for kind, (cos, sin) in state.rope.items()},
            mask=state.cache.valid[:, None, None, : slot + 1] if state.padded else None,
            token=state.token,
            session=state.session,
        )
        if state.session is not None:
            state.session.count_tokens(tokens.shape[0])
        state.slot += 1
        return decode_step(self.model, tokens, state.cache, state.compacts, step)
