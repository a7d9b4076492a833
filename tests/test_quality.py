"""The quality harness: its fast path, its metrics, and every selection rule's size."""

from __future__ import annotations

import json

import pytest
import torch

from coreinfer import Engine
from coreinfer.engine import SparsityConfig
from coreinfer.quality import (
    ALL_RULES,
    Config,
    EvalSet,
    Item,
    StaticSelector,
    calibrate_static,
    evaluate,
    markdown_table,
    prefill,
    repeated_ngram_rate,
    score,
    sweep,
)
from coreinfer.selection import RULES, num_kept

from conftest import prompts, tiny_model


def _items(n: int = 3, seed: int = 1) -> list[Item]:
    ps = prompts((9, 5, 12, 7)[:n], seed=seed)
    cs = prompts((6, 4, 8, 5)[:n], seed=seed + 10)
    return [Item(tuple(p), tuple(c)) for p, c in zip(ps, cs)]


@pytest.fixture
def llama() -> Engine:
    return Engine(tiny_model("llama"), tokenizer=None, name="tiny-llama", weights="fp32")


@pytest.mark.parametrize("rule", sorted(RULES) + ["static"])
def test_fast_path_equals_continuation_logits(llama, rule):
    items = _items()
    scores = calibrate_static(llama, _items(2, seed=7))
    sparsity = SparsityConfig(keep=0.3, alpha=0.3, rule="coreinfer" if rule == "static" else rule)
    for item in items:
        selector = StaticSelector(scores, 0.3) if rule == "static" else None
        pre = prefill(llama, item)
        # Score twice on the same prefill: the cache must come back untouched.
        for _ in range(2):
            fast, density = score(llama, pre, sparsity, selector)
            (ref,), session = llama.continuation_logits([item.prompt], [item.continuation], sparsity, selector=selector)
            torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)
            assert density == pytest.approx(session.ffn_density())
        dense, _ = score(llama, pre, None)
        (ref,), _ = llama.continuation_logits([item.prompt], [item.continuation], None)
        torch.testing.assert_close(dense, ref, rtol=1e-5, atol=1e-5)


def test_keep_one_matches_dense(tiny_engine):
    from coreinfer.adaptive import calibrate

    calibration_items = _items(2, seed=7)
    tiny_engine._calibration = calibrate(
        tiny_engine, [i.prompt for i in calibration_items], [i.continuation for i in calibration_items], (0.3,), progress=False
    )
    evalset = EvalSet("tiny", _items(), calibration_items)
    configs = [Config(rule, 1.0, 0.2 if rule in ("coreinfer", "official", "magnitude") else None) for rule in ALL_RULES]
    rows = evaluate(tiny_engine, evalset, configs, progress=False)
    for row in rows:
        assert row["agreement"] == 1.0, row
        assert row["kl"] == pytest.approx(0.0, abs=1e-6), row
        assert row["ppl"] == pytest.approx(row["dense_ppl"], rel=1e-5), row
        assert row["ffn_density"] == pytest.approx(1.0)


def test_sparse_differs_from_dense(llama):
    rows = evaluate(llama, EvalSet("tiny", _items(), _items(2, seed=7)), sweep(["random", "static"], [0.2], [0.2]), progress=False)
    dense, *sparse = rows
    assert dense["rule"] == "dense" and dense["agreement"] == 1.0
    for row in sparse:
        assert row["kl"] > 1e-4 and row["ffn_density"] < 1.0
    assert "| tiny | random | 0.2 |" in markdown_table(rows)


@pytest.mark.parametrize("rule", sorted(RULES))
@pytest.mark.parametrize("keep", [0.05, 0.3, 0.5, 0.8, 1.0])
def test_rule_keeps_stated_number(rule, keep):
    acts = torch.randn(11, 64, generator=torch.Generator().manual_seed(3))
    chosen = RULES[rule](acts, keep, 0.2)
    assert len(chosen) == num_kept(64, keep)
    assert torch.equal(chosen, torch.sort(chosen).values)
    assert len(set(chosen.tolist())) == len(chosen)


def test_static_selector_ignores_prompt():
    scores = {0: torch.arange(64.0)}
    selector = StaticSelector(scores, 0.25)
    a = selector(0, torch.randn(5, 64))
    b = selector(0, torch.randn(9, 64))
    assert torch.equal(a, b) and a.tolist() == list(range(48, 64))


def test_griffin_normalises_each_token():
    acts = torch.zeros(2, 4)
    acts[0, 0] = 100.0  # a loud token must not outweigh a quiet one
    acts[1, 1] = 0.1
    acts[1, 2] = 0.05
    assert RULES["griffin"](acts, 0.5, 0.2).tolist() == [0, 1]


def test_repeated_ngram_rate():
    assert repeated_ngram_rate([1, 2, 3, 4, 5, 6]) == 0.0
    assert repeated_ngram_rate([1, 2, 3, 4] * 3) == pytest.approx(5 / 9)  # 9 four-grams, the first 4 new
    assert repeated_ngram_rate([1, 2]) == 0.0


