"""A lean decode path for the Llama family, in the style of gpt-fast.

The reference engine decodes through Hugging Face modules: a dynamic KV cache
that grows by ``torch.cat`` every token, separate q/k/v projections, mask
building and Python bookkeeping per layer. Decoding a 135M model is bound by
reading the weights once per token, so all that overhead shows. Here:

- ``LeanModel`` holds the weights in a few contiguous tensors per layer (fused
  qkv, fused gate+up, down transposed so that kept neurons are rows), in fp32
  or bf16, built once from a Hugging Face model;
- ``KVCache`` is allocated once per request (``[B, kv_heads, max_len, head_dim]``)
  and written in place;
- ``lean_generate`` prefills with the engine's own (dense, recording) prefill,
  so neuron selection is exactly the reference's, copies the prompt's keys and
  values into the static cache, gathers each sparse layer's kept rows from the
  lean weights, and runs a plain loop of one-token steps.

Greedy tokens equal the reference path's in fp32 (tested); bf16 weights change
the numbers slightly, as any bf16 model does.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
from torch import nn
from torch.nn import functional as F

from .engine import Engine, GenerationResult, SamplingConfig, SparsityConfig, _Sequence, _sync, sample_next

SUPPORTED_TYPES = ("llama", "mistral", "qwen2")


def bf16_supported() -> bool:
    """Whether this CPU has native bf16 matmuls (AVX-512 BF16 or AMX); CUDA always counts."""
    if torch.cuda.is_available():
        return True
    return torch.backends.cpu.get_cpu_capability() in ("AVX512", "AVX512_BF16", "AMX") and _cpu_flag("avx512_bf16")


def _cpu_flag(flag: str) -> bool:
    try:
        with open("/proc/cpuinfo") as info:
            return any(flag in line.split() for line in info if line.startswith("flags"))
    except OSError:
        return False


WEIGHT_FORMATS = ("fp32", "bf16", "int8")


@dataclass
class Int8Weight:
    """Weight-only int8 in ``nn.Linear`` layout ``[out, in]`` with one scale per output channel.

    Selecting rows (gate/up neurons) or columns (down inputs) keeps the scales
    valid, so quantisation composes with CoreInfer's gathering.
    """

    q: torch.Tensor  # [out, in] int8
    scale: torch.Tensor  # [out], the activation dtype

    @classmethod
    def quantize(cls, w: torch.Tensor, dtype: torch.dtype) -> "Int8Weight":
        scale = w.detach().float().abs().amax(dim=1).clamp(min=1e-12) / 127.0
        q = torch.round(w.detach().float() / scale[:, None]).clamp(-127, 127).to(torch.int8)
        return cls(q.contiguous(), scale.to(dtype))

    def rows(self, index: torch.Tensor) -> "Int8Weight":
        return Int8Weight(self.q[index].contiguous(), self.scale[index].contiguous())

    def cols(self, index: torch.Tensor) -> "Int8Weight":
        return Int8Weight(self.q[:, index].contiguous(), self.scale)

    def numel(self) -> int:
        return self.q.numel()

    def nbytes(self) -> int:
        return self.q.numel() + self.scale.numel() * self.scale.element_size()


Weight = Union[torch.Tensor, Int8Weight]


def linear(x: torch.Tensor, w: Weight) -> torch.Tensor:
    """``x @ w.T`` for ``x`` ``[M, in]``; int8 weights use PyTorch's weight-only int8 kernel."""
    if isinstance(w, Int8Weight):
        return torch._weight_int8pack_mm(x, w.q, w.scale)
    return F.linear(x, w)


def _rows(w: Weight, index: torch.Tensor) -> Weight:
    return w.rows(index) if isinstance(w, Int8Weight) else w[index].contiguous()


def _cols(w: Weight, index: torch.Tensor) -> Weight:
    return w.cols(index) if isinstance(w, Int8Weight) else w[:, index].contiguous()


def _nbytes(w: Weight) -> int:
    return w.nbytes() if isinstance(w, Int8Weight) else w.numel() * w.element_size()


