"""coreinfer's int4 gather kernel (decode.int4_gather): token-level products on int4 weights that read
only the kept inputs' codes, against masked dense references on ``Int4Weight.dequantize()``, and the
lean backend's token-level int4 path against the masked reference backend."""

from __future__ import annotations

import pytest
import torch

from coreinfer import Engine
from coreinfer.config import SamplingConfig, SparsityConfig
from coreinfer.decode import cpu_kernels, int4_gather
from coreinfer.decode.int4_dense import round_activations
from coreinfer.decode.weights import Int4Weight, gathers
from coreinfer.token_sparsity import GROUPS, TokenThresholds, kept_entries, sparsify

from conftest import TEST_DEVICE, prompts
from test_int4 import _relative_error, int4_exact_model

needs_kernel = pytest.mark.skipif(TEST_DEVICE != "cpu" or not cpu_kernels.available(),
                                  reason="the int4 gather kernel (a CPU with AVX2, FMA and F16C, and a compiler)")


def fp16_weight(out: int, inn: int, bits: int = 4, seed: int = 0) -> Int4Weight:
    """Integer codes with scales and offsets that fp16 holds exactly (as GGUF's Q4_0 / Q4_1 store them)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 2**bits, (out, inn), generator=g)
    scale = (torch.rand(out, inn // 32, generator=g) / 10).half().float()
    offset = (torch.randn(out, inn // 32, generator=g) / 10).half().float()
    return Int4Weight.from_integers(q, scale, offset, bits)


def masked_reference(x: torch.Tensor, w: Int4Weight, threshold: float, rounded: bool = True) -> torch.Tensor:
    """The kept inputs (rounded per group of 32 to int8, as the kernel multiplies them) times the
    dequantised weights, in float64."""
    keep = x.abs() > threshold if threshold >= 0 else torch.ones_like(x, dtype=torch.bool)
    masked = x.float() * keep
    return (round_activations(masked, 127) if rounded else masked).double() @ w.dequantize().double().t()


@needs_kernel
def test_selection_buffers_reused_between_calls_leave_nothing_behind():
    """The kernel keeps each thread's selection buffers from call to call: a wide batch with every input
    kept, then a narrow one with few, then the wide one again, each equals its masked reference."""
    wide, narrow = fp16_weight(96, 1536, seed=2), fp16_weight(64, 64, seed=3)
    g = torch.Generator().manual_seed(4)
    calls = [(wide, torch.randn(4, 1536, generator=g), -1.0), (narrow, torch.randn(1, 64, generator=g), 1.5),
             (wide, torch.randn(2, 1536, generator=g), 0.3)]
    for w, x, threshold in calls:
        y, kept = int4_gather.gathered_mm(x, w.gathered(), threshold)
        want = masked_reference(x, w, threshold)
        torch.testing.assert_close(y.double(), want, atol=1e-5 * want.abs().max().item(), rtol=0)
        assert kept == (kept_entries(x, threshold).tolist() if threshold >= 0 else [x.shape[1]] * x.shape[0])


@needs_kernel
@pytest.mark.parametrize("out, inn", [(64, 32), (48, 96), (200, 160), (576, 1536)])  # 48, 200: padded to 64 outputs
@pytest.mark.parametrize("bits", [4, 8])  # 8: two 4-bit planes (Q8_0)
@pytest.mark.parametrize("batch", [1, 3])
def test_gathered_equals_masked_dense_on_the_dequantised_weights(out, inn, bits, batch):
    """fp32 activations: equal to the masked product of the rounded activations in float64 to fp32
    rounding (1e-5 of the largest output), and to the unrounded one within int8's rounding (2e-2)."""
    w = fp16_weight(out, inn, bits)
    layout = w.gathered()
    assert layout is not None and layout.bits == 4 * len(w.codes)  # two 4-bit planes join into one 8-bit
    assert layout.codes.shape == (1, inn * -(-out // 64) * 32 * len(w.codes))
    x = torch.randn(batch, inn, generator=torch.Generator().manual_seed(1))
    for threshold in (0.6, 0.0, -1.0):
        y, kept = int4_gather.gathered_mm(x, layout, threshold)
        want = masked_reference(x, w, threshold)
        assert y.shape == (batch, out) and y.dtype == torch.float32
        torch.testing.assert_close(y.double(), want, atol=1e-5 * want.abs().max().item(), rtol=0)
        exact = masked_reference(x, w, threshold, rounded=False)
        torch.testing.assert_close(y.double(), exact, atol=2e-2 * exact.abs().max().item(), rtol=0)
        assert kept == (kept_entries(x, threshold).tolist() if threshold >= 0 else [inn] * batch)
    assert 0 < sum(int4_gather.gathered_mm(x, layout, 0.6)[1]) < batch * inn


@needs_kernel
def test_threshold_zero_is_dense_and_a_batch_is_its_singles():
    w = fp16_weight(192, 128)
    layout = w.gathered()
    x = torch.randn(5, 128, generator=torch.Generator().manual_seed(2))
    zero, _ = int4_gather.gathered_mm(x, layout, 0.0)
    dense, _ = int4_gather.gathered_mm(x, layout, -1.0)
    torch.testing.assert_close(zero, dense, atol=1e-5, rtol=1e-5)
    together, kept = int4_gather.gathered_mm(x, layout, 0.8)
    for b in range(5):
        alone, kept_alone = int4_gather.gathered_mm(x[b : b + 1], layout, 0.8)
        assert torch.equal(alone[0], together[b]) and kept_alone == [kept[b]]
        assert torch.equal(int4_gather.gathered_mm(x[b : b + 1], layout, -1.0)[0][0], dense[b])


@needs_kernel
def test_bf16_activations_and_nothing_kept():
    w = fp16_weight(64, 64)
    x = torch.randn(2, 64, generator=torch.Generator().manual_seed(3)).bfloat16()
    y, _ = int4_gather.gathered_mm(x, w.gathered(), 0.5)
    want = masked_reference(x.float(), w, 0.5)
    assert y.dtype == torch.bfloat16  # fp32 sums, rounded once to bf16
    torch.testing.assert_close(y.double(), want, atol=2**-8 * want.abs().max().item(), rtol=2**-7)
    nothing, kept = int4_gather.gathered_mm(x, w.gathered(), 1e9)
    assert kept == [0, 0] and torch.equal(nothing, torch.zeros_like(nothing))


@needs_kernel
def test_layout_is_built_once_and_refused_where_fp16_cannot_hold_the_scales():
    w = fp16_weight(64, 64)
    assert w.gathered() is w.gathered()
    tiny = Int4Weight.from_integers(torch.randint(0, 16, (64, 64)), torch.full((64, 2), 1e-9), torch.zeros(64, 2), 4)
    assert tiny.gathered() is None  # 1e-9 underflows fp16: that matrix stays dense


def test_without_the_kernel_int4_token_level_falls_back(monkeypatch):
    """Where the extension cannot be built, int4 reads no rows: explicit token-level refuses it and the
    default (resolve) decodes it densely, as before the kernel."""
    monkeypatch.setattr(cpu_kernels, "_module", None)
    monkeypatch.setattr(cpu_kernels, "_failed", "turned off for the test")
    assert not cpu_kernels.available() and not gathers("int4", torch.device("cpu"))
    assert gathers("bf16", torch.device("cpu"))
    engine = Engine(int4_exact_model(), tokenizer=None)
    backend = engine.backend("lean", "int4")
    assert not gathers(backend.weights, backend.model.device)
    assert not engine.token_pays(backend, SparsityConfig(keep=0.7, mode="token"))
    with pytest.raises(ValueError, match="int4"):
        backend.model.token_layers(TokenThresholds(torch.ones(4, len(GROUPS)), 0.5, "ffn"))
    assert fp16_weight(64, 64).gathered() is None


def test_a_failing_build_warns_once_and_never_raises(monkeypatch):
    monkeypatch.setattr(cpu_kernels, "_module", None)
    monkeypatch.setattr(cpu_kernels, "_failed", None)
    monkeypatch.setattr(cpu_kernels, "_cpu_flags", lambda: set(cpu_kernels.FLAGS))

    def broken():
        raise RuntimeError("g++: not found")

    monkeypatch.setattr(cpu_kernels, "_build", broken)
    with pytest.warns(RuntimeWarning, match="g\\+\\+: not found"):
        assert not cpu_kernels.available()
    assert not cpu_kernels.available()  # no second build, no second warning


@needs_kernel
def test_lean_int4_token_level_reads_fewer_rows_and_tracks_the_masked_reference(monkeypatch, tmp_path):
    """Token-level decoding on int4 weights reads the kept inputs only (ffn_density < 1) and gives the
    masked reference backend's logits (fp32, same values) as closely as bf16 weights' gather does;
    a batch gives each single run's tokens."""
    monkeypatch.setenv("COREINFER_CACHE", str(tmp_path))
    engine = Engine(int4_exact_model(), tokenizer=None, name="tiny-int4-gather")
    ps = prompts((9, 5, 12, 7), seed=3)
    engine.token_profile(ps, [p[::-1] * 2 for p in ps], progress=False)
    backend = engine.backend("lean", "int4")
    assert gathers(backend.weights, backend.model.device)
    sparsity = SparsityConfig(mode="token", keep=0.5, targets="all")
    batch, conts = prompts((9, 5, 12), seed=2), prompts((7, 7, 7), seed=6)
    reference, _ = engine.continuation_logits(batch, conts, sparsity, backend="reference")
    bf16, _ = engine.continuation_logits(batch, conts, sparsity, backend="lean", weights="bf16")
    int4, session = engine.continuation_logits(batch, conts, sparsity, backend="lean", weights="int4")
    assert session.ffn_density() < 0.9
    error = _relative_error(int4, reference)
    assert error < max(2 * _relative_error(bf16, reference), 1e-3)
    dense, _ = engine.continuation_logits(batch, conts, None, backend="lean", weights="int4")
    assert _relative_error(dense, reference) > error  # the thresholds really bite, and int4 follows them

    sampling = SamplingConfig(max_new_tokens=8)
    together = engine.generate_ids(batch, sparsity, sampling, backend="lean", weights="int4", ignore_eos=True)
    alone = [engine.generate_ids([p], sparsity, sampling, backend="lean", weights="int4", ignore_eos=True)[0]
             for p in batch]
    assert [r.token_ids for r in together] == [r.token_ids for r in alone]
    for a, b in zip(together, alone):
        assert a.mode == "token" and a.ffn_density < 1.0 and a.ffn_density == pytest.approx(b.ffn_density)


@needs_kernel
def test_keep_one_on_int4_token_level_is_dense_int4(monkeypatch, tmp_path):
    monkeypatch.setenv("COREINFER_CACHE", str(tmp_path))
    engine = Engine(int4_exact_model(), tokenizer=None, name="tiny-int4-gather")
    batch, answer = prompts((9, 12), seed=5), [[5, 17, 33, 2]] * 2
    dense, _ = engine.continuation_logits(batch, answer, None, backend="lean", weights="int4")
    token, session = engine.continuation_logits(batch, answer, SparsityConfig(mode="token", keep=1.0),
                                                 backend="lean", weights="int4")
    for got, want in zip(token, dense):
        assert torch.equal(got, want)
    assert session.ffn_density() == pytest.approx(1.0)


def test_sparsify_matches_the_kernels_rule():
    x = torch.tensor([[0.5, -0.5, 0.51, -2.0]])
    assert torch.equal(sparsify(x, 0.5) != 0, x.abs() > 0.5)  # strictly above the threshold, as the kernel keeps


@needs_kernel
@pytest.mark.parametrize("speedup, mode", [(0.84, "dense"), (1.3, "token")])  # SmolLM2's, and a 1B shape's
def test_auto_chooses_token_level_on_int4_where_it_measures_faster(speedup, mode, monkeypatch, tmp_path):
    """keep="auto" may decode token-level on int4 (the gather kernel), where the speed check finds it at
    least TOKEN_SPEEDUP times dense; scoring scores what decodes."""
    from coreinfer.engine import auto_reads_rows

    monkeypatch.setenv("COREINFER_CACHE", str(tmp_path))
    engine = Engine(int4_exact_model(), tokenizer=None, name="tiny-int4-auto")
    ps = prompts((9, 5, 12, 7), seed=3)
    engine.token_profile(ps, [p[::-1] * 2 for p in ps], progress=False)
    monkeypatch.setattr(engine, "_measure_token_speedup", lambda backend, sparsity: speedup)
    backend = engine.backend("lean", "int4")
    assert gathers(backend.weights, backend.model.device) and auto_reads_rows(backend)
    sparsity = SparsityConfig(keep="auto", mode="token", targets="ffn", quality=0.01)
    result = engine.generate_ids(prompts((9,)), sparsity, SamplingConfig(max_new_tokens=6), backend="lean",
                                 weights="int4")[0]
    assert result.mode == mode and (result.ffn_density < 1.0) == (mode == "token")
    scored = engine.resolve_scored(sparsity, backend)
    assert (scored is not None) == (mode == "token")
    answer = [[5, 17, 33, 2]]
    default, _ = engine.continuation_logits(prompts((9,)), answer, sparsity, backend="lean", weights="int4")
    dense, _ = engine.continuation_logits(prompts((9,)), answer, None, backend="lean", weights="int4")
    assert torch.equal(default[0], dense[0]) == (mode == "dense")  # the quality figure is the timed path's


@needs_kernel
def test_planes_that_do_not_join_stay_4_bit_and_exact():
    """A 4-bit matrix stacked on an 8-bit one (a compact FFN's gate and up rows from Q4_K and Q5_0) has a
    second plane of zeros under the 4-bit rows: no single 8-bit scale, so the kernel reads two 4-bit planes."""
    from coreinfer.decode.weights import cat_rows

    w = cat_rows([fp16_weight(64, 96, 4, seed=1), fp16_weight(64, 96, 8, seed=2)])
    layout = w.gathered()
    assert layout is not None and layout.bits == 4 and layout.codes.shape[0] == 2
    x = torch.randn(2, 96, generator=torch.Generator().manual_seed(4))
    for threshold in (0.5, -1.0):
        want = masked_reference(x, w, threshold)
        torch.testing.assert_close(int4_gather.gathered_mm(x, layout, threshold)[0].double(), want,
                                   atol=1e-5 * want.abs().max().item(), rtol=0)


@needs_kernel
@pytest.mark.parametrize("bits", [4, 8])
def test_group_16_scales_as_gguf_q6_k_gather_too(bits):
    """A scale per 16 inputs (GGUF's Q6_K, Gemma 3's down projections): pairs of kept inputs never cross
    a scale group, so an odd count in either half of a 32-input group is paired with a zero."""
    g = torch.Generator().manual_seed(7)
    q = torch.randint(0, 2**bits, (128, 96), generator=g)
    scale = (torch.rand(128, 6, generator=g) / 10).half().float()
    offset = (torch.randn(128, 6, generator=g) / 10).half().float()
    w = Int4Weight.from_integers(q, scale, offset, bits, group=16)
    layout = w.gathered()
    assert layout is not None and layout.scales.shape[1] == 6
    x = torch.randn(2, 96, generator=torch.Generator().manual_seed(8))
    for threshold in (0.7, -1.0):
        y, _ = int4_gather.gathered_mm(x, layout, threshold)
        want = masked_reference(x, w, threshold)
        torch.testing.assert_close(y.double(), want, atol=1e-5 * want.abs().max().item(), rtol=0)
