"""Handing pages back: a mapped file's pages leave the resident set and come back unchanged."""

import sys

import numpy as np
import pytest

from coreinfer.process_memory import PageReleaser, release_file_pages

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps")


def test_a_read_only_mapping_is_released_and_reads_back_the_same(tmp_path):
    path = tmp_path / "weights.bin"
    values = np.random.default_rng(0).standard_normal(8 << 20).astype(np.float32)  # 32 MB
    values.tofile(path)
    mapped = np.memmap(path, dtype=np.float32, mode="r")
    total = float(mapped.sum())  # every page read
    assert release_file_pages(path) > 16 << 20
    assert release_file_pages(tmp_path / "other.bin") == 0  # another file: nothing
    assert float(mapped.sum()) == total and np.array_equal(mapped[:1000], values[:1000])


def test_the_releaser_waits_for_enough_bytes(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr("coreinfer.process_memory.release_file_pages", lambda where: calls.append(where) or 0)
    pages = PageReleaser(tmp_path, every=100)
    for _ in range(7):
        pages.read(40)
    assert calls == [tmp_path, tmp_path]  # after the 3rd and the 6th read (120 bytes each time), not after each
