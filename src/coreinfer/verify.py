"""The verified-models table: each model run end to end on real weights, as a user would.

For each model it measures what a newcomer meets first: how long ``load()`` takes, how fast the
engine decodes densely and with the default (``keep="auto"``), the FFN density the default
chose, and how close the default stays to dense. Quality is measured on the model's own greedy
dense answers to a few everyday prompts, teacher-forced, so it needs no data set and works for
any model with a chat template; and by whether the default's greedy text equals the dense text.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable, Optional, Sequence

from .config import DEFAULT_SPARSITY, SamplingConfig

VERIFY_PROMPTS = (
    "Why is the sky blue?",
    "Give me three tips for sleeping better.",
    "Write a Python function that checks whether a number is prime.",
    "What is the capital of France, and what is it known for?",
)


@dataclass
class ModelRow:
    family: str  # config.model_type
    model: str
    layers: int
    ffn: int  # neurons per FFN layer (the first layer's)
    backend: str
    weights: str
    load_s: float
    dense_tok_s: float  # median over prompts
    default_tok_s: float
    ffn_density: float  # mean over prompts, the default's
    agreement: float  # default vs dense top-1, teacher-forced on dense's own answers
    ppl_ratio: float  # default's perplexity of dense's answers over dense's
    same_text: float  # share of prompts whose greedy default text equals the dense text


def verify_model(
    model: Optional[str],
    max_new_tokens: int = 64,
    prompts: Sequence[str] = VERIFY_PROMPTS,
    load: Optional[Callable] = None,
    progress: Callable[[str], None] = lambda message: None,
) -> ModelRow:
    """Load ``model`` (``None``: the default) and measure its row; ``load`` defaults to ``coreinfer.load``."""
    from .api import load as default_load
    from .quality import DEFAULT, DENSE, Config, EvalSet, Item, evaluate

    start = time.perf_counter()
    engine = (load or default_load)(model)
    load_s = time.perf_counter() - start
    progress(f"{engine.name}: loaded in {load_s:.1f} s")
    sampling = SamplingConfig(max_new_tokens=max_new_tokens)
    ids = [engine.encode(p) for p in prompts]
    engine.generate_ids([ids[0]], None, SamplingConfig(max_new_tokens=4))  # first-call set-up off the clock
    dense = [engine.generate_ids([p], None, sampling)[0] for p in ids]
    default = [engine.generate_ids([p], DEFAULT_SPARSITY, sampling)[0] for p in ids]
    progress(f"{engine.name}: decoded {len(ids)} prompts densely and with the default")
    # The reference continuation is the model's own full-precision dense answer.
    reference = engine.generate_ids(ids, None, sampling, backend="reference")
    items = [Item(tuple(p), tuple(r.token_ids)) for p, r in zip(ids, reference) if len(r.token_ids) > 1]
    rows = evaluate(engine, EvalSet("own answers", items, []), [Config(DENSE), Config(DEFAULT)], progress=False)
    default_row = next(r for r in rows if r["rule"] == DEFAULT)
    config = engine.model.config
    return ModelRow(
        family=config.model_type,
        model=engine.name,
        layers=engine.num_layers,
        ffn=engine.ffns[0].weights.num_neurons,
        backend=default[0].backend,
        weights=default[0].weights,
        load_s=load_s,
        dense_tok_s=statistics.median(r.decode_tok_s for r in dense),
        default_tok_s=statistics.median(r.decode_tok_s for r in default),
        ffn_density=sum(r.ffn_density for r in default) / len(default),
        agreement=default_row["agreement"],
        ppl_ratio=default_row["ppl"] / default_row["dense_ppl"],
        same_text=sum(d.text == s.text for d, s in zip(dense, default)) / len(default),
    )


def models_table(rows: Sequence[ModelRow]) -> str:
    lines = [
        "| family | model | layers × FFN | backend, weights | load | dense tok/s | default tok/s "
        "| default FFN density | agreement | ppl × dense | same text as dense |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.family} | {r.model} | {r.layers} × {r.ffn} | {r.backend}, {r.weights} | {r.load_s:.1f} s "
            f"| {r.dense_tok_s:.1f} | {r.default_tok_s:.1f} | {r.ffn_density:.2f} | {r.agreement:.3f} "
            f"| {r.ppl_ratio:.3f} | {r.same_text:.2f} |"
        )
    return "\n".join(lines)


def rows_to_json(rows: Sequence[ModelRow]) -> list[dict]:
    return [asdict(r) for r in rows]
