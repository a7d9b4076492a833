"""The paper's analyses: overlap, stability on a tiny model, Spearman and the data readers."""

import pytest
import torch
from conftest import tiny_model

from coreinfer import Engine, SparsityConfig
from coreinfer.analysis import overlap, read_ag_news, read_sick, read_sts, similarity_correlation, stability_overlaps
from coreinfer.selection import select_coreinfer

DATA = __import__("pathlib").Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


def test_overlap():
    assert overlap(torch.tensor([1, 2, 3, 4]), torch.tensor([3, 4, 5, 6])) == 0.5
    assert overlap(torch.tensor([1, 2]), torch.tensor([1, 2])) == 1.0


def test_stability_matches_selecting_each_prefix_directly():
    engine = Engine(tiny_model("llama"), tokenizer=None, name="t")
    sparsity = SparsityConfig(keep=0.5, layers=(1, 2))
    window = torch.randint(1, 128, (24,), generator=torch.Generator().manual_seed(0)).tolist()
    result = stability_overlaps(engine, [window], sparsity, (8, 16), (8,))
    # the same numbers from two separate prefills per prefix
    from coreinfer.analysis import ActivationRecorder

    expected = {}
    for n in (8, 16):
        sets = []
        for length in (n, n + 8):
            rec = ActivationRecorder("coreinfer", 0.5, 0.2)
            engine.core_neurons([window[:length]], sparsity, rec)
            sets.append({l: select_coreinfer(a, 0.5, 0.2) for l, a in rec.acts.items()})
        expected[str(n)] = sum(overlap(sets[0][l], sets[1][l]) for l in (1, 2)) / 2
    assert result["+8"] == pytest.approx(expected, abs=1e-4)
    assert all(0 < v <= 1 for v in result["+8"].values())


def test_similarity_correlation_is_spearman_of_the_layer_mean():
    per_layer = {4: [0.1, 0.5, 0.9, 0.3], 5: [0.2, 0.4, 1.0, 0.2]}
    result = similarity_correlation(per_layer, [1.0, 2.0, 4.0, 1.5])
    assert result["spearman_mean_over_layers"] == pytest.approx(1.0)
    assert result["spearman_per_layer"]["4"] == pytest.approx(1.0)


@pytest.mark.skipif(not DATA.is_dir(), reason="shared evaluation data not present")
def test_data_readers():
    pairs, gold = read_sick(DATA / "sick" / "SICK_test_annotated.txt", 5)
    assert len(pairs) == 5 and all(1.0 <= g <= 5.0 for g in gold)
    pairs, gold = read_sts(DATA / "sts2015" / "headlines.test.tsv", 5)
    assert len(pairs) == 5 and all(0.0 <= g <= 5.0 for g in gold)
    texts, labels = read_ag_news(DATA / "ag_news" / "test.csv", 3)
    assert sorted(labels) == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3] and all(texts)
