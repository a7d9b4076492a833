"""Group-wise int4 weights: GGUF's own blocks read exactly, the kernel against dequantised references,
and the lean backend's int4 paths (dense, sentence-level compact, batches) against masked dense ones."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from coreinfer import Engine
from coreinfer.config import SparsityConfig
from coreinfer.decode.gguf_blocks import READERS, int4_from_gguf_tensor
from coreinfer.decode.weights import Int4Weight, cat_rows, linear, rows_padded, take_cols
from coreinfer.token_sparsity import GROUPS, TokenThresholds

from conftest import TEST_DEVICE, prompts, tiny_model

# The CPU kernel is the point here; elsewhere int4 dequantises (tested by the same numbers).
ON_CPU = TEST_DEVICE == "cpu"


def random_blocks(kind: str, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Random bytes shaped as GGUF blocks of ``kind``, with finite fp16 scales (each block's first bytes)."""
    block_bytes, block_weights, _ = READERS[kind]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (rows * cols // block_weights, block_bytes), dtype=np.uint8)
    halves = {"Q4_1": 2, "Q5_1": 2, "Q4_K": 2}.get(kind, 1)  # d, and m or dmin where the type has one
    at = slice(block_bytes - 2, block_bytes) if kind == "Q6_K" else slice(0, 2 * halves)  # Q6_K's d comes last
    raw[:, at] = rng.uniform(-0.1, 0.1, (raw.shape[0], halves)).astype(np.float16).view(np.uint8)
    return raw.reshape(rows, -1)


@pytest.mark.parametrize("kind", sorted(READERS))
def test_gguf_blocks_read_to_the_values_gguf_dequantises(kind):
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    rows, cols = 16, 256
    raw = random_blocks(kind, rows, cols)
    weight = int4_from_gguf_tensor(kind, raw, rows, cols)
    expected = torch.from_numpy(dequantize(raw, GGMLQuantizationType[kind]).reshape(rows, cols).astype(np.float32))
    assert len(weight.codes) == {"Q5_0": 2, "Q5_1": 2, "Q8_0": 2, "Q6_K": 2}.get(kind, 1)
    assert weight.group == (16 if kind == "Q6_K" else 32)
    torch.testing.assert_close(weight.dequantize(), expected, atol=1e-6, rtol=1e-5)


def test_gguf_types_int4_cannot_hold_are_left_out():
    assert int4_from_gguf_tensor("Q2_K", np.zeros((16, 84), np.uint8), 16, 256) is None
    assert int4_from_gguf_tensor("Q4_1", random_blocks("Q4_1", 8, 64), 8, 64) is None  # rows not a multiple of 16


@pytest.mark.parametrize("bits", [4, 5, 8])
@pytest.mark.parametrize("batch", [1, 3])
def test_int4_linear_equals_the_dequantised_product(bits, batch):
    torch.manual_seed(0)
    q = torch.randint(0, 2**bits, (48, 96))
    scale, offset = torch.rand(48, 3) / 10, torch.randn(48, 3) / 10
    reference = (q.float().view(48, 3, 32) * scale[..., None] + offset[..., None]).view(48, 96)
    x = torch.randn(batch, 96)
    for dtype, tolerance in ((torch.float32, 1e-4), (torch.bfloat16, 2e-2)):  # bf16: the kernel's scales round
        weight = Int4Weight.from_integers(q, scale, offset, bits, dtype=dtype)
        torch.testing.assert_close(weight.dequantize(), reference, atol=1e-5, rtol=1e-5)
        got = linear(x.to(dtype), weight).float()
        torch.testing.assert_close(got, F.linear(x, reference), atol=tolerance * reference.abs().max().item() * 10,
                                   rtol=tolerance)


def test_int4_rows_columns_and_stacking_keep_the_values():
    torch.manual_seed(0)
    four = Int4Weight.quantize(torch.randn(32, 64))
    eight = Int4Weight.from_integers(torch.randint(0, 256, (16, 64)), torch.rand(16, 2), torch.zeros(16, 2), 8)
    index = torch.tensor([5, 0, 17])
    picked = rows_padded(four, index, 16)
    assert torch.equal(picked.dequantize()[:3], four.dequantize()[index])
    assert torch.equal(picked.dequantize()[3:], torch.zeros(13, 64))  # zero rows contribute nothing
    stacked = cat_rows([four, eight])  # one plane and two: the first reads a zero second plane
    torch.testing.assert_close(stacked.dequantize(), torch.cat([four.dequantize(), eight.dequantize()]))
    columns = take_cols(four, index, 8)
    assert columns.dtype == four.dtype and torch.equal(columns[:, :3], four.dequantize()[:, index].to(four.dtype))


def test_int4_round_to_nearest_stays_within_half_a_step():
    torch.manual_seed(0)
    w = torch.randn(16, 64)
    grouped = w.view(16, 2, 32)
    step = (grouped.amax(-1) - grouped.amin(-1)) / 15
    error = (Int4Weight.quantize(w).dequantize() - w).view(16, 2, 32).abs().amax(-1)
    assert torch.all(error <= step / 2 + 1e-6)


def int4_exact_model():
    """A tiny model whose matrices already hold int4 values (round to nearest once), so int4 decoding
    and the dense fp32 reference (its prefill included) read the same numbers."""
    model = tiny_model("llama")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embed" not in name:
                p.copy_(Int4Weight.quantize(p).dequantize())
    return model


def _relative_error(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    got, want = torch.cat(got), torch.cat(want)
    return ((got - want).norm() / want.norm()).item()


@pytest.mark.skipif(not ON_CPU, reason="the int4 CPU kernel")
@pytest.mark.parametrize("keep", [None, 0.1, 0.4])  # 0.1: 8 neurons, so gate and up each 8 rows, packed together
def test_lean_int4_tracks_fp32_on_the_same_values(keep):
    """Dense and sentence-level compact int4 decoding give the logits fp32 gives on the int4 values,
    as closely as bf16 weights do, and a batch gives each single run."""
    engine = Engine(int4_exact_model(), tokenizer=None)
    lean = engine.backend("lean", "int4").model
    assert all(isinstance(w, Int4Weight) for layer in lean.layers for w in (layer.wqkv, layer.wo, layer.w13, layer.w2))
    assert isinstance(lean.lm_head, Int4Weight)
    sparsity = None if keep is None else SparsityConfig(keep=keep, layers=(0, 1, 2, 3))
    batch, answer = prompts((9, 12), seed=5), [[5, 17, 33, 2, 90, 41]] * 2
    logits = {w: engine.continuation_logits(batch, answer, sparsity, backend="lean", weights=w)[0]
              for w in ("fp32", "bf16", "int4")}
    error = _relative_error(logits["int4"], logits["fp32"])
    assert error < max(2 * _relative_error(logits["bf16"], logits["fp32"]), 1e-3)
    agree = torch.cat(logits["int4"]).argmax(-1) == torch.cat(logits["fp32"]).argmax(-1)
    assert agree.float().mean() > 0.9
    single, _ = engine.continuation_logits(batch[1:], answer[1:], sparsity, backend="lean", weights="int4")
    assert _relative_error(single, logits["int4"][1:]) < 0.01


def without_cpu_kernels(monkeypatch):
    """As where coreinfer's CPU kernels cannot be built (tests/test_int4_gather.py tests it)."""
    from coreinfer.decode import cpu_kernels

    monkeypatch.setattr(cpu_kernels, "_module", None)
    monkeypatch.setattr(cpu_kernels, "_failed", "turned off for the test")


def test_without_the_gather_kernel_token_level_refuses_int4_and_the_default_decodes_it_densely(monkeypatch):
    without_cpu_kernels(monkeypatch)
    engine = Engine(tiny_model("llama"), tokenizer=None)
    with pytest.raises(ValueError, match="int4"):
        engine.backend("lean", "int4").model.token_layers(TokenThresholds(torch.ones(4, len(GROUPS)), 0.5, "ffn"))
    assert not engine.token_pays(engine.backend("lean", "int4"), SparsityConfig(keep=0.7, mode="token"))


def test_default_scores_int4_as_it_decodes_it_densely_without_the_gather_kernel(monkeypatch, tmp_path):
    """Without the gather kernel the default's token-level level has no int4 path: scoring it on int4
    scores the dense int4 model."""
    without_cpu_kernels(monkeypatch)
    monkeypatch.setenv("COREINFER_CACHE", str(tmp_path))
    engine = Engine(int4_exact_model(), tokenizer=None, name="tiny-int4")
    batch = prompts((9, 5), seed=3)
    engine.token_profile(batch, [p[::-1] * 2 for p in batch], progress=False)
    monkeypatch.setattr(engine.token_profile(), "levels", lambda quality, targets: [0.7])
    answer = [[5, 17, 33, 2]] * 2
    default, _ = engine.continuation_logits(batch, answer, SparsityConfig(keep="auto", mode="token", targets="ffn"),
                                            backend="lean", weights="int4")
    dense, _ = engine.continuation_logits(batch, answer, None, backend="lean", weights="int4")
    for got, want in zip(default, dense):
        assert torch.equal(got, want)


def test_keep_one_on_int4_reproduces_dense_int4():
    engine = Engine(int4_exact_model(), tokenizer=None)
    batch, answer = prompts((9, 12), seed=5), [[5, 17, 33, 2]] * 2
    keep_one = SparsityConfig(keep=1.0, layers=(0, 1, 2, 3))
    for prompt in batch:  # one sequence: the same kernel either way, so the same numbers
        dense, _ = engine.continuation_logits([prompt], answer[:1], None, backend="lean", weights="int4")
        kept, _ = engine.continuation_logits([prompt], answer[:1], keep_one, backend="lean", weights="int4")
        assert torch.equal(kept[0], dense[0])
    # A batch too: its dense products and each sequence's compact ones run the same kernel, row by row.
    dense, _ = engine.continuation_logits(batch, answer, None, backend="lean", weights="int4")
    kept, _ = engine.continuation_logits(batch, answer, keep_one, backend="lean", weights="int4")
    for got, want in zip(kept, dense):
        assert torch.equal(got, want)


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_K", "Q8_0"])
def test_gguf_blocks_read_in_parts_equal_one_read(kind):
    """Large matrices are read a few thousand rows at a time (a 128k-token embedding would widen to
    1 GB of int32 codes at once): the parts joined are the whole."""
    raw = random_blocks(kind, 48, 256, seed=3)
    whole = int4_from_gguf_tensor(kind, raw, 48, 256)
    parts = int4_from_gguf_tensor(kind, raw, 48, 256, rows_per_part=16)
    assert len(parts.codes) == len(whole.codes)
    for a, b in zip(parts.codes + parts.scale_zeros, whole.codes + whole.scale_zeros):
        assert torch.equal(a, b)


def test_the_block_check_compares_every_row_block():
    from coreinfer.decode.gguf_blocks import _reproduces

    weight = int4_from_gguf_tensor("Q4_1", random_blocks("Q4_1", 48, 64, seed=4), 48, 64)
    exact = weight.dequantize()
    assert _reproduces(weight, lambda start, end: exact[start:end], rows=16)
    last = exact.clone()
    last[-1, -1] += 0.01 * exact.abs().max()  # off in the last block of rows only
    assert not _reproduces(weight, lambda start, end: last[start:end], rows=16)
    assert not _reproduces(weight, lambda start, end: exact[:32][start:end], rows=16)  # fewer rows


def _sourced(kind: str, rows: int, cols: int, seed: int) -> Int4Weight:
    """A GGUF-read matrix that can read its row layout back, as the int4 cache's are."""
    weight = int4_from_gguf_tensor(kind, random_blocks(kind, rows, cols, seed=seed), rows, cols)
    planes = ([c.clone() for c in weight.codes], [sz.clone() for sz in weight.scale_zeros])
    weight.source = lambda: ([c.clone() for c in planes[0]], [sz.clone() for sz in planes[1]])
    return weight


@pytest.mark.skipif(not ON_CPU, reason="the dense kernel's layout is a CPU layout")
def test_dropped_rows_are_read_back_for_compaction_and_the_token_layout():
    """Once the dense kernel's layout is built, the row layout (a second copy of the matrix) is dropped
    and read back from its source when a sparse path needs it: the same values, and dropped again once
    the token-level layout is built."""
    from coreinfer.decode import cpu_kernels

    if not cpu_kernels.available():
        pytest.skip("coreinfer's CPU kernels do not build here")
    gate, up = _sourced("Q4_1", 64, 128, seed=5), _sourced("Q8_0", 64, 128, seed=6)
    fused = cat_rows([gate, up])
    expected = fused.dequantize()
    x = torch.randn(2, 128, generator=torch.Generator().manual_seed(7))
    dense = linear(x, fused)
    assert fused.dense_layout() is not None and fused.drop_rows()
    assert "codes" not in vars(fused) and fused.shape == (128, 128)
    torch.testing.assert_close(linear(x, fused), dense)  # the product reads the kernel's layout only
    assert "codes" not in vars(fused)
    index = torch.tensor([3, 70, 9])
    torch.testing.assert_close(fused.rows(index, 16).dequantize()[:3], expected[index])  # read back
    assert fused.drop_rows() and fused.gathered() is not None
    assert "codes" not in vars(fused)  # the token layout built, the rows are dropped again
    torch.testing.assert_close(fused.dequantize(), expected)
    unsourced = int4_from_gguf_tensor("Q4_1", random_blocks("Q4_1", 64, 128), 64, 128)
    assert unsourced.dense_layout() is not None and not unsourced.drop_rows()  # nothing to read it back from


def test_a_row_layout_whose_cache_file_is_gone_says_so():
    def gone():
        raise FileNotFoundError("No such file or directory: int4.safetensors")

    weight = Int4Weight.from_source(gone, (16, 64), 32, torch.float32)
    assert weight.shape == (16, 64)  # known without reading
    with pytest.raises(RuntimeError, match="cache file, which is gone"):
        weight.codes
