"""What sparsity costs: teacher-forced metrics and greedy-generation quality against dense.

Each evaluation item is a (prompt -> continuation) pair of token ids. The prompt
is prefilled densely and selects the core sets; the continuation is scored by the
sparse model in one forward pass, exactly as ``Engine.continuation_logits`` does.
To compare many configurations on the same items, each item's dense prefill (its
KV cache and every layer's activations) is computed once and reused: a config
only selects, compacts, and scores the continuation on a copy of the cache.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Iterable, Optional, Sequence

import torch

from . import evaluation_data
from .config import DEFAULT_SPARSITY
from .decode.loop import DecodeBackend, forced_logits
from .decode.reference import ReferenceBackend
from .engine import (
    ActivationRecorder, Engine, SamplingConfig, Selector, SparseSession, SparsityConfig, WinaSelector,
    finalize_selection,
)
from .evaluation_data import PathLike
from .selection import (
    ALPHA_RULES, RANKINGS, RULES, coverage_core, fused_scores, griffin_scores, take_top,
    top_neurons,
)

DENSE = "dense"
STATIC = "static"
ADAPTIVE = "adaptive"
DEFAULT = "default"  # what `coreinfer generate` runs with no options (DEFAULT_SPARSITY)
WINA = "wina"
# Candidates measured against GRIFFIN (issue 12), evaluation-only: for `coverage`, keep is the share
# of each layer's GRIFFIN energy to cover, so its density varies by layer and prompt.
COVERAGE = "coverage"
GLASS = "glass"
CANDIDATES = (COVERAGE, GLASS)
# Token-level sparsity (token_sparsity): keep is the share of the FFN's weights read per token
# ("token"), or of the FFN's and the attention's ("token_all").
TOKEN_RULES = {"token": "ffn", "token_all": "all"}
ALL_RULES = (DENSE, *RULES, STATIC, ADAPTIVE, WINA, *CANDIDATES, *TOKEN_RULES)
# Rules needing a calibration prior over items never evaluated.
PRIOR_RULES = (STATIC, GLASS)
GLASS_PRIOR_WEIGHT = 0.5


# Data


@dataclass(frozen=True)
class Item:
    prompt: tuple[int, ...]
    continuation: tuple[int, ...]


@dataclass
class EvalSet:
    """Items to evaluate and disjoint items to calibrate a static selector on."""

    name: str
    items: list[Item]
    calibration: list[Item] = field(default_factory=list)


def _continuation_ids(engine: Engine, text: str, max_tokens: Optional[int]) -> tuple[int, ...]:
    ids = engine.tokenizer(text, add_special_tokens=False)["input_ids"]
    return tuple(ids[:max_tokens] if max_tokens else ids)


def gsm8k_set(
    engine: Engine, n: int, answer_tokens: int = 96, calibration: int = 8, data_dir: Optional[PathLike] = None
) -> EvalSet:
    """GSM8K test: the question (chat template applied, as ``Engine.encode`` does) -> its worked answer.

    ``data_dir``: a local copy of the sets (see ``evaluation_data``); None: ``$COREINFER_DATA`` or the Hub.
    """
    problems = evaluation_data.gsm8k(data_dir)[: n + calibration]
    items = [Item(tuple(engine.encode(p.question)), _continuation_ids(engine, p.answer, answer_tokens)) for p in problems]
    return EvalSet("gsm8k", items[:n], items[n:])


def wikitext_set(
    engine: Engine, n: int, window: int = 256, continuation: int = 128, calibration: int = 8,
    data_dir: Optional[PathLike] = None,
) -> EvalSet:
    """WikiText-2 test: a ``window``-token span -> the next ``continuation`` tokens.

    Blocks are spread evenly over the whole text; calibration blocks sit between
    evaluated ones, so the two never overlap.
    """
    text = evaluation_data.wikitext2(data_dir)
    ids = engine.tokenizer(text, add_special_tokens=False)["input_ids"]
    size = window + continuation
    blocks = len(ids) // size
    stride = blocks // max(n, calibration)
    if stride < 2:
        raise ValueError(f"WikiText-2 has only {blocks} blocks of {size} tokens; ask for fewer windows")

    def block(b: int) -> Item:
        start = b * size
        return Item(tuple(ids[start : start + window]), tuple(ids[start + window : start + size]))

    return EvalSet(
        "wikitext2",
        [block(i * stride) for i in range(n)],
        [block(i * stride + 1) for i in range(calibration)],
    )


def jsonl_set(engine: Engine, path: str, n: Optional[int], chat: Optional[bool] = None, calibration: int = 8) -> EvalSet:
    """A user's JSONL with ``prompt`` and ``continuation`` fields; the items after the first n calibrate."""
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    for number, row in enumerate(rows, 1):
        if not isinstance(row.get("prompt"), str) or not isinstance(row.get("continuation"), str):
            raise ValueError(f"{path}:{number}: each line needs string fields 'prompt' and 'continuation'")
    n = len(rows) if n is None else min(n, len(rows))
    items = [Item(tuple(engine.encode(r["prompt"], chat)), _continuation_ids(engine, r["continuation"], None)) for r in rows]
    if any(not item.continuation for item in items):
        raise ValueError(f"{path}: a continuation is empty")
    return EvalSet(Path(path).stem, items[:n], items[n : n + calibration])


