"""The README is a short front door and the docs' links hold: files exist, #anchors name real headings.

Fast and offline: reads markdown only (no Ray, no synthaug import).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
MAX_README_LINES = 250

FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.M | re.S)
CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1", re.S)
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^ {0,3}#{1,6}[ \t]+(.+?)[ \t]*#*[ \t]*$", re.M)


def _prose(text: str) -> str:
    """The text without fenced code blocks and inline code, where brackets are not links."""
    return CODE_SPAN.sub("", FENCE.sub("", text))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lowercase, only letters, digits, spaces, '-' and '_', spaces to '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading anchors on its text
    text = text.replace("`", "").strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading's anchor in a markdown file; a repeated heading gets GitHub's -1, -2, ... suffixes."""
    seen: dict[str, int] = {}
    out = set()
    for m in HEADING.finditer(FENCE.sub("", path.read_text())):
        s = slug(m.group(1))
        n = seen.get(s, 0)
        seen[s] = n + 1
        out.add(s if n == 0 else f"{s}-{n}")
    return out


def links(path: Path) -> list[str]:
    return [m.group(1) for m in LINK.finditer(_prose(path.read_text()))]


def _local(target: str) -> bool:
    return not re.match(r"^(https?:|mailto:)", target, re.I)


def test_slug_is_githubs():
    assert slug("The study: k x subset draws x seeds") == "the-study-k-x-subset-draws-x-seeds"
    assert slug("Kubernetes (KubeRay RayJob)") == "kubernetes-kuberay-rayjob"
    assert slug("Image-to-image sampling (SDEdit)") == "image-to-image-sampling-sdedit"
    assert slug("The `synthaug run` command") == "the-synthaug-run-command"


def test_link_parser_skips_code():
    page = "see [a](a.md) and `[b](b.md)`\n\n```\n[c](c.md)\n```\n![img](d.png \"title\")\n"
    assert [m.group(1) for m in LINK.finditer(_prose(page))] == ["a.md", "d.png"]


def test_readme_is_short():
    n = len(README.read_text().splitlines())
    assert n <= MAX_README_LINES, f"README.md has {n} lines; move material to docs/ (at most {MAX_README_LINES})"


def test_every_page_has_links_to_check():
    assert len(PAGES) > 1, "docs/*.md is missing"
    readme_links = links(README)
    for page in PAGES[1:]:
        assert f"docs/{page.name}" in readme_links, f"README's docs index does not link docs/{page.name}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    bad = []
    for target in filter(_local, links(page)):
        file, _, anchor = target.partition("#")
        dest = (page.parent / file).resolve() if file else page
        if not dest.exists():
            bad.append(f"{target}: no {dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest}")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            bad.append(f"{target}: no heading with anchor #{anchor} in {dest.relative_to(ROOT)}")
    assert not bad, f"{page.relative_to(ROOT)}: broken links:\n" + "\n".join(bad)
