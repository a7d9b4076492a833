"""``dtype``: what the model is loaded in, for load(), memory-limited mode and the command line."""

import json

import pytest
import torch
from transformers import AutoConfig
from typer.testing import CliRunner

import coreinfer
from coreinfer import SamplingConfig, SparsityConfig
from coreinfer.cli import app
from coreinfer.loading import load_dtype, parse_dtype
from coreinfer.offload import OffloadedFFNWeights, offloaded_parameter_names

from conftest import save_tiny_model

SPARSE = SparsityConfig(keep=0.5, layers=(1, 2))
SAMPLING = SamplingConfig(max_new_tokens=4)


@pytest.fixture
def saved(tmp_path):
    save_tiny_model(tmp_path / "m")
    return tmp_path / "m"


def dtypes(engine) -> set[torch.dtype]:
    return {p.dtype for p in engine.model.parameters()}


@pytest.mark.parametrize("dtype", ["bfloat16", torch.bfloat16])
def test_bfloat16_load_generates_on_both_backends(saved, dtype):
    engine = coreinfer.load(saved, device="cpu", dtype=dtype)
    assert dtypes(engine) == {torch.bfloat16}
    for backend in ("reference", "lean"):
        result = engine.generate("w5 w9 w3", SPARSE, SAMPLING, backend=backend)
        assert result.new_tokens == 4 and result.backend == backend


def test_auto_is_float32_on_the_cpu_and_the_checkpoints_on_cuda(tmp_path):
    save_tiny_model(tmp_path / "bf16", dtype=torch.bfloat16)
    assert dtypes(coreinfer.load(tmp_path / "bf16", device="cpu", dtype="auto")) == {torch.float32}
    config = AutoConfig.from_pretrained(tmp_path / "bf16")
    assert load_dtype("auto", config, "cuda") == torch.bfloat16
    assert load_dtype("auto", config, "cuda:1") == torch.bfloat16
    assert load_dtype(None, config, "cpu") == torch.float32
    assert load_dtype("float16", config, "cpu") == torch.float16
    config.dtype = None  # a config that does not say: float32
    assert load_dtype("auto", config, "cuda") == torch.float32


@pytest.mark.parametrize("bad", ["fp8", "half", torch.float64, 16])
def test_a_bad_dtype_names_the_choices(saved, bad):
    with pytest.raises(ValueError, match="auto, float32, bfloat16, float16"):
        parse_dtype(bad)
    with pytest.raises(ValueError, match="dtype must be one of"):
        coreinfer.load(saved, device="cpu", dtype=bad)


def test_memory_limited_honours_the_dtype(saved):
    engine = coreinfer.load(saved, device="cpu", dtype="bfloat16", memory_limit=True)
    # Offloaded FFN weights stay the mapped file's float32 bytes and are converted chunk by chunk.
    mapped = offloaded_parameter_names(engine.model, engine.model.offloaded_layers)
    resident = {p.dtype for name, p in engine.model.named_parameters() if name not in mapped}
    assert mapped and resident == {torch.bfloat16}
    offloaded = [ffn.weights for ffn in engine.ffns if isinstance(ffn.weights, OffloadedFFNWeights)]
    assert offloaded and all(w.target_dtype == torch.bfloat16 for w in offloaded)
    assert engine.generate("w5 w9 w3", SPARSE, SAMPLING).new_tokens == 4
    assert engine.generate("w5 w9 w3", None, SAMPLING).new_tokens == 4


runner = CliRunner()


def test_cli_dtype_loads_and_refuses_a_bad_one(saved):
    args = ["generate", "w5 w9 w3", "--model", str(saved), "--json", "--max-new-tokens", "3", "--device", "cpu"]
    result = runner.invoke(app, [*args, "--dtype", "bfloat16", "--backend", "reference"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["new_tokens"] == 3
    result = runner.invoke(app, [*args, "--dtype", "fp8"])
    assert result.exit_code == 2 and "auto, float32, bfloat16, float16" in result.output


@pytest.mark.parametrize(
    "command",
    ["generate", "serve", "quality", "cluster", "similarity-eval", "analyze", "bench-memory"],
)
def test_every_loading_command_takes_the_model_options(command):
    text = runner.invoke(app, [command, "--help"], terminal_width=200).output
    for option in ("--model", "--revision", "--gguf-file", "--dtype"):
        assert option in text, (command, option)
