"""Similarity-guided core neurons (CoreInfer, section 4.3): clusters of semantically similar prompts.

Offline (``build_clusters``): each prompt's sentence-wise core neurons at one
late sparse layer form a binary feature vector; KMeans groups the prompts; for
every cluster and every sparse layer we count, over that cluster's prompts only,
how often each neuron is in the prompt's sentence-wise core set. The counts and
centroids are stored as safetensors, the settings and model identity as JSON.

Online (``SimilaritySelector``): the prompt is prefilled densely as usual; its
feature at the clustering layer picks the nearest centroid, and every sparse
layer then decodes with that cluster's top ``keep * N`` neurons (optionally a
share of the budget taken from the prompt's own set).
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence

import torch
from safetensors.torch import load_file, save_file

from .. import evaluation_data
from ..evaluation_data import PathLike
from ..selection import check_fraction, get_rule, num_kept, token_core_mask

if TYPE_CHECKING:  # the engine is passed in; this module only calls its public methods
    from ..engine import Engine, SparsityConfig

FORMAT = 1
TENSORS = "clusters.safetensors"
META = "clusters.json"


class ClusterMismatch(ValueError):
    """A cluster file made for another model (or with other FFN shapes)."""


# Inputs


def truthfulqa_prompt(question: str) -> str:
    """The paper's TruthfulQA format."""
    return f"Question: {question.strip()} Answer:"


def load_truthfulqa(path: Path) -> list[tuple[str, str]]:
    """(prompt, best answer) pairs from the TruthfulQA CSV."""
    with open(path, newline="", encoding="utf-8") as fh:
        return [(truthfulqa_prompt(row["Question"]), row["Best Answer"].strip()) for row in csv.DictReader(fh)]


def builtin_truthfulqa(data_dir: Optional[PathLike] = None) -> list[tuple[str, str]]:
    """(prompt, best answer) pairs from the built-in TruthfulQA (a local copy or the Hub)."""
    return [(truthfulqa_prompt(q.question), q.best_answer.strip()) for q in evaluation_data.truthfulqa(data_dir)]


def load_prompts(path: Path) -> list[str]:
    """Prompts from a text file (one a line), JSONL (a ``prompt`` field) or the TruthfulQA CSV."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no data file at {path}")
    if path.suffix == ".csv":
        return [prompt for prompt, _ in load_truthfulqa(path)]
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if path.suffix == ".jsonl":
        try:
            return [json.loads(line)["prompt"] for line in lines]
        except (KeyError, json.JSONDecodeError) as err:
            raise ValueError(f"{path}: every JSONL line needs a 'prompt' field ({err})") from None
    return lines


# Recording each prompt's core sets during prefill


@dataclass
class CoreSetRecorder:
    """A selector that also remembers, per layer, each sequence's core set and token-wise frequency.

    ``sets[layer]`` and ``freqs[layer]`` grow by one entry per sequence, in batch
    order. The frequency (share of the prompt's tokens for which a neuron is
    token-wise core, Eq. 1) breaks ties between neurons of equal counts.
    """

    rule: str
    keep: float
    alpha: float
    sets: dict[int, list[torch.Tensor]] = field(default_factory=dict)
    freqs: dict[int, list[torch.Tensor]] = field(default_factory=dict)

    def __call__(self, layer: int, acts: torch.Tensor) -> torch.Tensor:
        chosen = get_rule(self.rule)(acts, self.keep, self.alpha)
        self.sets.setdefault(layer, []).append(chosen.cpu())
        self.freqs.setdefault(layer, []).append(token_core_mask(acts, self.alpha).float().mean(0).cpu())
        return chosen


def record_core_sets(
    engine: "Engine",
    prompts: Sequence[Sequence[int]],
    sparsity: "SparsityConfig",
    batch_size: int = 8,
    progress: bool = False,
    desc: str = "prefill",
) -> CoreSetRecorder:
    """Every prompt's sentence-wise core set and token-wise frequency at every sparse layer."""
    from tqdm import tqdm

    recorder = CoreSetRecorder(sparsity.rule, sparsity.keep, sparsity.alpha)
    # Similar lengths together: less padding, same results (each sequence selects from its own tokens).
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    for start in tqdm(range(0, len(order), batch_size), desc=desc, disable=not progress, unit="batch"):
        engine.core_neurons([prompts[i] for i in order[start : start + batch_size]], sparsity, recorder)
    back = torch.empty(len(order), dtype=torch.long)
    back[torch.tensor(order)] = torch.arange(len(order))
    for store in (recorder.sets, recorder.freqs):
        for layer, items in store.items():
            store[layer] = [items[i] for i in back.tolist()]
    return recorder


