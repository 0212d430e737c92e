"""DVC stage ``evaluate``: the base model and every variant on the held-out sets.

Per model: AQI (with raw CHI and XB) from pooled hidden states of harmful/benign prompt pairs;
refusal rate on held-out harmful prompts and over-refusal on edgy-benign prompts, from greedy
generations of the served files (the form the serve manifest names) through llama.cpp;
knowledge retention on true/false fact pairs; prefill/decode tokens/s from llama.cpp's own
counters, side by side; training time, throughput and memory from the training logs. Beside
them, the second serving backend (``eval.ollama_forms``, ``evaluation.ollama_backend``): every
served model through a private Ollama server, in its adapter and merged forms, its greedy replies
judged, paired with llama.cpp's and timed by Ollama's counters (``served_figures`` rows,
``metrics/eval.json``'s ``ollama``, ``artifacts/eval/ollama_generations.jsonl``). Every figure carries a
bootstrap interval; every variant is compared with the base, and every GRIT variant with its
same-engine control, paired on the same prompts (``evaluation/results.py``). What is measured
is the metric registry's (``evaluation/metrics.py``), on the one measurement path
(``evaluation.measure``) the study's trials take too. Writes the store
(``eval_metrics``, ``comparisons``, ``speed_metrics``, ``served_figures``), ``metrics/eval.json`` and
``artifacts/eval/generations.jsonl``. ``python -m evaluation.compare_all`` prints the comparison.
A variant whose LoRA settings cannot be served (DoRA: ``trainers.config.lora_capabilities``) is
measured on the fp32 model alone: no figures of greedy served replies, no speed.

Seed replicates (``train.n_seeds > 1``): every replicate is measured like a variant and recorded
under its training seed; comparisons pair replicates of the same seed (same initial adapter,
same batches). ``metrics/eval.json`` adds ``across_seeds``: each figure's mean over seeds with a
Student-t 95% interval, and each paired difference with a t-test over seeds, Holm-adjusted over
every difference (the aggregation ``compare_all`` uses). The base model is not trained: its rows
carry the primary seed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from pathlib import Path
from typing import Any

from core.errors import UserError
from core.files import atomic_write_json, atomic_write_text
from db.models import Comparison, EvalMetric, ServedFigure, SpeedMetric
from evaluation.held_out import held_out_sets
from evaluation.stats import finite_or_none
from export.llama_cpp import require_working_runtime
from export.served import ServeManifest
from pipelines.params import Params, declared_comparisons, require_text_model
from pipelines.paths import ADAPTERS, DATA_DIR, SERVE_MANIFEST, TRAIN_METRICS
from pipelines.replicates import model_key, replicate_path, replicates, served_replicates
from pipelines.stage import StageContext, run_stage

METRICS = Path("metrics/eval.json")
GENERATIONS = Path("artifacts/eval/generations.jsonl")
OLLAMA_GENERATIONS = Path("artifacts/eval/ollama_generations.jsonl")


def measure_every_model(ctx: StageContext, manifest: ServeManifest) -> tuple[dict, list[dict]]:
    """The registry's per-model metrics of the base and every replicate, on the one measurement
    path (``evaluation.measure``): the fp32 PEFT model holds every adapter, the served model
    (llama.cpp) gives the judged greedy replies; a replicate that cannot be served (DoRA)
    gets the fp32 figures only. The model lives where ``pipelines.placement`` puts it (fp32 on
    the CPU; on a CUDA host, as it trained). Returns (model -> ModelOutcomes, generation records)."""
    from peft import PeftModel

    from evaluation.measure import Subject, measure, sampling_of
    from evaluation.metrics import model_metrics
    from evaluation.serving import open_served
    from pipelines.placement import host_placement, load_measured_base
    from trainers.base_model import load_tokenizer, resolve_base_model

    params, settings = ctx.params, ctx.params.eval
    sets = held_out_sets(ctx.root / DATA_DIR, settings)
    files = resolve_base_model(params.model)
    placement = host_placement(params.model)
    print(f"[evaluate] the base model and its adapters on {placement.describe()}")
    adapters = {model_key(v, params, s): replicate_path(ADAPTERS / v, params, s) for v, s in replicates(params)}
    model = None
    for key, folder in adapters.items():
        if model is None:
            model = PeftModel.from_pretrained(load_measured_base(files, placement), str(ctx.root / folder),
                                              adapter_name=key)
        else:
            model.load_adapter(str(ctx.root / folder), adapter_name=key)
    tokenizer, chat = load_tokenizer(files, params.model), manifest.chat
    outcomes, records, served_keys = {}, [], served_model_keys(params)
    for key in ["base", *adapters]:
        greedy = "and greedy replies" if key in served_keys else "replies (not served: no greedy replies)"
        print(f"[evaluate] {key}: representations, facts, decline probabilities, sampled {greedy}")
        if key != "base":
            model.set_adapter(key)
        served = open_served(manifest, key) if key in served_keys else None
        subject = Subject(key, model, tokenizer, chat, sets, settings.aqi_layers, served, settings.max_new_tokens,
                          sampling=sampling_of(settings))
        try:
            with model.disable_adapter() if key == "base" else contextlib.nullcontext():
                outcomes[key] = measure(subject, [m for m in model_metrics() if served or m.source != "served"])
                records += generation_records(subject) + subject.sampled_records
        finally:
            if served is not None:
                served.close()
    return outcomes, records


def generation_records(subject) -> list[dict]:
    """The judged replies of one model, each with its prompt's fp32 decline probability."""
    position = {name: 0 for name in ("harmful", "edgy")}
    out = []
    for record in subject.records:
        index = position[record["set"]]
        position[record["set"]] += 1
        out.append({**record, "decline_probability":
                    round(float(subject.decline_probabilities(record["set"])[index]), 6)})
    return out


