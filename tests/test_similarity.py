"""Similarity-guided selection: cluster storage, model checks, deterministic assignment, end to end."""

import json

import pytest
import torch
from conftest import prompts, tiny_model
from transformers import AutoModelForCausalLM, LlamaConfig
from typer.testing import CliRunner

from coreinfer import Engine, RuleSelector, SamplingConfig, SparsityConfig
from coreinfer.cli import app
from coreinfer.predictors import ClusterMismatch, ClusterSet, SimilaritySelector, build_clusters, load_clusters
from coreinfer.predictors.similarity import load_prompts, rank_neurons
from coreinfer.selection import num_kept

SPARSITY = SparsityConfig(keep=0.5, layers=(1, 2))
PROMPTS = prompts(lengths=(9, 5, 12, 7, 8, 10, 6, 11), seed=3)


@pytest.fixture
def engine():
    return Engine(tiny_model("llama"), tokenizer=None, name="tiny-llama")


@pytest.fixture
def clusters(engine):
    return build_clusters(engine, PROMPTS, SPARSITY, k=3)


def test_clusters_round_trip_through_storage(engine, clusters, tmp_path):
    loaded = load_clusters(clusters.save(tmp_path / "c"), engine)
    assert loaded.meta == json.loads(json.dumps(clusters.meta))
    assert torch.equal(loaded.centroids, clusters.centroids)
    assert sorted(loaded.counts) == [1, 2]
    for layer in (1, 2):
        assert torch.equal(loaded.counts[layer], clusters.counts[layer])
        for c in range(3):
            assert torch.equal(loaded.core(layer, c, 0.5), clusters.core(layer, c, 0.5))
    assert not list(tmp_path.glob("**/*.pkl")) and (tmp_path / "c" / "clusters.safetensors").is_file()


def test_cluster_statistics_use_only_their_own_prompts(engine, clusters):
    sizes = clusters.meta["cluster_sizes"]
    assert sum(sizes) == len(PROMPTS) and clusters.meta["k"] == 3
    k_layer = num_kept(64, 0.5)
    for layer in (1, 2):
        # each member contributes exactly K neurons to its own cluster's counts, nothing to the others
        assert clusters.counts[layer].sum(1).tolist() == [float(s * k_layer) for s in sizes]


def test_another_models_clusters_are_refused(engine, clusters, tmp_path):
    clusters.save(tmp_path / "c")
    renamed = Engine(tiny_model("llama"), tokenizer=None, name="other-model")
    with pytest.raises(ClusterMismatch, match="made for model 'tiny-llama'"):
        load_clusters(tmp_path / "c", renamed)
    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2)
    other_shapes = Engine(AutoModelForCausalLM.from_config(config), tokenizer=None, name="tiny-llama")  # same name
    with pytest.raises(ClusterMismatch):
        load_clusters(tmp_path / "c", other_shapes)
    with pytest.raises(FileNotFoundError, match="holds no clusters"):
        load_clusters(tmp_path / "missing", engine)


def test_assignment_is_deterministic_and_ties_go_to_the_lower_cluster():
    centroids = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    clusters = ClusterSet({"layer": 0}, centroids, {}, {})
    features = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
    assert clusters.assign(features).tolist() == [0, 1, 0]
    # ranking: count, then frequency, then index
    ranked = rank_neurons(torch.tensor([2.0, 3.0, 2.0, 2.0]), torch.tensor([0.1, 0.0, 0.1, 0.5]))
    assert ranked.tolist() == [1, 3, 0, 2]


def test_similarity_selector_swaps_in_the_cluster_sets(engine, clusters):
    batch = PROMPTS[:4]
    runs = []
    for _ in range(2):
        selector = SimilaritySelector(clusters, keep=0.5)
        _, session = engine.continuation_logits(batch, [[3, 4]] * 4, SPARSITY, selector=selector)
        runs.append((selector.assigned.clone(), {l: n.clone() for l, n in session.neurons.items()}))
    assert torch.equal(runs[0][0], runs[1][0])
    for layer in (1, 2):
        assert torch.equal(runs[0][1][layer], runs[1][1][layer])
        for b, c in enumerate(runs[0][0].tolist()):
            assert torch.equal(runs[0][1][layer][b], clusters.core(layer, c, 0.5))
    # the assigned cluster is the nearest to the prompt's own feature at the clustering layer
    assert runs[0][0].tolist() == [clusters.meta["labels"][i] for i in range(4)]