@dataclass
class LeanLayer:
    attn_norm: torch.Tensor  # [d]
    wqkv: Weight  # [(H + 2 KV) * hd, d]
    bqkv: Optional[torch.Tensor]  # [(H + 2 KV) * hd] (Qwen2)
    wo: Weight  # [d, H * hd]
    ffn_norm: torch.Tensor  # [d]
    w13: Weight  # [2N, d]: gate rows, then up rows
    w2: Weight  # [d, N]


@dataclass
class CompactLayer:
    """One layer's kept neurons, gathered once per sequence: ``[2K, d]`` and ``[d, K]`` each."""

    w13: list[Weight]
    w2: list[Weight]


class LeanModel:
    """Contiguous decode-time weights of a Llama-family HF model."""

    def __init__(self, hf_model: nn.Module, weights: str = "fp32"):
        config = hf_model.config
        if config.model_type not in SUPPORTED_TYPES:
            raise ValueError(f"the lean path supports {', '.join(SUPPORTED_TYPES)}, not {config.model_type}")
        if weights not in WEIGHT_FORMATS:
            raise ValueError(f"weights must be one of {WEIGHT_FORMATS}, not {weights!r}")
        self.weights = weights
        # int8 weights run with bf16 activations: PyTorch's int8 kernel is fastest there.
        self.dtype = torch.float32 if weights == "fp32" else torch.bfloat16
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = config.num_key_value_heads or self.n_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.n_heads
        self.eps = config.rms_norm_eps
        self.sliding_window = getattr(config, "sliding_window", None) if config.model_type == "mistral" else None
        self.max_positions = config.max_position_embeddings
        self.layers = [self._layer(layer) for layer in hf_model.model.layers]
        self.norm = _c(hf_model.model.norm.weight, self.dtype)
        self.lm_head = self._matrix(hf_model.get_output_embeddings().weight)
        self.embed = hf_model.model.embed_tokens.weight  # read one row per token: keep the model's own
        self.rotary = hf_model.model.rotary_emb
        self.device = self.norm.device

    def _matrix(self, w: torch.Tensor) -> Weight:
        return Int8Weight.quantize(w, self.dtype) if self.weights == "int8" else _c(w, self.dtype)

    def _layer(self, layer: nn.Module) -> LeanLayer:
        attn, mlp = layer.self_attn, _mlp(layer)
        biases = [attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias]
        return LeanLayer(
            attn_norm=_c(layer.input_layernorm.weight, self.dtype),
            wqkv=self._matrix(torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])),
            bqkv=None if biases[0] is None else _c(torch.cat(biases), self.dtype),
            wo=self._matrix(attn.o_proj.weight),
            ffn_norm=_c(layer.post_attention_layernorm.weight, self.dtype),
            w13=self._matrix(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])),
            w2=self._matrix(mlp.down_proj.weight),
        )

    @property
    def num_neurons(self) -> int:
        return self.layers[0].w13.numel() // 2 // self.norm.numel()

    def weight_bytes_per_token(self, ffn_density: float = 1.0) -> int:
        """Bytes of weights one decode step reads: every layer, the final norm and the LM head.

        ``ffn_density`` is ``GenerationResult.ffn_density``: the FFNs' share read, averaged over layers.
        """
        norm_bytes = self.norm.element_size() * self.norm.numel()
        ffn = sum(_nbytes(layer.w13) + _nbytes(layer.w2) for layer in self.layers)
        rest = sum(2 * norm_bytes + _nbytes(layer.wqkv) + _nbytes(layer.wo) for layer in self.layers)
        return round(_nbytes(self.lm_head) + norm_bytes + rest + ffn * ffn_density)

    def gather(self, neurons: dict[int, torch.Tensor]) -> dict[int, CompactLayer]:
        """Each sparse layer's kept neurons (``{layer: [B, K]}``) as contiguous per-sequence weights."""
        compacts = {}
        n = self.num_neurons
        for index, kept in neurons.items():
            layer = self.layers[index]
            rows = [torch.cat([k, k + n]) for k in kept.to(self.device)]  # gate rows, then up rows
            compacts[index] = CompactLayer(
                w13=[_rows(layer.w13, r) for r in rows], w2=[_cols(layer.w2, k) for k in kept.to(self.device)]
            )
        return compacts

    def rope_tables(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin ``[length, hd]`` from the HF model's own rotary module (any rope scaling)."""
        positions = torch.arange(length, device=self.device)[None]
        probe = torch.zeros(1, dtype=torch.float32, device=self.device)
        cos, sin = self.rotary(probe, positions)
        return cos[0].to(self.dtype), sin[0].to(self.dtype)


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
        keys = [torch.zeros(shape, dtype=model.dtype, device=model.device) for _ in model.layers]
        values = [torch.zeros(shape, dtype=model.dtype, device=model.device) for _ in model.layers]
        return cls(keys, values, torch.zeros(batch, length, dtype=torch.bool, device=model.device))

    def fill(self, hf_cache, mask: torch.Tensor) -> None:
        """Copy the prompt's keys and values out of the HF prefill cache."""
        width = mask.shape[1]
        for index, layer in enumerate(hf_cache.layers):
            self.keys[index][:, :, :width] = layer.keys
            self.values[index][:, :, :width] = layer.values
        self.valid[:, :width] = mask.bool()


@dataclass
class _Step:
    """What every layer of one decode step shares: the slot written, rope rows, attention mask."""

    slot: int
    cos: torch.Tensor  # [B, 1, 1, hd]
    sin: torch.Tensor
    mask: Optional[torch.Tensor]  # [B, 1, 1, slot + 1] bool, or None when nothing is padding


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def _attention(model: LeanModel, layer: LeanLayer, x: torch.Tensor, cache: KVCache, index: int, step: _Step):
    batch = x.shape[0]
    h, kv, hd = model.n_heads, model.n_kv_heads, model.head_dim
    qkv = linear(x, layer.wqkv)
    if layer.bqkv is not None:
        qkv = qkv + layer.bqkv
    qkv = qkv.view(batch, 1, h + 2 * kv, hd).transpose(1, 2)  # [B, H+2KV, 1, hd]
    q, k, v = qkv.split([h, kv, kv], dim=1)
    q = _rotate(q, step.cos, step.sin)
    cache.keys[index][:, :, step.slot : step.slot + 1] = _rotate(k, step.cos, step.sin)
    cache.values[index][:, :, step.slot : step.slot + 1] = v
    keys = cache.keys[index][:, :, : step.slot + 1]
    values = cache.values[index][:, :, : step.slot + 1]
    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=step.mask, enable_gqa=kv != h)
    return linear(out.transpose(1, 2).reshape(batch, h * hd), layer.wo)


