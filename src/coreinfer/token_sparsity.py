"""Token-level activation sparsity (TEAL-style): pure functions, thresholds, and their allocation.

Each decoded token skips the weight columns whose input entries are small. A layer has four
inputs that feed weight matrices (``GROUPS``):

- ``qkv``: the normed hidden state read by the q, k and v projections;
- ``o``: the attention's output, read by the output projection;
- ``gate_up``: the normed hidden state read by the FFN's gate and up projections;
- ``down``: the FFN's intermediate ``act(gate(x)) * up(x)``, read by the down projection.

An entry ``x_i`` with ``|x_i| <= threshold`` is dropped, so column ``i`` of every matrix that
reads this input is never read. Thresholds are numbers fixed per layer and input, calibrated
offline from activation statistics (``TokenProfile``), so decoding compares and never sorts.
``TokenProfile.allocate`` spreads one model-level target over the layers and inputs greedily:
each step raises the sparsity of the input whose next step costs the least measured damage per
weight saved.
"""

from __future__ import annotations

import heapq
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

GROUPS = ("qkv", "o", "gate_up", "down")
FFN_GROUPS = ("gate_up", "down")
# Which inputs a token-level configuration sparsifies: the FFN's, or the attention's as well.
TARGETS = {"ffn": FFN_GROUPS, "all": GROUPS}
# Sparsity levels the calibration measures, as fractions of an input's entries dropped.
LEVELS = tuple(round(i / 20, 2) for i in range(20))  # 0.0, 0.05, ..., 0.95
PROFILE_FORMAT = 1
# keep="auto" never reads less than this share of the targeted weights. The calibration's agreement
# (on 16 prompts' own answers) ranks levels within a model but misjudges how far a model can go: on
# held-out text both models here lost quality below it that their calibration did not show (0.6 of
# the FFN: SmolLM2 GSM8K perplexity x1.16, Gemma 3 WikiText-2 x1.16 and agreement 0.79, while Gemma's
# calibration agreement at 0.6 was 0.91). TEAL (arXiv 2408.14690) likewise finds 25 % near-lossless
# across models and degradation from 40-50 %. A sparser level stays an explicit `keep`.
MIN_AUTO_KEEP = 0.7


def group_index(group: str) -> int:
    return GROUPS.index(group)


def sparsify(x: torch.Tensor, threshold: float) -> torch.Tensor:
    """``x`` with every entry of magnitude at most ``threshold`` set to zero (threshold 0 keeps all)."""
    if threshold <= 0:
        return x
    return x.masked_fill(x.abs() <= threshold, 0)


def kept_entries(x: torch.Tensor, threshold: float) -> torch.Tensor:
    """How many entries of each row of ``x`` ``[..., n]`` survive ``threshold``: ``[...]``."""
    if threshold <= 0:
        return torch.full(x.shape[:-1], x.shape[-1], device=x.device)
    return (x.abs() > threshold).sum(-1)


def level_thresholds(magnitudes: torch.Tensor, levels: Sequence[float] = LEVELS) -> torch.Tensor:
    """The magnitude below which each level's fraction of entries lies: ``[len(levels)]``, level 0 -> 0."""
    flat = magnitudes.flatten().float()
    if flat.numel() > 1 << 24:  # torch.quantile's limit; an even subsample keeps the distribution
        flat = flat[torch.linspace(0, flat.numel() - 1, 1 << 24, device=flat.device).long()]
    q = torch.quantile(flat, torch.tensor(levels, dtype=torch.float32, device=flat.device))
    q[torch.tensor(levels, device=flat.device) == 0] = 0.0
    return q


