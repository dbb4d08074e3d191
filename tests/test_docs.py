"""The documentation stays true to the repository: no references to files that are not in it, no broken
relative links in README.md and docs/, and every command and preset the docs name exists.

Each checker is a plain function over text or paths, also run on planted bad input, so a checker that could
not fail would show.
"""
from __future__ import annotations

import argparse
import re
import subprocess
from pathlib import Path

import pytest

from reasonknee3d.cli import build_parser
from reasonknee3d.families import preset_names

ROOT = Path(__file__).resolve().parents[1]

# Spelled in pieces so that this file does not mention them itself.
FORBIDDEN = ("../" + "shared", "DESIGN" + ".md", "BENCH" + ".md")
"""Files outside the repository that nothing in it may point to."""

PENDING_LINK_TARGETS: set[str] = set()
"""Link targets written on another branch (the release-layout page). A link to one is accepted while the file
is absent here; once it exists it is checked like every other link. Remove an entry after the merge."""

_SKIP_DIRS = {".git", ".venv", "__pycache__", ".pytest_cache", ".hypothesis", "build", "dist", "demo_out", "runs"}
_FENCE_RE = re.compile(r"^(```|~~~).*?^\1", re.DOTALL | re.MULTILINE)
_INLINE_CODE_RE = re.compile(r"`[^`\n]*`")
_LINK_RE = re.compile(r"!?\[[^\]\n]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_HEADING_RE = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.MULTILINE)


def repository_files(root: Path = ROOT) -> list[Path]:
    """Files git tracks or would track (untracked, not ignored); every file outside build folders without git."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                             capture_output=True, check=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return [p for p in root.rglob("*") if p.is_file() and not _SKIP_DIRS & set(p.relative_to(root).parts)]
    return [root / name for name in out.decode().split("\0") if name and (root / name).is_file()]


def forbidden_mentions(paths: list[Path], root: Path = ROOT) -> list[str]:
    """``"relative/path: needle"`` for every file that contains one of ``FORBIDDEN`` (binary files included)."""
    needles = [n.encode() for n in FORBIDDEN]
    found = []
    for path in paths:
        data = path.read_bytes()
        found += [f"{path.relative_to(root)}: {n.decode()}" for n in needles if n in data]
    return found


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped (``-`` and ``_`` kept), spaces -> ``-``."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading anchors by its text
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(markdown: str) -> set[str]:
    """Anchors of every heading outside code fences (repeats get ``-1``, ``-2`` ... as on GitHub)."""
    seen: dict[str, int] = {}
    out = set()
    for heading in _HEADING_RE.findall(_FENCE_RE.sub("", markdown)):
        slug = github_slug(heading)
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def relative_links(markdown: str) -> list[str]:
    """Targets of the Markdown links and images outside code, except URLs (``scheme:``)."""
    text = _INLINE_CODE_RE.sub("", _FENCE_RE.sub("", markdown))
    return [t for t in _LINK_RE.findall(text) if not re.match(r"[A-Za-z][A-Za-z0-9+.-]*:", t)]


def broken_links(doc: Path, root: Path = ROOT, pending: set[str] = frozenset()) -> list[str]:
    """``"doc: target (why)"`` for each relative link of ``doc`` whose file or heading anchor does not exist."""
    bad = []
    for target in relative_links(doc.read_text(encoding="utf-8")):
        file_part, _, anchor = target.partition("#")
        dest = (doc.parent / file_part).resolve() if file_part else doc
        rel = dest.relative_to(root).as_posix() if dest.is_relative_to(root) else str(dest)
        if not dest.exists():
            if rel not in pending:
                bad.append(f"{doc.relative_to(root)}: {target} (no such file)")
            continue
        if anchor and dest.suffix == ".md" and anchor not in anchors(dest.read_text(encoding="utf-8")):
            bad.append(f"{doc.relative_to(root)}: {target} (no heading with anchor #{anchor} in {rel})")
    return bad


def table_commands(readme: str) -> list[str]:
    """Subcommands named in the first cell of the table under README's ``## Commands`` heading."""
    section = readme.split("\n## Commands", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `reasonknee3d ")]
    return [row.split("`reasonknee3d ", 1)[1].split()[0].rstrip("`") for row in rows]


def cli_commands() -> set[str]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return set(sub.choices)


def docs_pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


# --- the repository ---------------------------------------------------------------------------------------

def test_nothing_mentions_files_outside_the_repository() -> None:
    files = repository_files()
    assert ROOT / "README.md" in files and ROOT / "reasonknee3d" / "cli.py" in files
    assert forbidden_mentions(files) == []


def test_every_relative_link_in_readme_and_docs_exists() -> None:
    pages = docs_pages()
    assert {"design.md", "benchmark.md", "results.md"} <= {p.name for p in pages}
    bad = [msg for page in pages for msg in broken_links(page, pending=PENDING_LINK_TARGETS)]
    assert bad == []


def test_readme_links_every_docs_page() -> None:
    linked = {(ROOT / t.partition("#")[0]).resolve() for t in relative_links((ROOT / "README.md").read_text())}
    assert [p.name for p in sorted((ROOT / "docs").glob("*.md")) if p.resolve() not in linked] == []


def test_every_command_in_the_readme_table_exists() -> None:
    named = table_commands((ROOT / "README.md").read_text(encoding="utf-8"))
    assert len(named) >= 10
    assert sorted(set(named) - cli_commands()) == []


def test_every_named_preset_exists() -> None:
    """``--config NAME`` in the docs, the presets' own comments and the launch scripts names a shipped preset."""
    texts = [*docs_pages(), *(ROOT / "reasonknee3d" / "configs").glob("*.yaml"), *(ROOT / "scripts").glob("*.sh"),
             *(ROOT / "configs").glob("*.yaml")]
    named = {(p.relative_to(ROOT).as_posix(), m) for p in texts
             for m in re.findall(r"--config\s+([a-z][a-z0-9_.]*)", p.read_text(encoding="utf-8"))}
    assert len(named) >= 5
    presets = set(preset_names())
    assert sorted((where, n) for where, n in named if n.removesuffix(".yaml") not in presets) == []


# --- the checkers on planted input ------------------------------------------------------------------------

def test_forbidden_mentions_finds_a_planted_one(tmp_path: Path) -> None:
    (tmp_path / "ok.py").write_text("x = 1\n")
    (tmp_path / "bad.py").write_text(f"# see {FORBIDDEN[1]}\n")
    (tmp_path / "blob.bin").write_bytes(b"\x00\x01" + FORBIDDEN[0].encode() + b"\xff")
    found = forbidden_mentions(sorted(tmp_path.iterdir()), root=tmp_path)
    assert found == [f"bad.py: {FORBIDDEN[1]}", f"blob.bin: {FORBIDDEN[0]}"]


def test_broken_links_finds_missing_files_and_anchors(tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# Title\n\n## Box convention (v2)\n\n```\n## not a heading\n```\n")
    readme = tmp_path / "README.md"
    readme.write_text(
        "[ok](docs/a.md) [ok anchor](docs/a.md#box-convention-v2) [web](https://example.org/x.md)\n"
        "![pic](docs/missing.png) [gone](docs/gone.md) [bad anchor](docs/a.md#not-a-heading)\n"
        "[self](#title) `[in code](docs/nope.md)` [later](docs/later.md)\n"
        "```\n[in a fence](docs/nope.md)\n```\n")
    assert broken_links(readme, root=tmp_path, pending={"docs/later.md"}) == [
        "README.md: docs/missing.png (no such file)",
        "README.md: docs/gone.md (no such file)",
        "README.md: docs/a.md#not-a-heading (no heading with anchor #not-a-heading in docs/a.md)",
        "README.md: #title (no heading with anchor #title in README.md)",
    ]
    (tmp_path / "docs" / "later.md").write_text("# Later\n")
    assert broken_links(readme, root=tmp_path) == broken_links(readme, root=tmp_path, pending={"docs/later.md"})


@pytest.mark.parametrize("heading, slug", [
    ("Region look and the grade probe (2026-12-03)", "region-look-and-the-grade-probe-2026-12-03"),
    ("The import hook in `reasonknee3d/__init__.py`", "the-import-hook-in-reasonknee3d__init__py"),
    ("Why the real-size presets look as they do", "why-the-real-size-presets-look-as-they-do"),
])
def test_github_slug(heading: str, slug: str) -> None:
    assert github_slug(heading) == slug


def test_table_commands_reads_the_commands_section_only() -> None:
    readme = ("# x\n\n| `reasonknee3d nope` | outside |\n\n## Commands\n\n| command | does |\n|---|---|\n"
              "| `reasonknee3d score --out DIR` | scores |\n| `reasonknee3d frobnicate` | not a command |\n\n"
              "## Next\n\n| `reasonknee3d later` | outside |\n")
    named = table_commands(readme)
    assert named == ["score", "frobnicate"]
    assert sorted(set(named) - cli_commands()) == ["frobnicate"]