# Selectors beyond the pure rules


@dataclass(frozen=True)
class StaticSelector:
    """One core set per layer, the same for every prompt: the top ``keep`` by calibration score.

    This is what a 'hot neurons' design gives: the neurons busiest over a
    calibration set, chosen once, offline.
    """

    scores: dict[int, torch.Tensor]  # layer -> [N]
    keep: float

    def __call__(self, layer: int, acts: torch.Tensor) -> torch.Tensor:
        return top_neurons(self.scores[layer], self.keep).to(acts.device)


@dataclass(frozen=True)
class RankedSelector:
    """A rule's choice from a ranking cached per (rule, alpha, layer), so a keep sweep ranks once.

    Gives exactly ``RULES[rule](acts, keep, alpha)`` as long as ``cache`` only
    ever sees one prompt's activations.
    """

    rule: str
    keep: float
    alpha: float
    cache: dict = field(default_factory=dict, compare=False, hash=False)

    def __call__(self, layer: int, acts: torch.Tensor) -> torch.Tensor:
        key = (self.rule, self.alpha, layer)
        if key not in self.cache:
            self.cache[key] = RANKINGS[self.rule](acts, self.alpha)
        return take_top(self.cache[key], self.keep)


@dataclass(frozen=True)
class CoverageSelector:
    """Per layer, the fewest neurons holding ``share`` of the prompt's GRIFFIN energy.

    Batch-1 only (the count differs between prompts), which is how `quality` evaluates.
    """

    share: float

    def __call__(self, layer: int, acts: torch.Tensor) -> torch.Tensor:
        return coverage_core(griffin_scores(acts), self.share)


@dataclass(frozen=True)
class GlassSelector:
    """The prompt's GRIFFIN scores fused with a prior over calibration items (GLASS-style)."""

    prior: dict[int, torch.Tensor]  # layer -> [N]
    keep: float
    prior_weight: float = GLASS_PRIOR_WEIGHT

    def __call__(self, layer: int, acts: torch.Tensor) -> torch.Tensor:
        return top_neurons(fused_scores(griffin_scores(acts), self.prior[layer], self.prior_weight), self.keep)


# Prefill once, score many configurations


@dataclass
class Prefilled:
    """One item after its dense prefill: what every configuration reuses."""

    item: Item
    mask: torch.Tensor  # [1, T]
    first_logits: torch.Tensor  # [1, 1, V]: predicts the first continuation token
    cache: object
    acts: dict[int, torch.Tensor]  # layer -> [T, N]
    rankings: dict = field(default_factory=dict)  # RankedSelector's cache for this prompt


