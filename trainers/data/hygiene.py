"""Data hygiene as small pure functions: normalisation, duplicates and the held-out guarantee."""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Iterable, Sequence
from typing import TypeVar

T = TypeVar("T")
_NON_WORD = re.compile(r"[^0-9a-z]+")


def normalise(text: str) -> str:
    """Case-, accent- and punctuation-insensitive form used for every comparison."""
    decomposed = unicodedata.normalize("NFKD", text.casefold())
    ascii_only = "".join(ch for ch in decomposed if not unicodedata.combining(ch))
    return _NON_WORD.sub(" ", ascii_only).strip()


def shingles(text: str, width: int = 3) -> frozenset[str]:
    """Word ``width``-grams of the normalised text (the words themselves for short texts)."""
    words = normalise(text).split()
    if len(words) < width:
        return frozenset(words)
    return frozenset(" ".join(words[i:i + width]) for i in range(len(words) - width + 1))


def jaccard(a: frozenset[str], b: frozenset[str]) -> float:
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)


def drop_exact_duplicates(items: Sequence[T], key: Callable[[T], str]) -> tuple[list[T], int]:
    """Keep the first item of each normalised text; returns (kept, number dropped)."""
    seen: set[str] = set()
    kept = []
    for item in items:
        norm = normalise(key(item))
        if norm and norm not in seen:
            seen.add(norm)
            kept.append(item)
    return kept, len(items) - len(kept)


class ShingleIndex:
    """Shingle sets with an inverted index: only texts sharing a shingle are compared, which is
    exact for any threshold > 0 (Jaccard is 0 without a shared shingle) and keeps the check
    near-linear instead of all-pairs."""

    def __init__(self) -> None:
        self._sets: list[frozenset[str]] = []
        self._postings: dict[str, list[int]] = {}

    def add(self, text_shingles: frozenset[str]) -> None:
        for shingle in text_shingles:
            self._postings.setdefault(shingle, []).append(len(self._sets))
        self._sets.append(text_shingles)

    def max_similarity(self, text_shingles: frozenset[str]) -> float:
        candidates = {i for shingle in text_shingles for i in self._postings.get(shingle, ())}
        return max((jaccard(text_shingles, self._sets[i]) for i in candidates), default=0.0)


def drop_near_duplicates(
    items: Sequence[T], key: Callable[[T], str], threshold: float,
) -> tuple[list[T], int]:
    """Greedy: keep an item unless its shingle Jaccard with a kept item is >= ``threshold``."""
    kept: list[T] = []
    index = ShingleIndex()
    for item in items:
        current = shingles(key(item))
        if index.max_similarity(current) >= threshold:
            continue
        kept.append(item)
        index.add(current)
    return kept, len(items) - len(kept)


def drop_near_matches(
    items: Sequence[T], key: Callable[[T], str], reference: Iterable[str], threshold: float,
) -> tuple[list[T], int]:
    """Drop items too close to any ``reference`` text (keeps evaluation prompts held out)."""
    index = ShingleIndex()
    reference_exact = set()
    for text in reference:
        index.add(shingles(text))
        reference_exact.add(normalise(text))
    kept = [
        item for item in items
        if normalise(key(item)) not in reference_exact
        and index.max_similarity(shingles(key(item))) < threshold
    ]
    return kept, len(items) - len(kept)


def leaked(train_texts: Iterable[str], eval_texts: Iterable[str]) -> list[str]:
    """Evaluation texts whose normalised form also appears in training (must be empty)."""
    train = {normalise(text) for text in train_texts}
    return sorted({text for text in eval_texts if normalise(text) in train})