def binary_features(sets: Sequence[torch.Tensor], num_neurons: int) -> torch.Tensor:
    """One row per core set: 1.0 where the neuron is in the set ``[len(sets), num_neurons]``."""
    features = torch.zeros(len(sets), num_neurons)
    for row, chosen in enumerate(sets):
        features[row, chosen] = 1.0
    return features


def ffn_shapes(engine: "Engine") -> list[list[int]]:
    """Each layer's (neurons, hidden size): what a cluster file must match besides the model's name."""
    return [[f.weights.num_neurons, f.weights.hidden_size] for f in engine.ffns]


# Clusters


def choose_k(features: torch.Tensor, k_max: int, seed: int = 0) -> tuple[int, dict[int, float]]:
    """k in 2..k_max with the highest silhouette score (Euclidean, as KMeans minimises); ties: smaller k."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import silhouette_score

    x = features.numpy()
    distinct = len({tuple(row) for row in x.astype(bool).tolist()})
    scores: dict[int, float] = {}
    for k in range(2, min(k_max, distinct - 1, len(x) - 1) + 1):
        labels = KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(x)
        scores[k] = float(silhouette_score(x, labels))
    if not scores:
        return 1, scores
    return max(scores, key=lambda k: (scores[k], -k)), scores


def rank_neurons(counts: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Neurons ordered by count (descending), then token-wise frequency, then index."""
    order = torch.sort(freqs.double(), dim=-1, descending=True, stable=True).indices
    by_count = torch.sort(torch.gather(counts.double(), -1, order), dim=-1, descending=True, stable=True).indices
    return torch.gather(order, -1, by_count)


@dataclass
class ClusterSet:
    """KMeans centroids over core-set features, and per cluster and layer the core-set statistics.

    ``counts[layer]`` is ``[k, N]``: over the cluster's prompts, how many had the
    neuron in their sentence-wise core set; ``freqs[layer]`` sums their token-wise
    frequencies (the tie-break).
    """

    meta: dict
    centroids: torch.Tensor  # [k, F]
    counts: dict[int, torch.Tensor]
    freqs: dict[int, torch.Tensor]

    @property
    def layer(self) -> int:
        return int(self.meta["layer"])

    @property
    def k(self) -> int:
        return self.centroids.shape[0]

    def feature(self, acts: torch.Tensor) -> torch.Tensor:
        """One prompt's feature ``[F]`` at the clustering layer, made as the clusters' were."""
        chosen = get_rule(self.meta["rule"])(acts, self.meta["keep"], self.meta["alpha"])
        return binary_features([chosen.cpu()], acts.shape[-1])[0]

    def assign(self, features: torch.Tensor) -> torch.Tensor:
        """Nearest centroid per row of ``features [B, F]`` (Euclidean; ties: the lower cluster index)."""
        distances = torch.cdist(features.double().cpu(), self.centroids.double())
        return torch.argmin(distances, dim=1)

    def ranked(self, layer: int, cluster: int) -> torch.Tensor:
        """All of ``layer``'s neurons, best first, for ``cluster``."""
        if layer not in self.counts:
            raise ValueError(f"the clusters have no statistics for layer {layer}; they cover {sorted(self.counts)}")
        return rank_neurons(self.counts[layer][cluster], self.freqs[layer][cluster])

    def core(self, layer: int, cluster: int, keep: float) -> torch.Tensor:
        """The cluster's core set at ``layer``: its top round(keep * N) neurons, sorted."""
        ranked = self.ranked(layer, cluster)
        return torch.sort(ranked[: num_kept(ranked.shape[0], keep)]).values

    def check_model(self, engine: "Engine") -> None:
        """Refuse clusters made for another model: its name and every FFN shape must match."""
        made_for, shapes = self.meta["model"], self.meta["ffn_shapes"]
        if made_for != engine.name or shapes != ffn_shapes(engine):
            what = "another name" if made_for != engine.name else "other FFN shapes"
            raise ClusterMismatch(
                f"these clusters were made for model {made_for!r} ({len(shapes)} FFN layers), not for "
                f"{engine.name!r} ({engine.num_layers} FFN layers; {what}); rebuild them for this model "
                "with `coreinfer cluster`"
            )

    def save(self, out: Path) -> Path:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        tensors = {"centroids": self.centroids.float().contiguous()}
        for layer in self.counts:
            tensors[f"counts.{layer}"] = self.counts[layer].float().contiguous()
            tensors[f"freqs.{layer}"] = self.freqs[layer].float().contiguous()
        save_file(tensors, str(out / TENSORS), metadata={"format": str(FORMAT)})
        (out / META).write_text(json.dumps(self.meta, indent=1) + "\n", encoding="utf-8")
        return out