@torch.inference_mode()
def prefill(engine: Engine, item: Item) -> Prefilled:
    ids, mask = engine.left_pad([item.prompt])
    recorder = ActivationRecorder()
    every_layer = SparsityConfig(keep=1.0, layers=tuple(range(engine.num_layers)))
    session = SparseSession(every_layer, engine.ffns, mask, recorder)
    first, cache = engine.prefill(ids, mask, session)
    return Prefilled(item, mask, first[:, -1:, :], cache, {layer: a[0] for layer, a in recorder.acts.items()})


@torch.inference_mode()
def score(
    engine: Engine,
    pre: Prefilled,
    sparsity: Optional[SparsityConfig],
    selector: Optional[Selector] = None,
    backend: Optional[DecodeBackend] = None,
) -> tuple[torch.Tensor, float]:
    """Teacher-forced logits ``[C, V]`` for the continuation, and the FFN density computed.

    Equals ``engine.continuation_logits([prompt], [continuation], sparsity, selector=selector,
    backend=...)`` for one item; the prompt's prefill is not repeated. ``backend=None`` is the
    reference backend in the model's own precision.
    """
    logits, density, _ = score_shares(engine, pre, sparsity, selector, backend)
    return logits, density


@torch.inference_mode()
def score_shares(
    engine: Engine,
    pre: Prefilled,
    sparsity: Optional[SparsityConfig],
    selector: Optional[Selector] = None,
    backend: Optional[DecodeBackend] = None,
) -> tuple[torch.Tensor, float, float]:
    """``score`` and the share of all decode-time weights read per token (attention and LM head included)."""
    session = None
    if sparsity is not None and sparsity.token:
        session = engine.new_session(sparsity, pre.mask)  # thresholds apply per token: nothing to select
    elif sparsity is not None:
        session = SparseSession(sparsity, engine.ffns, pre.mask, selector)
        neurons = {layer: session.selector(layer, pre.acts[layer]).unsqueeze(0) for layer in session.layers}
        session.neurons = finalize_selection(session.selector, neurons)
    cont = torch.tensor([pre.item.continuation], device=engine.device)
    if backend is not None and not isinstance(backend, ReferenceBackend):
        # Another backend steps through the continuation as decoding would (its cache is its own copy).
        state = backend.start(session, pre.cache, pre.mask, pre.mask.shape[1] + cont.shape[1])
        logits = forced_logits(backend, state, cont[:, :-1]).float()
    else:
        # The masked dense FFN gives the compact path's numbers (tested) without gathering
        # weights per config, which costs more than the FFN work it saves on a short continuation.
        # The forward appends to the cache; a copy keeps the prompt's cache for the next config.
        masked = ReferenceBackend(engine, masked=True)
        state = masked.start(session, copy.deepcopy(pre.cache), pre.mask, 0)
        logits = engine.score_continuation(state, masked, cont)[:, :-1]
    logits = torch.cat([pre.first_logits.float(), logits.float()], dim=1)[0]
    if session is None:
        return logits, 1.0, 1.0
    if session.mode == "token":  # token-level sessions count the weights their tokens read while scoring
        return logits, session.ffn_density(), session.weight_share()
    return logits, session.ffn_density(), engine.weight_share(session.ffn_density())


def score_auto(engine: Engine, item: Item, sparsity: SparsityConfig, backend: DecodeBackend) -> tuple[torch.Tensor, float, float]:
    """``keep="auto"`` teacher-forced (``Engine.auto_continuation_logits``): logits, FFN density, keep."""
    logits, session, keep = engine.auto_continuation_logits(
        item.prompt, item.continuation, sparsity, backend.name, backend.weights if backend.name == "lean" else None
    )
    return logits, session.ffn_density() if session is not None else 1.0, keep


# Metrics


