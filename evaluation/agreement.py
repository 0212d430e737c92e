"""How far two serving engines agree on the same GGUF file, reply by reply (issue 64).

Ollama's vendored llama.cpp and llama-cpp-python decode the same file with the same greedy
options (``export.decoding``), yet their builds sum in different orders, so near-ties in the
logits can part their replies later on. Three readings, from strict to what the evaluation uses:

- ``same_opening``: the first ``opening_words`` words are equal (where a refusal is decided);
- ``same_reply``: the whole replies are equal (whitespace-normalised);
- ``same_verdict``: the refusal judge (``evaluation.refusals.judge``) reads both alike, and
  Cohen's kappa of the two verdict lists (agreement beyond chance).

``shared_words`` is the median length of the common word prefix: how long the engines agree
before a near-tie parts them.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from evaluation.judge_report import cohen_kappa
from evaluation.refusals import judge

OPENING_WORDS = 3


def words(reply: str) -> list[str]:
    return reply.split()


def shared_prefix(first: Sequence[str], second: Sequence[str]) -> int:
    """How many leading items two sequences share."""
    count = 0
    for a, b in zip(first, second, strict=False):
        if a != b:
            break
        count += 1
    return count


@dataclass(frozen=True)
class Agreement:
    replies: int
    same_opening: float          # share with equal first ``opening_words`` words
    same_reply: float            # share with equal whole replies
    same_verdict: float          # share the judge reads alike
    verdict_kappa: float         # Cohen's kappa of the two verdict lists
    shared_words: float          # median length of the common word prefix
    opening_words: int = OPENING_WORDS

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


def reply_agreement(first: Sequence[str], second: Sequence[str], opening_words: int = OPENING_WORDS) -> Agreement:
    """The agreement of two engines' replies to the same prompts, in the same order."""
    if len(first) != len(second) or not first:
        raise ValueError(f"reply_agreement needs two equal, non-empty lists (got {len(first)} and {len(second)})")
    split = [(words(a), words(b)) for a, b in zip(first, second, strict=True)]
    verdicts = [judge(a) for a in first], [judge(b) for b in second]
    n = len(split)
    return Agreement(
        replies=n,
        same_opening=sum(a[:opening_words] == b[:opening_words] for a, b in split) / n,
        same_reply=sum(a == b for a, b in split) / n,
        same_verdict=sum(a == b for a, b in zip(*verdicts, strict=True)) / n,
        verdict_kappa=cohen_kappa(*verdicts),
        shared_words=float(statistics.median(shared_prefix(a, b) for a, b in split)),
        opening_words=opening_words,
    )
