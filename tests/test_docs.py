"""The documentation site builds without a warning, its recipe reference is generated from the
code, and the README's links lead somewhere.

``mkdocs build --strict`` (mkdocs.yml) turns every warning into a failure: a broken link or
anchor between pages, a page left out of the navigation, a docstring mkdocstrings cannot read.
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from nt_dist.config import Recipe

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    pytest.importorskip("mkdocs", reason="the docs extra is not installed: pip install -e '.[docs]'")
    out = tmp_path_factory.mktemp("site")
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=REPO,
                          env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stdout}\n{proc.stderr}"
    return out


def test_the_site_builds_strict(site: Path):
    for page in ("index.html", "getting-started/index.html", "errors/index.html", "api/config/index.html",
                 "architecture/index.html", "benchmark-results/index.html"):
        assert (site / page).is_file(), page


def test_the_recipe_reference_lists_every_key_of_every_section(site: Path):
    assert not (REPO / "docs" / "recipe-reference.md").exists(), "the reference is generated, not written"
    page = (site / "recipe-reference" / "index.html").read_text(encoding="utf-8")
    for section, cls in typing.get_type_hints(Recipe).items():
        assert f"<code>{section}</code>" in page, f"section {section} has no heading"
        missing = [f.name for f in dataclasses.fields(cls) if f"<code>{section}.{f.name}</code>" not in page]
        assert not missing, f"recipe reference, section {section}: {missing}"


def test_the_api_reference_renders_the_docstrings(site: Path):
    page = (site / "api" / "errors" / "index.html").read_text(encoding="utf-8")
    assert "UserError" in page and "A mistake in a recipe" in page
    assert ":class:" not in page  # reStructuredText roles are rendered as code (docs/hooks/griffe_rst.py)


def test_every_relative_link_in_the_readme_exists():
    text = (REPO / "README.md").read_text(encoding="utf-8")
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    assert links, "the README links to no page"
    relative = [link for link in links if not re.match(r"[a-z]+:|#", link)]
    assert any(link.startswith("docs/") for link in relative), "the README has no map of the docs"
    missing = [link for link in relative if not (REPO / link.split("#", 1)[0]).exists()]
    assert not missing, f"README.md links to files that do not exist: {missing}"


def test_the_readme_stays_short():
    assert len((REPO / "README.md").read_bytes()) <= 10_000, "move detail into docs/"