@dataclass
class TokenStats:
    """Sums over scored tokens; ``summary`` turns them into perplexities and rates."""

    tokens: int = 0
    nll: float = 0.0
    dense_nll: float = 0.0
    agree: int = 0
    kl: float = 0.0
    density: float = 0.0  # summed per item
    items: int = 0
    share: float = 0.0  # weight share, summed per item

    def add(
        self, dense_logits: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor, density: float,
        share: Optional[float] = None,
    ) -> None:
        dense_logp = torch.log_softmax(dense_logits.double(), -1)
        logp = torch.log_softmax(logits.double(), -1)
        self.tokens += len(targets)
        self.nll -= float(logp.gather(-1, targets[:, None]).sum())
        self.dense_nll -= float(dense_logp.gather(-1, targets[:, None]).sum())
        self.agree += int((logits.argmax(-1) == dense_logits.argmax(-1)).sum())
        self.kl += float((dense_logp.exp() * (dense_logp - logp)).sum())
        self.density += density
        self.share += density if share is None else share
        self.items += 1

    def summary(self) -> dict:
        return {
            "ffn_density": self.density / self.items,
            "weight_share": self.share / self.items,
            "ppl": math.exp(self.nll / self.tokens),
            "dense_ppl": math.exp(self.dense_nll / self.tokens),
            "agreement": self.agree / self.tokens,
            "kl": max(0.0, self.kl / self.tokens),
            "items": self.items,
            "tokens": self.tokens,
        }


@dataclass(frozen=True)
class Config:
    """One evaluated configuration; ``rule='dense'`` is the baseline, ``alpha=None`` where it does not apply."""

    rule: str
    keep: float = 1.0
    alpha: Optional[float] = None
    quality: Optional[float] = None  # rule "default": its quality target (None: the default's)

    def sparsity(self, layers: Optional[tuple[int, ...]]) -> Optional[SparsityConfig]:
        if self.rule == DENSE:
            return None
        rule = self.rule if self.rule in RULES else "coreinfer"  # static: the rule name is unused
        return SparsityConfig(keep=self.keep, alpha=self.alpha or 0.2, rule=rule, layers=layers)

    def plan(
        self, engine: Engine, layers: Optional[tuple[int, ...]], static_scores, rankings: dict
    ) -> tuple[Optional[SparsityConfig], Optional[Selector]]:
        """The sparsity settings and selector this config evaluates with."""
        if self.rule == DENSE:
            return None, None
        if self.rule in TOKEN_RULES:
            return SparsityConfig(keep=self.keep, mode="token", targets=TOKEN_RULES[self.rule]), None
        if self.rule == ADAPTIVE:  # keep is the density target; the calibration picks the layers
            selector = engine.adaptive_selector(self.keep)
            return SparsityConfig(keep=self.keep, rule=ADAPTIVE, layers=selector.sparse_layers()), selector
        if self.rule == STATIC:
            return self.sparsity(layers), StaticSelector(static_scores, self.keep)
        if self.rule == WINA:
            return self.sparsity(layers), WinaSelector(engine.down_column_norms(), self.keep)
        if self.rule == COVERAGE:
            return self.sparsity(layers), CoverageSelector(self.keep)
        if self.rule == GLASS:
            return self.sparsity(layers), GlassSelector(static_scores, self.keep)
        return self.sparsity(layers), RankedSelector(self.rule, self.keep, self.alpha or 0.2, rankings)


def default_sparsity(config: Config) -> SparsityConfig:
    """The configuration `coreinfer generate` uses, at this config's quality target."""
    return replace(DEFAULT_SPARSITY, quality=config.quality or DEFAULT_SPARSITY.quality)