@pytest.mark.parametrize("rule", sorted(RULES))
def test_ranked_selector_equals_rule(rule):
    from coreinfer.quality import RankedSelector

    acts = torch.randn(13, 96, generator=torch.Generator().manual_seed(5))
    cache: dict = {}
    for keep in (0.8, 0.2, 0.5):  # the cached ranking serves every keep
        for alpha in (0.1, 0.3):
            got = RankedSelector(rule, keep, alpha, cache)(2, acts)
            assert torch.equal(got, RULES[rule](acts, keep, alpha))


def test_data_dir_missing_is_a_clear_error(monkeypatch, tmp_path):
    from coreinfer.quality import gsm8k_set

    monkeypatch.setenv("COREINFER_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="COREINFER_DATA"):
        gsm8k_set(None, 2)


def test_sweep_rejects_unknown_rule():
    with pytest.raises(ValueError, match="unknown rule"):
        sweep(["bogus"], [0.5], [0.2])
    configs = sweep(["coreinfer", "griffin"], [0.4, 0.6], [0.1, 0.2])
    assert configs[0].rule == "dense" and len(configs) == 1 + 4 + 2  # alpha only sweeps where it applies
    assert {c.rule for c in sweep(["all"], [0.5], [0.2])} == set(ALL_RULES)


@pytest.mark.real_model
def test_quality_cli_on_user_jsonl(real_engine, tmp_path):
    from typer.testing import CliRunner

    from coreinfer.cli import app

    data = tmp_path / "pairs.jsonl"
    data.write_text(
        "\n".join(
            json.dumps(r)
            for r in [
                {"prompt": "Name a colour.", "continuation": "Blue is a colour."},
                {"prompt": "Count to three.", "continuation": "One, two, three."},
                {"prompt": "Say hello.", "continuation": "Hello there!"},
            ]
        )
    )
    out, png = tmp_path / "q.json", tmp_path / "q.png"
    args = ["quality", "--data", str(data), "--data-items", "2", "--calibration", "1", "--keep", "0.5", "--keep", "1.0",
            "--rule", "static", "--rule", "griffin", "--json", str(out), "--plot", str(png), "--weights", "fp32"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    rows = json.loads(out.read_text())["rows"]
    assert [(r["rule"], r["keep"]) for r in rows] == [("dense", 1.0), ("static", 0.5), ("static", 1.0), ("griffin", 0.5), ("griffin", 1.0)]
    for r in rows:
        assert {"set", "rule", "keep", "alpha", "ffn_density", "ppl", "dense_ppl", "agreement", "kl"} <= set(r)
        assert r["set"] == "pairs" and r["items"] == 2 and (r["backend"], r["weights"]) == ("lean", "fp32")
        if r["keep"] == 1.0:
            assert r["agreement"] == 1.0 and r["ppl"] == pytest.approx(r["dense_ppl"], rel=1e-5)
    assert 0 < rows[1]["ffn_density"] < 1
    assert png.stat().st_size > 1000 and "| pairs | griffin | 0.5 |" in result.stdout
    # --keep without --rule: the default's ranking at that keep.
    result = CliRunner().invoke(app, ["quality", "--data", str(data), "--data-items", "1", "--keep", "0.5",
                                      "--weights", "fp32", "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert [(r["rule"], r["keep"]) for r in json.loads(out.read_text())["rows"]] == [("dense", 1.0), ("griffin", 0.5)]


def test_adaptive_rule_in_the_harness_meets_its_density_target(llama):
    from coreinfer.adaptive import calibrate

    items = _items()
    llama._calibration = calibrate(llama, [i.prompt for i in items], [i.continuation for i in items], levels=(0.3, 0.6), progress=False)
    rows = evaluate(llama, EvalSet("tiny", _items(3, seed=4)), sweep(["adaptive"], [0.5, 1.0], [0.2]), progress=False)
    by_keep = {r["keep"]: r for r in rows if r["rule"] == "adaptive"}
    assert by_keep[0.5]["ffn_density"] <= 0.5 + 1e-6 and by_keep[0.5]["agreement"] < 1.0
    assert by_keep[1.0]["agreement"] == 1.0 and by_keep[1.0]["kl"] == pytest.approx(0.0, abs=1e-9)


def test_headline_table_puts_each_rule_on_one_line():
    from coreinfer.quality import headline_table

    rows = [
        {"set": "s", "rule": "dense", "keep": 1.0, "ppl": 5.0, "dense_ppl": 5.0, "agreement": 1.0, "ffn_density": 1.0},
        {"set": "s", "rule": "magnitude", "keep": 0.4, "ppl": 9.5, "dense_ppl": 5.0, "agreement": 0.5, "ffn_density": 0.56},
        {"set": "s", "rule": "magnitude", "keep": 0.6, "ppl": 7.25, "dense_ppl": 5.0, "agreement": 0.7, "ffn_density": 0.71},
    ]
    lines = headline_table(rows).splitlines()
    assert len(lines) == 3
    assert lines[2] == "| s (5.00) | magnitude | 9.50 / 0.500 @ 0.56 | 7.25 / 0.700 @ 0.71 |"


@pytest.mark.real_model
def test_quality_without_rule_or_keep_evaluates_the_default(real_engine, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from coreinfer.cli import app
    from coreinfer.decode import cpu_kernels
    from coreinfer.engine import Engine

    data = tmp_path / "pairs.jsonl"
    answer = "The sky looks blue because air scatters short blue wavelengths of sunlight far more than red ones."
    data.write_text(json.dumps({"prompt": "Why is the sky blue?", "continuation": answer}) + "\n")
    out = tmp_path / "q.json"
    base = ["quality", "--data", str(data), "--calibration", "1", "--data-items", "1", "--json", str(out)]
    # The default scores what it decodes, which the speed check decides: here it is told, not timed.
    monkeypatch.setattr(Engine, "token_pays", lambda self, backend, sparsity: backend.name == "lean")
    result = CliRunner().invoke(app, [*base, "--weights", "fp32"])
    assert result.exit_code == 0, result.output
    rows = json.loads(out.read_text())["rows"]
    assert [r["rule"] for r in rows] == ["dense", "default"]
    default = rows[1]
    # The default is token-level: one calibrated level per model, no dense warm-up to report apart.
    assert default["mode"] == "token" and 0 < default["keep"] < 1.0 and "warmup" not in default
    assert 0 < default["ffn_density"] < 1.0 and default["ffn_density"] < default["weight_share"] < 1.0
    # On the default weights (int4 from the GGUF) the gather kernel reads the kept rows too.
    result = CliRunner().invoke(app, base)
    assert result.exit_code == 0, result.output
    default = json.loads(out.read_text())["rows"][1]
    if cpu_kernels.available():
        assert (default["weights"], default["mode"]) == ("int4", "token") and 0 < default["ffn_density"] < 1.0
    else:  # no kernel, no int4 default either: it falls back to bf16 or fp32, which gather
        assert default["weights"] != "int4" and default["mode"] == "token"
    # Where the level does not pay, the default decodes densely, and that is what its row scores.
    monkeypatch.setattr(Engine, "token_pays", lambda self, backend, sparsity: False)
    result = CliRunner().invoke(app, base)
    assert result.exit_code == 0, result.output
    dense, default = json.loads(out.read_text())["rows"]
    assert (default["mode"], default["keep"], default["ffn_density"]) == ("dense", 1.0, 1.0)
    assert default["agreement"] == dense["agreement"] and default["ppl"] == dense["ppl"]


def test_fact_questions_parse_and_match(tmp_path):
    from coreinfer.quality import fact_present, load_fact_questions

    shipped = load_fact_questions()
    assert len(shipped) >= 20 and all(q.facts for q in shipped)
    assert fact_present("carbon dioxide|CO2", "Plants take in co2.") and not fact_present("Paris", "It is Lyon.")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "Q?"}) + "\n")
    with pytest.raises(ValueError, match="needs a 'question' and a non-empty 'facts'"):
        load_fact_questions(str(bad))
    with pytest.raises(FileNotFoundError):
        load_fact_questions(str(tmp_path / "missing.jsonl"))


@pytest.mark.real_model
def test_answers_report_facts_kept(real_engine, tmp_path):
    from typer.testing import CliRunner

    from coreinfer.cli import app

    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"prompt": "Say hello.", "continuation": "Hello there, how are you today?"}) + "\n")
    answers = tmp_path / "answers.jsonl"
    answers.write_text("\n".join(json.dumps(r) for r in [
        {"question": "What is the capital of France?", "facts": ["Paris"]},
        {"question": "How many legs does a spider have?", "facts": ["eight|8"]},
    ]) + "\n")
    out = tmp_path / "q.json"
    args = ["quality", "--data", str(data), "--calibration", "1", "--data-items", "1", "--answers", str(answers),
            "--answers-tokens", "20", "--json", str(out), "--weights", "fp32"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    facts = json.loads(out.read_text())["facts"]
    assert [r["rule"] for r in facts] == ["dense", "default"]
    assert facts[0]["facts_kept"] == 1.0 and facts[0]["dense_facts"] >= 1  # lean fp32 dense is the reference
    assert 0.0 <= facts[1]["facts_kept"] <= 1.0 and "Facts kept" in result.stdout


@pytest.mark.parametrize("rule", ["wina", "coverage", "glass"])
def test_candidate_rules_score_like_continuation_logits(llama, rule):
    from coreinfer.quality import Config

    prior = calibrate_static(llama, _items(2, seed=7))
    item = _items(1)[0]
    pre = prefill(llama, item)
    sparsity, selector = Config(rule, 0.5).plan(llama, None, prior, {})
    fast, density = score(llama, pre, sparsity, selector)
    (ref,), session = llama.continuation_logits([item.prompt], [item.continuation], sparsity, selector=selector)
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)
    assert density == pytest.approx(session.ffn_density()) and density < 1.0
    dense, _ = score(llama, pre, None)
    assert not torch.allclose(fast, dense)


def test_sweep_adds_a_default_row_at_its_quality():
    from coreinfer.quality import Config, sweep

    configs = sweep(["griffin", "default"], [0.5], [0.2], quality=0.9)
    assert Config("default", quality=0.9) in configs and Config("griffin", 0.5) in configs