def relative_errors(x: torch.Tensor, weight: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """For each threshold, ``‖W (x - sparsify(x))‖² / ‖W x‖²`` summed over the rows of ``x`` ``[T, in]``.

    ``weight`` is ``[out, in]`` (every matrix reading this input, stacked). Returns ``[len(thresholds)]``.
    """
    x = x.float()
    weight = weight.float()
    dense = (x @ weight.t()).square().sum().clamp_min(1e-30)
    errors = []
    for t in thresholds.tolist():
        dropped = x - sparsify(x, t)
        errors.append(float((dropped @ weight.t()).square().sum() / dense))
    return torch.tensor(errors)


@dataclass(frozen=True)
class TokenThresholds:
    """One token-level configuration: a threshold per layer and input ``[L, len(GROUPS)]`` (0 = dense).

    ``keep`` is the target it was allocated for: the expected share of the sparsified weights read.
    """

    values: torch.Tensor
    keep: float
    targets: str = "all"

    def threshold(self, layer: int, group: str) -> float:
        return float(self.values[layer, group_index(group)])

    def layer(self, layer: int) -> dict[str, float]:
        return {g: float(v) for g, v in zip(GROUPS, self.values[layer].tolist())}

    @property
    def num_layers(self) -> int:
        return self.values.shape[0]


@dataclass
class TokenProfile:
    """What calibration measured about each layer's inputs, enough to allocate any target.

    ``thresholds[l, g, q]`` drops ``LEVELS[q]`` of input ``g``'s entries in layer ``l`` on the
    calibration text; ``damage[l, g, q]`` is the measured cost of doing so (see
    ``token_calibration``); ``sizes[l, g]`` counts the weights that read input ``g``.
    """

    thresholds: torch.Tensor  # [L, G, Q]
    damage: torch.Tensor  # [L, G, Q], non-decreasing in q, 0 at q = 0
    sizes: torch.Tensor  # [L, G] weight elements
    model: str = ""
    meta: dict = None

    def allocate(self, keep: float, targets: str = "all") -> TokenThresholds:
        """Greedy allocation: thresholds reading about ``keep`` of the ``targets`` inputs' weights."""
        if targets not in TARGETS:
            raise ValueError(f"targets must be one of {', '.join(TARGETS)}, not {targets!r}")
        if not 0.0 < keep <= 1.0:
            raise ValueError(f"keep must lie in (0, 1], got {keep}")
        groups = [group_index(g) for g in TARGETS[targets]]
        levels = torch.tensor(LEVELS)
        num_layers = self.sizes.shape[0]
        total = float(sum(self.sizes[l, g] for l in range(num_layers) for g in groups))
        budget = (1.0 - keep) * total  # weights to skip
        step = torch.zeros(num_layers, len(GROUPS), dtype=torch.long)
        skipped = 0.0

        def move(l: int, g: int):
            q = int(step[l, g])
            if q + 1 >= len(LEVELS):
                return None
            saved = float(self.sizes[l, g] * (levels[q + 1] - levels[q]))
            cost = float(self.damage[l, g, q + 1] - self.damage[l, g, q])
            return (max(cost, 0.0) / saved, l, g, saved)

        heap = [m for l in range(num_layers) for g in groups if (m := move(l, g)) is not None]
        heapq.heapify(heap)
        while heap and skipped < budget:
            _, l, g, saved = heapq.heappop(heap)
            step[l, g] += 1
            skipped += saved
            if (m := move(l, g)) is not None:
                heapq.heappush(heap, m)
        values = torch.gather(self.thresholds, 2, step.unsqueeze(-1)).squeeze(-1)
        return TokenThresholds(values.float(), float(keep), targets)

    def levels(self, quality: float, targets: str = "all") -> list[float]:
        """Keeps for ``keep="auto"``, sparsest first: the lowest calibrated level of at least
        ``MIN_AUTO_KEEP`` whose agreement with the dense model on the calibration answers reaches
        ``quality``, then each denser one."""
        measured = sorted(
            (float(key.split(":")[1]), value)
            for key, value in (self.meta or {}).get("agreement", {}).items()
            if key.split(":")[0] == targets and float(key.split(":")[1]) >= MIN_AUTO_KEEP
        )
        passing = [i for i, (_, value) in enumerate(measured) if value >= quality]
        return [keep for keep, _ in measured[passing[0] :]] if passing else []

    def save(self, directory: Path) -> None:
        from safetensors.torch import save_file

        directory.mkdir(parents=True, exist_ok=True)
        tensors = {"thresholds": self.thresholds, "damage": self.damage, "sizes": self.sizes}
        save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(directory / "token.safetensors"))
        info = {"format": PROFILE_FORMAT, "model": self.model, "levels": list(LEVELS), "groups": list(GROUPS),
                "meta": self.meta or {}}
        (directory / "token.json").write_text(json.dumps(info, indent=1) + "\n")

    @classmethod
    def load(cls, directory: Path, expect_model: str = "") -> "TokenProfile":
        from safetensors.torch import load_file

        info = json.loads((directory / "token.json").read_text())
        if info.get("format") != PROFILE_FORMAT or list(info.get("levels", [])) != list(LEVELS):
            raise ValueError(f"{directory} holds a token-level calibration of another format")
        if expect_model and info.get("model") != expect_model:
            raise ValueError(f"{directory} was calibrated for {info.get('model')!r}, not {expect_model!r}")
        tensors = load_file(str(directory / "token.safetensors"))
        return cls(tensors["thresholds"], tensors["damage"], tensors["sizes"], info["model"], info.get("meta") or {})


def read_share(kept: dict[str, torch.Tensor], widths: dict[str, int], sizes: dict[str, float]) -> torch.Tensor:
    """Share of weights read, from kept input counts per group (``[...]`` each) and group sizes.

    ``widths[g]`` is input ``g``'s full width; ``sizes[g]`` the weights that read it.
    """
    total = sum(sizes[g] for g in kept)
    return sum(kept[g].float() / widths[g] * sizes[g] for g in kept) / total
