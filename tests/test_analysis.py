"""The paper's analyses: overlap, stability on a tiny model, Spearman and the data readers."""

import pytest
import torch
from conftest import tiny_model

from coreinfer import Engine, SparsityConfig
from coreinfer import evaluation_data
from coreinfer.analysis import first_per_class, overlap, similarity_correlation, split_pairs, stability_overlaps
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
    pairs, gold = split_pairs(evaluation_data.sick(DATA), 5)
    assert len(pairs) == 5 and all(1.0 <= g <= 5.0 for g in gold)
    pairs, gold = split_pairs(evaluation_data.sts2015(DATA), 5)
    assert len(pairs) == 5 and all(0.0 <= g <= 5.0 for g in gold)
    texts, labels = first_per_class(evaluation_data.ag_news(DATA), 3)
    assert sorted(labels) == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3] and all(texts)


def test_wikitext_windows_skip_headings_and_blank_lines():
    from coreinfer.analysis import wikitext_windows

    def tokenizer(text, add_special_tokens):  # one id per word
        return {"input_ids": [len(w) for w in text.split()]}

    text = " \n = Title = \n \n a bb ccc \n = = Sub = = \n dddd eeeee ffffff \n"
    assert wikitext_windows(text, tokenizer, 2, 3) == [[1, 2], [3, 4], [5, 6]]
    with pytest.raises(ValueError, match="only 1 windows"):
        wikitext_windows(text, tokenizer, 4, 2)
