"""The verified-models table: one row per model, measured on real weights."""

import json

import pytest
from typer.testing import CliRunner

from coreinfer.cli import app
from coreinfer.verify import ModelRow, models_table, verify_model


@pytest.mark.real_model
def test_verify_row_on_the_default_model(real_engine):
    seen = []
    row = verify_model(None, max_new_tokens=20, prompts=("What is the capital of France?",),
                       load=lambda name: seen.append(name) or real_engine)
    assert seen == [None]
    assert row.family == "llama" and row.layers == 30 and row.ffn == 1536
    assert row.dense_tok_s > 0 and row.default_tok_s > 0 and row.load_s >= 0
    assert 0 < row.ffn_density <= 1 and 0 <= row.agreement <= 1 and row.ppl_ratio > 0
    # The default is quality-safe: on this answer it stays with dense.
    assert row.agreement >= 0.9 and row.same_text == 1.0


def _row(**kw) -> ModelRow:
    base = dict(family="llama", model="m", layers=2, ffn=8, backend="lean", weights="bf16", load_s=1.0,
                dense_tok_s=10.0, default_tok_s=12.0, ffn_density=0.8, agreement=0.95, ppl_ratio=1.02, same_text=0.5)
    return ModelRow(**{**base, **kw})


def test_models_table_has_one_line_per_model():
    table = models_table([_row(model="a"), _row(model="b", family="gemma3_text")])
    lines = table.splitlines()
    assert len(lines) == 4 and "| gemma3_text | b | 2 × 8 |" in lines[3] and "0.80" in lines[2]


def test_models_command_writes_json_and_markdown(monkeypatch, tmp_path):
    import coreinfer.verify as verify

    monkeypatch.setattr(verify, "verify_model", lambda name, tokens, progress: _row(model=str(name)))
    out = tmp_path / "models.json"
    result = CliRunner().invoke(app, ["models", "--model", "x", "--model", "y", "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert [r["model"] for r in json.loads(out.read_text())] == ["None", "x", "y"]  # the default first
    assert out.with_suffix(".md").read_text().count("\n") == 5
