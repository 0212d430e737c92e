"""The refusal judge against the hand-labelled replies: precision and recall per model.

    python -m evaluation.judge_report            # print the table and rewrite it in docs/refusal-judge.md
    python -m evaluation.judge_report --check    # exit 1 when the docs table is stale

The labelled set and its rule: docs/refusal-judge.md. Precision and recall are of *decline*
(the refusal rate's verdict), per model, over all its labelled replies and over the held-out
half (replies to odd-numbered prompts, which the judge was not tuned on).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from evaluation.refusals import VERDICTS, judge

LABELLED = Path("tests/evaluation/data/judged_replies.jsonl")
DOC = Path("docs/refusal-judge.md")
BEGIN, END = "<!-- judge:begin -->", "<!-- judge:end -->"


@dataclass(frozen=True)
class Scores:
    n: int
    declines: int           # labelled decline
    precision: float        # of the judge's declines, labelled decline (1.0 when it names none)
    recall: float           # of labelled declines, named decline (1.0 when there are none)
    accuracy: float         # all three verdicts
    nonanswers: int = 0     # labelled decline or deflect
    nonanswer_precision: float = 1.0
    nonanswer_recall: float = 1.0


def _precision_recall(verdicts: list[bool], labels: list[bool]) -> tuple[float, float]:
    hits = sum(v and t for v, t in zip(verdicts, labels, strict=True))
    return hits / sum(verdicts) if any(verdicts) else 1.0, hits / sum(labels) if any(labels) else 1.0


def scores(rows: list[dict], verdicts: list[str]) -> Scores:
    """Precision and recall of *decline* and of *decline or deflect*, and three-way accuracy, of
    ``verdicts`` against the labels of ``rows``."""
    labels = [r["label"] for r in rows]
    precision, recall = _precision_recall([v == "decline" for v in verdicts], [t == "decline" for t in labels])
    non_p, non_r = _precision_recall([v != "comply" for v in verdicts], [t != "comply" for t in labels])
    agree = sum(v == t for v, t in zip(verdicts, labels, strict=True))
    return Scores(len(rows), labels.count("decline"), precision, recall, agree / len(rows) if rows else 1.0,
                  sum(t != "comply" for t in labels), non_p, non_r)


def read_labelled(path: Path = LABELLED) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    bad = [r for r in rows if r.get("label") not in VERDICTS]
    if bad:
        raise ValueError(f"{path}: label must be one of {VERDICTS}, got {bad[0].get('label')!r} ({bad[0].get('id')})")
    return rows


def per_model(rows: list[dict], held_out_only: bool = False) -> dict[str, Scores]:
    out = {}
    for model in sorted({r["model"] for r in rows}):
        mine = [r for r in rows if r["model"] == model and (not held_out_only or r["split"] == "held_out")]
        out[model] = scores(mine, [judge(r["reply"]) for r in mine])
    return out


def cohen_kappa(first: list[str], second: list[str]) -> float:
    """Agreement of two readers beyond chance."""
    n = len(first)
    observed = sum(a == b for a, b in zip(first, second, strict=True)) / n
    expected = sum(first.count(v) * second.count(v) for v in VERDICTS) / n ** 2
    return (observed - expected) / (1 - expected) if expected < 1 else 1.0


def table(rows: list[dict]) -> str:
    everything, held_out = per_model(rows), per_model(rows, held_out_only=True)
    lines = ["| model | replies | labelled declines | decline precision | decline recall | held-out precision | "
             "held-out recall | labelled non-answers | non-answer precision | non-answer recall | 3-way accuracy |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for model, s in everything.items():
        h = held_out[model]
        lines.append(f"| {model} | {s.n} | {s.declines} | {s.precision:.2f} | {s.recall:.2f} | {h.precision:.2f} | "
                     f"{h.recall:.2f} | {s.nonanswers} | {s.nonanswer_precision:.2f} | {s.nonanswer_recall:.2f} | "
                     f"{s.accuracy:.2f} |")
    readers = [r for r in rows if r.get("labels")]
    if readers:
        names = sorted(readers[0]["labels"])
        kappa = cohen_kappa([r["labels"][names[0]] for r in readers], [r["labels"][names[1]] for r in readers])
        agree = sum(r["labels"][names[0]] == r["labels"][names[1]] for r in readers)
        lines.append("")
        lines.append(f"The two readers agreed on {agree} of the {len(readers)} replies (Cohen's kappa "
                     f"{kappa:.2f}) before the disagreements were settled.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m evaluation.judge_report", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args(argv)
    block = table(read_labelled())
    doc = DOC.read_text()
    head, rest = doc.split(BEGIN, 1)
    wanted = f"{head}{BEGIN}\n{block}\n{END}{rest.split(END, 1)[1]}"
    if args.check:
        if wanted != doc:
            print(f"{DOC}'s table differs from {LABELLED}; run python -m evaluation.judge_report", file=sys.stderr)
            return 1
        return 0
    DOC.write_text(wanted)
    print(block)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
