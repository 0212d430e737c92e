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
from trainers.base_model import BaseModelFiles, load_tokenizer, resolve_base_model
from trainers.config import ModelParams
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
from trainers.data.config import DataParams
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


def _selection_report() -> SelectionReport:
    """A report in which every count the metrics file shows is present, zero or not, so that
    ``dvc metrics diff`` compares the same keys on every run."""
    report = SelectionReport()
    for always_reported in ("dropped_overlong", "truncated_prompt", "dropped_empty_response",
                            "harmful_dropped_not_a_harmful_request", "benign_dropped_answer_cut_at_token_limit"):
        report.add(always_reported, 0)
    return report


def instruction_rows(loaded: LoadedSources, data: DataParams, held_out: list[str],
                     report: SelectionReport) -> list[dict]:
    """``task: instruction``: the chosen prompts with the responses their corpus gives."""
    chosen = select_prompts(loaded.benign, data.max_benign, data.seed, data.near_duplicate_threshold,
                            held_out, "instruction", report)
    return [{"id": p.id, "source": p.source, "kind": "instruction", "prompt": p.text,
             "response": p.response} for p in chosen]


def safety_rows(loaded: LoadedSources, data: DataParams, held_out: list[str], report: SelectionReport,
                files: BaseModelFiles, model: ModelParams) -> list[dict]:
    """``task: safety``: harmful requests answered with refusals, benign prompts answered by their
    corpus or by the base model itself (so training changes refusals and keeps its benign
    behaviour; ``trainers/data/answers.py`` says why)."""
    requests = harmful_requests(loaded.harmful, data.donotanswer_areas)
    report.add("harmful_dropped_not_a_harmful_request", len(loaded.harmful) - len(requests))
    harmful = select_prompts(requests, data.max_harmful, data.seed, data.near_duplicate_threshold,
                             held_out, "harmful", report)
    benign = select_prompts(loaded.benign, data.max_benign, data.seed, data.near_duplicate_threshold,
                            held_out, "benign", report)

    def benign_answer(prompts: list[sources.Prompt]) -> list[str | None]:
        if data.benign_answers == "corpus":
            return [p.response or "" for p in prompts]
        answers = base_model_answers([p.text for p in prompts], files, model, data.answer_max_new_tokens)
        report.add("benign_dropped_answer_cut_at_token_limit", sum(a is None for a in answers))
        return answers

    return answer_examples(harmful, benign, benign_answer, data.seed)


def checked_split(rows: list[dict], eval_sets: EvalSets, data: DataParams) -> tuple[list[dict], list[dict], list[dict]]:
    """(train, validation, test) once no evaluation prompt is among the rows and training is not
    empty: both are user errors caught before anything is written."""
    leaks = check_held_out(rows, eval_sets)
    if leaks:
        raise LeakError(f"{len(leaks)} evaluation prompt(s) also appear in training, e.g. {leaks[0][:80]!r}")
    train, validation, test = split(rows, data.validation_fraction, data.seed, data.test_fraction)
    if not train:
        raise UserError("no training example is left after filtering; raise data.max_seq_length or the caps")
    return train, validation, test


def _set_counts(rows: list[dict], *keys: str) -> dict:
    return {"total": len(rows), **{f"by_{key}": _counts_by(rows, key) for key in keys}}


def data_manifest(data: DataParams, base_model: str, outputs: dict[str, list[dict]], report: SelectionReport,
                  folder: Path) -> dict:
    """What was written and why: the params, per-file counts, what filtering removed, and the
    sha256 of every file in ``folder`` (the test split only where ``test_fraction`` asks for one)."""
    counts = {
        "train": _set_counts(outputs["train.jsonl"], "kind", "source"),
        "validation": _set_counts(outputs["validation.jsonl"], "kind", "source"),
        **({"test": _set_counts(outputs["test.jsonl"], "kind")} if data.test_fraction else {}),
        "eval_aqi": _set_counts(outputs["eval_aqi.jsonl"], "label"),
        "eval_overrefusal": _set_counts(outputs["eval_overrefusal.jsonl"]),
        "eval_facts": _set_counts(outputs["eval_facts.jsonl"], "source"),
    }
    return {"task": data.task, "params": data.model_dump(mode="json"), "base_model": base_model, "counts": counts,
            "filtering": dict(sorted(report.counts.items())), "overlong_policy": data.overlong,
            "files": {name: sha256_file(folder / name) for name in outputs}}


def data_metrics(data: DataParams, train: list[dict], validation: list[dict], test: list[dict],
                 report: SelectionReport) -> dict:
    """``metrics/data.json``: the sizes ``dvc metrics`` compares across experiments, and every
    filtering count."""
    return {"train_examples": len(train), "validation_examples": len(validation),
            **({"test_examples": len(test)} if data.test_fraction else {}),
            "train_tokens": sum(r["n_tokens"] for r in train),
            **{k: v for k, v in sorted(report.counts.items())}}


def prepare_data(ctx: StageContext, loaded: LoadedSources) -> dict[str, Path]:
    """The text sets: the training rows selected, answered, fitted to the length and split, then
    published with the evaluation sets and the manifest as one directory."""
    data, report = ctx.params.data, _selection_report()
    held_out = loaded.eval_sets.prompts()
    files = resolve_base_model(ctx.params.model)
    tokenizer = load_tokenizer(files, ctx.params.model)
    if data.task == "instruction":
        rows = instruction_rows(loaded, data, held_out, report)
    else:
        rows = safety_rows(loaded, data, held_out, report, files, ctx.params.model)
    train, validation, test = checked_split(fit_examples(rows, tokenizer, data, report), loaded.eval_sets, data)

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
    atomic_write_json(tmp / "manifest.json", data_manifest(data, files.name, outputs, report, tmp))
    publish_directory(tmp, final)  # only now, after every file is written
    atomic_write_json(ctx.root / METRICS, data_metrics(data, train, validation, test, report))
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
