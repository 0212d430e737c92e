"""Assemble the training set and the held-out evaluation sets from loaded sources.

Pure functions over lists (no file I/O), so each rule is testable on a handful of rows:
deterministic seeded sampling, exact then near-duplicate removal, removal of anything close to
an evaluation prompt, length filtering under the chat template, and a deterministic split.
"""

from __future__ import annotations

import difflib
import random
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from trainers.data.config import DataParams
from trainers.data.formatting import fit_to_length
from trainers.data.hygiene import drop_exact_duplicates, drop_near_duplicates, drop_near_matches, leaked, normalise
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
    fact_rows = interleave_by_source([{"id": f.id, "source": f.source, "true": f.true, "false": f.false}
                                      for f in sorted(facts, key=lambda f: f.id)])
    return EvalSets(aqi=aqi, overrefusal=over_rows, facts=fact_rows)


def word_similarity(a: str, b: str) -> float:
    """difflib's ratio over the normalised words: 1 for the same sentence, high for a sentence
    with one phrase swapped ("... the largest ocean" / "... the smallest ocean")."""
    return difflib.SequenceMatcher(None, normalise(a).split(), normalise(b).split(), autojunk=False).ratio()


def pair_statements(statements: Sequence[FactPair], min_similarity: float = 0.75) -> list[FactPair]:
    """Unpaired true and false statements (lmdoctor's facts) matched one-to-one into minimal
    pairs, most similar first, so retention compares two versions of one sentence and not two
    sentences of different difficulty. Pairs below ``min_similarity`` are left out, and so is
    a sentence that appears with both labels (the source is inconsistent about it); a sentence
    listed twice is used once."""
    true, _ = drop_exact_duplicates([f for f in statements if f.true and not f.false], key=lambda f: f.true)
    false, _ = drop_exact_duplicates([f for f in statements if f.false and not f.true], key=lambda f: f.false)
    both = {normalise(f.true) for f in true} & {normalise(f.false) for f in false}
    true = [f for f in true if normalise(f.true) not in both]
    false = [f for f in false if normalise(f.false) not in both]
    candidates = sorted(((word_similarity(t.true, f.false), i, j) for i, t in enumerate(true)
                         for j, f in enumerate(false)), key=lambda c: (-c[0], c[1], c[2]))
    used_true, used_false, pairs = set(), set(), []
    for similarity, i, j in candidates:
        if similarity < min_similarity:
            break
        if i in used_true or j in used_false:
            continue
        used_true.add(i)
        used_false.add(j)
        t, f = true[i], false[j]
        pairs.append(FactPair(id=f"{t.id}+{f.id.rsplit('/', 1)[-1]}", source=t.source, true=t.true, false=f.false))
    return sorted(pairs, key=lambda p: p.id)


def interleave_by_source(rows: Sequence[dict]) -> list[dict]:
    """Rows of several sources alternated (round robin, each source in its own order), so that
    the first N rows of an evaluation file draw on every source."""
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(row["source"], []).append(row)
    ordered = [groups[name] for name in sorted(groups)]
    return [group[i] for i in range(max(map(len, ordered), default=0)) for group in ordered if i < len(group)]


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


def harmful_requests(prompts: Sequence[Prompt], donotanswer_areas: Sequence[str]) -> list[Prompt]:
    """The prompts that ask for harmful help: every HarmBench behaviour, and Do-Not-Answer items
    of the chosen risk areas only (``DataParams.donotanswer_areas`` says why)."""
    return [p for p in prompts if p.source != "donotanswer" or p.group in donotanswer_areas]


def answer_examples(
    harmful: Sequence[Prompt], benign: Sequence[Prompt],
    benign_answer: Callable[[list[Prompt]], list[str | None]], seed: int,
) -> list[dict]:
    """Harmful prompts get a refusal; benign ones the answers ``benign_answer`` returns (a
    prompt whose answer is None, one the model could not finish, is left out)."""
    rows = [{"id": p.id, "source": p.source, "kind": "harmful", "prompt": p.text,
             "response": refusal_for(p.id, seed)} for p in harmful]
    answers = benign_answer(list(benign))
    rows += [{"id": p.id, "source": p.source, "kind": "benign", "prompt": p.text, "response": a}
             for p, a in zip(benign, answers, strict=True) if a is not None]
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


def split(rows: Sequence[dict], fraction: float, seed: int,
          test_fraction: float = 0.0) -> tuple[list[dict], list[dict], list[dict]]:
    """Deterministic train/validation/test split, stratified by kind so all keep the same mix.
    The test share comes after the validation share of the same shuffle, so a test split of 0
    leaves train and validation exactly as without one."""
    train, validation, test = [], [], []
    for kind in sorted({r["kind"] for r in rows}):
        group = sorted((r for r in rows if r["kind"] == kind), key=lambda r: r["id"])
        random.Random(f"{seed}:split:{kind}").shuffle(group)
        n_val, n_test = round(len(group) * fraction), round(len(group) * test_fraction)
        validation += group[:n_val]
        test += group[n_val:n_val + n_test]
        train += group[n_val + n_test:]
    rng = random.Random(f"{seed}:order")
    rng.shuffle(train)
    return train, sorted(validation, key=lambda r: r["id"]), sorted(test, key=lambda r: r["id"])


def check_held_out(train_rows: Sequence[dict], eval_sets: EvalSets) -> list[str]:
    """Evaluation prompts that appear (normalised) in training; the stage fails if any."""
    return leaked([r["prompt"] for r in train_rows], eval_sets.prompts())
