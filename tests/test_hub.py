"""Hub ids: loaded offline from a hand-built Hugging Face cache, and every failure named.

No test touches the network: the cache is written in huggingface_hub's own layout
(blobs named by content, snapshots/<commit>/ symlinks, refs/<branch>) under a
temporary HF_HUB_CACHE with HF_HUB_OFFLINE on; the online failures are mocked at
the huggingface_hub boundary with its own exception classes.
"""

import hashlib
import json
import os
from pathlib import Path

import httpx
import pytest
import torch
from huggingface_hub import constants
from huggingface_hub.errors import (
    GatedRepoError,
    LocalEntryNotFoundError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from safetensors import safe_open
from typer.testing import CliRunner

import coreinfer
from coreinfer import SamplingConfig, loading
from coreinfer.adaptive import model_fingerprint
from coreinfer.cli import app
from coreinfer.loading import ModelNotFound, is_hub_id, resolve_model

from conftest import save_tiny_model

MAIN = "a" * 40
OTHER = "b" * 40


def cache_repo(cache: Path, repo_id: str, files: dict[str, bytes], commit: str = MAIN, ref: str = "main") -> Path:
    """``files`` as one commit of ``repo_id`` in the HF cache layout; returns the snapshot directory."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    (repo / "blobs").mkdir(exist_ok=True)
    for name, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        os.symlink(os.path.relpath(blob, snapshot), snapshot / name)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / ref).write_text(commit)
    return snapshot


def model_files(tmp_path: Path, seed: int = 0) -> dict[str, bytes]:
    directory = tmp_path / f"saved-{seed}"
    save_tiny_model(directory, seed=seed)
    return {p.name: p.read_bytes() for p in directory.iterdir()}


@pytest.fixture
def offline_hub(tmp_path, monkeypatch) -> Path:
    """An empty HF cache with HF_HUB_OFFLINE on (the env var and the constant huggingface_hub read at import)."""
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("COREINFER_CACHE", str(tmp_path / "coreinfer"))
    monkeypatch.chdir(tmp_path)  # no relative path of a test's repo name exists here
    return cache


def hub_error(cls, message: str = "refused"):
    response = httpx.Response(404, request=httpx.Request("GET", "https://huggingface.co/api/models/owner/tiny"))
    return cls(message, response=response)


@pytest.mark.parametrize(
    "text, hub",
    [("owner/name", True), ("gpt2", True), ("Qwen/Qwen2.5-0.5B-Instruct", True), ("./model", False),
     ("/abs/model", False), ("~/model", False), ("a/b/c", False), ("model.gguf", False), ("a--b", False)],
)
def test_what_reads_as_a_hub_id(text, hub):
    assert is_hub_id(text) is hub


def test_hub_id_loads_offline_from_the_cache(offline_hub, tmp_path):
    cache_repo(offline_hub, "owner/tiny", model_files(tmp_path))
    engine = coreinfer.load("owner/tiny", device="cpu")
    assert engine.name == "owner/tiny"
    result = engine.generate("w5 w9 w3", None, SamplingConfig(max_new_tokens=4))
    assert result.new_tokens == 4 and result.text
    # The fingerprint is the name plus the weights' checksum: the same weights from a local directory
    # differ only in the name, other weights differ in the hash too.
    local = coreinfer.load(tmp_path / "saved-0", device="cpu")
    hub_print, local_print = model_fingerprint(engine), model_fingerprint(local)
    assert hub_print.startswith("owner--tiny-") and "/" not in hub_print
    assert hub_print.rsplit("-", 1)[1] == local_print.rsplit("-", 1)[1]
    save_tiny_model(tmp_path / "other", seed=1)
    other = coreinfer.load(tmp_path / "other", device="cpu")
    assert model_fingerprint(other).rsplit("-", 1)[1] != local_print.rsplit("-", 1)[1]


def test_a_local_path_wins_over_a_hub_id(offline_hub, tmp_path):
    save_tiny_model(tmp_path / "owner" / "tiny", seed=1)  # cwd is tmp_path: "owner/tiny" is this directory
    cache_repo(offline_hub, "owner/tiny", model_files(tmp_path, seed=0))
    source = resolve_model("owner/tiny")
    assert source.path == Path("owner/tiny") and source.name == "tiny"


def test_revision_is_honoured(offline_hub, tmp_path):
    cache_repo(offline_hub, "owner/tiny", model_files(tmp_path, seed=0))
    cache_repo(offline_hub, "owner/tiny", model_files(tmp_path, seed=1), commit=OTHER, ref="v1")
    main = coreinfer.load("owner/tiny", device="cpu")
    tagged = coreinfer.load("owner/tiny", device="cpu", revision="v1")
    by_commit = coreinfer.load("owner/tiny", device="cpu", revision=OTHER)
    assert tagged.name == "owner/tiny@v1"
    first = lambda engine: next(engine.model.parameters())  # noqa: E731
    assert not torch.equal(first(main), first(tagged))
    assert torch.equal(first(tagged), first(by_commit))


def test_missing_repo_offline_names_hf_hub_offline(offline_hub):
    with pytest.raises(ModelNotFound, match="HF_HUB_OFFLINE is set and owner/absent is not"):
        coreinfer.load("owner/absent", device="cpu")


def test_missing_revision_offline_names_the_revision(offline_hub, tmp_path):
    cache_repo(offline_hub, "owner/tiny", model_files(tmp_path))
    with pytest.raises(ModelNotFound, match=r"HF_HUB_OFFLINE is set and owner/tiny at revision 'v9'"):
        resolve_model("owner/tiny", revision="v9")


def test_unreachable_hub_without_offline_mode_says_so(offline_hub, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)

    def unreachable(*args, **kwargs):
        raise LocalEntryNotFoundError("connection refused")

    monkeypatch.setattr(loading, "snapshot_download", unreachable)
    with pytest.raises(ModelNotFound, match="could not reach the Hugging Face Hub"):
        resolve_model("owner/tiny")


@pytest.mark.parametrize(
    "error, message",
    [
        (RepositoryNotFoundError, "owner/tiny does not exist on the Hugging Face Hub"),
        (GatedRepoError, "owner/tiny is gated"),
        (RevisionNotFoundError, "owner/tiny exists but has no revision 'v9'"),
    ],
)
def test_hub_refusals_are_named(offline_hub, monkeypatch, error, message):
    def refuse(*args, **kwargs):
        raise hub_error(error)

    monkeypatch.setattr(loading, "snapshot_download", refuse)
    with pytest.raises(ModelNotFound, match=message):
        resolve_model("owner/tiny", revision="v9" if error is RevisionNotFoundError else None)


def test_only_transformers_weights_are_fetched(tmp_path, monkeypatch):
    # Config, tokenizer and model*.safetensors first; PyTorch pickles only where no safetensors came,
    # from the same commit. GGUF, ONNX and the like are never fetched for a directory load.
    snapshot = tmp_path / MAIN
    snapshot.mkdir()
    (snapshot / "config.json").write_text("{}")
    calls = []

    def download(repo_id, revision=None, allow_patterns=None):
        calls.append((revision, allow_patterns))
        if allow_patterns == loading.HUB_PICKLES:
            (snapshot / "pytorch_model.bin").write_bytes(b"")
        return str(snapshot)

    monkeypatch.setattr(loading, "snapshot_download", download)
    assert resolve_model("owner/old").path == snapshot
    assert calls == [(None, loading.HUB_SMALL_FILES + loading.HUB_SAFETENSORS), (MAIN, loading.HUB_PICKLES)]
    (snapshot / "model.safetensors").write_bytes(b"")
    calls.clear()
    resolve_model("owner/old", revision="v1")
    assert calls == [("v1", loading.HUB_SMALL_FILES + loading.HUB_SAFETENSORS)]


def test_gguf_only_repo_lists_its_files(offline_hub):
    cache_repo(offline_hub, "owner/tiny-GGUF", {"tiny-q4_0.gguf": b"GGUF0", "tiny-q8_0.gguf": b"GGUF8", "README.md": b"#"})
    with pytest.raises(ModelNotFound, match=r"GGUF files \(tiny-q4_0.gguf, tiny-q8_0.gguf\).*--gguf-file"):
        resolve_model("owner/tiny-GGUF")


def test_missing_gguf_file_is_named(offline_hub, monkeypatch):
    cache_repo(offline_hub, "owner/tiny-GGUF", {"tiny-q4_0.gguf": b"GGUF0"})
    with pytest.raises(ModelNotFound, match="HF_HUB_OFFLINE is set and tiny-q8_0.gguf of owner/tiny-GGUF"):
        resolve_model("owner/tiny-GGUF", gguf_file="tiny-q8_0.gguf")
    def no_such_file(*args, **kwargs):
        raise hub_error(RemoteEntryNotFoundError)

    monkeypatch.setattr(loading, "hf_hub_download", no_such_file)
    monkeypatch.setattr(loading.HfApi, "list_repo_files", lambda self, repo_id, revision=None: ["tiny-q4_0.gguf", "x.md"])
    with pytest.raises(ModelNotFound, match="has no file 'tiny-q8_0.gguf'; its GGUF files: tiny-q4_0.gguf"):
        resolve_model("owner/tiny-GGUF", gguf_file="tiny-q8_0.gguf")


@pytest.fixture
def fake_dequantise(monkeypatch):
    """GGUF 'dequantisation' that saves the tiny model, in float32 as the real one does; counts calls."""
    calls = []

    def dequantise(gguf, target):
        calls.append(gguf)
        save_tiny_model(target)

    monkeypatch.setattr(loading, "_dequantise_gguf", dequantise)
    return calls


def test_hub_gguf_goes_through_the_dequantised_cache(offline_hub, fake_dequantise):
    cache_repo(offline_hub, "owner/tiny-GGUF", {"tiny-q4_0.gguf": b"GGUF-A"})
    engine = coreinfer.load("owner/tiny-GGUF", gguf_file="tiny-q4_0.gguf", device="cpu", dtype="bfloat16")
    assert engine.name == "tiny-q4_0"  # the file names the model, as a local copy of it would
    assert {p.dtype for p in engine.model.parameters()} == {torch.bfloat16}
    assert engine.generate("w5 w9", None, SamplingConfig(max_new_tokens=3)).new_tokens == 3
    # The cache stays the float32 source; only the loaded model is cast.
    (entry,) = [p for p in loading.cache_root().iterdir() if p.name.startswith("tiny-q4_0-")]
    with safe_open(entry / "model.safetensors", "pt") as stored:
        assert {stored.get_slice(name).get_dtype() for name in stored.keys()} == {"F32"}


def test_hub_gguf_cache_key_follows_the_content(offline_hub, fake_dequantise):
    # The snapshot file resolves to its blob, named by the content's SHA-256: another commit with the
    # same file shares the cache entry, a changed file gets its own.
    first = cache_repo(offline_hub, "owner/tiny-GGUF", {"tiny.gguf": b"GGUF-A"})
    same = cache_repo(offline_hub, "owner/tiny-GGUF", {"tiny.gguf": b"GGUF-A"}, commit=OTHER, ref="same")
    changed = cache_repo(offline_hub, "owner/tiny-GGUF", {"tiny.gguf": b"GGUF-B"}, commit="c" * 40, ref="new")
    key = loading._gguf_cache_dir
    assert key(first / "tiny.gguf") == key(same / "tiny.gguf") != key(changed / "tiny.gguf")
    for revision in ("main", "same"):
        coreinfer.load("owner/tiny-GGUF", revision=revision, gguf_file="tiny.gguf", device="cpu")
    assert len(fake_dequantise) == 1


def test_revision_or_gguf_file_with_a_local_path_is_refused(tmp_path):
    save_tiny_model(tmp_path / "m")
    with pytest.raises(ModelNotFound, match="needs a Hugging Face Hub id"):
        resolve_model(tmp_path / "m", revision="main")
    with pytest.raises(ModelNotFound, match="gguf_file must name a .gguf"):
        resolve_model("owner/tiny", gguf_file="weights.bin")
    with pytest.raises(ModelNotFound, match="no model at"):
        resolve_model(tmp_path / "m", gguf_file="absent.gguf")


runner = CliRunner()


def test_cli_loads_a_hub_id_at_a_revision(offline_hub, tmp_path):
    cache_repo(offline_hub, "owner/tiny", model_files(tmp_path, seed=1), commit=OTHER, ref="v1")
    args = ["generate", "w5 w9 w3", "--json", "--dense", "--max-new-tokens", "3", "--device", "cpu"]
    result = runner.invoke(app, [*args, "--model", "owner/tiny", "--revision", "v1"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["model"] == "owner/tiny@v1"


def test_cli_offline_miss_is_a_one_line_error(offline_hub):
    result = runner.invoke(app, ["generate", "hi", "--model", "owner/absent"])
    assert result.exit_code == 2
    assert result.output.startswith("error: HF_HUB_OFFLINE is set") and "Traceback" not in result.output