def sweep(
    rules: Iterable[str], keeps: Sequence[float], alphas: Sequence[float], quality: Optional[float] = None
) -> list[Config]:
    """Dense first, then every rule at every keep (and every alpha for the rules that use one).

    Rule ``default`` adds one row at ``quality`` (its keep is chosen per item).
    """
    configs = [Config(DENSE)]
    rules = list(rules)
    if "all" in rules:
        rules = list(ALL_RULES)
    for rule in rules:
        if rule not in (*ALL_RULES, DEFAULT):
            raise ValueError(f"unknown rule {rule!r}; choose from {', '.join((*ALL_RULES, DEFAULT))}")
        if rule == DEFAULT:  # keep is chosen per item
            configs.append(Config(DEFAULT, quality=quality))
            continue
        if rule == DENSE:
            continue
        for keep in keeps:
            for alpha in alphas if rule in ALPHA_RULES else [None]:
                configs.append(Config(rule, keep, alpha))
    return configs


@torch.inference_mode()
def calibrate_static(engine: Engine, items: Sequence[Item]) -> dict[int, torch.Tensor]:
    """Per layer, GRIFFIN's normalised activation energy summed over every calibration token."""
    if not items:
        raise ValueError("the static rule needs calibration items (none left beyond the evaluated ones)")
    totals: dict[int, torch.Tensor] = {}
    for item in items:
        pre = prefill(engine, item)
        for layer, acts in pre.acts.items():
            totals[layer] = totals.get(layer, 0) + griffin_scores(acts)
    return totals


def evaluate(
    engine: Engine,
    evalset: EvalSet,
    configs: Sequence[Config],
    layers: Optional[tuple[int, ...]] = None,
    progress: bool = True,
    backend: Optional[str] = None,
    weights: Optional[str] = None,
) -> list[dict]:
    """One row per config: the set's teacher-forced metrics against dense.

    Every config, the dense one included, is scored on ``backend``/``weights`` (default: the
    engine's, the path users run); the dense reference is always the model in its own precision,
    so the error of low-precision weights counts.
    """
    from tqdm.auto import tqdm

    static_scores = None
    if any(c.rule in PRIOR_RULES for c in configs):
        static_scores = calibrate_static(engine, evalset.calibration)
    stats = {config: TokenStats() for config in configs}
    after_warmup = {config: TokenStats() for config in configs if config.rule == DEFAULT}
    keeps: dict[Config, list[float]] = {config: [] for config in after_warmup}
    longest = max(len(i.prompt) + len(i.continuation) for i in evalset.items)
    chosen = engine.backend(backend, weights, length=longest)
    bar = tqdm(total=len(evalset.items) * len(configs), desc=evalset.name, disable=not progress, unit="cfg")
    for item in evalset.items:
        pre = prefill(engine, item)
        targets = torch.tensor(item.continuation, device=engine.device)
        dense_logits, _ = score(engine, pre, None)
        for config in configs:
            if config.rule == DENSE and isinstance(chosen, ReferenceBackend):
                logits, density, share = dense_logits, 1.0, 1.0
            elif config.rule == DEFAULT and default_sparsity(config).token:
                # Token-level auto is one calibrated level per model and quality target, or dense where
                # that level does not pay here: what generation decodes (Engine.resolve_scored).
                sparsity = engine.resolve_scored(default_sparsity(config), chosen)
                logits, density, share = score_shares(engine, pre, sparsity, None, chosen)
                keeps[config].append(sparsity.keep if sparsity is not None else 1.0)
            elif config.rule == DEFAULT:
                logits, density, keep = score_auto(engine, item, default_sparsity(config), chosen)
                share = engine.weight_share(density)
                keeps[config].append(keep)
                warm = default_sparsity(config).warmup
                if len(targets) > warm:
                    after_warmup[config].add(dense_logits[warm:], logits[warm:], targets[warm:], density)
            else:
                sparsity, selector = config.plan(engine, layers, static_scores, pre.rankings)
                logits, density, share = score_shares(engine, pre, sparsity, selector, chosen)
            stats[config].add(dense_logits, logits, targets, density, share)
            bar.update()
        del pre
    bar.close()
    where = {"backend": chosen.name, "weights": chosen.weights}
    rows = [{"set": evalset.name, **asdict(config), **stats[config].summary(), **where} for config in configs]
    for row, config in zip(rows, configs):
        if config.rule == DEFAULT:
            row["keep"] = sum(keeps[config]) / len(keeps[config])  # the mean keep chosen
            # What scored: dense where the default decodes densely on these weights (Engine.resolve_scored).
            row["mode"] = default_sparsity(config).mode if row["keep"] < 1.0 or not default_sparsity(config).token else "dense"
        if config.rule == DEFAULT and not default_sparsity(config).token:
            # the answer's first `warmup` tokens are dense by design, so the sparse part is also reported on its own
            row["warmup"] = default_sparsity(config).warmup
            if after_warmup[config].items:
                rest = after_warmup[config].summary()
                row.update({f"{k}_after_warmup": rest[k] for k in ("ppl", "dense_ppl", "agreement", "kl")})
    return rows


