"""coreinfer's fused CPU decode pieces (decode/decode_ops.cpp) against the ATen path they replace."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from coreinfer import Engine
from coreinfer.decode import cpu_kernels
from coreinfer.decode.lean import _rotate
from coreinfer.decode.weights import Int4Weight

from conftest import TEST_DEVICE, prompts, tiny_model

needs_kernels = pytest.mark.skipif(TEST_DEVICE != "cpu" or not cpu_kernels.available(),
                                   reason="coreinfer's CPU kernels (AVX2, a C++ compiler)")
LEAN_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text")


@needs_kernels
@pytest.mark.parametrize("post", [False, True])
def test_residual_norm_adds_in_place_and_norms(post):
    gen = torch.Generator().manual_seed(0)
    x, delta = torch.randn(3, 40, generator=gen), torch.randn(3, 40, generator=gen)
    weight, post_weight = torch.rand(40, generator=gen) + 0.5, torch.rand(40, generator=gen) + 0.5
    want_x = x + (F.rms_norm(delta, (40,), post_weight, 1e-6) if post else delta)
    want = F.rms_norm(want_x, (40,), weight, 1e-6)
    got = cpu_kernels.residual_norm(x, delta, weight, 1e-6, post_weight if post else None)
    torch.testing.assert_close(x, want_x, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def _reference_attention(qkv, cos, sin, keys, values, valid, h, kv, slot, first, scale, q_norm, k_norm, eps):
    """The lean backend's ATen attention for one new token (decode/lean.py's unfused path)."""
    batch, hd = qkv.shape[0], keys.shape[-1]
    qkv = qkv.view(batch, 1, h + 2 * kv, hd).transpose(1, 2)
    qk, v = qkv[:, : h + kv], qkv[:, h + kv :]
    if q_norm is not None:
        qk = torch.cat([F.rms_norm(qk[:, :h], (hd,), q_norm, eps), F.rms_norm(qk[:, h:], (hd,), k_norm, eps)], dim=1)
    qk = _rotate(qk, cos[:, None, None], sin[:, None, None])
    keys[:, :, slot : slot + 1], values[:, :, slot : slot + 1] = qk[:, h:], v
    mask = valid[:, None, None, first : slot + 1]
    out = F.scaled_dot_product_attention(qk[:, :h], keys[:, :, first : slot + 1], values[:, :, first : slot + 1],
                                         attn_mask=mask, enable_gqa=kv != h, scale=scale)
    return out.transpose(1, 2).reshape(batch, h * hd)


@needs_kernels
@pytest.mark.parametrize("heads,kv_heads,hd", [(4, 2, 8), (9, 3, 64), (4, 1, 256)])
@pytest.mark.parametrize("first,norms", [(0, False), (5, True)])
def test_attend_equals_rope_cache_write_and_masked_sdpa(heads, kv_heads, hd, first, norms):
    """q/k norms, rope, the cache write at the slot, GQA, a left-padded row and a sliding window."""
    gen = torch.Generator().manual_seed(1)
    batch, length, slot, scale = 2, 24, 17, hd ** -0.5
    qkv = torch.randn(batch, (heads + 2 * kv_heads) * hd, generator=gen)
    cos, sin = torch.randn(batch, hd, generator=gen), torch.randn(batch, hd, generator=gen)
    keys, values = torch.randn(2, batch, kv_heads, length, hd, generator=gen).unbind(0)
    valid = torch.zeros(batch, length, dtype=torch.bool)
    valid[0, : slot + 1] = True
    valid[1, 8 : slot + 1] = True  # row 1 is left-padded: slots 0-7 hold nothing
    q_norm, k_norm = (torch.rand(hd, generator=gen) + 0.5, torch.rand(hd, generator=gen) + 0.5) if norms else (None, None)
    want_keys, want_values = keys.clone(), values.clone()
    want = _reference_attention(qkv, cos, sin, want_keys, want_values, valid, heads, kv_heads, slot, first, scale,
                                q_norm, k_norm, 1e-6)
    got = cpu_kernels.attend(qkv, cos, sin, keys, values, valid, heads, kv_heads, slot, first, scale, q_norm, k_norm, 1e-6)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(keys, want_keys, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(values, want_values)



@needs_kernels
@pytest.mark.parametrize("hd,slot", [(64, 250), (128, 93), (24, 40)])
def test_attend_over_long_caches_ignores_what_masked_slots_hold(hd, slot):
    """Spans of many 8-slot blocks and a tail, head sizes with and without the 64-wide value path; masked
    slots holding NaN (a cache row nobody wrote) change nothing."""
    gen = torch.Generator().manual_seed(2)
    batch, heads, kv_heads, length, scale = 3, 6, 2, 320, hd ** -0.5
    qkv = torch.randn(batch, (heads + 2 * kv_heads) * hd, generator=gen)
    cos, sin = torch.randn(batch, hd, generator=gen), torch.randn(batch, hd, generator=gen)
    keys, values = (torch.randn(2, batch, kv_heads, length, hd, generator=gen) * 3).unbind(0)
    valid = torch.zeros(batch, length, dtype=torch.bool)
    valid[0, : slot + 1] = True
    valid[1, 37 : slot + 1] = True  # left padding that ends inside an 8-slot block
    valid[2, slot] = True  # only the new token
    want_keys, want_values = keys.clone(), values.clone()
    want = _reference_attention(qkv, cos, sin, want_keys, want_values, valid, heads, kv_heads, slot, 0, scale,
                                None, None, 1e-6)
    keys[~valid[:, None, :, None].expand_as(keys)] = float("nan")
    values[~valid[:, None, :, None].expand_as(values)] = float("nan")
    got = cpu_kernels.attend(qkv, cos, sin, keys, values, valid, heads, kv_heads, slot, 0, scale, None, None, 1e-6)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # One row alone gets the numbers it gets in the batch.
    alone = cpu_kernels.attend(qkv[1:2], cos[1:2], sin[1:2], keys[1:2].clone(), values[1:2].clone(), valid[1:2],
                               heads, kv_heads, slot, 0, scale, None, None, 1e-6)
    assert torch.equal(alone, got[1:2])

def _int4_model(arch: str):
    model = tiny_model(arch)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embed" not in name:
                p.copy_(Int4Weight.quantize(p).dequantize())
    return model


@needs_kernels
@pytest.mark.parametrize("arch", LEAN_FAMILIES)
def test_fused_int4_step_equals_the_aten_step(arch):
    """Every lean family (Qwen2's bias, Qwen3's q/k norms, Gemma 3's output norms and sliding window,
    left padding): the fused step's logits are the ATen step's, in a batch and alone."""
    engine = Engine(_int4_model(arch), tokenizer=None)
    lean = engine.backend("lean", "int4").model
    assert lean.fused and lean.dtype == torch.float32
    batch, answer = prompts((9, 14), seed=3), [[5, 17, 33, 2, 90, 41, 7, 60]] * 2
    fused, _ = engine.continuation_logits(batch, answer, None, backend="lean", weights="int4")
    single, _ = engine.continuation_logits(batch[:1], answer[:1], None, backend="lean", weights="int4")
    lean.fused = False
    try:
        aten, _ = engine.continuation_logits(batch, answer, None, backend="lean", weights="int4")
    finally:
        lean.fused = True
    for got, want in zip(fused, aten):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(single[0], fused[0], rtol=1e-4, atol=1e-4)
