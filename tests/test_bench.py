"""coreinfer bench on a tiny model: the report's shape and its arithmetic (never its speed)."""

from __future__ import annotations

import json

import pytest

from coreinfer.adaptive import calibrate

from coreinfer import Engine
from coreinfer.bench import BenchSettings, markdown_table, run_bench, speed_quality_plot, token_agreement
from coreinfer.quality import Item

from conftest import prompts, tiny_model

ROW_KEYS = {"config", "keep", "decode_tok_s", "prefill_tok_s", "peak_rss_mb", "ratio_vs_hf", "fraction_of_bandwidth_limit"}


@pytest.fixture(scope="module")
def report():
    engine = Engine(tiny_model("llama"), tokenizer=None)
    engine._calibration = calibrate(engine, prompts((8, 6), seed=3), prompts((5, 5), seed=4), progress=False)
    settings = BenchSettings(
        prompt=" ".join(map(str, prompts((9,))[0])), max_new_tokens=4, repeats=2, keeps=(1.0, 0.4), weights="bf16",
        token_keeps=(0.5,),
        memory=False, scaling_tokens=(3, 5), scaling_batches=(1, 2), scaling_repeats=1,
    )
    items = [Item(tuple(p), tuple(c)) for p, c in zip(prompts((7, 9), seed=5), prompts((6, 6), seed=6))]
    return run_bench(engine, tiny_model("llama"), settings, progress=lambda _: None, items=items)


def test_rows_name_every_configuration(report):
    names = [r["config"] for r in report.rows]
    assert names == ["hf_dense", "reference_dense", "lean_dense_fp32", "lean_dense_bf16", "default_bf16",
                     "token_k0.5_bf16", "token_all_k0.5_bf16",
                     "coreinfer_k1_bf16", "coreinfer_k0.4_bf16", "coreinfer_k0.4_fp32"]
    for row in report.rows:
        assert ROW_KEYS <= set(row)
        assert len(row["decode_tok_s_runs"]) == 2
        assert row["decode_tok_s"] > 0 and row["prefill_tok_s"] > 0


def test_ratios_and_limits_are_consistent(report):
    hf = report.rows[0]
    assert hf["ratio_vs_hf"] == 1.0
    for row in report.rows:
        assert row["ratio_vs_hf"] == pytest.approx(row["decode_tok_s"] / hf["decode_tok_s"], rel=0.01)
        assert row["fraction_of_bandwidth_limit"] == pytest.approx(row["decode_tok_s"] / row["bandwidth_limit_tok_s"], rel=0.01, abs=1e-3)
    by_name = {r["config"]: r for r in report.rows}
    assert by_name["lean_dense_bf16"]["weight_mb_per_token"] == pytest.approx(by_name["lean_dense_fp32"]["weight_mb_per_token"] / 2, rel=0.01)
    assert by_name["coreinfer_k0.4_bf16"]["ffn_density"] < 1.0
    token, both = by_name["token_k0.5_bf16"], by_name["token_all_k0.5_bf16"]
    assert token["mode"] == "token" and token["targets"] == "ffn" and token["ffn_density"] < 1.0
    assert both["weight_share"] < token["weight_share"] < 1.0  # thinning the attention too reads less
    assert both["weight_mb_per_token"] < by_name["lean_dense_bf16"]["weight_mb_per_token"]
    for row in report.rows:
        assert row["answer_s"] > 0


def test_scaling_covers_tokens_and_batches(report):
    assert [e["new_tokens"] for e in report.scaling["new_tokens"]] == [3, 5]
    assert [e["batch"] for e in report.scaling["batch"]] == [1, 2]
    for entry in report.scaling["batch"]:
        assert all(entry[c] > 0 for c in report.scaling["configs"])


def test_every_row_carries_its_quality(report):
    by_name = {r["config"]: r for r in report.rows}
    # HF generate, the reference backend and lean fp32 are the same dense fp32 model: full agreement.
    for name in ("hf_dense", "reference_dense", "lean_dense_fp32"):
        assert by_name[name]["greedy_agreement"] == 1.0 and by_name[name]["forced_agreement"] == 1.0
    for row in report.rows:
        assert 0.0 <= row["forced_agreement"] <= 1.0
    sparse = by_name["coreinfer_k0.4_bf16"]
    assert sparse["forced_agreement"] < 1.0 and "predicted_agreement" in sparse and "flagged" in sparse
    assert by_name["coreinfer_k0.4_fp32"]["predicted_agreement"] == by_name["coreinfer_k0.4_fp32"]["forced_agreement"]


def test_token_agreement_counts_positions():
    assert token_agreement([1, 2, 3, 4], [1, 2, 9, 4]) == 0.75
    assert token_agreement([], [1]) == 0.0


def test_outputs_write(report, tmp_path):
    json.dumps(report.to_dict())
    table = markdown_table(report)
    assert all(r["config"] in table for r in report.rows)
    speed_quality_plot(report, tmp_path / "bench.png")
    assert (tmp_path / "bench.png").stat().st_size > 1000