# Generation quality


def repeated_ngram_rate(ids: Sequence[int], n: int = 4) -> float:
    """Fraction of the n-grams that already occurred earlier in the same sequence (loops score high)."""
    grams = [tuple(ids[i : i + n]) for i in range(len(ids) - n + 1)]
    if not grams:
        return 0.0
    seen: set = set()
    repeats = 0
    for gram in grams:
        repeats += gram in seen
        seen.add(gram)
    return repeats / len(grams)


def rouge_l(reference: str, candidate: str) -> float:
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"]).score(reference, candidate)["rougeL"].fmeasure


def generation_quality(
    engine: Engine,
    prompts: Sequence[Sequence[int]],
    configs: Sequence[Config],
    max_new_tokens: int = 64,
    calibration: Sequence[Item] = (),
    layers: Optional[tuple[int, ...]] = None,
    progress: bool = True,
    backend: Optional[str] = None,
    weights: Optional[str] = None,
) -> list[dict]:
    """Greedy generation per config: ROUGE-L of each output against dense, and its repeated-4-gram rate.

    Dense is the model in its own precision on the reference backend; configs run on ``backend``.
    """
    from tqdm.auto import tqdm

    sampling = SamplingConfig(max_new_tokens=max_new_tokens)
    static_scores = calibrate_static(engine, calibration) if any(c.rule in PRIOR_RULES for c in configs) else None
    dense = engine.generate_ids(prompts, None, sampling, backend="reference")
    run = dict(backend=backend, weights=weights)
    rows = []
    for config in tqdm(configs, desc="generation", disable=not progress, unit="cfg"):
        if config.rule == DENSE:
            results = engine.generate_ids(prompts, None, sampling, **run)
        elif config.rule == DEFAULT:
            results = engine.generate_ids(prompts, default_sparsity(config), sampling, **run)
        else:
            sparsity, selector = config.plan(engine, layers, static_scores, {})
            if config.rule in RULES:
                selector = None  # the rule itself; a ranking cache is per prompt
            results = engine.generate_ids(prompts, sparsity, sampling, selector=selector, **run)
        rows.append(
            {
                **asdict(config),
                "backend": results[0].backend,
                "weights": results[0].weights,
                "ffn_density": sum(r.ffn_density for r in results) / len(results),
                "rouge_l": sum(rouge_l(d.text, r.text) for d, r in zip(dense, results)) / len(results),
                "rep4": sum(repeated_ngram_rate(r.token_ids) for r in results) / len(results),
                "prompts": len(prompts),
            }
        )
    return rows


# Facts kept: does the sparse answer still say what the dense one got right?


@dataclass(frozen=True)
class FactQuestion:
    question: str
    facts: tuple[str, ...]  # each: alternatives separated by "|", matched case-insensitively in the answer


def builtin_answers_path() -> Path:
    return Path(__file__).with_name("data") / "answers.jsonl"


