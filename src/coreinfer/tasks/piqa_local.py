"""PIQA validation as an lm-eval dataset: from a local copy ($COREINFER_DATA) or the Hub (see evaluation_data)."""

from __future__ import annotations

from dataclasses import asdict


def load(**kwargs):
    import datasets

    from coreinfer.evaluation_data import piqa

    return datasets.DatasetDict({"validation": datasets.Dataset.from_list([asdict(item) for item in piqa()])})
