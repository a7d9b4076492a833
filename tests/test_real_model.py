"""End to end on the default model, SmolLM2-135M-Instruct (a few seconds once cached)."""

import pytest
import torch

from coreinfer import SamplingConfig, SparsityConfig
from coreinfer.loading import cached_model_dir, default_gguf_path, load_hf

pytestmark = pytest.mark.real_model
PROMPT = "What is the capital of France?"


def test_dense_generation_is_unchanged_by_the_machinery(real_engine):
    plain, _ = load_hf(cached_model_dir(default_gguf_path()))
    ids = real_engine.encode(PROMPT)
    expected = plain.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False)[0, len(ids):].tolist()
    result = real_engine.generate_ids([ids], None, SamplingConfig(max_new_tokens=16))[0]
    eos = real_engine.eos_ids()
    assert result.token_ids == [t for t in expected if t not in eos][: len(result.token_ids)]
    assert "Paris" in result.text


def test_chat_template_is_applied(real_engine):
    ids = real_engine.encode(PROMPT)
    text = real_engine.tokenizer.decode(ids)
    assert text.count("<|im_start|>") == 3 and text.rstrip().endswith("assistant")
    assert real_engine.encode(PROMPT, chat=False) != ids


def test_keep_one_reproduces_dense_logits(real_engine):
    ids = real_engine.encode(PROMPT)
    cont = real_engine.tokenizer(" The capital of France is Paris.")["input_ids"]
    dense, _ = real_engine.continuation_logits([ids], [cont], None)
    full, _ = real_engine.continuation_logits([ids], [cont], SparsityConfig(keep=1.0))
    torch.testing.assert_close(full[0], dense[0], rtol=1e-4, atol=2e-4)


def test_sparse_generation_runs_and_reads_fewer_weights(real_engine):
    result = real_engine.generate(PROMPT, SparsityConfig(keep=0.4), SamplingConfig(max_new_tokens=12))
    assert result.new_tokens >= 1 and result.text.strip()
    # 22 of 30 layers sparse at 0.4: (22 * 0.4 + 8) / 30
    assert result.ffn_density == pytest.approx((22 * round(0.4 * 1536) / 1536 + 8) / 30)


def test_stop_string_and_streaming(real_engine):
    sampling = SamplingConfig(max_new_tokens=30, stop=("Paris",))
    result = real_engine.generate(PROMPT, None, sampling)
    assert result.finish_reason == "stop" and "Paris" not in result.text
    streamed = "".join(real_engine.stream(PROMPT, None, sampling))
    assert streamed == result.text


@pytest.mark.parametrize("backend, weights", [("reference", None), ("lean", "fp32")])
def test_batch_of_text_prompts_equals_singles(real_engine, backend, weights):
    prompts = [PROMPT, "Name a primary colour."]
    sparsity, sampling = SparsityConfig(keep=0.6), SamplingConfig(max_new_tokens=10)
    batch = real_engine.generate(prompts, sparsity, sampling, backend=backend, weights=weights)
    singles = [real_engine.generate(p, sparsity, sampling, backend=backend, weights=weights) for p in prompts]
    assert [r.token_ids for r in batch] == [r.token_ids for r in singles]


def test_low_precision_batch_tracks_singles(real_engine):
    """In bf16/int8 a batch's fp32 prefill differs from a single's by ~1e-5, which bf16 rounding can
    turn into a different token at a near tie (as in any bf16 engine); the predictions must still agree."""
    prompts = [real_engine.encode(p) for p in (PROMPT, "Name a primary colour.")]
    sparsity = SparsityConfig(keep=0.6)
    answers = [r.token_ids for r in real_engine.generate_ids(prompts, None, SamplingConfig(max_new_tokens=16), backend="reference")]
    batch, _ = real_engine.continuation_logits(prompts, answers, sparsity, backend="lean", weights="int8")
    for row, prompt in enumerate(prompts):
        (single,), _ = real_engine.continuation_logits([prompt], [answers[row]], sparsity, backend="lean", weights="int8")
        assert (single.argmax(-1) == batch[row].argmax(-1)).float().mean() >= 0.75


def test_default_model_uses_the_shipped_calibration(real_engine, monkeypatch, tmp_path):
    from coreinfer.adaptive import model_fingerprint, shipped_calibration_dir

    monkeypatch.setenv("COREINFER_CACHE", str(tmp_path))  # nothing cached: must come from the package
    real_engine._calibration = None
    calibration = real_engine.calibration(progress=False)
    assert shipped_calibration_dir(model_fingerprint(real_engine)).is_dir()
    assert calibration.model == model_fingerprint(real_engine)
    assert not list(tmp_path.iterdir())  # nothing was recalibrated
    result = real_engine.generate(PROMPT, SparsityConfig(rule="adaptive", keep=0.6), SamplingConfig(max_new_tokens=8))
    assert result.ffn_density == pytest.approx(0.6, abs=0.002)