def measure_through_ollama(ctx: StageContext, manifest: ServeManifest, records: list[dict]) -> dict:
    """Every served model through a private Ollama server (``evaluation.ollama_backend``), in the
    forms ``eval.ollama_forms`` names: model key -> form -> FormOutcome; {} when it names none."""
    from evaluation.measure import Subject, sampling_of
    from evaluation.metrics import model_metrics
    from evaluation.ollama_backend import through_ollama

    settings = ctx.params.eval
    if not settings.ollama_forms:
        return {}
    sets = held_out_sets(ctx.root / DATA_DIR, settings)

    def subject_of(key: str, served) -> Subject:
        return Subject(key, None, None, manifest.chat, sets, settings.aqi_layers, served, settings.max_new_tokens,
                       sampling=sampling_of(settings))

    return through_ollama(manifest, served_model_keys(ctx.params), settings.ollama_forms, subject_of, records,
                          [m for m in model_metrics() if m.source == "served"])


def comparison_pairs(params: Params) -> list[tuple[str, str]]:
    """(variant, reference): every variant vs the base, every GRIT variant vs its declared control,
    then the pairs ``eval.comparisons`` declares (pure GRIT vs the Unsloth baseline)."""
    pairs = [(name, "base") for name in params.variants]
    pairs += [(name, variant.control) for name, variant in params.variants.items() if variant.control]
    return pairs + declared_comparisons(params)


def served_model_keys(params: Params) -> list[str]:
    """The model keys the serve stage serves: the base and every replicate of a variant that can
    be served (``pipelines.replicates.served_replicates``)."""
    return ["base", *(model_key(v, params, s) for v, s in served_replicates(params))]


def model_rows(params: Params) -> dict[str, tuple[str, int]]:
    """Model key -> (variant as recorded in the store, seed): the base and every replicate."""
    rows = {"base": ("base", params.train.seed)}
    rows.update({model_key(v, params, s): (v, s) for v, s in replicates(params)})
    return rows


def training_speed(root: Path, variant: str, seed: int) -> dict[str, float]:
    """The registry's training figures (``evaluation.metrics.TRAINING_FIGURES``) of one replicate,
    from its training summary; stored as speed rows (backend ``train``)."""
    from evaluation.metrics import TRAINING_FIGURES

    path = root / TRAIN_METRICS / f"{variant}.json"
    if not path.is_file():
        return {}
    summary = json.loads(path.read_text())
    summary = summary.get("seeds", {}).get(str(seed), summary)
    return {f.name: float(summary[f.name]) for f in TRAINING_FIGURES if summary.get(f.name) is not None}


def paired_comparisons(params: Params, outcomes: dict) -> list[tuple[int, Any]]:
    """(seed, comparison) of every pair of every seed, named by variant (not replicate key);
    Holm's family is every distinct finding of every pair of one seed."""
    from evaluation.results import adjust_family, compare, tested_metrics

    out = []
    for seed in params.train.seeds:
        models = [(variant, reference, outcomes[model_key(variant, params, seed)],
                   outcomes["base" if reference == "base" else model_key(reference, params, seed)])
                  for variant, reference in comparison_pairs(params)]
        size = sum(len(tested_metrics(ours, theirs)) for _, _, ours, theirs in models)
        family = []
        for variant, reference, ours, theirs in models:
            family += [dataclasses.replace(c, variant=variant, reference=reference)
                       for c in compare(ours, theirs, params.eval, size)]
        out += [(seed, c) for c in adjust_family(family, params.eval.significance)]
    return out


