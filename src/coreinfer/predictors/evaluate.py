"""Similarity-guided against stability-guided selection at equal FFN density, teacher-forced.

Small and self-contained so the quality harness can take it over: build
clusters on one part of TruthfulQA, then score the held-out questions' best
answers (prompt ``Question: ... Answer:``, continuation `` <best answer>``) with
dense, stability-guided (the prompt's own core neurons) and similarity-guided
selection at the same ``keep``. Reports perplexity and top-1 agreement with
dense, over all held-out items and over the short prompts alone.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Optional, Sequence

import torch

from .similarity import SimilaritySelector, build_clusters

if TYPE_CHECKING:
    from ..engine import Engine, SparsityConfig


def split_items(n: int, cluster_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """A seeded permutation cut in two: indices to cluster on, indices to evaluate on."""
    if not 0.0 < cluster_fraction < 1.0:
        raise ValueError(f"cluster_fraction must lie in (0, 1), got {cluster_fraction}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    cut = round(cluster_fraction * n)
    return order[:cut], order[cut:]


def _token_scores(logits: torch.Tensor, target: list[int], dense_top1: Optional[torch.Tensor]) -> tuple[float, int]:
    """(summed negative log-likelihood of ``target``, tokens whose argmax equals dense's)."""
    target_t = torch.tensor(target, device=logits.device)
    nll = torch.nn.functional.cross_entropy(logits.float(), target_t, reduction="sum").item()
    agree = int((logits.argmax(-1) == dense_top1).sum()) if dense_top1 is not None else len(target)
    return nll, agree


def _summary(rows: list[dict], names: list[str]) -> dict:
    tokens = sum(r["tokens"] for r in rows)
    out = {"items": len(rows), "tokens": tokens}
    for name in names:
        nll = sum(r[name]["nll"] for r in rows)
        out[name] = {
            "ppl": round(math.exp(nll / tokens), 4) if tokens else None,
            "top1_agreement": round(sum(r[name]["agree"] for r in rows) / tokens, 4) if tokens else None,
        }
    return out


def evaluate_truthfulqa(
    engine: "Engine",
    items: Sequence[tuple[str, str]],
    sparsity: "SparsityConfig",
    cluster_fraction: float = 0.5,
    eval_items: int = 100,
    k: Optional[int] = None,
    k_max: int = 8,
    own_shares: tuple[float, ...] = (0.0, 0.5),
    short_tokens: int = 12,
    batch_size: int = 8,
    seed: int = 0,
    progress: bool = False,
) -> dict:
    """Cluster on ``cluster_fraction`` of the (prompt, best answer) ``items``; score up to ``eval_items`` of the rest."""
    from tqdm import tqdm

    from ..engine import RuleSelector

    cluster_idx, eval_idx = split_items(len(items), cluster_fraction, seed)
    eval_idx = eval_idx[:eval_items]
    tok = engine.tokenizer

    def encode(text: str) -> list[int]:  # raw text: the paper's format, no chat template
        return tok(text)["input_ids"]

    clusters = build_clusters(
        engine, [encode(items[i][0]) for i in cluster_idx], sparsity, k=k, k_max=k_max,
        seed=seed, batch_size=batch_size, progress=progress, extra_meta={"chat": False},
    )
    prompts = [encode(items[i][0]) for i in eval_idx]
    answers = [tok(" " + items[i][1], add_special_tokens=False)["input_ids"] for i in eval_idx]
    methods = {
        "stability": lambda: RuleSelector(sparsity.rule, sparsity.keep, sparsity.alpha),
        **{
            f"similarity_own{share:g}": (
                lambda share=share: SimilaritySelector(clusters, sparsity.keep, sparsity.alpha, sparsity.rule, share)
            )
            for share in own_shares
        },
    }
    rows: list[dict] = []
    density = {}
    for start in tqdm(range(0, len(prompts), batch_size), desc="score", disable=not progress, unit="batch"):
        p, a = prompts[start : start + batch_size], answers[start : start + batch_size]
        dense, _ = engine.continuation_logits(p, a)
        batch_rows = [{"tokens": len(t), "prompt_tokens": len(q)} for q, t in zip(p, a)]
        for row, logits, target in zip(batch_rows, dense, a):
            nll, agree = _token_scores(logits, target, None)
            row["dense"] = {"nll": nll, "agree": agree}
        for name, make in methods.items():
            logits_list, session = engine.continuation_logits(p, a, sparsity, selector=make())
            density[name] = round(session.ffn_density(), 5)
            for row, logits, target, ref in zip(batch_rows, logits_list, a, dense):
                nll, agree = _token_scores(logits, target, ref.argmax(-1))
                row[name] = {"nll": nll, "agree": agree}
        rows.extend(batch_rows)
    names = ["dense", *methods]
    short = [r for r in rows if r["prompt_tokens"] <= short_tokens]
    return {
        "task": "TruthfulQA best answer, teacher-forced",
        "model": engine.name,
        "keep": sparsity.keep,
        "alpha": sparsity.alpha,
        "rule": sparsity.rule,
        "cluster_items": len(cluster_idx),
        "clusters": {key: clusters.meta[key] for key in ("k", "k_criterion", "layer", "cluster_sizes", "silhouette")},
        "ffn_density": density,
        "all": _summary(rows, names),
        f"short_prompts_le_{short_tokens}_tokens": _summary(short, names),
        "seed": seed,
    }
