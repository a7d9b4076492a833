"""PIQA validation from the shared data folder, its items joined with their labels (a separate file)."""

from __future__ import annotations

import json


def load(**kwargs):
    import datasets

    from coreinfer.quality import data_dir

    folder = data_dir() / "piqa"
    items = [json.loads(line) for line in (folder / "valid.jsonl").read_text().splitlines() if line.strip()]
    labels = [int(line) for line in (folder / "valid-labels.lst").read_text().split()]
    if len(items) != len(labels):
        raise ValueError(f"PIQA: {len(items)} items but {len(labels)} labels")
    rows = [{"goal": i["goal"], "sol1": i["sol1"], "sol2": i["sol2"], "label": label} for i, label in zip(items, labels)]
    return datasets.DatasetDict({"validation": datasets.Dataset.from_list(rows)})
