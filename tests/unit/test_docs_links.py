"""Every relative link in the README, docs/ and the other root pages leads somewhere.

A link to a file must name a file or folder of the repository (never outside it), and a
`#anchor` into a Markdown page must name one of its headings, spelled as GitHub spells them.
Links inside code (fenced blocks, `spans`) are not links and are skipped.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

REPO = Path(__file__).resolve().parents[2]
PAGES = [
    REPO / "README.md",
    REPO / "CONTRIBUTING.md",
    REPO / "SECURITY.md",
    REPO / "CHANGELOG.md",
    *sorted((REPO / "docs").glob("*.md")),
]

FENCE = re.compile(r"^\s*(```|~~~)")
CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1")
INLINE_LINK = re.compile(r"!?\[(?:[^\]\\]|\\.)*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_LINK = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+\".*\")?\s*$")
HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks, with inline code spans blanked."""
    out: list[str] = []
    fence: str | None = None
    for line in text.splitlines():
        match = FENCE.match(line)
        if match:
            if fence is None:
                fence = match[1]
            elif match[1] == fence:
                fence = None
            continue
        if fence is None:
            out.append(CODE_SPAN.sub("", line))
    return out


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup dropped, lower case, punctuation out, spaces to -."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps its text
    text = text.replace("`", "").strip().lower()
    text = "".join(c for c in text if c.isalnum() or c in " -_")
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every heading anchor of a Markdown page; a repeated heading gets -1, -2, ... as on GitHub."""
    seen: dict[str, int] = {}
    out: set[str] = set()
    for line in prose_lines(page.read_text(encoding="utf-8")):
        match = HEADING.match(line)
        if match is None:
            continue
        base = slug(match[2])
        count = seen.get(base, 0)
        seen[base] = count + 1
        out.add(base if count == 0 else f"{base}-{count}")
    return out


def links(page: Path) -> list[str]:
    """The relative link targets of a page (external URLs left out)."""
    targets: list[str] = []
    for line in prose_lines(page.read_text(encoding="utf-8")):
        targets += INLINE_LINK.findall(line)
        ref = REFERENCE_LINK.match(line)
        if ref:
            targets.append(ref[1])
    return [t for t in targets if not SCHEME.match(t)]


def broken(page: Path, repo: Path = REPO) -> list[str]:
    """Why each bad link of `page` is bad, one line per link."""
    problems: list[str] = []
    for target in links(page):
        path_part, _, anchor = target.partition("#")
        dest = (page.parent / unquote(path_part)).resolve() if path_part else page
        where = f"{page.relative_to(repo)}: ({target})"
        if not dest.is_relative_to(repo.resolve()):
            problems.append(f"{where} points outside the repository")
        elif not dest.exists():
            problems.append(f"{where}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            problems.append(f"{where}: {dest.name} has no heading with anchor #{anchor}")
    return problems


def test_the_pages_exist() -> None:
    missing = [p.name for p in PAGES if not p.is_file()]
    assert missing == []
    assert len(PAGES) > 5, "docs/ has no pages"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves(page: Path) -> None:
    assert broken(page) == []


def test_slugs_as_github_spells_them() -> None:
    assert slug("Checking it: `make test`") == "checking-it-make-test"
    assert slug("Mosquitto in production") == "mosquitto-in-production"
    assert slug("Sensor models fitted to real data") == "sensor-models-fitted-to-real-data"
    assert slug("What amqtt 0.12.1 does not") == "what-amqtt-0121-does-not"


def test_a_broken_link_is_caught(tmp_path: Path) -> None:
    (tmp_path / "other.md").write_text("# Other\n\n## Same\n\n## Same\n")
    page = tmp_path / "page.md"
    page.write_text(
        "# Page\n\n[ok](other.md#same-1) [ok](#page) [web](https://example.org/x)\n"
        "[gone](missing.md) [no anchor](other.md#nowhere) [self](#nowhere-here)\n"
        "[out](../outside.md) `[code](not-a-link.md)`\n\n```\n[fenced](not-a-link.md)\n```\n"
        "[ref]: missing-too.md\n"
    )
    problems = broken(page, repo=tmp_path)
    assert [p.split(": (")[1].split(")")[0] for p in problems] == [
        "missing.md",
        "other.md#nowhere",
        "#nowhere-here",
        "../outside.md",
        "missing-too.md",
    ]
