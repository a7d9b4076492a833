"""The lean int4 prefill (decode.lean.prefill): whole prompts through coreinfer's int4 kernels, for
every lean family, against the HF prefill's keys and values and the lean decode step's logits."""

from __future__ import annotations

import pytest
import torch

from coreinfer import Engine
from coreinfer.config import SparsityConfig
from coreinfer.decode.lean import PromptCache, prefill, prefill_steps

from conftest import prompts
from test_cpu_kernels import LEAN_FAMILIES, _int4_model, needs_kernels


def _relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).abs().max() / want.abs().max()).item()


@needs_kernels
@pytest.mark.parametrize("arch", LEAN_FAMILIES)
@torch.inference_mode()
def test_prefill_equals_its_own_decode_step_and_the_hf_cache(arch):
    """Left-padded prompts longer than Gemma 3's tiny sliding window (16): the prefill's last logits
    are what a decode step gives after the prefill of all but the last token; its keys and values are
    the HF prefill's (which the int4 weights reproduce to their fp16 scales); each row is its single run."""
    engine = Engine(_int4_model(arch), tokenizer=None)
    backend = engine.backend("lean", "int4")
    assert backend.prefills
    ids, mask = engine.left_pad(prompts((9, 20, 14), seed=3))
    logits, cache = backend.prefill(ids, mask)
    assert logits.shape == (3, 1, engine.model.config.vocab_size) and isinstance(cache, PromptCache)

    _, head = backend.prefill(ids[:, :-1], mask[:, :-1])
    state = backend.start(None, head, mask[:, :-1], ids.shape[1] + 1)
    assert _relative(backend.step(state, ids[:, -1]), logits[:, -1]) < 1e-4

    _, hf_cache = engine.prefill(ids, mask, None)
    real = mask.bool()
    for ours, theirs in zip(cache.layers, hf_cache.layers):
        kept = theirs.keys.shape[2]  # a sliding-window layer's HF cache holds only the last slots
        slots = real[:, -kept:]  # [B, kept]; padding slots hold anything
        for got, want in ((ours.keys, theirs.keys), (ours.values, theirs.values)):
            got = got[..., -kept:, :].transpose(1, 2)[slots]  # [real slots, KV, hd]
            assert _relative(got, want.transpose(1, 2)[slots]) < 2e-2

    for row, prompt in enumerate(prompts((9, 20, 14), seed=3)):
        alone, _ = backend.prefill(*engine.left_pad([prompt]))
        torch.testing.assert_close(alone[0, -1], logits[row, -1], rtol=1e-4, atol=1e-4)



@needs_kernels
@pytest.mark.parametrize("arch", LEAN_FAMILIES)
@torch.inference_mode()
def test_a_prefill_in_chunks_is_the_whole_prefill(arch):
    """Chunks of 5 columns over left-padded prompts longer than Gemma 3's sliding window (16): each
    chunk attends to the keys before it, so the logits and every real slot's keys and values are the
    one-chunk prefill's; the steps pause once between chunks, and a one-chunk prompt does not pause."""
    engine = Engine(_int4_model(arch), tokenizer=None)
    model = engine.backend("lean", "int4").model
    ids, mask = engine.left_pad(prompts((9, 23, 14), seed=5))
    whole, whole_cache = prefill(model, ids, mask, chunk=ids.shape[1])
    steps = prefill_steps(model, ids, mask, chunk=5)
    pauses = 0
    while True:
        try:
            next(steps)
            pauses += 1
        except StopIteration as done:
            chunked, chunked_cache = done.value
            break
    assert pauses == -(-ids.shape[1] // 5) - 1
    assert _relative(chunked, whole) < 1e-4  # as a batch row against its single run: attention sums in another order
    real = mask.bool()
    for ours, theirs in zip(chunked_cache.layers, whole_cache.layers):
        for got, want in ((ours.keys, theirs.keys), (ours.values, theirs.values)):
            assert _relative(got.transpose(1, 2)[real], want.transpose(1, 2)[real]) < 1e-4
    one = prefill_steps(model, ids[:1, -4:], mask[:1, -4:], chunk=5)
    with pytest.raises(StopIteration):
        next(one)
    with pytest.raises(ValueError, match="chunk"):
        prefill(model, ids, mask, chunk=0)

@needs_kernels
@torch.inference_mode()
def test_engine_prefills_dense_and_token_prompts_on_int4_and_sentence_level_on_hf():
    engine = Engine(_int4_model("llama"), tokenizer=None)
    backend = engine.backend("lean", "int4")
    ids, mask = engine.left_pad(prompts((9, 5), seed=2))
    _, cache = engine.prefill(ids, mask, None, backend=backend)
    assert isinstance(cache, PromptCache)
    session = engine.new_session(SparsityConfig(keep=0.5), mask)  # records the prompt's activations
    _, cache = engine.prefill(ids, mask, session, backend=backend)
    assert not isinstance(cache, PromptCache) and session.neurons
    fp32 = engine.backend("lean", "fp32")
    assert not fp32.prefills
    _, cache = engine.prefill(ids, mask, None, backend=fp32)
    assert not isinstance(cache, PromptCache)


@needs_kernels
def test_generation_on_the_lean_prefill_gives_each_row_its_single_run():
    """Greedy answers: the first token is the lean prefill's best; a left-padded batch equals single runs."""
    engine = Engine(_int4_model("qwen3"), tokenizer=None)
    backend = engine.backend("lean", "int4")
    batch = prompts((9, 5, 12), seed=4)
    together = engine.generate_ids(batch, backend="lean", weights="int4")
    for prompt, result in zip(batch, together):
        with torch.inference_mode():
            first = backend.prefill(*engine.left_pad([prompt]))[0][0, -1].argmax().item()
        alone = engine.generate_ids([prompt], backend="lean", weights="int4")[0]
        assert alone.token_ids == result.token_ids and result.token_ids[0] == first and result.new_tokens > 1
