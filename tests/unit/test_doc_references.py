"""Every reference to a section of a document points at a heading that exists.

References: `§N` or `§N.M` (to docs/method.md, the one document with numbered sections, unless a `file.md`
stands right before it), and links `file.md#anchor` or `(#anchor)`, whose anchor is GitHub's slug of a
heading of the target. Read in the README, docs/, sql/ and migrations/ READMEs, deploy/ and the package's
source. A `[§N](file.md#anchor)` link must also name the same heading twice.
"""

import re
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
NUMBERED_DOCUMENT = ROOT / "docs" / "method.md"

SECTION = re.compile(r"(?:(?P<file>[\w./-]+\.md)\)?,?\s*)?§\s?(?P<number>\d+(?:\.\d+)*)")
LINK = re.compile(r"(?P<file>[\w./-]*\.md)?#(?P<anchor>[\w-]+)")
MARKDOWN_LOCAL_LINK = re.compile(r"\]\(#(?P<anchor>[\w-]+)\)")
SECTION_LINK = re.compile(r"§\s?(?P<number>\d+(?:\.\d+)*)\]\((?P<file>[\w./-]+\.md)#(?P<anchor>[\w-]+)\)")
HEADING = re.compile(r"^(#{1,6})\s+(?P<text>.+?)\s*#*\s*$")
HEADING_NUMBER = re.compile(r"^(?P<number>\d+(?:\.\d+)*)\.?\s")
FENCE = re.compile(r"^\s*(```|~~~)")


def referring_files() -> list[Path]:
    files = [ROOT / "README.md", ROOT / "sql" / "README.md", ROOT / "migrations" / "README.md"]
    files += sorted((ROOT / "docs").glob("*.md"))
    files += sorted(path for path in (ROOT / "deploy").rglob("*") if path.is_file())
    files += sorted(path for path in (ROOT / "icldaemon").rglob("*.py") if "__pycache__" not in path.parts)
    return files


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: markup dropped, lower case, punctuation removed, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps its text
    text = re.sub(r"[`*]|(?<!\w)_|_(?!\w)", "", text).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


@cache
def headings(path: Path) -> tuple[dict[str, str], set[str]]:
    """(section number -> its heading's anchor, every anchor) of a Markdown file."""
    numbers, anchors, seen = {}, set(), {}
    fenced = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        match = None if fenced else HEADING.match(line)
        if match is None:
            continue
        base = slug(match["text"])
        count = seen.get(base, 0)
        seen[base] = count + 1
        anchor = base if count == 0 else f"{base}-{count}"  # GitHub numbers a repeated heading's anchor
        anchors.add(anchor)
        number = HEADING_NUMBER.match(match["text"])
        if number:
            numbers[number["number"]] = anchor
    return numbers, anchors


def target(referrer: Path, name: str | None) -> Path | None:
    """The Markdown file a reference names: beside the referrer, from the repository root, or in docs/."""
    if not name:
        return referrer
    for base in (referrer.parent, ROOT, ROOT / "docs"):
        candidate = (base / name).resolve()
        if candidate.is_file():
            return candidate
    return None


def where(path: Path, text: str, offset: int) -> str:
    name = path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else path.name
    return f"{name}:{text.count(chr(10), 0, offset) + 1}"


def broken_references(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8")
    broken = []
    for match in SECTION.finditer(text):
        document = target(path, match["file"]) if match["file"] else NUMBERED_DOCUMENT
        if document is None:
            broken.append(f"{where(path, text, match.start())}: §{match['number']} of missing {match['file']}")
        elif match["number"] not in headings(document)[0]:
            broken.append(f"{where(path, text, match.start())}: {document.name} has no §{match['number']}")
    links = [(match.start(), match["file"], match["anchor"]) for match in LINK.finditer(text) if match["file"]]
    if path.suffix == ".md":
        links += [(match.start(), None, match["anchor"]) for match in MARKDOWN_LOCAL_LINK.finditer(text)]
    for offset, name, anchor in links:
        document = target(path, name)
        if document is None:
            broken.append(f"{where(path, text, offset)}: {name} does not exist")
        elif anchor not in headings(document)[1]:
            broken.append(f"{where(path, text, offset)}: {document.name} has no heading #{anchor}")
    for match in SECTION_LINK.finditer(text):
        document = target(path, match["file"])
        expected = headings(document)[0].get(match["number"]) if document else None
        if expected is not None and expected != match["anchor"]:
            broken.append(f"{where(path, text, match.start())}: §{match['number']} is #{expected}, "
                          f"the link goes to #{match['anchor']}")
    return broken


def test_the_walk_sees_the_references():
    files = referring_files()
    assert ROOT / "README.md" in files and ROOT / "icldaemon" / "columns.py" in files
    texts = [path.read_text(encoding="utf-8") for path in files]
    assert sum(len(SECTION.findall(text)) for text in texts) > 30
    assert sum(1 for text in texts for match in LINK.finditer(text) if match["file"]) > 5


def test_slug_is_githubs():
    assert slug("7. Consolidation: from patches to a LoRA adapter that says the fact") == (
        "7-consolidation-from-patches-to-a-lora-adapter-that-says-the-fact")
    assert slug("7.2 The fit") == "72-the-fit"
    assert slug("Views: schema `icl_analytics`") == "views-schema-icl_analytics"
    assert slug("Step by step, from the command line") == "step-by-step-from-the-command-line"
    assert slug("8. Hybrid models: attention and a Mamba2 mixer") == "8-hybrid-models-attention-and-a-mamba2-mixer"


def test_a_broken_reference_is_found(tmp_path):
    referrer = tmp_path / "notes.md"
    referrer.write_text("See docs/method.md §9.9, [§3](method.md#5-method-versions), (method.md#no-such-heading)"
                        " and [here](#nowhere).\n\n# Here\n", encoding="utf-8")
    found = broken_references(referrer)
    assert len(found) == 4, found
    assert "§9.9" in found[0] and "#no-such-heading" in found[1] and "#nowhere" in found[2]
    assert "§3 is #3-per-token-dynamics" in found[3]


@pytest.mark.parametrize("path", referring_files(), ids=lambda path: path.relative_to(ROOT).as_posix())
def test_every_section_reference_names_an_existing_heading(path):
    assert broken_references(path) == []