def _gated(x: torch.Tensor, w13: Weight, w2: Weight) -> torch.Tensor:
    gate, up = linear(x, w13).chunk(2, dim=-1)
    return linear(F.silu(gate).mul_(up), w2)


def _ffn(layer: LeanLayer, compact: Optional[CompactLayer], x: torch.Tensor) -> torch.Tensor:
    if compact is None:
        return _gated(x, layer.w13, layer.w2)
    # Each sequence has its own kept neurons; batches are small, so one matmul pair per sequence.
    if x.shape[0] == 1:
        return _gated(x, compact.w13[0], compact.w2[0])
    return torch.cat([_gated(x[b : b + 1], compact.w13[b], compact.w2[b]) for b in range(x.shape[0])])


def decode_step(
    model: LeanModel, tokens: torch.Tensor, cache: KVCache, compacts: dict[int, CompactLayer], step: _Step
) -> torch.Tensor:
    """One token per sequence (``tokens`` ``[B]``) through the whole model; returns logits ``[B, V]``."""
    x = model.embed[tokens].to(model.dtype)  # [B, d]
    for index, layer in enumerate(model.layers):
        attn_in = F.rms_norm(x, (x.shape[-1],), layer.attn_norm, model.eps)
        x = x + _attention(model, layer, attn_in, cache, index, step)
        ffn_in = F.rms_norm(x, (x.shape[-1],), layer.ffn_norm, model.eps)
        x = x + _ffn(layer, compacts.get(index), ffn_in)
    x = F.rms_norm(x, (x.shape[-1],), model.norm, model.eps)
    return linear(x, model.lm_head)


