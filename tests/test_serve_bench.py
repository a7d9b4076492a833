"""The load benchmark's arithmetic, and one small run against a tiny model's server."""

from __future__ import annotations

import json

import pytest

from coreinfer import Engine
from coreinfer.serve_bench import RequestTiming, markdown, percentile, run

from conftest import tiny_model, tiny_tokenizer


def test_percentile_interpolates_and_handles_edges():
    assert percentile([], 0.5) == 0.0
    assert percentile([3.0], 0.95) == 3.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 0.5) == pytest.approx(2.5)
    assert percentile([4.0, 1.0, 3.0, 2.0], 1.0) == 4.0


def test_request_pace_counts_the_tokens_after_the_first():
    assert RequestTiming(first_token_s=1.0, total_s=3.0, tokens=5).decode_tok_s == pytest.approx(2.0)
    assert RequestTiming(first_token_s=1.0, total_s=1.0, tokens=1).decode_tok_s == 0.0


def test_a_small_run_reports_every_wave_and_every_soak_request(tmp_path):
    # The tiny tokenizer has no chat template: the server would refuse chat requests, so give it one.
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    engine = Engine(tiny_model("llama"), tokenizer=tokenizer, name="tiny", weights="fp32", backend="lean")
    report = run(engine, tmp_path, clients=(1, 2), requests_per_client=1, max_tokens=6, soak_requests=8,
                 soak_concurrency=4, echo=lambda line: None)
    assert [w["clients"] for w in report["waves"]] == [1, 2]
    assert all(w["total_tok_s"] > 0 and w["requests"] == w["clients"] for w in report["waves"])
    assert report["waves"][0]["throughput_vs_1"] == 1.0
    soak = report["soak"]
    assert sum(soak["outcomes"].values()) == 8 and "hanging" not in soak["outcomes"]
    assert json.loads((tmp_path / "serve.json").read_text())["model"] == "tiny"
    assert "| 2 |" in (tmp_path / "serve.md").read_text()


def test_markdown_names_the_soak_outcomes():
    report = {"model": "m", "max_tokens": 8, "max_batch": 2, "waves": [],
              "soak": {"requests": 3, "concurrency": 2, "wall_s": 1.0, "outcomes": {"answered": 2, "cancelled": 1},
                       "rss_first_wave_mib": 100.0, "rss_after_mib": 101.0, "rss_growth": 0.01}}
    text = markdown(report)
    assert "answered: 2, cancelled: 1" in text and "+1.0%" in text
