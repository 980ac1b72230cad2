"""The README and docs/ name only files that exist, and the README stays short (issue 22)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted((ROOT / "docs").glob("*.md"))


def _links(text: str) -> list[str]:
    """Markdown link and image targets, without anchors or external addresses."""
    targets = re.findall(r"\]\(([^)\s]+)\)", text)
    return [t.split("#")[0] for t in targets if not re.match(r"[a-z]+:", t) and t.split("#")[0]]


def test_every_docs_path_the_readme_names_exists():
    text = (ROOT / "README.md").read_text()
    named = set(re.findall(r"docs/[\w./-]+\w", text)) | set(_links(text))
    assert named, "the README links no docs"
    missing = sorted(p for p in named if not (ROOT / p).exists())
    assert not missing, f"README names missing files: {missing}"


def test_every_relative_link_in_docs_exists():
    missing = []
    for doc in DOCS:
        text = doc.read_text()
        missing += [f"{doc.name}: {t}" for t in _links(text) if not (doc.parent / t).exists()]
        # result files quoted by path (other projects' `docs/...` files are named too, so only ours)
        quoted = re.findall(r"`(docs/results/[\w./-]+\w)`", text)
        missing += [f"{doc.name}: {p}" for p in quoted if not (ROOT / p).exists()]
    assert not missing, f"broken links: {missing}"


def test_the_readme_links_every_topic_in_docs_and_stays_short():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 250
    unlinked = [d.name for d in DOCS if f"docs/{d.name}" not in text]
    assert not unlinked, f"docs the README does not link: {unlinked}"