@torch.inference_mode()
def lean_generate(
    engine: Engine,
    model: LeanModel,
    prompts: Sequence[Sequence[int]],
    sparsity: Optional[SparsityConfig] = None,
    sampling: SamplingConfig = SamplingConfig(),
    ignore_eos: bool = False,
) -> list[GenerationResult]:
    """Generate like ``Engine.generate_ids``, decoding with ``model`` (built from ``engine.model``).

    Selection, first token and results are the engine's; only the decode loop differs.
    ``ignore_eos`` always produces ``max_new_tokens`` tokens (benchmarks).
    """
    with engine.lock:
        return _lean_generate(engine, model, prompts, sparsity, sampling, ignore_eos)


def _lean_generate(engine, model, prompts, sparsity, sampling, ignore_eos) -> list[GenerationResult]:
    device = engine.device
    ids, mask = engine._left_pad(prompts)
    width = ids.shape[1]
    length = width + sampling.max_new_tokens
    if model.sliding_window and length > model.sliding_window:
        raise ValueError(f"the lean path does not implement sliding windows; keep prompts under {model.sliding_window}")
    if sampling.stop:
        raise ValueError("the lean path does not implement stop strings; use Engine.generate_ids")
    seqs = [_Sequence(len(p), engine._generator(sampling.seed)) for p in prompts]
    eos = set() if ignore_eos else engine.eos_ids()

    start = time.perf_counter()
    session = engine.new_session(sparsity, mask)
    logits, hf_cache = engine.prefill(ids, mask, session)
    _sync(device)
    prefill_s = time.perf_counter() - start

    start = time.perf_counter()
    compacts = model.gather({layer: session.neurons[layer] for layer in session.layers}) if session else {}
    cache = KVCache.allocate(model, len(prompts), length)
    cache.fill(hf_cache, mask)
    del hf_cache
    cos_table, sin_table = model.rope_tables(length)
    _sync(device)
    select_s = time.perf_counter() - start

    start = time.perf_counter()
    positions = mask.sum(-1) - 1  # [B]
    padded = not bool(mask.all())
    tokens = _pick(logits[:, -1, :], sampling, seqs)
    out = [tokens]
    finished = _finished(tokens, eos, torch.zeros_like(tokens, dtype=torch.bool))
    for slot in range(width, length - 1):
        if bool(finished.all()):
            break
        positions = positions + 1
        cache.valid[:, slot] = True
        step = _Step(
            slot=slot,
            cos=cos_table[positions][:, None, None],
            sin=sin_table[positions][:, None, None],
            mask=cache.valid[:, None, None, : slot + 1] if padded else None,
        )
        logits = decode_step(model, tokens, cache, compacts, step)
        tokens = _pick(logits, sampling, seqs)
        out.append(tokens)
        finished = _finished(tokens, eos, finished)
    _sync(device)
    decode_s = time.perf_counter() - start

    density = session.ffn_density() if session is not None else 1.0
    results = []
    for row, token_ids in enumerate(torch.stack(out, dim=1).tolist()):
        ids_out, reason = _until_eos(token_ids, eos, sampling.max_new_tokens)
        results.append(
            GenerationResult(
                text=engine.decode_text(ids_out),
                token_ids=ids_out,
                prompt_tokens=seqs[row].prompt_len,
                new_tokens=len(ids_out),
                finish_reason=reason,
                prefill_s=prefill_s,
                select_s=select_s,
                decode_s=decode_s,
                ffn_density=density,
                keep=sparsity.keep if sparsity is not None else None,
            )
        )
    return results


def _pick(logits: torch.Tensor, sampling: SamplingConfig, seqs: list[_Sequence]) -> torch.Tensor:
    """Next token per sequence ``[B]``; greedy stays one batched argmax, with no Python per row."""
    if sampling.temperature == 0:
        return logits.argmax(-1)
    return torch.tensor([sample_next(row, sampling, s.generator) for row, s in zip(logits, seqs)], device=logits.device)


def _finished(tokens: torch.Tensor, eos: set[int], finished: torch.Tensor) -> torch.Tensor:
    if not eos:
        return finished
    return finished | torch.isin(tokens, torch.tensor(sorted(eos), device=tokens.device))


def _until_eos(token_ids: list[int], eos: set[int], limit: int) -> tuple[list[int], str]:
    for index, token in enumerate(token_ids[:limit]):
        if token in eos:
            return token_ids[:index], "eos"
    return token_ids[:limit], "length"
