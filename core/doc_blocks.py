"""Figures in the documentation rendered from committed files, never typed by hand.

A page holds a block between two marker lines (``<!-- name:begin (python -m pipelines.docs) -->``
... ``<!-- name:end -->``); a :class:`DocBlock` says which page, which committed files the block
is rendered from and how. ``python -m pipelines.docs`` rewrites every block, ``--check`` (and
the test suite) fails when a page and its files disagree. Sources are read through a
:class:`Sources`: the working tree when rendering, the commit alone when checking (``make run``
rewrites the working copies of the metrics, and a page quotes the committed run): commit a
re-measured file together with the pages rendered from it.
"""

from __future__ import annotations

import fnmatch
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

TOOL = "python -m pipelines.docs"


class Sources:
    """The files of the working tree under ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def text(self, relative: str) -> str | None:
        path = self.root / relative
        return path.read_text() if path.is_file() else None

    def glob(self, pattern: str) -> list[str]:
        return sorted(str(p.relative_to(self.root)) for p in self.root.glob(pattern) if p.is_file())

    def page(self, relative: str) -> str:
        """A page that holds blocks, as these sources see it."""
        return (self.root / relative).read_text()


class CommittedSources(Sources):
    """The files and pages of commit ``rev`` of the git repository at ``root``, and only those:
    the committed pages are checked against the committed files, never against what a user's run
    left in the working tree (``make run`` rewrites ``metrics/``; the smoke profile adds
    ``metrics/train/grit_paper.json``, which a glob would otherwise pick up, and rewrites the
    README's study lines). Outside a git repository, the working tree."""

    def __init__(self, root: Path, rev: str = "HEAD") -> None:
        super().__init__(root)
        self.rev = rev
        listed = subprocess.run(["git", "ls-tree", "-r", "--name-only", "--full-tree", rev], cwd=root,
                                capture_output=True, text=True)
        self.tracked = set(listed.stdout.splitlines()) if listed.returncode == 0 else None

    def text(self, relative: str) -> str | None:
        if self.tracked is None:
            return super().text(relative)
        if relative not in self.tracked:
            return None
        shown = subprocess.run(["git", "show", f"{self.rev}:{relative}"], cwd=self.root, capture_output=True,
                               text=True, check=True)
        return shown.stdout

    def glob(self, pattern: str) -> list[str]:
        if self.tracked is None:
            return super().glob(pattern)
        return sorted(name for name in self.tracked if fnmatch.fnmatchcase(name, pattern))

    def page(self, relative: str) -> str:
        """The committed page (a study sitting, or the smoke profile, rewrites the working copy's
        study lines); a page the commit does not hold yet, from the working tree."""
        return self.text(relative) or super().page(relative)


@dataclass(frozen=True)
class DocBlock:
    """One rendered block: ``page`` (relative to the repository root) holds it between the
    markers named ``name``; ``render`` builds its text from the sources."""

    name: str
    page: str
    render: Callable[[Sources], str]

    @property
    def begin(self) -> str:
        return f"<!-- {self.name}:begin ({TOOL}) -->"

    @property
    def end(self) -> str:
        return f"<!-- {self.name}:end -->"

    def current(self, page_text: str) -> str:
        """The block as ``page_text`` holds it now."""
        self._require_markers(page_text)
        return page_text.split(self.begin, 1)[1].split(self.end, 1)[0].strip("\n")

    def rendered_into(self, page_text: str, sources: Sources) -> str:
        """``page_text`` with this block rendered anew from ``sources``."""
        self._require_markers(page_text)
        head, rest = page_text.split(self.begin, 1)
        return f"{head}{self.begin}\n{self.render(sources)}\n{self.end}{rest.split(self.end, 1)[1]}"

    def _require_markers(self, page_text: str) -> None:
        if self.begin not in page_text or self.end not in page_text:
            raise ValueError(f"{self.page} has no {self.begin!r} ... {self.end!r} markers")


def render_pages(blocks: list[DocBlock], sources: Sources) -> dict[str, tuple[str, str]]:
    """page -> (its text now, its text with every block rendered), for the pages ``blocks`` name."""
    pages: dict[str, tuple[str, str]] = {}
    for block in blocks:
        now, wanted = pages.get(block.page, (None, None))
        if now is None:
            now = wanted = sources.page(block.page)
        pages[block.page] = (now, block.rendered_into(wanted, sources))
    return pages
