"""Built-in evaluation sets: a local copy and the Hub give the same records; offline gives one clear error."""

from __future__ import annotations

import json

import pytest
from conftest import tiny_model

from coreinfer import Engine
from coreinfer import evaluation_data as data

# One small local copy, in the shared data's layout, and the same items as the Hub's schemas hold them.
LOCAL_FILES = {
    "gsm8k/test.jsonl": "\n".join(json.dumps({"question": f"Q{i}?", "answer": f"A{i}\n#### {i}"}) for i in range(3)) + "\n",
    "wikitext-2/test.txt": " \n = Title = \n \n First paragraph . \n Second one . \n",
    "piqa/valid.jsonl": '{"goal": "g1", "sol1": "a", "sol2": "b"}\n{"goal": "g2", "sol1": "c", "sol2": "d"}\n',
    "piqa/valid-labels.lst": "1\n0\n",
    "truthfulqa/TruthfulQA.csv": "Type,Category,Question,Best Answer,Correct Answers,Incorrect Answers,Source\n"
    'Adversarial,Misc,"Why, though?",Because.,Because.,No.,http://x\n',
    "ag_news/test.csv": '"3","Wall St. Up","Stocks rose\\today."\n"2","Win","Team won."\n',
    "sick/SICK_test_annotated.txt": "pair_ID\tsentence_A\tsentence_B\trelatedness_score\tentailment_judgment\n"
    "6\tA dog runs.\tA dog is running.\t4.9\tENTAILMENT\n",
    "sts2015/headlines.test.tsv": "4.2\tCats sleep.\tA cat sleeps.\n\tUnscored.\tPair.\n0.5\tRain.\tSun.\n",
}

HUB_ROWS = {
    "openai/gsm8k": [{"question": f"Q{i}?", "answer": f"A{i}\n#### {i}"} for i in range(3)],
    # the raw variant's rows: the file's lines, each blank line (" \n") an empty row
    "Salesforce/wikitext": [{"text": t} for t in ["", " = Title = \n", "", " First paragraph . \n", " Second one . \n"]],
    "baber/piqa": [{"goal": "g1", "sol1": "a", "sol2": "b", "label": 1}, {"goal": "g2", "sol1": "c", "sol2": "d", "label": 0}],
    "truthfulqa/truthful_qa": [{"type": "Adversarial", "category": "Misc", "question": "Why, though?",
                                "best_answer": "Because.", "correct_answers": ["Because."],
                                "incorrect_answers": ["No."], "source": "http://x"}],
    "fancyzhx/ag_news": [{"text": "Wall St. Up Stocks rose\\today.", "label": 2}, {"text": "Win Team won.", "label": 1}],
    "mteb/sickr-sts": [{"sentence1": "A dog runs.", "sentence2": "A dog is running.", "score": 4.9}],
    "mteb/sts15-sts": [{"split": "test", "sentence1": "Cats sleep.", "sentence2": "A cat sleeps.", "score": 4.2},
                       {"split": "test", "sentence1": "Rain.", "sentence2": "Sun.", "score": 0.5}],
}

LOADERS = {"gsm8k": data.gsm8k, "wikitext2": data.wikitext2, "piqa": data.piqa, "truthfulqa": data.truthfulqa,
           "ag_news": data.ag_news, "sick": data.sick, "sts2015": data.sts2015}


@pytest.fixture
def local(tmp_path):
    for name, text in LOCAL_FILES.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text, encoding="utf-8")
    return tmp_path


@pytest.fixture
def no_local_copy(monkeypatch):
    """Neither COREINFER_DATA nor a checkout's shared data: what a wheel install sees."""
    monkeypatch.delenv("COREINFER_DATA", raising=False)
    monkeypatch.setattr(data, "checkout_copy", lambda: None)


@pytest.fixture
def hub(monkeypatch):
    """``datasets.load_dataset`` answering from HUB_ROWS; records each call."""
    import datasets

    calls = []

    def load_dataset(path, name=None, split=None, **kwargs):
        calls.append((path, name, split))
        return HUB_ROWS[path]

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls


def test_every_set_is_in_the_table_with_a_loader():
    assert set(data.SETS) == set(LOADERS)
    assert {s.hub for s in data.SETS.values()} == set(HUB_ROWS)


@pytest.mark.parametrize("name", sorted(LOADERS))
def test_the_hub_gives_the_local_copys_records(name, local, no_local_copy, hub):
    from_local = LOADERS[name](local)
    from_hub = LOADERS[name]()
    source = data.SETS[name]
    assert hub == [(source.hub, source.config, source.split)]
    if name == "ag_news":  # the Hub joins title and description with a space (see SETS)
        assert [t.label for t in from_hub] == [t.label for t in from_local] == [2, 1]
        assert [t.text for t in from_hub] == ["Wall St. Up Stocks rose today.", "Win Team won."]
        assert from_local[0].text == "Wall St. Up. Stocks rose today."
    else:
        assert from_hub == from_local and from_local


def test_records_read_from_a_local_copy(local):
    assert data.gsm8k(local)[1] == data.Problem("Q1?", "A1\n#### 1")
    assert data.piqa(local) == [data.Choice("g1", "a", "b", 1), data.Choice("g2", "c", "d", 0)]
    assert data.truthfulqa(local) == [data.Question("Why, though?", "Because.")]
    assert data.sts2015(local) == [data.Pair("Cats sleep.", "A cat sleeps.", 4.2), data.Pair("Rain.", "Sun.", 0.5)]
    assert data.wikitext2(local).splitlines()[3] == " First paragraph . "