def load_fact_questions(path: Optional[str] = None) -> list[FactQuestion]:
    """A JSONL of ``{"question": ..., "facts": [...]}`` (default: the shipped set)."""
    source = Path(path) if path else builtin_answers_path()
    if not source.is_file():
        raise FileNotFoundError(f"no answers file at {source}")
    questions = []
    for number, line in enumerate(source.read_text().splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        if not isinstance(row.get("question"), str) or not row.get("facts"):
            raise ValueError(f"{source}:{number}: each line needs a 'question' and a non-empty 'facts' list")
        questions.append(FactQuestion(row["question"], tuple(str(f) for f in row["facts"])))
    if not questions:
        raise ValueError(f"{source} holds no questions")
    return questions


def fact_present(fact: str, answer: str) -> bool:
    text = answer.lower()
    return any(alt.strip().lower() in text for alt in fact.split("|") if alt.strip())


def facts_kept(
    engine: Engine,
    questions: Sequence[FactQuestion],
    configs: Sequence[Config],
    max_new_tokens: int = 96,
    calibration: Sequence[Item] = (),
    backend: Optional[str] = None,
    weights: Optional[str] = None,
    progress: bool = True,
) -> list[dict]:
    """Per config: the share of the facts the dense answer states that its answer states too, and repetition.

    Every question is asked greedily with the chat template, densely (the model in its own
    precision) and with each config on ``backend``/``weights``.
    """
    from tqdm.auto import tqdm

    prompts = [engine.encode(q.question) for q in questions]
    sampling = SamplingConfig(max_new_tokens=max_new_tokens)
    dense = engine.generate_ids(prompts, None, sampling, backend="reference")
    dense_facts = [[f for f in q.facts if fact_present(f, d.text)] for q, d in zip(questions, dense)]
    static_scores = calibrate_static(engine, calibration) if any(c.rule in PRIOR_RULES for c in configs) else None
    rows = []
    for config in tqdm(configs, desc="facts", disable=not progress, unit="cfg"):
        results = []
        for prompt in prompts:  # one at a time: keep="auto" then chooses per question, as a user's request
            if config.rule == DENSE:
                sparsity, selector = None, None
            elif config.rule == DEFAULT:
                sparsity, selector = default_sparsity(config), None
            else:
                sparsity, selector = config.plan(engine, None, static_scores, {})
                if config.rule in RULES:
                    selector = None
            results += engine.generate_ids([prompt], sparsity, sampling, selector=selector, backend=backend, weights=weights)
        kept = sum(fact_present(f, r.text) for facts, r in zip(dense_facts, results) for f in facts)
        rows.append({
            **asdict(config),
            "backend": results[0].backend,
            "weights": results[0].weights,
            "ffn_density": sum(r.ffn_density for r in results) / len(results),
            "dense_facts": sum(len(f) for f in dense_facts),
            "facts_kept": kept / max(sum(len(f) for f in dense_facts), 1),
            "rep4": sum(repeated_ngram_rate(r.token_ids) for r in results) / len(results),
            "dense_rep4": sum(repeated_ngram_rate(d.token_ids) for d in dense) / len(dense),
            "questions": len(questions),
        })
    return rows


def facts_table(rows: Sequence[dict]) -> str:
    lines = ["| rule | keep | backend, weights | FFN density | facts kept | repeated 4-grams (dense) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        keep = "" if r["rule"] == DENSE else f"{r['keep']:g}" if r["rule"] != DEFAULT else "auto"
        lines.append(f"| {r['rule']} | {keep} | {r['backend']}, {r['weights']} | {r['ffn_density']:.3f} "
                     f"| {r['facts_kept']:.2f} of {r['dense_facts']} | {r['rep4']:.3f} ({r['dense_rep4']:.3f}) |")
    return "\n".join(lines)


# Reports


def headline_table(rows: Sequence[dict]) -> str:
    """One line per (set, rule): 'ppl / agreement @ density' at each keep, dense ppl in the header."""
    keeps = sorted({r["keep"] for r in rows if r["rule"] != DENSE})
    lines = [
        "| set (dense ppl) | rule | " + " | ".join(f"keep {k:g}: ppl / agr. @ density" for k in keeps) + " |",
        "|---|---|" + "---|" * len(keeps),
    ]
    for name in dict.fromkeys(r["set"] for r in rows):
        of_set = [r for r in rows if r["set"] == name]
        dense_ppl = of_set[0]["dense_ppl"]
        for rule in dict.fromkeys(r["rule"] for r in of_set if r["rule"] != DENSE):
            cells = []
            for keep in keeps:
                hit = [r for r in of_set if r["rule"] == rule and r["keep"] == keep]
                cells.append(
                    f"{hit[0]['ppl']:.2f} / {hit[0]['agreement']:.3f} @ {hit[0]['ffn_density']:.2f}" if hit else ""
                )
            lines.append(f"| {name} ({dense_ppl:.2f}) | {rule} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown_table(rows: Sequence[dict]) -> str:
    lines = [
        "| set | rule | keep | α | backend, weights | FFN density | ppl | dense ppl | agreement | KL |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        alpha = "" if r["alpha"] is None else f"{r['alpha']:g}"
        keep = "" if r["rule"] == DENSE else f"{r['keep']:g}"
        lines.append(
            f"| {r['set']} | {r['rule']} | {keep} | {alpha} | {r.get('backend', '')}, {r.get('weights', '')} "
            f"| {r['ffn_density']:.3f} | {r['ppl']:.2f} | "
            f"{r['dense_ppl']:.2f} | {r['agreement']:.3f} | {r['kl']:.3f} |"
        )
    return "\n".join(lines)


def generation_table(rows: Sequence[dict]) -> str:
    lines = ["| rule | keep | α | FFN density | ROUGE-L vs dense | repeated 4-grams |", "|---|---|---|---|---|---|"]
    for r in rows:
        alpha = "" if r["alpha"] is None else f"{r['alpha']:g}"
        keep = "" if r["rule"] == DENSE else f"{r['keep']:g}"
        lines.append(f"| {r['rule']} | {keep} | {alpha} | {r['ffn_density']:.3f} | {r['rouge_l']:.3f} | {r['rep4']:.3f} |")
    return "\n".join(lines)


def pareto_plot(rows: Sequence[dict], path: str) -> None:
    """Perplexity and agreement against FFN density, one panel column per set, one line per rule."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = list(dict.fromkeys(r["set"] for r in rows))
    fig, axes = plt.subplots(2, len(sets), figsize=(5.5 * len(sets), 7), squeeze=False)
    for col, name in enumerate(sets):
        set_rows = [r for r in rows if r["set"] == name]
        lines = {}
        for r in set_rows:
            if r["rule"] != DENSE:
                lines.setdefault((r["rule"], r["alpha"]), []).append(r)
        for (rule, alpha), points in lines.items():
            points.sort(key=lambda r: r["ffn_density"])
            label = rule if alpha is None else f"{rule} α={alpha:g}"
            for row, metric in enumerate(("ppl", "agreement")):
                axes[row][col].plot([p["ffn_density"] for p in points], [p[metric] for p in points], "o-", label=label)
        dense = next((r for r in set_rows if r["rule"] == DENSE), None)
        for row, metric in enumerate(("ppl", "agreement")):
            ax = axes[row][col]
            if dense is not None:
                ax.axhline(dense[metric], color="black", linestyle="--", label="dense")
            ax.set_xlabel("FFN density (fraction of multiply-adds per token)")
            ax.set_ylabel("perplexity (log)" if metric == "ppl" else "top-1 agreement with dense")
            if metric == "ppl":
                ax.set_yscale("log")
            ax.set_title(name)
            ax.grid(alpha=0.3)
        axes[0][col].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
