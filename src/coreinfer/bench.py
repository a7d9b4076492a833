"""``coreinfer bench``: decode and prefill speed, peak memory and the bandwidth limit, per configuration.

Method (one run, one machine):

- every configuration gets the same prompt and the same number of new tokens
  (end-of-sequence is ignored), greedy;
- runs are interleaved round-robin over configurations, so a noisy neighbour
  slows all of them alike; the first round is a warm-up and is discarded; each
  figure is the median of the remaining ``repeats`` rounds;
- decode tok/s counts the tokens after the first (which comes from the
  prefill logits) over the time after the first; prefill tok/s is prompt
  tokens over the time to the first token;
- the bandwidth limit of a configuration is the memory read bandwidth measured
  in the same run (best of a few sums over a tensor far larger than the
  caches) divided by the bytes of weights one decode step reads (dense or at
  its FFN density; the LM head included);
- peak memory: each configuration is loaded and run once in a fresh
  subprocess (spawned, not forked), which reports its own peak (``VmHWM``). It
  therefore includes the Python runtime, torch and every weight copy that
  configuration needs (the lean path keeps the HF model for prefill).
"""

from __future__ import annotations

import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from multiprocessing import get_context
from pathlib import Path
from typing import Optional, Sequence, Union

import torch

from .config import DEFAULT_SPARSITY, SamplingConfig, SparsityConfig
from .decode.lean import LeanModel
from .decode.weights import gathers
from .engine import Engine
from .offload_bench import peak_rss_mb as process_peak_rss_mb

DEFAULT_PROMPT = "Write a short story about a robot who learns to paint."
# A row is flagged when its agreement falls this far below what its selection and weights predict.
FLAG_MARGIN = 0.05


@dataclass(frozen=True)
class BenchConfig:
    """One row: ``kind`` is hf (HF generate), engine (one of the engine's backends) or llamacpp."""

    name: str
    kind: str
    keep: Union[float, str, None] = None
    weights: str = "fp32"
    rule: str = "coreinfer"
    backend: str = "lean"
    mode: str = "sentence"
    targets: str = "ffn"  # token mode: the inputs thinned
    quality: float = DEFAULT_SPARSITY.quality

    def sparsity(self) -> Optional[SparsityConfig]:
        if self.keep is None:
            return None
        return SparsityConfig(keep=self.keep, rule=self.rule, mode=self.mode, targets=self.targets, quality=self.quality)

    def in_fp32(self) -> "BenchConfig":
        """The same selection on the lean backend in fp32: what this row's quantisation is measured against."""
        return replace(self, name=f"{self.name}@fp32", weights="fp32")


@dataclass
class BenchSettings:
    prompt: str = DEFAULT_PROMPT
    max_new_tokens: int = 128
    repeats: int = 5
    keeps: tuple[float, ...] = (1.0, 0.6, 0.4, 0.2)
    token_keeps: tuple[float, ...] = (0.7, 0.6, 0.5)  # token-level rows (targets ffn), and one of all at the last
    weights: Optional[str] = None  # lean weights of the sparse rows; None: the engine's default for the device
    model: Optional[str] = None
    gguf: Optional[str] = None  # llama.cpp row; None: the default model's GGUF when llama_cpp imports
    llamacpp: bool = True
    memory: bool = True
    quality_items: int = 6  # GSM8K items scored teacher-forced per row (0 skips)
    data_dir: Optional[str] = None  # a local copy of the built-in sets; None: $COREINFER_DATA or the Hub
    quality_tokens: int = 64
    scaling_tokens: tuple[int, ...] = (8, 128, 512)
    scaling_batches: tuple[int, ...] = (1, 4, 8)
    scaling_repeats: int = 3
    scaling_keep: float = 0.4

    def lean_weights(self, engine: Engine) -> str:
        return self.weights or engine.default_weights()


