"""DVC stage ``prepare_data``: held-out safety SFT data and evaluation sets from package files.

Reads params sections ``data`` and ``model`` (the base model answers benign prompts).
Writes ``artifacts/data/`` (train, validation, the three evaluation sets and a manifest with
counts and sha256 of every file) and ``metrics/data.json``. Every source is read and checked
before anything is written; the directory is replaced atomically, so a failure leaves the
previous outputs untouched.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from core.errors import UserError
from core.files import atomic_write_json, fresh_staging_dir, publish_directory, sha256_file
from export.llama_cpp import require_working_runtime
from pipelines.params import Params
from pipelines.paths import DATA_DIR
from pipelines.stage import StageContext, run_stage
from trainers.base_model import load_tokenizer, resolve_base_model
from trainers.data import sources
from trainers.data.answers import base_model_answers
from trainers.data.assemble import (
    EvalSets,
    SelectionReport,
    answer_examples,
    aqi_rows_from_labelled,
    aqi_rows_from_pairs,
    build_eval_sets,
    check_held_out,
    fit_examples,
    harmful_requests,
    pair_statements,
    select_prompts,
    split,
)
from trainers.hardware import check_hardware

METRICS = Path("metrics/data.json")


class LeakError(UserError):
    pass


@dataclass(frozen=True)
class LoadedSources:
    """Everything read from packages or datasets, checked before the store is opened."""

    harmful: list[sources.Prompt]
    benign: list[sources.Prompt]
    eval_sets: EvalSets


def load_sources(params: Params) -> LoadedSources:
    data = params.data
    check_hardware(params.model, params.train)
    if data.aqi_dataset is not None:
        aqi = aqi_rows_from_labelled(*sources.labelled_safety_pairs(data.aqi_dataset))
    else:
        aqi = aqi_rows_from_pairs(sources.rho_refusal_pairs())
    facts = sources.rho_fact_pairs() + pair_statements(sources.lmdoctor_fact_statements())
    eval_sets = build_eval_sets(aqi, sources.rho_overrefusal_prompts(), facts)
    if data.task == "instruction":
        return LoadedSources(harmful=[], benign=sources.alpaca_prompts(data.instruction), eval_sets=eval_sets)
    harmful = [p for name in data.harmful_sources for p in sources.HARMFUL_SOURCES[name]()]
    benign = [p for name in data.benign_sources for p in sources.BENIGN_SOURCES[name]()]
    return LoadedSources(harmful=harmful, benign=benign, eval_sets=eval_sets)


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n")


def _counts_by(rows: list[dict], key: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for row in rows:
        counts[str(row[key])] = counts.get(str(row[key]), 0) + 1
    return dict(sorted(counts.items()))


def prepare_data(ctx: StageContext, loaded: LoadedSources) -> dict[str, Path]:
    data, report = ctx.params.data, SelectionReport()
    for always_reported in ("dropped_overlong", "truncated_prompt", "dropped_empty_response",
                            "harmful_dropped_not_a_harmful_request", "benign_dropped_answer_cut_at_token_limit"):
        report.add(always_reported, 0)
    held_out = loaded.eval_sets.prompts()
    files = resolve_base_model(ctx.params.model)
    tokenizer = load_tokenizer(files, ctx.params.model)

    if data.task == "instruction":
        chosen = select_prompts(loaded.benign, data.max_benign, data.seed, data.near_duplicate_threshold,
                                held_out, "instruction", report)
        rows = [{"id": p.id, "source": p.source, "kind": "instruction", "prompt": p.text,
                 "response": p.response} for p in chosen]
    else:
        requests = harmful_requests(loaded.harmful, data.donotanswer_areas)
        report.add("harmful_dropped_not_a_harmful_request", len(loaded.harmful) - len(requests))
        harmful = select_prompts(requests, data.max_harmful, data.seed, data.near_duplicate_threshold,
                                 held_out, "harmful", report)
        benign = select_prompts(loaded.benign, data.max_benign, data.seed, data.near_duplicate_threshold,
                                held_out, "benign", report)

        def benign_answer(prompts: list[sources.Prompt]) -> list[str | None]:
            if data.benign_answers == "corpus":
                return [p.response or "" for p in prompts]
            answers = base_model_answers([p.text for p in prompts], files, ctx.params.model,
                                         data.answer_max_new_tokens)
            report.add("benign_dropped_answer_cut_at_token_limit", sum(a is None for a in answers))
            return answers

        rows = answer_examples(harmful, benign, benign_answer, data.seed)

    rows = fit_examples(rows, tokenizer, data, report)
    leaks = check_held_out(rows, loaded.eval_sets)
    if leaks:
        raise LeakError(f"{len(leaks)} evaluation prompt(s) also appear in training, e.g. {leaks[0][:80]!r}")
    train, validation, test = split(rows, data.validation_fraction, data.seed, data.test_fraction)
    if not train:
        raise UserError("no training example is left after filtering; raise data.max_seq_length or the caps")

    outputs = {
        "train.jsonl": train,
        "validation.jsonl": validation,
        **({"test.jsonl": test} if data.test_fraction else {}),
        "eval_aqi.jsonl": loaded.eval_sets.aqi,
        "eval_overrefusal.jsonl": loaded.eval_sets.overrefusal,
        "eval_facts.jsonl": loaded.eval_sets.facts,
    }
    final = ctx.root / DATA_DIR
    tmp = fresh_staging_dir(final)
    for name, payload in outputs.items():
        _write_jsonl(tmp / name, payload)
    manifest = {
        "task": data.task,
        "params": data.model_dump(mode="json"),
        "base_model": files.name,
        "counts": {
            "train": {"total": len(train), "by_kind": _counts_by(train, "kind"),
                      "by_source": _counts_by(train, "source")},
            "validation": {"total": len(validation), "by_kind": _counts_by(validation, "kind"),
                           "by_source": _counts_by(validation, "source")},
            **({"test": {"total": len(test), "by_kind": _counts_by(test, "kind")}} if data.test_fraction else {}),
            "eval_aqi": {"total": len(outputs["eval_aqi.jsonl"]),
                         "by_label": _counts_by(outputs["eval_aqi.jsonl"], "label")},
            "eval_overrefusal": {"total": len(outputs["eval_overrefusal.jsonl"])},
            "eval_facts": {"total": len(outputs["eval_facts.jsonl"]),
                           "by_source": _counts_by(outputs["eval_facts.jsonl"], "source")},
        },
        "filtering": dict(sorted(report.counts.items())),
        "overlong_policy": data.overlong,
        "files": {name: sha256_file(tmp / name) for name in outputs},
    }
    atomic_write_json(tmp / "manifest.json", manifest)
    publish_directory(tmp, final)  # only now, after every file is written
    metrics = {"train_examples": len(train), "validation_examples": len(validation),
               **({"test_examples": len(test)} if data.test_fraction else {}),
               "train_tokens": sum(r["n_tokens"] for r in train),
               **{k: v for k, v in sorted(report.counts.items())}}
    atomic_write_json(ctx.root / METRICS, metrics)
    print(f"[prepare_data] {len(train)} train / {len(validation)} validation examples; "
          f"eval: {len(outputs['eval_aqi.jsonl'])} AQI prompts, {len(outputs['eval_overrefusal.jsonl'])} "
          f"edgy-benign, {len(outputs['eval_facts.jsonl'])} facts")
    return {name: final / name for name in [*outputs, "manifest.json"]}


def prepare_image_text(ctx: StageContext) -> dict[str, Path]:
    """``model.kind: vlm``: the image-text pairs (synthetic, or the user's JSONL with its images
    copied in), published as a whole like the text sets."""
    from trainers.grit_vlm.data import read_pairs, synthetic_pairs, write_pairs

    vlm = ctx.params.vlm.data
    if vlm.source == "jsonl":
        pairs = read_pairs(Path(vlm.path).expanduser())
    else:
        pairs = synthetic_pairs(vlm.n_train, vlm.seed, vlm.image_size)
    final = ctx.root / DATA_DIR
    tmp = fresh_staging_dir(final)
    write_pairs(pairs, tmp / "train_pairs.jsonl")
    captions = _counts_by([{"caption": p.caption} for p in pairs], "caption")
    atomic_write_json(tmp / "manifest.json", {"task": "image_text", "params": vlm.model_dump(mode="json"),
                                              "counts": {"train_pairs": len(pairs), "by_caption": captions},
                                              "files": {"train_pairs.jsonl": sha256_file(tmp / "train_pairs.jsonl")}})
    publish_directory(tmp, final)
    atomic_write_json(ctx.root / METRICS, {"train_pairs": len(pairs), "distinct_captions": len(captions)})
    print(f"[prepare_data] {len(pairs)} image-text pairs ({vlm.source}), {len(captions)} distinct captions")
    return {"train_pairs.jsonl": final / "train_pairs.jsonl", "manifest.json": final / "manifest.json"}


def preflight(params: Params) -> LoadedSources | None:
    if params.model.kind == "vlm":
        check_hardware(params.model, params.train)
        return None
    if params.model.source == "embedded":
        require_working_runtime()  # the base model's answers are generated by llama.cpp in-process
    return load_sources(params)


def prepare(ctx: StageContext, loaded: LoadedSources | None) -> dict[str, Path]:
    return prepare_image_text(ctx) if loaded is None else prepare_data(ctx, loaded)


def main(argv: list[str] | None = None) -> int:
    return run_stage("prepare_data", prepare, preflight=preflight, argv=argv)


if __name__ == "__main__":
    raise SystemExit(main())