def test_the_local_copy_wins(local, monkeypatch, hub, tmp_path_factory):
    monkeypatch.setenv("COREINFER_DATA", str(local))
    assert data.gsm8k()[0].question == "Q0?" and hub == []
    other = tmp_path_factory.mktemp("other")
    (other / "gsm8k").mkdir()
    (other / "gsm8k" / "test.jsonl").write_text(json.dumps({"question": "mine", "answer": "#### 1"}) + "\n")
    assert data.gsm8k(other) == [data.Problem("mine", "#### 1")] and hub == []  # --data-dir over COREINFER_DATA
    assert data.describe("gsm8k", other) == str(other / "gsm8k" / "test.jsonl")


def test_the_checkout_copy_comes_after_the_explicit_ones(local, monkeypatch, hub):
    monkeypatch.delenv("COREINFER_DATA", raising=False)
    monkeypatch.setattr(data, "checkout_copy", lambda: local)
    assert data.local_copy() == local and len(data.gsm8k()) == 3 and hub == []


def test_a_missing_local_copy_or_file_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("COREINFER_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(data.DataNotFound, match="nowhere.*COREINFER_DATA"):
        data.gsm8k()
    with pytest.raises(FileNotFoundError, match="--data-dir"):
        data.gsm8k(tmp_path / "elsewhere")
    with pytest.raises(data.DataNotFound, match="lacks .*piqa/valid-labels.lst"):
        data.piqa(tmp_path)


def _offline(*args, **kwargs):
    # what datasets raises with HF_HUB_OFFLINE=1, or once its retries give up without a network
    raise ConnectionError("Couldn't reach 'openai/gsm8k' on the Hub (OfflineModeIsEnabled)")


def test_offline_without_a_local_copy_names_both_ways(no_local_copy, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets, "load_dataset", _offline)
    with pytest.raises(data.DataNotFound) as err:
        data.gsm8k()
    message = str(err.value)
    assert "COREINFER_DATA" in message and "--data-dir" in message and "connect to the Hub" in message
    assert "openai/gsm8k" in message


def test_real_datasets_offline_fails_at_once_with_the_clear_error(no_local_copy, monkeypatch):
    import datasets.config

    if not datasets.config.HF_HUB_OFFLINE:
        pytest.skip("HF_HUB_OFFLINE was not set before datasets was imported")
    never_cached = data.Source("coreinfer-tests/no-such-set", None, "test", ("gsm8k/test.jsonl",))
    monkeypatch.setitem(data.SETS, "gsm8k", never_cached)
    with pytest.raises(data.DataNotFound, match="coreinfer-tests/no-such-set.*COREINFER_DATA or pass --data-dir"):
        data.gsm8k()


# The CLI without any data: a wheel install, offline


@pytest.fixture
def offline_cli(no_local_copy, monkeypatch):
    import datasets

    import coreinfer.api

    monkeypatch.setattr(datasets, "load_dataset", _offline)
    monkeypatch.setattr(coreinfer.api, "load", lambda *a, **k: Engine(tiny_model("llama"), tokenizer=None, name="t"))
    from typer.testing import CliRunner

    from coreinfer.cli import app

    return lambda *args: CliRunner().invoke(app, list(args))


@pytest.mark.parametrize("command", [["quality"], ["analyze", "--out", "OUT"], ["similarity-eval"]])
def test_cli_without_data_fails_with_the_clear_message(command, offline_cli, tmp_path):
    result = offline_cli(*[str(tmp_path / "a") if a == "OUT" else a for a in command])
    assert result.exit_code != 0
    assert "set COREINFER_DATA or pass --data-dir to a local copy, or connect to the Hub" in result.output


def test_cli_data_dir_names_a_missing_copy(offline_cli, tmp_path):
    result = offline_cli("analyze", "--out", str(tmp_path / "a"), "--data-dir", str(tmp_path / "missing"))
    assert result.exit_code != 0 and "missing (from --data-dir)" in result.output


def test_eval_takes_data_dir_for_its_tasks():
    from coreinfer.cli import _take_option

    assert _take_option(["--tasks", "piqa_local", "--data-dir", "/d", "--limit", "5"], "--data-dir") == (
        "/d", ["--tasks", "piqa_local", "--limit", "5"])
    assert _take_option(["--data-dir=/e"], "--data-dir") == ("/e", [])
    assert _take_option(["--tasks", "x"], "--data-dir") == (None, ["--tasks", "x"])


def test_piqa_task_loads_the_built_in_set(local, monkeypatch):
    monkeypatch.setenv("COREINFER_DATA", str(local))
    from coreinfer.tasks.piqa_local import load

    rows = list(load()["validation"])
    assert rows == [{"goal": "g1", "sol1": "a", "sol2": "b", "label": 1}, {"goal": "g2", "sol1": "c", "sol2": "d", "label": 0}]


def test_without_the_datasets_package_the_error_says_what_to_install(no_local_copy, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` raises ImportError
    with pytest.raises(data.DataNotFound, match="pip install datasets.*--data-dir"):
        data.truthfulqa()
