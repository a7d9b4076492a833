"""The documentation: the site builds strictly, and the README stays a first contact.

`mkdocs build --strict` fails on any warning: a link to a page or file that is not in docs/, an
anchor that no heading makes, a nav entry without its page (mkdocs.yml's `validation`).
"""

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
README_LIMIT = 15_000  # bytes: a few screens; everything else lives in docs/


@pytest.mark.skipif(
    importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("material") is None,
    reason="mkdocs-material is not installed (the [test] extra installs it)",
)
def test_docs_site_builds_strictly(tmp_path):
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert (tmp_path / "site" / "index.html").is_file()


def test_readme_fits_15_kb():
    size = README.stat().st_size
    assert size <= README_LIMIT, f"README.md is {size} bytes; move detail to a docs/ page"


def test_readme_starts_with_the_two_commands():
    lines = README.read_text().splitlines()
    assert lines[2] == "```bash"
    assert lines[3].startswith("pip install ") and "coreinfer generate" in lines[3]
    assert lines[4] == "python3 -m pytest -q"


def test_readme_relative_links_resolve():
    text = README.read_text()
    targets = re.findall(r"\]\(([^)\s]+)\)", text)
    relative = [t for t in targets if not re.match(r"[a-z][a-z0-9+.-]*:", t) and not t.startswith("#")]
    assert relative, "the README links to its docs pages"
    missing = [t for t in relative if not (ROOT / t.split("#", 1)[0]).exists()]
    assert not missing, f"README.md links to missing files: {missing}"