def default_configs(settings: BenchSettings, weights: str, with_llamacpp: bool) -> list[BenchConfig]:
    configs = [
        BenchConfig("hf_dense", "hf"),
        BenchConfig("reference_dense", "engine", backend="reference"),
        BenchConfig("lean_dense_fp32", "engine"),
    ]
    if weights != "fp32":
        configs.append(BenchConfig(f"lean_dense_{weights}", "engine", weights=weights))
    # What `coreinfer generate` runs with no options.
    default = DEFAULT_SPARSITY
    configs.append(BenchConfig(f"default_{weights}", "engine", default.keep, weights, default.rule,
                               mode=default.mode, targets=default.targets))
    # Token-level rows need weights read row by row: fp32 where the format cannot be (int8; int4 where
    # coreinfer's int4 kernel does not build).
    tw = weights if gathers(weights, torch.device("cpu")) else "fp32"
    configs += [BenchConfig(f"token_k{k:g}_{tw}", "engine", k, tw, mode="token") for k in settings.token_keeps]
    if settings.token_keeps:
        k = settings.token_keeps[-1]
        configs.append(BenchConfig(f"token_all_k{k:g}_{tw}", "engine", k, tw, mode="token", targets="all"))
    configs += [BenchConfig(f"coreinfer_k{k:g}_{weights}", "engine", keep=k, weights=weights) for k in settings.keeps]
    # Sparsity alone, without quantisation.
    if weights != "fp32":
        configs.append(BenchConfig("coreinfer_k0.4_fp32", "engine", keep=0.4, weights="fp32"))
    if with_llamacpp:
        configs.append(BenchConfig("llamacpp", "llamacpp"))
    return configs


def llamacpp_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


# Timing one generation


@dataclass
class Timing:
    prompt_tokens: int
    new_tokens: int  # per sequence
    batch: int
    prefill_s: float
    decode_s: float
    token_ids: list[int] = field(default_factory=list)  # the first sequence's greedy tokens
    ffn_density: float = 1.0  # as the run reported it (keep="auto" chooses it per run)
    weight_share: float = 1.0  # share of all decode-time weights read per token
    chosen_keep: Optional[float] = None  # the keep the run decoded with (keep="auto": its choice)
    mode: str = "dense"  # what decoded the run: dense, sentence or token (keep="auto" may resolve to dense)

    @property
    def answer_s(self) -> float:
        return self.prefill_s + self.decode_s

    @property
    def decode_tok_s(self) -> float:
        return self.batch * (self.new_tokens - 1) / self.decode_s if self.decode_s > 0 else 0.0

    @property
    def prefill_tok_s(self) -> float:
        return self.batch * self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else 0.0


class _FirstTokenClock:
    """An HF streamer that notes when the first new token arrives (the end of prefill)."""

    def __init__(self) -> None:
        self.calls: list[float] = []

    def put(self, value) -> None:  # the first call carries the prompt, the second the first new token
        self.calls.append(time.perf_counter())

    def end(self) -> None:
        pass


