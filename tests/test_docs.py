"""The Sphinx docs build cleanly (needs ``pip install sphinx``; skipped without it)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # ~15 s of Sphinx
def test_docs_build_without_warnings_and_registry_pages_are_not_dicts_docstring(tmp_path):
    pytest.importorskip("sphinx")
    build = tmp_path / "html"
    generated = ROOT / "docs" / "generated"
    existed = generated.exists()
    cmd = [sys.executable, "-m", "sphinx", "-q", "-d", str(tmp_path / "doctrees")]
    proc = subprocess.run([*cmd, str(ROOT / "docs"), str(build)], capture_output=True, text=True)
    if not existed:  # autosummary writes its stubs into the source tree (git ignores them)
        shutil.rmtree(generated, ignore_errors=True)
    assert proc.returncode == 0, proc.stderr
    noise = [line for line in proc.stderr.splitlines() if "ERROR" in line or "FLOWS" in line]
    assert not noise, noise
    html = (build / "index.html").read_text()
    assert "dict() -&gt; new empty dictionary" not in html and "Names:" in html


def test_docs_build_output_is_ignored_by_git():
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    proc = subprocess.run(
        ["git", "check-ignore", "-q", "docs/generated/pyroflows.VAE.rst"], cwd=ROOT
    )
    assert proc.returncode == 0


@pytest.mark.parametrize("path", ["README.md", "docs/index.rst", "docs/conf.py"])
def test_user_docs_do_not_point_at_files_outside_the_repository(path):
    assert "shared/" not in (ROOT / path).read_text()
