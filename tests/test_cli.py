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
        (["generate", "hi", "--keep", "most"], 'or "auto"'),
        (["generate", "hi", "--quality", "0"], "quality must lie in"),
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
def test_lean_fp32_gives_the_reference_tokens(real_engine):
    args = ["generate", "What is 2+2?", "--json", "--max-new-tokens", "8", "--rule", "coreinfer", "--keep", "0.6"]
    reference = json.loads(runner.invoke(app, [*args, "--backend", "reference"]).stdout)
    assert reference["backend"] == "reference"
    for extra in (["--backend", "lean", "--weights", "fp32"], ["--fast", "fp32"]):  # --fast is an alias
        fast = runner.invoke(app, [*args, *extra])
        assert fast.exit_code == 0, fast.output
        payload = json.loads(fast.stdout)
        assert (payload["backend"], payload["weights"]) == ("lean", "fp32")
        assert payload["text"] == reference["text"] and payload["ffn_density"] == reference["ffn_density"]


@pytest.mark.real_model
def test_default_runs_the_lean_backend(real_engine):
    result = runner.invoke(app, ["generate", "Name a colour.", "--json", "--max-new-tokens", "4"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    from coreinfer.decode.weights import default_weights

    assert payload["backend"] == "lean"
    # int4 for a GGUF source on a CPU where coreinfer's kernels build (default_weights)
    assert payload["weights"] == default_weights(real_engine.device, gguf=True)


@pytest.mark.real_model
def test_default_dense_answer_reads_like_full_precision(real_engine):
    """The prompt on which dense int8 looped ("1.1.1.1..."): the default weights answer as fp32 does."""
    args = ["generate", "Give me three tips for sleeping better.", "--dense", "--json", "--max-new-tokens", "24"]
    default = json.loads(runner.invoke(app, args).stdout)
    reference = json.loads(runner.invoke(app, [*args, "--backend", "reference"]).stdout)
    assert default["text"] == reference["text"]


@pytest.mark.real_model
@pytest.mark.parametrize("extra", [["--fast", "fp8"], ["--weights", "fp8"], ["--backend", "fast"]])
def test_unknown_backend_or_weights_is_refused(real_engine, extra):
    result = runner.invoke(app, ["generate", "hi", *extra], input="")
    assert result.exit_code == 2 and ("weights must be one of" in result.output or "backend must be one of" in result.output)


@pytest.mark.real_model
def test_default_chooses_the_density_and_says_so(real_engine):
    result = runner.invoke(app, ["generate", "Why is the sky blue?", "--json", "--max-new-tokens", "24"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    # Token-level sparsity of the FFN inputs at the default model's shipped calibrated level, where it
    # decodes faster than dense on this machine; dense (and saying so) where it does not.
    assert payload["dense_tokens"] == 0 and payload["mode"] in ("token", "dense")
    if payload["mode"] == "token":
        assert payload["targets"] == "ffn" and 0 < payload["keep"] < 1.0 and payload["ffn_density"] < 0.95
        assert payload["ffn_density"] < payload["weight_share"] < 1.0
    else:
        assert payload["ffn_density"] == 1.0 and payload["weight_share"] == 1.0
