"""The documentation: settings generated from the code, and every relative link resolves."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from service.settings import settings_markdown

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def test_settings_doc_is_the_generated_one():
    assert (ROOT / "docs" / "settings.md").read_text() == settings_markdown(), "run make docs"


def anchors(doc: Path) -> set[str]:
    """GitHub's anchors of a Markdown file's headings (lower case, punctuation dropped)."""
    headings = re.findall(r"^#+ (.+)$", doc.read_text(), re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_relative_link_resolves(doc):
    text = doc.read_text()
    targets = [t for t in LINK.findall(text) if not re.match(r"^[a-z]+:", t)]
    missing = [t for t in targets if not (doc.parent / t.split("#")[0]).exists()]
    assert not missing, missing
    for target in (t for t in targets if "#" in t):
        path, anchor = target.split("#", 1)
        file = doc.parent / path if path else doc
        if file.suffix == ".md":
            assert anchor in anchors(file), f"{target}: no heading with that anchor"


def test_the_readme_stays_short_and_links_every_doc():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 260
    for doc in DOCS[1:]:
        assert f"](docs/{doc.name})" in readme, doc.name