def progress_line(key: str, metrics: dict, speed: dict) -> str:
    """The stage's line per model (one not served has no figures of greedy replies, nor speed)."""
    def served(name: str) -> str:
        return f"{metrics[name].value:.3f}" if name in metrics else "n/a (not served)"

    ratio = speed.get("delta_speed_decode", (None, 0))[0]
    same_format = speed.get("delta_speed_decode_same_format", (None, 0))[0]
    return (f"[evaluate] {key}: AQI-style {metrics['aqi'].value:.4f} (1/XB {metrics['separation'].value:.4f}), "
            f"refusal {served('refusal_rate')} (P(decline) {metrics['decline_probability'].value:.3f}), "
            f"over-refusal {served('overrefusal_rate')}, retention {metrics['retention_accuracy'].value:.3f}"
            + speed_note(ratio, same_format))


def speed_note(ratio: float | None, same_format: float | None) -> str:
    """The progress line's decode ratios: to the base as served and to the base in the variants'
    file format, where measured."""
    parts = ([f"{ratio:.3f}x base"] if ratio is not None else []) + \
        ([f"{same_format:.3f}x the base in the variants' file format"] if same_format is not None else [])
    return ", decode " + ", ".join(parts) if parts else ""


def record(ctx: StageContext, figures: dict, comparisons: list, speeds: dict, ollama: dict) -> None:
    """Every figure, speed and comparison of this run into the store, in one transaction (the
    export parity figures are the export stage's rows, ``export_parity_<form>_<figure>``)."""
    from evaluation.metrics import OLLAMA, SIDE_BY_SIDE

    keys = model_rows(ctx.params)
    with ctx.store.transaction() as session:
        for key, metrics in figures.items():
            variant, seed = keys[key]
            rows = [{"metric": metric, "value": i.value, "ci_low": finite_or_none(i.low),
                     "ci_high": finite_or_none(i.high), "n": i.n} for metric, i in metrics.items()]
            for row in rows:
                values = {k: v for k, v in row.items() if k != "metric"}
                ctx.store.replace_rows(session, EvalMetric, ctx.run_id, [values], variant=variant, seed=seed,
                                       metric=row["metric"])
            speed_rows = [{"backend": SIDE_BY_SIDE, "metric": m, "value": v, "n": n}
                          for m, (v, n) in speeds.get(key, {}).items()]
            speed_rows += [{"backend": "train", "metric": m, "value": v, "n": None}
                           for m, v in training_speed(ctx.root, variant, seed).items()]
            ctx.store.replace_rows(session, SpeedMetric, ctx.run_id, speed_rows, variant=variant, seed=seed)
            served_rows = [{"form": form, **row} for form, outcome in ollama.get(key, {}).items()
                           for row in outcome.rows(ctx.params.eval.confidence)]
            ctx.store.replace_rows(session, ServedFigure, ctx.run_id, served_rows, variant=variant, seed=seed,
                                   backend=OLLAMA)
        ctx.store.replace_rows(session, Comparison, ctx.run_id, [{**vars(c), "seed": seed} for seed, c in comparisons])


def summary(params: Params, figures: dict, comparisons: list, speeds: dict, parity: dict, records: list,
            ollama: dict, served_device: str) -> dict:
    """``metrics/eval.json``: every figure with its interval, speeds, parity, the figures through
    Ollama per form (``ollama``), and comparisons, and with several seeds their aggregation over
    seeds. ``served_device``: where llama.cpp decoded the served models whose speed it records
    (``export.backend.serving_device``)."""
    from evaluation.refusals import probability_agreement
    from evaluation.results import across_seeds

    out: dict[str, Any] = {
        key: {metric: {"value": finite_or_none(i.value), "ci": [finite_or_none(i.low), finite_or_none(i.high)],
                       "n": i.n} for metric, i in metrics.items()}
        | {"speed": {m: v for m, (v, _) in speeds.get(key, {}).items()}}
        | ({"export_parity": parity[key]} if parity[key] else {})
        | ({"ollama": ollama_summary(ollama[key], params.eval.confidence)} if key in ollama else {})
        for key, metrics in figures.items()}
    out["comparisons"] = [vars(c) | {"seed": seed} for seed, c in comparisons]
    out["decline_probability_vs_judge"] = probability_agreement(records)
    out["served_speed_device"] = served_device
    if params.train.n_seeds > 1:
        keys = model_rows(params)
        members = {v: [k for k, (variant, _) in keys.items() if variant == v] for v in params.variants}
        out["across_seeds"] = across_seeds(figures, members, [c for _, c in comparisons], params.train.n_seeds,
                                           params.eval.confidence, params.eval.significance)
    return out