class Runners:
    """Everything the configurations run on, built once and shared."""

    def __init__(self, engine: Optional[Engine], hf_model, gguf: Optional[str], pad_id: Optional[int] = None):
        self.engine = engine
        self.hf_model = hf_model
        self.gguf = gguf
        self.pad_id = pad_id if pad_id is not None else engine.pad_id() if engine is not None else 0
        self.llama = None
        self._llama_all = None  # a second instance keeping every position's logits, for teacher forcing
        if gguf is not None:
            from llama_cpp import Llama

            self.llama = Llama(model_path=gguf, n_ctx=2048, n_threads=torch.get_num_threads(), verbose=False)

    def lean_model(self, weights: str) -> LeanModel:
        return self.engine.backend("lean", weights).model

    @torch.inference_mode()
    def run(self, config: BenchConfig, prompt: list[int], new_tokens: int, batch: int = 1) -> Timing:
        return getattr(self, f"_run_{config.kind}")(config, prompt, new_tokens, batch)

    def _run_hf(self, config, prompt, new_tokens, batch) -> Timing:
        ids = torch.tensor([prompt] * batch)
        clock = _FirstTokenClock()
        start = time.perf_counter()
        out = self.hf_model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
            do_sample=False, streamer=clock, pad_token_id=self.pad_id,
        )
        end = time.perf_counter()
        first = clock.calls[1] if len(clock.calls) > 1 else end
        return Timing(len(prompt), new_tokens, batch, first - start, end - first, out[0, len(prompt):].tolist())

    def _run_engine(self, config, prompt, new_tokens, batch) -> Timing:
        results = self.engine.generate_ids(
            [prompt] * batch, config.sparsity(), SamplingConfig(max_new_tokens=new_tokens),
            backend=config.backend, weights=config.weights if config.backend == "lean" else None, ignore_eos=True,
        )
        r = results[0]
        return Timing(r.prompt_tokens, r.new_tokens, batch, r.prefill_s, r.select_s + r.decode_s, r.token_ids,
                      r.ffn_density, r.weight_share, r.keep, r.mode)

    def _run_llamacpp(self, config, prompt, new_tokens, batch) -> Timing:
        import numpy as np

        if batch != 1:
            raise ValueError("the llama.cpp row runs batch 1 only")
        llm = self.llama
        llm.reset()
        start = time.perf_counter()
        llm.eval(prompt)
        token = int(np.argmax(_last_logits(llm)))
        tokens = [token]
        first = time.perf_counter()
        for _ in range(new_tokens - 1):
            llm.eval([token])
            token = int(np.argmax(_last_logits(llm)))
            tokens.append(token)
        end = time.perf_counter()
        return Timing(len(prompt), new_tokens, 1, first - start, end - first, tokens)

    # Teacher-forced top-1 predictions over shared items, for the quality columns

    @torch.inference_mode()
    def predictions(self, config: BenchConfig, items) -> list[torch.Tensor]:
        """Each item's argmax prediction per continuation token, as this configuration computes it."""
        if config.kind == "llamacpp":
            return [self._llamacpp_predictions(item) for item in items]
        if config.kind == "hf":  # HF generate is the fp32 dense model: the reference itself
            config = BenchConfig("reference", "engine", backend="reference")
        out = []
        for item in items:
            logits, _ = self.engine.continuation_logits(
                [list(item.prompt)], [list(item.continuation)], config.sparsity(), backend=config.backend,
                weights=config.weights if config.backend == "lean" else None,
            )
            out.append(logits[0].argmax(-1).cpu())
        return out

    def _llamacpp_predictions(self, item) -> torch.Tensor:
        from llama_cpp import Llama

        if self._llama_all is None:
            self._llama_all = Llama(model_path=self.gguf, n_ctx=2048, logits_all=True,
                                    n_threads=torch.get_num_threads(), verbose=False)
        llm = self._llama_all
        llm.reset()
        ids = list(item.prompt) + list(item.continuation)
        llm.eval(ids)
        start = len(item.prompt) - 1
        return torch.tensor([int(llm.scores[start + i].argmax()) for i in range(len(item.continuation))])


def _last_logits(llm):
    """The last evaluated token's logits. Without ``logits_all``, llama-cpp-python >= 0.3 no longer
    copies them into ``llm.scores`` (which then stays zero: argmax 0 every step), so read the context."""
    import numpy as np

    return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))



# Memory bandwidth and bytes per token


