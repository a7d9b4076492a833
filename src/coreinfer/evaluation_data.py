"""The built-in evaluation sets as plain records, from a local copy or the Hugging Face Hub.

A *local copy* is a folder in the layout of the project's shared data (``gsm8k/test.jsonl``,
``wikitext-2/test.txt`` ...), named by ``--data-dir`` or ``$COREINFER_DATA``; a source
checkout's ``../shared/data`` serves as a development fallback after those. Without one,
each set comes from the Hub through ``datasets.load_dataset`` and its cache, as every
other evaluation tool loads it. Both sources give the same records; where the Hub's copy
is not the same file (WikiText raw, SICK and STS 2015 in their MTEB form), ``SETS`` says so.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, TypeVar, Union

T = TypeVar("T")
PathLike = Union[str, Path]

HOW_TO_FIX = "set COREINFER_DATA or pass --data-dir to a local copy, or connect to the Hub"


class DataNotFound(FileNotFoundError):
    """Neither a local copy nor the Hub could give a built-in set.

    A ``FileNotFoundError``, so callers that already treat missing data as optional
    (the bench's quality column) keep doing so.
    """


@dataclass(frozen=True)
class Source:
    """Where one built-in set lives: its Hub dataset and, in a local copy, its file(s)."""

    hub: str
    config: Optional[str]
    split: str
    files: tuple[str, ...]
    note: str = ""


# The one table of sources. Hub ids are the ones lm-eval and MTEB load.
SETS = {
    "gsm8k": Source("openai/gsm8k", "main", "test", ("gsm8k/test.jsonl",)),
    "wikitext2": Source(
        "Salesforce/wikitext", "wikitext-2-raw-v1", "test", ("wikitext-2/test.txt",),
        # The Hub has no split of the local tokenised file (`<unk>`, ` @-@ `) that tokenises
        # the same, so perplexities differ slightly between the two sources.
        "the Hub copy is the raw variant; the local copy is the tokenised one",
    ),
    "piqa": Source("baber/piqa", None, "validation", ("piqa/valid.jsonl", "piqa/valid-labels.lst")),
    "truthfulqa": Source("truthfulqa/truthful_qa", "generation", "validation", ("truthfulqa/TruthfulQA.csv",)),
    "ag_news": Source(
        "fancyzhx/ag_news", None, "test", ("ag_news/test.csv",),
        "the Hub joins title and description with a space, the local reader with '. '",
    ),
    "sick": Source(
        "mteb/sickr-sts", None, "test", ("sick/SICK_test_annotated.txt",),
        "the Hub copy (MTEB SICK-R) holds all 9,927 SICK pairs; the local file the 4,927 test pairs",
    ),
    "sts2015": Source(
        "mteb/sts15-sts", None, "test", ("sts2015/headlines.test.tsv",),
        "the Hub copy (MTEB STS15) holds all five 2015 domains; the local file the headlines alone",
    ),
}


# Records


@dataclass(frozen=True)
class Problem:
    """A GSM8K problem: the question and its worked answer (reasoning, then ``#### number``)."""

    question: str
    answer: str


@dataclass(frozen=True)
class Choice:
    """A PIQA item: a goal, two solutions and the index of the right one."""

    goal: str
    sol1: str
    sol2: str
    label: int


@dataclass(frozen=True)
class Question:
    """A TruthfulQA question and its best answer."""

    question: str
    best_answer: str


@dataclass(frozen=True)
class Topic:
    """An AG News item: its text and topic (0-3: World, Sports, Business, Sci/Tech)."""

    text: str
    label: int


@dataclass(frozen=True)
class Pair:
    """Two sentences and their gold similarity (SICK 1-5, STS 0-5)."""

    first: str
    second: str
    score: float


# Where the data comes from


def checkout_copy() -> Optional[Path]:
    """A source checkout's ``../shared/data``; None in an installed wheel, which has no checkout."""
    root = Path(__file__).resolve().parents[2]  # <checkout> for src/coreinfer/evaluation_data.py
    folder = root.parent / "shared" / "data"
    return folder if (root / "pyproject.toml").is_file() and folder.is_dir() else None


def local_copy(data_dir: Optional[PathLike] = None) -> Optional[Path]:
    """The local copy to read: ``data_dir``, else ``$COREINFER_DATA``, else the checkout's; None: the Hub."""
    for given, origin in ((data_dir, "--data-dir"), (os.environ.get("COREINFER_DATA"), "COREINFER_DATA")):
        if given:
            folder = Path(given).expanduser()
            if not folder.is_dir():
                raise DataNotFound(f"no evaluation data at {folder} (from {origin}); {HOW_TO_FIX}")
            return folder
    return checkout_copy()


def describe(name: str, data_dir: Optional[PathLike] = None) -> str:
    """Where ``name`` would be read from, for reports."""
    source, folder = SETS[name], local_copy(data_dir)
    if folder is not None:
        return ", ".join(str(folder / f) for f in source.files)
    config = f", {source.config}" if source.config else ""
    return f"Hugging Face Hub {source.hub}{config} ({source.split})"


def hub_rows(name: str) -> list[dict]:
    """The rows of ``name`` from the Hub (or the ``datasets`` cache), or a clear error naming both ways."""
    source = SETS[name]
    try:
        import datasets
        from datasets.exceptions import DatasetsError
    except ImportError:
        raise DataNotFound(
            f"{name}: no local copy, and reading the Hub needs the `datasets` package (pip install datasets); "
            "or set COREINFER_DATA or pass --data-dir to a local copy"
        ) from None
    try:
        return list(datasets.load_dataset(source.hub, source.config, split=source.split))
    # Offline (HF_HUB_OFFLINE, or no network once huggingface_hub's retries give up) raises a
    # ConnectionError; a missing dataset raises DatasetsError; both are worth one clear line.
    except (OSError, DatasetsError) as err:
        raise DataNotFound(f"{name}: cannot load {source.hub} from the Hugging Face Hub ({err}); {HOW_TO_FIX}") from None


def _load(name: str, data_dir: Optional[PathLike], read: Callable[..., T], from_hub: Callable[[list[dict]], T]) -> T:
    """``read(*files)`` on the local copy where there is one, else ``from_hub(rows)``."""
    folder = local_copy(data_dir)
    if folder is None:
        return from_hub(hub_rows(name))
    paths = [folder / f for f in SETS[name].files]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise DataNotFound(f"{name}: the local copy {folder} lacks {', '.join(missing)}; {HOW_TO_FIX}")
    return read(*paths)


# The sets


def gsm8k(data_dir: Optional[PathLike] = None) -> list[Problem]:
    """GSM8K test, in file order."""
    def read(path: Path) -> list[Problem]:
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        return [Problem(r["question"], r["answer"]) for r in rows]

    return _load("gsm8k", data_dir, read, lambda rows: [Problem(r["question"], r["answer"]) for r in rows])


def wikitext2(data_dir: Optional[PathLike] = None) -> str:
    """WikiText-2 test as one text, a line per paragraph or heading (see ``SETS`` on raw vs tokenised)."""
    # Hub rows are the release file's lines with their newlines, except that its blank lines
    # (" \n") became empty rows; put them back so both sources have the same line structure.
    def from_hub(rows: list[dict]) -> str:
        return "".join(r["text"] if r["text"].endswith("\n") else (r["text"] or " ") + "\n" for r in rows)

    return _load("wikitext2", data_dir, lambda path: path.read_text(encoding="utf-8"), from_hub)


def piqa(data_dir: Optional[PathLike] = None) -> list[Choice]:
    """PIQA validation, each item joined with its label (a separate file in the local copy)."""
    def read(items_path: Path, labels_path: Path) -> list[Choice]:
        items = [json.loads(line) for line in items_path.read_text(encoding="utf-8").splitlines() if line.strip()]
        labels = [int(line) for line in labels_path.read_text(encoding="utf-8").split()]
        if len(items) != len(labels):
            raise ValueError(f"PIQA: {len(items)} items but {len(labels)} labels")
        return [Choice(i["goal"], i["sol1"], i["sol2"], label) for i, label in zip(items, labels)]

    return _load("piqa", data_dir, read, lambda rows: [Choice(r["goal"], r["sol1"], r["sol2"], int(r["label"])) for r in rows])


def truthfulqa(data_dir: Optional[PathLike] = None) -> list[Question]:
    """TruthfulQA's 817 questions with their best answers."""
    def read(path: Path) -> list[Question]:
        with open(path, newline="", encoding="utf-8") as fh:
            return [Question(r["Question"], r["Best Answer"]) for r in csv.DictReader(fh)]

    return _load("truthfulqa", data_dir, read, lambda rows: [Question(r["question"], r["best_answer"]) for r in rows])


def ag_news(data_dir: Optional[PathLike] = None) -> list[Topic]:
    """AG News test, in file order; labels 0-3."""
    def read(path: Path) -> list[Topic]:
        with open(path, newline="", encoding="utf-8") as fh:
            return [Topic(_news(f"{title}. {body}"), int(label) - 1) for label, title, body in csv.reader(fh)]

    return _load("ag_news", data_dir, read, lambda rows: [Topic(_news(r["text"]), int(r["label"])) for r in rows])


def _news(text: str) -> str:
    return text.replace("\\", " ")  # the source escapes line breaks as backslashes


def sick(data_dir: Optional[PathLike] = None) -> list[Pair]:
    """SICK sentence pairs with gold relatedness (1-5)."""
    def read(path: Path) -> list[Pair]:
        with open(path, encoding="utf-8") as fh:
            rows = csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)
            return [Pair(r["sentence_A"], r["sentence_B"], float(r["relatedness_score"])) for r in rows]

    return _load("sick", data_dir, read, _mteb_pairs)


def sts2015(data_dir: Optional[PathLike] = None) -> list[Pair]:
    """STS 2015 scored sentence pairs with gold similarity (0-5)."""
    def read(path: Path) -> list[Pair]:
        with open(path, encoding="utf-8") as fh:
            rows = csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)
            # unscored pairs have an empty gold field
            return [Pair(r[1], r[2], float(r[0])) for r in rows if len(r) >= 3 and r[0].strip()]

    return _load("sts2015", data_dir, read, _mteb_pairs)


def _mteb_pairs(rows: list[dict]) -> list[Pair]:
    return [Pair(r["sentence1"], r["sentence2"], float(r["score"])) for r in rows]