def test_gguf_cache_written_tensor_by_tensor_holds_what_transformers_loads(real_engine, tmp_path):
    """The cache is dequantised one tensor at a time (a 1B model's first load peaked at 8 GB when
    transformers built the whole model); its contents must be exactly transformers' own load."""
    from transformers import AutoModelForCausalLM

    from coreinfer import loading

    gguf = default_gguf_path()
    loading._dequantise_gguf(gguf, tmp_path)
    assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) > 1  # shards: never the whole model at once
    own = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tied = own.config.tie_word_embeddings
    expected = {k: v for k, v in own.state_dict().items() if not (tied and k == "lm_head.weight")}
    index = loading.json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    assert set(index) == set(expected)
    read = loading.cached_tensors(tmp_path)
    for name, tensor in expected.items():
        assert torch.equal(read(name), tensor), name
    reloaded, _ = load_hf(tmp_path)
    differs = {k for k, v in own.config.to_dict().items() if reloaded.config.to_dict().get(k) != v}
    assert differs == {"quantization_config", "_name_or_path"}  # the GGUF's quantisation, and where it lay
    assert reloaded.generation_config.to_dict() == own.generation_config.to_dict()


def test_gguf_blocks_are_checked_against_the_cache_not_the_loaded_model(real_engine):
    """``reference`` (the dequantised cache, read tensor by tensor) is what each block must reproduce:
    checked through the loaded model's mapped parameters, the whole fp32 model would become resident."""
    from coreinfer.decode.gguf_blocks import gguf_int4_weights
    from coreinfer.decode.lean import _matrices
    from coreinfer.loading import cached_tensors

    gguf, entry = default_gguf_path(), cached_model_dir(default_gguf_path())
    matrices = _matrices(real_engine.model)
    wrong = {name: torch.zeros_like(w) for name, w in matrices.items()}  # must not be what is compared
    read = cached_tensors(entry)
    found = gguf_int4_weights(gguf, real_engine.model, wrong, torch.float32, reference=read)
    layers = real_engine.model.config.num_hidden_layers
    assert len(found) == 7 * layers + 1  # every projection and the tied embedding: the file's own blocks

    down = "model.layers.3.mlp.down_proj.weight"
    def changed(name, start, end):  # the last row of one matrix differs
        rows = read(name, start, end)
        last = read(name).shape[0] - 1
        return rows.clone().index_fill_(0, torch.tensor([last - start]), 0.5) if name == down and end > last else rows
    assert down not in gguf_int4_weights(gguf, real_engine.model, wrong, torch.float32, reference=changed)


def test_int4_model_holds_the_kernel_layouts_and_reads_rows_back_from_the_cache(real_engine):
    """Every GGUF matrix drops its row layout once packed (the dense kernel reads its own layout), and
    reads back exactly the cache's blocks when sentence-level compaction needs rows."""
    from coreinfer.decode import cpu_kernels
    from coreinfer.decode.gguf_blocks import _load
    from coreinfer.loading import gguf_int4_cache

    if not cpu_kernels.available():
        pytest.skip("coreinfer's CPU kernels do not build here")
    from coreinfer.decode.lean import LeanModel

    gguf = default_gguf_path()
    lean = LeanModel(real_engine.model, "int4", gguf=gguf, gguf_cache=gguf_int4_cache(gguf))  # the engine's own
    assert all("codes" not in vars(w) for w in lean.matrices())  # may have read rows back for earlier tests
    stored = _load(gguf_int4_cache(default_gguf_path()), torch.float32)
    down = lean.layers[5].w2
    assert "codes" not in vars(down)
    for a, b in zip(down.codes + down.scale_zeros, stored["model.layers.5.mlp.down_proj.weight"].codes
                    + stored["model.layers.5.mlp.down_proj.weight"].scale_zeros):
        assert torch.equal(a, b)
    down.drop_rows()
    result = real_engine.generate(PROMPT, SparsityConfig(keep=0.5, rule="coreinfer"), SamplingConfig(max_new_tokens=8),
                                  backend="lean", weights="int4")
    assert result.new_tokens >= 1 and result.text.strip()


def test_pages_a_dense_run_read_are_released_and_read_again_the_same(real_engine):
    """The model's weights are mapped from the cache: after a run through the HF model (a calibration
    releases them itself) their pages leave the resident set and come back from the file unchanged."""
    ids = torch.tensor([real_engine.encode(PROMPT)])
    with torch.inference_mode():
        before = real_engine.model(ids).logits
    assert real_engine.release_model_pages() > 100 * 2**20  # most of the 0.54 GB fp32 model had been read
    with torch.inference_mode():
        assert torch.equal(real_engine.model(ids).logits, before)