def read_bandwidth(megabytes: int = 512, tries: int = 5) -> float:
    """Memory read bandwidth in bytes/s: the best of ``tries`` sums over a tensor far larger than caches."""
    data = torch.ones(megabytes * 2**20 // 4, dtype=torch.float32)
    best = float("inf")
    for _ in range(tries + 1):  # the first pass pages the tensor in
        start = time.perf_counter()
        data.sum()
        best = min(best, time.perf_counter() - start)
    return data.numel() * 4 / best


def gguf_file_type(path: Optional[str]) -> str:
    """The GGUF's own name for its quantisation (``q4_1``, ``q4_k_m``), what llama.cpp decodes."""
    from gguf import GGUFReader, LlamaFileType

    field = GGUFReader(path).fields.get("general.file_type")
    if field is None:
        return "gguf"
    return LlamaFileType(int(field.parts[field.data[0]][0])).name.removeprefix("MOSTLY_").lower()


def bytes_per_token(
    runners: Runners, config: BenchConfig, ffn_density: float, gguf: Optional[str], weight_share: float = 1.0
) -> int:
    """Weight bytes one decode step reads. llama.cpp: the GGUF's size (its weights, all read once).

    Token-level rows read ``weight_share`` of every decode-time weight (attention included).
    """
    if config.kind == "llamacpp":
        return Path(gguf).stat().st_size
    weights = config.weights if config.kind == "engine" and config.backend == "lean" else "fp32"
    model = runners.lean_model(weights)
    if config.mode == "token":  # also right where keep="auto" decoded densely: its share is then 1
        return round(model.weight_bytes_per_token(1.0) * weight_share)
    return model.weight_bytes_per_token(ffn_density)


# Peak memory, one fresh process per configuration


def _peak_rss_child(config: BenchConfig, settings: BenchSettings, prompt: list[int], gguf: Optional[str]) -> float:
    from .api import load
    from .loading import load_model_and_tokenizer

    if config.kind == "llamacpp":
        runners = Runners(None, None, gguf)
    elif config.kind == "hf":
        model, _, _ = load_model_and_tokenizer(settings.model, "cpu", torch.float32)
        runners = Runners(None, model, None, pad_id=model.config.pad_token_id or 0)
    else:
        runners = Runners(load(settings.model, device="cpu"), None, None)
    runners.run(config, prompt, settings.max_new_tokens)
    return process_peak_rss_mb()


def peak_rss_mb(
    configs: Sequence[BenchConfig], settings: BenchSettings, prompt: list[int], gguf: Optional[str]
) -> dict[str, float]:
    peaks = {}
    for config in configs:
        with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
            peaks[config.name] = round(pool.submit(_peak_rss_child, config, settings, prompt, gguf).result(), 1)
    return peaks


# The benchmark


def _prompt_ids(engine: Engine, prompt: str) -> list[int]:
    return engine.encode(prompt) if engine.tokenizer is not None else [int(t) for t in prompt.split()]


def interleaved(
    runners: Runners, configs: Sequence[BenchConfig], prompt: list[int], new_tokens: int, repeats: int, batch: int = 1
) -> dict[str, list[Timing]]:
    """Round-robin over configurations; the first round is a warm-up and is dropped."""
    timings: dict[str, list[Timing]] = {c.name: [] for c in configs}
    for round_index in range(repeats + 1):
        for config in configs:
            timing = runners.run(config, prompt, new_tokens, batch)
            if round_index > 0:
                timings[config.name].append(timing)
    return timings


def _median(timings: list[Timing], attribute: str) -> float:
    return statistics.median(getattr(t, attribute) for t in timings)


@dataclass
class BenchReport:
    settings: dict
    machine: dict
    rows: list[dict]
    scaling: dict = field(default_factory=dict)
    goals: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def token_agreement(tokens: Sequence[int], reference: Sequence[int]) -> float:
    """Share of positions where a free-running greedy sequence equals the reference's."""
    n = min(len(tokens), len(reference))
    return sum(a == b for a, b in zip(tokens[:n], reference[:n])) / n if n else 0.0


def first_divergence(tokens: Sequence[int], reference: Sequence[int]) -> int:
    """How many leading tokens equal the reference's."""
    for index, (a, b) in enumerate(zip(tokens, reference)):
        if a != b:
            return index
    return min(len(tokens), len(reference))


def forced_agreement(predictions: Sequence[torch.Tensor], reference: Sequence[torch.Tensor]) -> float:
    """Teacher-forced top-1 agreement with the reference's predictions, over all scored tokens."""
    same = sum(int((p == r).sum()) for p, r in zip(predictions, reference))
    return same / max(sum(len(r) for r in reference), 1)


def quality_items(engine: Engine, settings: BenchSettings) -> list:
    """A few GSM8K items (question -> reference answer), or none where no data is to be had."""
    if settings.quality_items <= 0 or engine.tokenizer is None:
        return []
    from .quality import gsm8k_set

    try:
        return gsm8k_set(engine, settings.quality_items, settings.quality_tokens, 0, settings.data_dir).items
    except FileNotFoundError:  # evaluation_data.DataNotFound: no local copy and no Hub; the column is optional
        return []


def quality_columns(runners: Runners, configs: Sequence[BenchConfig], items, timings, progress=print) -> dict[str, dict]:
    """Per row: agreement with the fp32 dense reference, free-running and teacher-forced, and the flag.

    A row's *predicted* teacher-forced agreement is that of the same selection in fp32
    times that of its weight format on the dense model (independent errors); a row more
    than ``FLAG_MARGIN`` below it is flagged: its path loses more than its density and
    weights explain.
    """
    reference = timings["reference_dense"][-1].token_ids
    out = {c.name: {"greedy_agreement": round(token_agreement(timings[c.name][-1].token_ids, reference), 3),
                    "first_divergence": first_divergence(timings[c.name][-1].token_ids, reference)} for c in configs}
    if not items:
        return out
    progress(f"quality: teacher-forced agreement on {len(items)} shared items per row")
    dense = runners.predictions(BenchConfig("reference", "engine", backend="reference"), items)
    forced = {c.name: forced_agreement(runners.predictions(c, items), dense) for c in configs}
    for config in configs:
        row = out[config.name]
        row["forced_agreement"] = round(forced[config.name], 3)
        if config.kind != "engine" or config.backend != "lean":
            continue
        twin = next((c.name for c in configs if c.kind == "engine" and c.backend == "lean" and c.weights == "fp32"
                     and (c.keep, c.rule) == (config.keep, config.rule)), None)
        fp32 = forced[twin] if twin else forced_agreement(runners.predictions(config.in_fp32(), items), dense)
        dense_weights = next((forced[c.name] for c in configs if c.kind == "engine" and c.backend == "lean"
                              and c.keep is None and c.weights == config.weights), 1.0)
        predicted = fp32 * dense_weights if config.weights != "fp32" else fp32
        row["predicted_agreement"] = round(predicted, 3)
        row["flagged"] = forced[config.name] < predicted - FLAG_MARGIN
    return out


def run_bench(
    engine: Engine,
    hf_model,
    settings: BenchSettings,
    gguf: Optional[str] = None,
    progress=print,
    items=None,
) -> BenchReport:
    """Measure every configuration; ``hf_model`` is an unwrapped copy of the same model for HF generate.

    ``items`` (``quality.Item``) replace the shared GSM8K items of the teacher-forced column.
    """
    configs = default_configs(settings, settings.lean_weights(engine), with_llamacpp=gguf is not None)
    runners = Runners(engine, hf_model, gguf)
    prompt = _prompt_ids(engine, settings.prompt)
    progress(f"measuring read bandwidth; {len(configs)} configurations x {settings.repeats + 1} rounds")
    bandwidth = read_bandwidth()
    timings = interleaved(runners, configs, prompt, settings.max_new_tokens, settings.repeats)
    bandwidth = max(bandwidth, read_bandwidth())  # once more at the end; the best is the limit
    items = quality_items(engine, settings) if items is None else items
    quality = quality_columns(runners, configs, items, timings, progress)
    peaks = {}
    if settings.memory:
        progress("peak memory: one fresh process per configuration")
        peaks = peak_rss_mb(configs, settings, prompt, gguf)

    rows = []
    for config in configs:
        last = timings[config.name][-1]
        density = last.ffn_density
        weight_bytes = bytes_per_token(runners, config, density, gguf, last.weight_share)
        decode = _median(timings[config.name], "decode_tok_s")
        limit = bandwidth / weight_bytes
        rows.append({
            "config": config.name,
            "kind": config.kind,
            "backend": config.backend if config.kind == "engine" else config.kind,
            "keep": config.keep,
            "chosen_keep": last.chosen_keep,
            "mode": last.mode,
            "targets": config.targets if config.mode == "token" else None,
            "dense_tokens": DEFAULT_SPARSITY.warmup if config.keep == "auto" and config.mode == "sentence" else 0,
            "rule": config.rule if config.keep is not None and config.mode == "sentence" else None,
            "weights": gguf_file_type(gguf) if config.kind == "llamacpp" else config.weights,
            "ffn_density": round(density, 4),
            "weight_share": round(last.weight_share, 4),
            "decode_tok_s": round(decode, 2),
            # the whole answer as a user waits for it: prefill, the choice, and decoding
            "answer_s": round(_median(timings[config.name], "answer_s"), 3),
            "prefill_tok_s": round(_median(timings[config.name], "prefill_tok_s"), 1),
            "peak_rss_mb": peaks.get(config.name),
            "weight_mb_per_token": round(weight_bytes / 1e6, 2),
            "bandwidth_limit_tok_s": round(limit, 2),
            "fraction_of_bandwidth_limit": round(decode / limit, 3),
            "decode_tok_s_runs": [round(t.decode_tok_s, 2) for t in timings[config.name]],
            **quality[config.name],
        })
    hf = next(r["decode_tok_s"] for r in rows if r["kind"] == "hf")
    llama = next((r["decode_tok_s"] for r in rows if r["kind"] == "llamacpp"), None)
    for row in rows:
        row["ratio_vs_hf"] = round(row["decode_tok_s"] / hf, 3)
        row["ratio_vs_llamacpp"] = round(row["decode_tok_s"] / llama, 3) if llama else None

    scaling = run_scaling(runners, settings, prompt, progress) if settings.scaling_tokens or settings.scaling_batches else {}
    machine = {
        "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "read_bandwidth_gb_s": round(bandwidth / 1e9, 2),
        "torch": torch.__version__,
    }
    return BenchReport(
        settings={**asdict(settings), "prompt_tokens": len(prompt), "quality_items_used": len(items)},
        machine=machine,
        rows=rows,
        scaling=scaling,
        goals=goals(rows),
    )


def run_scaling(runners: Runners, settings: BenchSettings, prompt: list[int], progress=print) -> dict:
    """Decode tok/s (all sequences together) of the dense lean path and CoreInfer at ``scaling_keep``."""
    weights = settings.lean_weights(runners.engine)
    configs = [
        BenchConfig(f"lean_dense_{weights}", "engine", weights=weights),
        BenchConfig(f"coreinfer_k{settings.scaling_keep:g}_{weights}", "engine", keep=settings.scaling_keep, weights=weights),
    ]
    out: dict = {"configs": [c.name for c in configs], "new_tokens": [], "batch": []}
    for tokens in settings.scaling_tokens:
        progress(f"scaling: {tokens} new tokens")
        t = interleaved(runners, configs, prompt, tokens, settings.scaling_repeats)
        out["new_tokens"].append({"new_tokens": tokens, "batch": 1, **{c: round(_median(t[c], "decode_tok_s"), 2) for c in t}})
    for batch in settings.scaling_batches:
        progress(f"scaling: batch {batch}")
        t = interleaved(runners, configs, prompt, settings.max_new_tokens, settings.scaling_repeats, batch)
        out["batch"].append({"batch": batch, "new_tokens": settings.max_new_tokens,
                             **{c: round(_median(t[c], "decode_tok_s"), 2) for c in t}})
    return out


def goals(rows: list[dict]) -> dict:
    """Where the speed goals stand in this run, each with the agreement measured beside it."""
    by_name = {r["config"]: r for r in rows}
    default = next((r for r in rows if r["config"].startswith("default_")), None)  # `coreinfer generate`
    dense = by_name.get("lean_dense_fp32")
    int8 = [r["fraction_of_bandwidth_limit"] for r in rows if r["weights"] == "int8"]
    same = default and by_name.get(f"lean_dense_{default['weights']}")  # dense on the default's weights
    return {
        "default_answer_speedup_vs_dense_same_weights (goal >= 1.2)": (
            round(same["answer_s"] / default["answer_s"], 3) if same and default["answer_s"] else None
        ),
        "default_config": default and default["config"],
        "default_ratio_vs_hf (goal >= 2.5)": default and default["ratio_vs_hf"],
        "default_ratio_vs_llamacpp (goal >= 1.0, stretch 1.3)": default and default["ratio_vs_llamacpp"],
        "default_forced_agreement": default and default.get("forced_agreement"),
        "dense_fp32_fraction_of_limit (goal >= 0.8)": dense and dense["fraction_of_bandwidth_limit"],
        "int8_rows_min_fraction_of_limit (goal >= 0.5)": min(int8) if int8 else None,
        "flagged_rows": [r["config"] for r in rows if r.get("flagged")],
    }


# Output


def markdown_table(report: BenchReport) -> str:
    head = ("| config | keep | weights | FFN density | weight share | decode tok/s | answer s | × HF | × llama.cpp "
            "| same tokens until | greedy agree | forced agree | flag | prefill tok/s | peak RSS MB | MB/token | of limit |")
    lines = [head, "|" + "---|" * 17]
    for r in report.rows:
        llama = "" if r["ratio_vs_llamacpp"] is None else f"{r['ratio_vs_llamacpp']:.2f}"
        forced = "" if r.get("forced_agreement") is None else f"{r['forced_agreement']:.2f}"
        flag = "**below prediction**" if r.get("flagged") else ""
        lines.append(
            f"| {r['config']} | {'' if r['keep'] is None else r['keep']} | {r['weights']} | {r['ffn_density']:.2f} "
            f"| {r['weight_share']:.2f} | {r['decode_tok_s']:.1f} | {r['answer_s']:.2f} | {r['ratio_vs_hf']:.2f} "
            f"| {llama} | {r['first_divergence']} "
            f"| {r['greedy_agreement']:.2f} | {forced} | {flag} "
            f"| {r['prefill_tok_s']:.0f} | {r['peak_rss_mb'] or ''} | {r['weight_mb_per_token']:.0f} "
            f"| {r['fraction_of_bandwidth_limit']:.2f} |"
        )
    lines.append("")
    lines.append(
        f"Read bandwidth {report.machine['read_bandwidth_gb_s']} GB/s, {report.machine['threads']} threads, "
        f"{report.settings['prompt_tokens']} prompt tokens, {report.settings['max_new_tokens']} new tokens, "
        f"median of {report.settings['repeats']} interleaved runs. Agreement is with the fp32 dense reference: "
        f"same tokens until = how many timed tokens match before the first difference; greedy = share of the "
        f"timed tokens equal position by position; forced = teacher-forced top-1 over "
        f"{report.settings['quality_items_used']} GSM8K answers (flagged: more than {FLAG_MARGIN} below the same "
        f"selection in fp32 times the weight format's dense agreement)."
    )
    return "\n".join(lines) + "\n"


def speed_quality_plot(report: BenchReport, path: Path) -> None:
    """One point per row: decode speed against agreement with the dense reference."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for r in report.rows:
        agreement = r.get("forced_agreement", r["greedy_agreement"])
        color = "tab:red" if r.get("flagged") else "tab:green" if r["config"].startswith("default_") else "tab:blue"
        ax.scatter(r["decode_tok_s"], agreement, color=color, s=40, zorder=3)
        ax.annotate(r["config"], (r["decode_tok_s"], agreement), fontsize=7, xytext=(4, 3), textcoords="offset points")
    forced = all("forced_agreement" in r for r in report.rows)
    ax.set_xlabel("decode tokens / s (median, batch 1)")
    ax.set_ylabel(("teacher-forced" if forced else "greedy") + " top-1 agreement with fp32 dense")
    ax.set_title("Speed against agreement (red: below its prediction; green: the default)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# Speed at the sizes where FFNs dominate: random weights at a real model's shapes

SHAPES = {
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, head_dim=64, tie_word_embeddings=True),
    # Qwen2.5-1.5B's sizes as a Llama (no q/k/v biases): a 1.5B model, 6.2 GB in fp32.
    "qwen2.5-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2, vocab_size=151936, head_dim=128, tie_word_embeddings=True),
    "llama-3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
}


def shape_engine(shape: str, dtype: torch.dtype = torch.float32) -> Engine:
    """A Llama with random weights at ``shape``'s sizes (speed says nothing about trained quality)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; choose one of {', '.join(SHAPES)}")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**SHAPES[shape], max_position_embeddings=4096), dtype=dtype)
    return Engine(model.eval(), tokenizer=None, name=f"random-{shape}")


def run_shape_bench(
    shape: str, weights: str = "fp32", keeps: Sequence[float] = (0.5,), new_tokens: int = 32, repeats: int = 3,
    progress=print,
) -> dict:
    """Dense against token-level decoding (FFN and attention inputs thinned) on a random model at ``shape``.

    Thresholds come from the model's own activations on random prompts (``probes=False``); runs
    alternate between configurations and each figure is a median. Returns one row per configuration.
    """
    engine = shape_engine(shape)
    generator = torch.Generator().manual_seed(0)
    vocab = engine.model.config.vocab_size
    prompts = [torch.randint(0, vocab, (32,), generator=generator).tolist() for _ in range(4)]
    continuations = [torch.randint(0, vocab, (16,), generator=generator).tolist() for _ in range(4)]
    progress(f"{shape}: thresholds from the model's activations")
    engine.token_profile(prompts, continuations, progress=False, probes=False)
    configs = {"dense": None, **{f"token_all_k{k:g}": SparsityConfig(keep=k, mode="token", targets="all") for k in keeps}}
    runs: dict[str, list] = {name: [] for name in configs}
    sampling = SamplingConfig(max_new_tokens=new_tokens)
    for round_ in range(repeats + 1):  # the first round warms up and is discarded
        for name, sparsity in configs.items():
            result = engine.generate_ids(prompts[:1], sparsity, sampling, backend="lean", weights=weights, ignore_eos=True)[0]
            if round_:
                runs[name].append(result)
        progress(f"{shape}: round {round_} of {repeats}")
    dense = statistics.median(r.decode_tok_s for r in runs["dense"])
    rows = []
    for name, results in runs.items():
        tok_s = statistics.median(r.decode_tok_s for r in results)
        rows.append({
            "config": name, "shape": shape, "weights": weights,
            "ffn_density": round(results[-1].ffn_density, 4), "weight_share": round(results[-1].weight_share, 4),
            # Said apart so that an allocation thinning one matrix alone shows (FFN 0.39 with attention at 1.00).
            "attention_density": round(engine.attention_density(results[-1].ffn_density, results[-1].weight_share), 4),
            "decode_tok_s": round(tok_s, 3), "speedup_vs_dense": round(tok_s / dense, 3),
            "decode_tok_s_runs": [round(r.decode_tok_s, 3) for r in results],
        })
    return {"shape": shape, "weights": weights, "new_tokens": new_tokens, "repeats": repeats,
            "threads": torch.get_num_threads(), "rows": rows}