def test_own_share_keeps_the_prompts_own_set_at_equal_density(engine, clusters):
    selector = SimilaritySelector(clusters, keep=0.5, own_share=0.5)
    _, session = engine.continuation_logits(PROMPTS[:3], [[3, 4]] * 3, SPARSITY, selector=selector)
    _, stable = engine.continuation_logits(PROMPTS[:3], [[3, 4]] * 3, SPARSITY, selector=RuleSelector("coreinfer", 0.25, 0.2))
    assert session.ffn_density() == pytest.approx(
        engine.continuation_logits(PROMPTS[:3], [[3, 4]] * 3, SPARSITY)[1].ffn_density()
    )
    for layer in (1, 2):
        chosen = session.neurons[layer]
        assert chosen.shape == (3, num_kept(64, 0.5))
        assert all(len(set(row.tolist())) == chosen.shape[1] for row in chosen)
        for b in range(3):
            assert set(stable.neurons[layer][b].tolist()) <= set(chosen[b].tolist())


def test_similarity_decoding_matches_the_masked_reference(engine, clusters):
    sampling = SamplingConfig(max_new_tokens=5)
    fast = engine.generate_ids(PROMPTS[:3], SPARSITY, sampling, selector=SimilaritySelector(clusters, 0.5))
    ref = engine.generate_ids(PROMPTS[:3], SPARSITY, sampling, reference=True, selector=SimilaritySelector(clusters, 0.5))
    assert [r.token_ids for r in fast] == [r.token_ids for r in ref]


def test_clustering_layer_must_be_sparse(engine, clusters):
    with pytest.raises(ValueError, match="must be one of the sparse layers"):
        build_clusters(engine, PROMPTS, SPARSITY, layer=3, k=2)
    selector = SimilaritySelector(clusters, keep=0.5)
    with pytest.raises(ValueError, match="clustering layer"):
        engine.continuation_logits(PROMPTS[:2], [[3], [4]], SparsityConfig(keep=0.5, layers=(1,)), selector=selector)


def test_prompt_files(tmp_path):
    (tmp_path / "p.txt").write_text("one\n\ntwo\n")
    (tmp_path / "p.jsonl").write_text('{"prompt": "a"}\n{"prompt": "b"}\n')
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n')
    (tmp_path / "q.csv").write_text("Type,Category,Question,Best Answer\nA,B,Why?,Because\n")
    assert load_prompts(tmp_path / "p.txt") == ["one", "two"]
    assert load_prompts(tmp_path / "p.jsonl") == ["a", "b"]
    assert load_prompts(tmp_path / "q.csv") == ["Question: Why? Answer:"]
    with pytest.raises(ValueError, match="'prompt' field"):
        load_prompts(tmp_path / "bad.jsonl")


@pytest.mark.real_model
def test_cluster_then_generate_end_to_end_on_a_tiny_model(real_engine, tmp_path):
    """The CLI on a tiny random Llama that shares the default model's tokenizer."""
    torch.manual_seed(0)
    vocab = len(real_engine.tokenizer)
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=8,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         eos_token_id=real_engine.tokenizer.eos_token_id)
    model_dir = tmp_path / "tiny"
    AutoModelForCausalLM.from_config(config).save_pretrained(model_dir)
    real_engine.tokenizer.save_pretrained(model_dir)
    data = tmp_path / "prompts.txt"
    data.write_text("\n".join(["Translate to French: cat", "Translate to French: dog", "What is 2+2?",
                               "What is 3+5?", "Summarise: the sky is blue.", "Summarise: rain is wet."]))
    runner = CliRunner()
    made = runner.invoke(app, ["cluster", "--data", str(data), "--out", str(tmp_path / "c"), "--model",
                               str(model_dir), "--k", "2", "--no-chat"])
    assert made.exit_code == 0, made.output
    meta = json.loads((tmp_path / "c" / "clusters.json").read_text())
    assert meta["k"] == 2 and meta["model"] == "tiny" and meta["layer"] == 6
    args = ["generate", "What is 4+4?", "--model", str(model_dir), "--no-chat", "--json", "--max-new-tokens", "4"]
    refused = runner.invoke(app, args + ["--method", "similarity", "--clusters", str(tmp_path / "c")])
    assert refused.exit_code == 2 and "needs a number for --keep" in refused.output
    result = runner.invoke(app, args + ["--method", "similarity", "--clusters", str(tmp_path / "c"), "--keep", "0.4"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["method"] == "similarity" and payload["cluster"] in (0, 1)
    assert 0 < payload["ffn_density"] < 1
    # the default model refuses these clusters with a clear message
    refused = runner.invoke(app, ["generate", "hi", "--method", "similarity", "--clusters", str(tmp_path / "c"),
                                   "--keep", "0.4"])
    assert refused.exit_code == 2 and "made for model 'tiny'" in refused.output
