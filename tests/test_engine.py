"""The sparse path on tiny models of every supported family."""

import pytest
import torch

from coreinfer import Engine, SamplingConfig, SparsityConfig
from coreinfer.adapters import UnsupportedArchitecture, get_adapter, wrap_model
from coreinfer.sparse_ffn import SparseFFN

from conftest import prompts, tiny_model

ALL_LAYERS = (0, 1, 2, 3)
GREEDY = SamplingConfig(max_new_tokens=12)


def dense_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def test_wrapping_changes_nothing(arch):
    model = tiny_model(arch)
    ids = prompts()[0]
    before = dense_logits(model, ids)
    ffns = wrap_model(model)
    assert len(ffns) == 4 and all(isinstance(f, SparseFFN) for f in ffns)
    assert wrap_model(model) == ffns  # idempotent
    assert torch.equal(dense_logits(model, ids), before)
    # The FFN weights are still the model's parameters (device moves and state dicts see them).
    assert any(p is ffns[0].weights.up or p.data_ptr() == ffns[0].weights.up.data_ptr() for p in model.parameters())


def test_keep_one_reproduces_dense_logits_and_tokens(tiny_engine):
    sparsity = SparsityConfig(keep=1.0, layers=ALL_LAYERS)
    ps, conts = prompts(), prompts((6, 6, 6), seed=2)
    dense, _ = tiny_engine.continuation_logits(ps, conts, None)
    sparse, _ = tiny_engine.continuation_logits(ps, conts, sparsity)
    for d, s in zip(dense, sparse):
        torch.testing.assert_close(s, d, rtol=1e-4, atol=1e-4)
    dense_gen = tiny_engine.generate_ids(ps, None, GREEDY)
    sparse_gen = tiny_engine.generate_ids(ps, sparsity, GREEDY)
    assert [r.token_ids for r in sparse_gen] == [r.token_ids for r in dense_gen]
    assert sparse_gen[0].ffn_density == pytest.approx(1.0)


def test_compact_path_equals_masked_dense_reference(tiny_engine):
    sparsity = SparsityConfig(keep=0.4, layers=(1, 2))
    ps, conts = prompts(), prompts((5, 7, 3), seed=4)
    compact, session = tiny_engine.continuation_logits(ps, conts, sparsity)
    masked, _ = tiny_engine.continuation_logits(ps, conts, sparsity, reference=True)
    dense, _ = tiny_engine.continuation_logits(ps, conts, None)
    for c, m, d in zip(compact, masked, dense):
        torch.testing.assert_close(c, m, rtol=1e-4, atol=1e-4)
        assert not torch.allclose(c, d, atol=1e-3)  # sparsity really changed something
    assert session.neurons[1].shape == (3, round(0.4 * 64))
    compact_gen = tiny_engine.generate_ids(ps, sparsity, GREEDY)
    masked_gen = tiny_engine.generate_ids(ps, sparsity, GREEDY, reference=True)
    assert [r.token_ids for r in compact_gen] == [r.token_ids for r in masked_gen]


def test_batch_equals_single_runs(tiny_engine):
    sparsity = SparsityConfig(keep=0.5, layers=(1, 2, 3))
    ps = prompts()
    batch = tiny_engine.generate_ids(ps, sparsity, GREEDY)
    for p, b in zip(ps, batch):
        single = tiny_engine.generate_ids([p], sparsity, GREEDY)[0]
        assert single.token_ids == b.token_ids
    # Each sequence selected its own core neurons from its own tokens.
    _, session = tiny_engine.continuation_logits(ps, [[1]] * 3, sparsity)
    _, alone = tiny_engine.continuation_logits(ps[1:2], [[1]], sparsity)
    assert torch.equal(session.neurons[2][1], alone.neurons[2][0])
    assert not torch.equal(session.neurons[2][0], session.neurons[2][1])


def test_sampling_is_reproducible_with_a_seed_and_batch_matches_singles(tiny_engine):
    sampling = SamplingConfig(max_new_tokens=10, temperature=1.0, top_p=0.9, seed=7)
    sparsity = SparsityConfig(keep=0.5, layers=ALL_LAYERS)
    ps = prompts()
    first = tiny_engine.generate_ids(ps, sparsity, sampling)
    again = tiny_engine.generate_ids(ps, sparsity, sampling)
    assert [r.token_ids for r in first] == [r.token_ids for r in again]
    assert tiny_engine.generate_ids(ps[2:], sparsity, sampling)[0].token_ids == first[2].token_ids


def test_ffn_density_counts_dense_layers_in_full():
    engine = Engine(tiny_model("llama"))
    result = engine.generate_ids(prompts()[:1], SparsityConfig(keep=0.5, layers=(0, 1)), GREEDY)[0]
    assert result.ffn_density == pytest.approx((0.5 + 0.5 + 1 + 1) / 4)
    assert result.keep == 0.5


def test_generation_stops_at_eos_and_at_max_new_tokens():
    engine = Engine(tiny_model("llama"))
    result = engine.generate_ids(prompts()[:1], None, SamplingConfig(max_new_tokens=5))[0]
    assert result.new_tokens <= 5 and result.finish_reason in {"length", "eos"}
    first = engine.generate_ids(prompts()[:1], None, SamplingConfig(max_new_tokens=1))[0].token_ids[0]
    engine.model.generation_config.eos_token_id = first  # the very first token now ends it
    result = engine.generate_ids(prompts()[:1], None, SamplingConfig(max_new_tokens=5))[0]
    assert result.finish_reason == "eos" and result.token_ids == []


