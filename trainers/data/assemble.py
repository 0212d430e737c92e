"""Assemble the training set and the held-out evaluation sets from loaded sources.

Pure functions over lists (no file I/O), so each rule is testable on a handful of rows:
deterministic seeded sampling, exact then near-duplicate removal, removal of anything close to
an evaluation prompt, length filtering under the chat template, and a deterministic split.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from trainers.data.config import DataParams
from trainers.data.formatting import fit_to_length
from trainers.data.hygiene import drop_exact_duplicates, drop_near_duplicates, drop_near_matches, leaked
from trainers.data.refusals import refusal_for
from trainers.data.sources import AqiPair, FactPair, Prompt


@dataclass(frozen=True)
class EvalSets:
    aqi: list[dict]
    overrefusal: list[dict]
    facts: list[dict]

    def prompts(self) -> list[str]:
        """Every evaluation text that training must never contain."""
        facts = [text for row in self.facts for text in (row["true"], row["false"]) if text]
        return [r["prompt"] for r in self.aqi] + [r["prompt"] for r in self.overrefusal] + facts


@dataclass
class SelectionReport:
    """Counts of what each filtering step removed, per kind of example (for the manifest)."""

    counts: Counter = field(default_factory=Counter)

    def add(self, key: str, n: int) -> None:
        self.counts[key] += n


def aqi_rows_from_pairs(pairs: Sequence[AqiPair]) -> list[dict]:
    rows = []
    for pair in sorted(pairs, key=lambda p: p.id):
        for label, text in (("harmful", pair.harmful), ("benign", pair.benign)):
            rows.append({"id": f"{pair.id}/{label}", "pair_id": pair.id, "label": label,
                         "domain": pair.domain, "prompt": text})
    return rows


def aqi_rows_from_labelled(unsafe: Sequence[Prompt], safe: Sequence[Prompt]) -> list[dict]:
    return [{"id": p.id, "pair_id": None, "label": label, "domain": "", "prompt": p.text}
            for label, group in (("harmful", unsafe), ("benign", safe)) for p in group]


def build_eval_sets(aqi: list[dict], overrefusal: Sequence[Prompt], facts: Sequence[FactPair]) -> EvalSets:
    over_rows = [{"id": p.id, "category": p.group or "", "prompt": p.text}
                 for p in sorted(overrefusal, key=lambda p: p.id)]
    fact_rows = [{"id": f.id, "source": f.source, "true": f.true, "false": f.false}
                 for f in sorted(facts, key=lambda f: f.id)]
    return EvalSets(aqi=aqi, overrefusal=over_rows, facts=fact_rows)


def select_prompts(
    prompts: Sequence[Prompt], cap: int, seed: int, threshold: float, held_out: Sequence[str],
    kind: str, report: SelectionReport,
) -> list[Prompt]:
    """Dedupe (exact, then near), drop anything close to ``held_out``, then sample ``cap``."""
    ordered = sorted(prompts, key=lambda p: p.id)  # source order must not depend on file listing
    report.add(f"{kind}_available", len(ordered))
    unique, n = drop_exact_duplicates(ordered, key=lambda p: p.text)
    report.add(f"{kind}_dropped_exact_duplicates", n)
    unique, n = drop_near_duplicates(unique, key=lambda p: p.text, threshold=threshold)
    report.add(f"{kind}_dropped_near_duplicates", n)
    unique, n = drop_near_matches(unique, key=lambda p: p.text, reference=held_out, threshold=threshold)
    report.add(f"{kind}_dropped_close_to_evaluation", n)
    rng = random.Random(f"{seed}:{kind}")
    return sorted(rng.sample(unique, min(cap, len(unique))), key=lambda p: p.id)


def answer_examples(
    harmful: Sequence[Prompt], benign: Sequence[Prompt], benign_answer: Callable[[list[Prompt]], list[str]],
    seed: int,
) -> list[dict]:
    """Harmful prompts get a refusal; benign ones the answers ``benign_answer`` returns."""
    rows = [{"id": p.id, "source": p.source, "kind": "harmful", "prompt": p.text,
             "response": refusal_for(p.id, seed)} for p in harmful]
    answers = benign_answer(list(benign))
    rows += [{"id": p.id, "source": p.source, "kind": "benign", "prompt": p.text, "response": a}
             for p, a in zip(benign, answers, strict=True)]
    return rows


def fit_examples(rows: Sequence[dict], tokenizer, data: DataParams, report: SelectionReport) -> list[dict]:
    """Keep examples that fit ``max_seq_length`` (see ``data.overlong``), with token counts."""
    kept = []
    for row in rows:
        if not row["response"].strip():
            report.add("dropped_empty_response", 1)
            continue
        fitted = fit_to_length(tokenizer, row["prompt"], row["response"], data.max_seq_length, data.overlong)
        if fitted is None:
            report.add("dropped_overlong", 1)
            continue
        example, prompt = fitted
        if prompt != row["prompt"]:
            report.add("truncated_prompt", 1)
        kept.append({**row, "prompt": prompt, "n_tokens": len(example.input_ids),
                     "n_response_tokens": len(example.input_ids) - example.prompt_length})
    return kept


def split(rows: Sequence[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Deterministic train/validation split, stratified by kind so both keep the same mix."""
    train, validation = [], []
    for kind in sorted({r["kind"] for r in rows}):
        group = sorted((r for r in rows if r["kind"] == kind), key=lambda r: r["id"])
        random.Random(f"{seed}:split:{kind}").shuffle(group)
        n_val = round(len(group) * fraction)
        validation += group[:n_val]
        train += group[n_val:]
    rng = random.Random(f"{seed}:order")
    rng.shuffle(train)
    return train, sorted(validation, key=lambda r: r["id"])


def check_held_out(train_rows: Sequence[dict], eval_sets: EvalSets) -> list[str]:
    """Evaluation prompts that appear (normalised) in training; the stage fails if any."""
    return leaked([r["prompt"] for r in train_rows], eval_sets.prompts())