def load_clusters(directory: Path, engine: Optional["Engine"] = None) -> ClusterSet:
    """Read a cluster directory; with ``engine``, refuse it unless it was made for that model."""
    directory = Path(directory)
    if not (directory / META).is_file() or not (directory / TENSORS).is_file():
        raise FileNotFoundError(f"{directory} holds no clusters ({META} and {TENSORS}); make them with `coreinfer cluster`")
    meta = json.loads((directory / META).read_text(encoding="utf-8"))
    if meta.get("format") != FORMAT:
        raise ValueError(f"{directory}: cluster format {meta.get('format')!r}, this coreinfer reads {FORMAT}")
    tensors = load_file(str(directory / TENSORS))
    layers = sorted(int(name.split(".")[1]) for name in tensors if name.startswith("counts."))
    clusters = ClusterSet(
        meta,
        tensors["centroids"],
        {layer: tensors[f"counts.{layer}"] for layer in layers},
        {layer: tensors[f"freqs.{layer}"] for layer in layers},
    )
    if engine is not None:
        clusters.check_model(engine)
    return clusters


def build_clusters(
    engine: "Engine",
    prompts: Sequence[Sequence[int]],
    sparsity: "SparsityConfig",
    layer: Optional[int] = None,
    k: Optional[int] = None,
    k_max: int = 8,
    seed: int = 0,
    batch_size: int = 8,
    progress: bool = False,
    extra_meta: Optional[dict] = None,
) -> ClusterSet:
    """Cluster token-id prompts by their core set at ``layer`` (default: the last sparse layer).

    ``k=None`` picks k in 2..``k_max`` by silhouette score.
    """
    from sklearn.cluster import KMeans

    from .. import __version__

    sparse = sparsity.sparse_layers(engine.num_layers)
    layer = sparse[-1] if layer is None else layer
    if layer not in sparse:
        raise ValueError(f"the clustering layer {layer} must be one of the sparse layers {list(sparse)}")
    if len(prompts) < 2:
        raise ValueError("clustering needs at least two prompts")
    recorder = record_core_sets(engine, prompts, sparsity, batch_size, progress, desc="core sets")
    num_neurons = engine.ffns[layer].weights.num_neurons
    features = binary_features(recorder.sets[layer], num_neurons)
    silhouettes: dict[int, float] = {}
    if k is None:
        k, silhouettes = choose_k(features, k_max, seed)
    if not 1 <= k <= len(prompts):
        raise ValueError(f"k must lie in 1..{len(prompts)} (the number of prompts), got {k}")
    km = KMeans(n_clusters=k, n_init=10, random_state=seed).fit(features.numpy())
    labels = torch.from_numpy(km.labels_).long()
    counts, freqs = {}, {}
    for sparse_layer in sparse:
        n = engine.ffns[sparse_layer].weights.num_neurons
        member = binary_features(recorder.sets[sparse_layer], n)  # [P, N]
        freq = torch.stack(recorder.freqs[sparse_layer])  # [P, N]
        one_hot = torch.nn.functional.one_hot(labels, k).T.float()  # [k, P]: each cluster's prompts only
        counts[sparse_layer] = one_hot @ member
        freqs[sparse_layer] = one_hot @ freq
    meta = {
        "format": FORMAT,
        "coreinfer_version": __version__,
        "model": engine.name,
        "ffn_shapes": ffn_shapes(engine),
        "layer": layer,
        "rule": sparsity.rule,
        "alpha": sparsity.alpha,
        "keep": sparsity.keep,
        "k": k,
        "k_criterion": "given" if not silhouettes else f"silhouette over k=2..{k_max}",
        "silhouette": {str(key): round(value, 5) for key, value in silhouettes.items()},
        "feature_size": num_neurons,
        "sparse_layers": list(sparse),
        "num_prompts": len(prompts),
        "cluster_sizes": torch.bincount(labels, minlength=k).tolist(),
        "labels": labels.tolist(),
        "seed": seed,
        **(extra_meta or {}),
    }
    return ClusterSet(meta, torch.from_numpy(km.cluster_centers_).float(), counts, freqs)