def test_tokens_stream_as_they_are_produced():
    engine = Engine(tiny_model("llama"))
    seen = []
    results = engine.generate_ids(prompts(), None, SamplingConfig(max_new_tokens=4), on_token=seen.append)
    for index, result in enumerate(results):
        streamed = [e.token_id for e in seen if e.index == index]
        assert streamed[: len(result.token_ids)] == result.token_ids
        assert len(streamed) == len(result.token_ids) + (result.finish_reason == "eos")
    assert seen[-1].finished


def test_first_token_comes_from_prefill_logits():
    engine = Engine(tiny_model("llama"))
    p = prompts()[0]
    expected = int(dense_logits(engine.model, p)[-1].argmax())
    assert engine.generate_ids([p], SparsityConfig(keep=0.2), GREEDY)[0].token_ids[0] == expected


@pytest.mark.parametrize("kwargs", [dict(keep=0.0), dict(keep=1.5), dict(alpha=0.0), dict(alpha=-1), dict(rule="x")])
def test_bad_sparsity_settings_are_rejected(kwargs):
    with pytest.raises(ValueError):
        SparsityConfig(**kwargs)


def test_bad_layers_and_empty_prompts_are_rejected():
    engine = Engine(tiny_model("llama"))
    with pytest.raises(ValueError, match="out of range"):
        engine.generate_ids(prompts()[:1], SparsityConfig(layers=(9,)), GREEDY)
    with pytest.raises(ValueError, match="empty"):
        engine.generate_ids([[]], None, GREEDY)
    with pytest.raises(ValueError, match="no prompts"):
        engine.generate_ids([], None, GREEDY)
    with pytest.raises(ValueError, match="max_new_tokens"):
        SamplingConfig(max_new_tokens=0)


def test_unknown_architecture_names_the_supported_ones():
    with pytest.raises(UnsupportedArchitecture, match="llama.*opt|opt.*llama"):
        get_adapter("bloom")
    model = tiny_model("llama")
    model.config.model_type = "falcon"
    with pytest.raises(UnsupportedArchitecture, match="falcon"):
        Engine(model)


def test_engine_runs_on_cuda_when_present():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device here; the same code runs there (device comes from the model)")
    engine = Engine(tiny_model("llama").to("cuda"))
    cpu = Engine(tiny_model("llama").to("cpu"))
    sparsity = SparsityConfig(keep=0.5)
    assert engine.generate_ids(prompts(), sparsity, GREEDY)[0].token_ids == cpu.generate_ids(prompts(), sparsity, GREEDY)[0].token_ids


def test_a_custom_selector_decides_the_kept_neurons():
    engine = Engine(tiny_model("llama"))
    fixed = torch.tensor([3, 10, 20])
    calls = []

    def selector(layer, acts):
        calls.append((layer, acts.shape))
        return fixed

    ps = prompts()
    _, session = engine.continuation_logits(ps, [[1, 2]] * 3, SparsityConfig(layers=(1, 2)), selector=selector)
    assert sorted({layer for layer, _ in calls}) == [1, 2]
    assert sorted(shape[0] for layer, shape in calls if layer == 1) == sorted(len(p) for p in ps)  # unpadded
    assert torch.equal(session.neurons[1], fixed.expand(3, 3))
    assert session.ffn_density() == pytest.approx((3 / 64 * 2 + 2) / 4)


def test_a_selector_may_revise_its_choice_after_the_prompt():
    engine = Engine(tiny_model("llama"))

    class Revising:
        def __call__(self, layer, acts):
            return torch.arange(8)

        def finalize(self, neurons):
            return {layer: chosen + 1 for layer, chosen in neurons.items()}

    _, session = engine.continuation_logits(prompts(), [[1]] * 3, SparsityConfig(layers=(2,)), selector=Revising())
    assert session.neurons[2][0].tolist() == list(range(1, 9))
    _, masked = engine.continuation_logits(prompts(), [[1]] * 3, SparsityConfig(layers=(2,)), selector=Revising(), reference=True)
    assert torch.equal(masked.neurons[2], session.neurons[2])


def test_wina_rule_weights_activations_by_down_columns():
    from coreinfer.selection import griffin_scores, top_neurons, wina_scores

    engine = Engine(tiny_model("llama"), tokenizer=None, name="tiny-llama", weights="fp32")
    sparsity = SparsityConfig(keep=0.4, layers=(1, 2), rule="wina")
    ps, conts = prompts(), prompts((5, 7, 3), seed=4)
    compact, session = engine.continuation_logits(ps, conts, sparsity)
    masked, _ = engine.continuation_logits(ps, conts, sparsity, reference=True)
    for c, m in zip(compact, masked):
        torch.testing.assert_close(c, m, rtol=1e-4, atol=1e-4)
    # The kept set is the top of GRIFFIN's statistic over |a| x column norm, not of GRIFFIN's own.
    acts = engine.record_activations(*engine.left_pad(ps[:1]))[2][1][0]
    norms = engine.ffns[1].weights.down.detach().norm(dim=0)
    assert torch.equal(session.neurons[1][0], top_neurons(wina_scores(acts, norms), 0.4))
    assert not torch.equal(session.neurons[1][0], top_neurons(griffin_scores(acts), 0.4))
    batch = engine.generate_ids(ps, sparsity, GREEDY)
    assert [r.token_ids for r in batch] == [engine.generate_ids([p], sparsity, GREEDY)[0].token_ids for p in ps]


def test_releasing_pages_of_a_model_built_in_memory_does_nothing(tiny_engine):
    ids = torch.tensor([[5, 9, 3]], device=tiny_engine.device)
    with torch.inference_mode():
        before = tiny_engine.model(ids).logits
    assert tiny_engine.release_model_pages() == 0
    with torch.inference_mode():
        assert torch.equal(tiny_engine.model(ids).logits, before)
