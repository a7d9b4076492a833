"""coreinfer's dense int4 kernel (decode.int4_dense): the product of the exact GGUF weights with the
activations rounded per group of 32 to int16, against that product in float64 on
``Int4Weight.dequantize()``; and close to the unrounded product."""

from __future__ import annotations

import pytest
import torch

from coreinfer.decode import int4_dense, int4_gather
from coreinfer.decode.weights import Int4Weight, cat_rows, int4_linear

from test_int4_gather import fp16_weight, needs_kernel


def reference(x: torch.Tensor, w: Int4Weight) -> torch.Tensor:
    return int4_dense.round_activations(x).double() @ w.dequantize().double().t()


@needs_kernel
@pytest.mark.parametrize("out, inn", [(64, 32), (48, 96), (200, 160), (576, 1536)])  # 48, 200: padded to 64 outputs
@pytest.mark.parametrize("bits", [4, 8])  # 8: two 4-bit planes joined (Q8_0)
@pytest.mark.parametrize("batch", [1, 6])  # 6: one group of four sequences sharing each load, then two
def test_dense_product_equals_the_rounded_activations_times_the_exact_weights(out, inn, bits, batch):
    w = fp16_weight(out, inn, bits)
    layout = w.dense_layout()
    assert layout is not None and layout.bits == bits
    x = torch.randn(batch, inn, generator=torch.Generator().manual_seed(1))
    y = int4_dense.dense_mm(x, layout)
    want = reference(x, w)
    assert y.shape == (batch, out) and y.dtype == torch.float32
    torch.testing.assert_close(y.double(), want, atol=1e-5 * want.abs().max().item(), rtol=0)
    # int16 rounding is small beside the weights' own: within 1e-4 of the unrounded product.
    exact = x.double() @ w.dequantize().double().t()
    torch.testing.assert_close(y.double(), exact, atol=1e-4 * exact.abs().max().item(), rtol=0)


@needs_kernel
def test_a_batch_gives_each_row_its_single_run_numbers():
    w = fp16_weight(200, 160)
    x = torch.randn(7, 160, generator=torch.Generator().manual_seed(2))
    x[3] = 0  # an all-zero row rounds with scale 0: its output is exactly zero
    together = int4_dense.dense_mm(x, w.dense_layout())
    for b in range(7):
        assert torch.equal(int4_dense.dense_mm(x[b : b + 1], w.dense_layout())[0], together[b])
    assert torch.equal(together[3], torch.zeros(200))


@needs_kernel
def test_rounding_keeps_each_groups_largest_input_and_steps_of_its_32767th():
    x = torch.tensor([[3.0] + [0.0] * 30 + [-1e-6] + [1e-3] * 32])
    rounded = int4_dense.round_activations(x)
    assert rounded[0, 0] == 3.0 and rounded[0, 31] == 0.0  # below half a step of 3 / 32767
    assert torch.allclose(rounded[0, 32:], torch.full((32,), 1e-3))


@needs_kernel
def test_bf16_activations_and_two_4_bit_planes():
    """bf16 in, bf16 out; a 4-bit matrix stacked on an 8-bit one keeps two 4-bit planes (no single 8-bit scale)."""
    w = cat_rows([fp16_weight(64, 96, 4, seed=1), fp16_weight(64, 96, 8, seed=2)])
    layout = w.dense_layout()
    assert layout.bits == 4 and layout.stream.shape[0] == 2
    x = torch.randn(3, 96, generator=torch.Generator().manual_seed(4)).bfloat16()
    y = int4_dense.dense_mm(x, layout)
    want = reference(x.float(), w)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.double(), want, atol=1e-2 * want.abs().max().item(), rtol=0)


@needs_kernel
def test_int4_linear_reads_the_dense_layout_and_counts_its_bytes():
    w = fp16_weight(576, 1536)
    x = torch.randn(2, 1536, generator=torch.Generator().manual_seed(5))
    assert torch.equal(int4_linear(x, w), int4_dense.dense_mm(x, w.dense_layout()))
    # codes (half a byte per weight) and one fp16 scale and min per 32 weights
    assert w.nbytes() == w.dense_layout().nbytes() == 576 * 1536 // 2 + 2 * 2 * 576 * 1536 // 32
    assert w.dense_layout() is w.dense_layout()  # built once


@needs_kernel
@pytest.mark.parametrize("batch", [1, 5])
def test_groups_of_16_read_gguf_q6_k(batch):
    """Q6_K: 6-bit codes with a scale per 16 inputs, read as one 8-bit plane with two scale rows per group.
    Its scales (fp16 d times int8 sc) are rounded to fp16, 2**-11, as Q4_K's are."""
    from coreinfer.decode.gguf_blocks import int4_from_gguf_tensor

    from test_int4 import random_blocks

    raw = random_blocks("Q6_K", 128, 512)
    w = int4_from_gguf_tensor("Q6_K", raw, 128, 512)
    layout = w.dense_layout()
    assert w.group == 16 and layout is not None and layout.bits == 8 and layout.group == 16
    x = torch.randn(batch, 512, generator=torch.Generator().manual_seed(6))
    want = reference(x, w)
    torch.testing.assert_close(int4_dense.dense_mm(x, layout).double(), want, atol=5e-4 * want.abs().max().item(), rtol=0)
    gathered = w.gathered()  # token-level reads the same Q6_K matrix's kept inputs (int8 activations)
    assert gathered is not None and gathered.scales.shape[1] == 512 // 16
    sparse, _ = int4_gather.gathered_mm(x, gathered, -1.0)
    torch.testing.assert_close(sparse.double(), want, atol=2e-2 * want.abs().max().item(), rtol=0)


def test_a_scale_fp16_cannot_hold_leaves_the_matrix_on_torchs_kernel():
    tiny = Int4Weight.from_integers(torch.randint(0, 16, (64, 64)), torch.full((64, 2), 1e-9), torch.zeros(64, 2), 4)
    assert int4_dense.Int4Dense.of(tiny.codes, tiny.scale_zeros) is None


@needs_kernel
@pytest.mark.parametrize("kind", ["Q4_1", "Q8_0", "Q6_K"])
def test_the_layout_built_in_parts_is_the_layout_built_whole(kind):
    """A large matrix's layout is built a few thousand outputs at a time, the last part padded: the same
    bytes as one build, for 4-bit, joined 8-bit and groups-of-16 planes."""
    from coreinfer.decode.gguf_blocks import int4_from_gguf_tensor

    from test_int4 import random_blocks

    w = int4_from_gguf_tensor(kind, random_blocks(kind, 208, 256, seed=7), 208, 256)  # 3 tiles and a part
    whole = int4_dense.Int4Dense.of(w.codes, w.scale_zeros)
    parts = int4_dense.Int4Dense.of(w.codes, w.scale_zeros, rows_per_part=int4_dense.TILE)
    assert (parts.bits, parts.group, parts.outp, parts.out_features) == (whole.bits, whole.group, whole.outp, 208)
    assert torch.equal(parts.stream, whole.stream)