# Online selection


@dataclass
class SimilaritySelector:
    """Decode each sequence with its nearest cluster's core sets (a ``Selector`` with ``finalize``).

    During prefill every layer selects the prompt's own share (the rule at
    ``keep * own_share``; a placeholder when ``own_share`` is 0); at the
    clustering layer the prompt's feature is kept. ``finalize`` assigns each
    sequence its nearest cluster and fills every layer to round(keep * N) neurons
    from the cluster's ranking: the whole budget when ``own_share`` is 0, else
    what the prompt's own share leaves. FFN density thus equals that of the
    stability-guided rule at the same ``keep``.
    """

    clusters: ClusterSet
    keep: float
    alpha: float = 0.2
    rule: str = "coreinfer"
    own_share: float = 0.0
    features: list[torch.Tensor] = field(default_factory=list)
    assigned: Optional[torch.Tensor] = None

    def __post_init__(self) -> None:
        check_fraction("keep", self.keep)
        if not 0.0 <= self.own_share < 1.0:
            raise ValueError(f"own_share must lie in [0, 1), got {self.own_share}")

    def __call__(self, layer: int, acts: torch.Tensor) -> torch.Tensor:
        if layer == self.clusters.layer:
            self.features.append(self.clusters.feature(acts))
        if self.own_share == 0:  # finalize replaces the whole set; skip selecting one here
            return torch.arange(num_kept(acts.shape[-1], self.keep), device=acts.device)
        return get_rule(self.rule)(acts, self.keep * self.own_share, self.alpha)

    def finalize(self, neurons: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        if len(self.features) != next(iter(neurons.values())).shape[0]:
            raise ValueError(
                f"the clustering layer {self.clusters.layer} is not among this request's sparse layers "
                f"{sorted(neurons)}; use the sparse layers the clusters were made with"
            )
        self.assigned = self.clusters.assign(torch.stack(self.features))
        self.features = []  # one request's state; the selector may serve the next one
        return {layer: self._fill(layer, own) for layer, own in neurons.items()}

    def _fill(self, layer: int, own: torch.Tensor) -> torch.Tensor:
        """[B, K]: the prompt's own share (if any), then the cluster's best until K = round(keep * N)."""
        rows = []
        for b, cluster in enumerate(self.assigned.tolist()):
            ranked = self.clusters.ranked(layer, cluster).to(own.device)
            total = num_kept(ranked.shape[0], self.keep)
            if self.own_share == 0:
                rows.append(ranked[:total])
                continue
            taken = torch.zeros(ranked.shape[0], dtype=torch.bool, device=own.device)
            taken[own[b]] = True
            rows.append(torch.cat([own[b], ranked[~taken[ranked]][: total - own.shape[1]]]))
        return torch.sort(torch.stack(rows), dim=1).values