def ollama_summary(forms: dict, confidence: float) -> dict:
    """Form -> figure -> value (with ``ci`` where it has one) of one model through Ollama."""
    return {form: {row["metric"]: ({"value": row["value"], "ci": [row["ci_low"], row["ci_high"]], "n": row["n"]}
                                   if row["ci_low"] is not None else row["value"])
                   for row in outcome.rows(confidence)}
            for form, outcome in forms.items()}


def ollama_line(key: str, forms: dict) -> str:
    """The stage's line per model through Ollama: each form's refusals beside llama.cpp's reading."""
    parts = []
    for form, outcome in forms.items():
        rate = outcome.values.get("refusal_rate")
        a = outcome.agreement
        parts.append(f"{form}: refusal {float(rate.mean()):.3f}" if rate is not None else f"{form}:")
        parts[-1] += (f", same verdict as llama.cpp {a.same_verdict:.2f} (kappa {a.verdict_kappa:.2f}), "
                      f"same reply {a.same_reply:.2f}")
        decode = outcome.speed.get("ollama_decode_tokens_per_second")
        if decode:
            parts[-1] += f", decode {decode[0]:.1f} tokens/s"
    return f"[evaluate] {key} through Ollama: " + "; ".join(parts)


def preflight(params: Params) -> ServeManifest:
    require_text_model(params, "evaluate")
    require_working_runtime()  # every served model is decoded by llama.cpp in-process
    if params.eval.ollama_forms:
        from export.ollama_build import installed_binary

        installed_binary()      # the second backend's server: one line saying how to build it
    if not SERVE_MANIFEST.is_file():
        raise UserError(f"{SERVE_MANIFEST} is missing; run `dvc repro serve` first")
    for name in ("eval_aqi.jsonl", "eval_facts.jsonl", "eval_overrefusal.jsonl"):
        if not (DATA_DIR / name).is_file():
            raise UserError(f"{DATA_DIR / name} is missing; run `dvc repro prepare_data` first")
    manifest = ServeManifest.read(SERVE_MANIFEST)
    missing = [k for k in served_model_keys(params) if k not in manifest.models]
    if missing:
        raise UserError(f"{SERVE_MANIFEST} does not serve {missing[0]}; run `dvc repro serve` first")
    return manifest


def evaluate(ctx: StageContext, manifest: ServeManifest) -> dict[str, Path]:
    from evaluation.results import intervals
    from evaluation.speed import served_speed
    from export.backend import serving_device

    outcomes, records = measure_every_model(ctx, manifest)
    figures = {key: intervals(o, ctx.params.eval) for key, o in outcomes.items()}
    comparisons = paired_comparisons(ctx.params, outcomes)
    device = serving_device()
    print(f"[evaluate] served speed: llama.cpp on the {device}, every model side by side")
    speeds = served_speed(manifest, served_model_keys(ctx.params), ctx.params.eval)
    ollama = measure_through_ollama(ctx, manifest, records)
    parity = {key: manifest.export_parity(key) for key in outcomes}
    record(ctx, figures, comparisons, speeds, ollama)
    atomic_write_json(ctx.root / METRICS, summary(ctx.params, figures, comparisons, speeds, parity, records, ollama,
                                                     device))
    atomic_write_text(ctx.root / GENERATIONS, "".join(json.dumps(r) + "\n" for r in records))
    ollama_records = [r for forms in ollama.values() for outcome in forms.values() for r in outcome.records]
    atomic_write_text(ctx.root / OLLAMA_GENERATIONS, "".join(json.dumps(r) + "\n" for r in ollama_records))
    for key, metrics in figures.items():
        print(progress_line(key, metrics, speeds.get(key, {})))
        if key in ollama:
            print(ollama_line(key, ollama[key]))
    return {"metrics": ctx.root / METRICS, "generations": ctx.root / GENERATIONS,
            "ollama_generations": ctx.root / OLLAMA_GENERATIONS}


def main(argv: list[str] | None = None) -> int:
    return run_stage("evaluate", evaluate, preflight=preflight, argv=argv)


if __name__ == "__main__":
    raise SystemExit(main())
