"""The command line: JSON output on the default model, clear errors on bad input."""

import json

import pytest
from typer.testing import CliRunner

from coreinfer.cli import app

runner = CliRunner()


@pytest.mark.real_model
def test_generate_json_on_the_default_model(real_engine):
    result = runner.invoke(app, ["generate", "What is 2+2?", "--json", "--max-new-tokens", "6", "--keep", "0.5"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    for key in ("text", "prompt_tokens", "new_tokens", "prefill_s", "decode_tok_s", "keep", "ffn_density"):
        assert key in payload
    assert payload["keep"] == 0.5 and 0 < payload["ffn_density"] < 1
    assert payload["model"] == "SmolLM2-135M-Instruct"


@pytest.mark.real_model
def test_generate_reads_stdin_and_dense_flag(real_engine):
    result = runner.invoke(app, ["generate", "--dense", "--json", "--max-new-tokens", "4"], input="Say hi.")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["ffn_density"] == 1.0 and payload["keep"] is None


@pytest.mark.parametrize(
    "args, message",
    [
        (["generate", "hi", "--keep", "1.5"], "keep must lie in"),
        (["generate", "hi", "--alpha", "0"], "alpha must lie in"),
        (["generate", "hi", "--rule", "bogus"], "unknown selection rule"),
        (["generate", "hi", "--model", "/nonexistent/model.gguf"], "no model at"),
        (["generate", "   "], "empty"),
    ],
)
def test_bad_input_gives_a_clear_error(args, message):
    result = runner.invoke(app, args, input="")
    assert result.exit_code == 2
    assert message in result.output


@pytest.mark.real_model
def test_fast_flag_gives_the_reference_tokens_in_fp32(real_engine):
    args = ["generate", "What is 2+2?", "--json", "--max-new-tokens", "8", "--rule", "coreinfer", "--keep", "0.6"]
    reference = json.loads(runner.invoke(app, args).stdout)
    fast = runner.invoke(app, [*args, "--fast", "fp32"])
    assert fast.exit_code == 0, fast.output
    payload = json.loads(fast.stdout)
    assert payload["text"] == reference["text"] and payload["ffn_density"] == reference["ffn_density"]


@pytest.mark.real_model
def test_fast_flag_rejects_an_unknown_weight_format(real_engine):
    result = runner.invoke(app, ["generate", "hi", "--fast", "fp8"], input="")
    assert result.exit_code == 2 and "weights must be one of" in result.output
