"""Which entries token-level sparsity should keep: TEAL's largest |x|, WINA's largest |x| times the
norm of the weight column each entry multiplies (arXiv 2505.19427), or a hybrid that always keeps the
prompt's core neurons (sentence-level) and fills the rest of the keep token by token, at equal keep.

    python scripts/selection_criterion.py [--model PATH] [--data-dir DIR] [--items 8]

Every layer and input keeps the same share per token (top-k, no calibrated allocation), so only the
criterion differs. The hybrid's core set is a layer's ``core`` share of neurons with the largest mean
|activation| over the prompt (GRIFFIN's ranking), at the down projection's input. Teacher-forced on
held-out WikiText-2 windows and GSM8K answers, the prompt dense, the fp32 model's own logits as the
reference; prints perplexity x dense and top-1 agreement per row.
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F

import coreinfer
from coreinfer import quality

KEEPS = (0.5, 0.6, 0.7)


class Masking:
    """The keep, criterion and targeted inputs of the row being scored, read by every hook."""

    def __init__(self) -> None:
        self.keep, self.wina, self.targets, self.prompt = 1.0, False, ("gate_up", "down"), 0
        self.core = 0.0  # the share of neurons the prompt fixes (the hybrid rule), 0: none

    def apply(self, x: torch.Tensor, group: str, column_norms: torch.Tensor) -> torch.Tensor:
        if self.keep >= 1.0 or group not in self.targets:
            return x
        score = x.abs() * column_norms if self.wina else x.abs()
        if self.core and group == "down":  # the prompt's core neurons first, whatever their value now
            ranking = x[:, : self.prompt].abs().mean(1, keepdim=True)
            core = ranking >= ranking.topk(max(1, round(self.core * x.shape[-1])), dim=-1).values[..., -1:]
            score = score + core * score.max()
        k = max(1, round(self.keep * x.shape[-1]))
        keep = score >= score.topk(k, dim=-1).values[..., -1:]
        keep[:, : self.prompt] = True  # the prompt is read densely
        return x * keep


def norms(weights: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([w.float() for w in weights]).norm(dim=0)


def install(engine, masking: Masking) -> None:
    for ffn, attention in zip(engine.ffns, engine.attention_modules()):
        w = ffn.weights
        gate_up, down = norms(([w.gate] if w.gated else []) + [w.up]), norms([w.down])

        def handler(module, x, w=w, gate_up=gate_up, down=down):
            acts = w.activations(masking.apply(x, "gate_up", gate_up))
            return F.linear(masking.apply(acts, "down", down), w.down, w.down_bias)

        ffn.handler = handler
        for group, modules in attention.items():
            column_norms = norms([m.weight for m in modules])
            for m in modules:
                m.register_forward_pre_hook(lambda _, args, g=group, c=column_norms: (masking.apply(args[0], g, c),))


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model")
    parser.add_argument("--data-dir")
    parser.add_argument("--items", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(2)
    engine = coreinfer.load(args.model) if args.model else coreinfer.load()
    masking = Masking()
    install(engine, masking)
    sets = [quality.wikitext_set(engine, args.items, 256, 96, data_dir=args.data_dir),
            quality.gsm8k_set(engine, args.items, 96, data_dir=args.data_dir)]
    rows = [("dense", 1.0, False, (), 0.0)] + [
        (f"{'wina' if wina else 'teal'} {targets} {keep}", keep, wina, targets, 0.0)
        for targets in ("ffn", "all") for keep in KEEPS for wina in (False, True)] + [
        (f"core {core} + teal ffn {keep}", keep, False, "ffn", core) for keep in KEEPS for core in (0.2, 0.4)]
    for evalset in sets:
        reference, dense_ppl = [], None
        for name, keep, wina, targets, core in rows:
            masking.keep, masking.wina, masking.core = keep, wina, core
            masking.targets = ("gate_up", "down") if targets == "ffn" else ("qkv", "o", "gate_up", "down")
            nll, agree, count = 0.0, 0, 0
            for index, item in enumerate(evalset.items):
                masking.prompt = len(item.prompt)
                ids = torch.tensor([list(item.prompt) + list(item.continuation)])
                logits = engine.model(ids).logits[0, len(item.prompt) - 1 : -1].float()
                if name == "dense":
                    reference.append(logits.argmax(-1))
                target = torch.tensor(item.continuation)
                nll += F.cross_entropy(logits, target, reduction="sum").item()
                agree += int((logits.argmax(-1) == reference[index]).sum())
                count += len(target)
            ppl = math.exp(nll / count)
            dense_ppl = dense_ppl or ppl
            print(f"{evalset.name:10s} {name:22s} ppl x{ppl / dense_ppl:.3f} agreement {agree / count:.3f}", flush=True)


if __name__ == "__main__":
    main()
