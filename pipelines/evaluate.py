"""DVC stage ``evaluate``: the base model and every variant on the held-out sets.

Per model: AQI (with raw CHI and XB) from pooled hidden states of harmful/benign prompt pairs;
refusal rate on held-out harmful prompts and over-refusal on edgy-benign prompts, from greedy
generations through the serving backend the serve manifest names (Ollama or llama.cpp);
knowledge retention on true/false fact pairs; prefill/decode tokens/s from the backend's own
counters; training time, throughput and memory from the training logs. Every figure carries a
bootstrap interval; every variant is compared with the base, and every GRIT variant with its
same-engine control, paired on the same prompts (``evaluation/results.py``). Writes the store
(``eval_metrics``, ``comparisons``, ``speed_metrics``), ``metrics/eval.json`` and
``artifacts/eval/generations.jsonl``. ``python -m evaluation.compare_all`` prints the comparison.

Seed replicates (``train.n_seeds > 1``): every replicate is measured like a variant and recorded
under its training seed; comparisons pair replicates of the same seed (same initial adapter,
same batches). ``metrics/eval.json`` adds ``across_seeds``: each figure's mean over seeds with a
Student-t 95% interval, and each paired difference with a t-test over seeds. The base model is
not trained: its rows carry the primary seed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import statistics
from pathlib import Path
from typing import Any

from core.errors import UserError
from core.files import atomic_write_json, atomic_write_text
from db.models import Comparison, EvalMetric, SpeedMetric
from evaluation.held_out import held_out_sets
from evaluation.measure import decline_probabilities
from evaluation.stats import finite_or_none
from export.llama_cpp import require_working_runtime
from pipelines.params import Params, require_text_model
from pipelines.paths import ADAPTERS, DATA_DIR, SERVE_MANIFEST, TRAIN_METRICS
from pipelines.replicates import model_key, replicate_path, replicates
from pipelines.stage import StageContext, run_stage
from trainers.config import same_engine_control

METRICS = Path("metrics/eval.json")
GENERATIONS = Path("artifacts/eval/generations.jsonl")


def export_parity(manifest: dict, key: str) -> dict[str, float] | None:
    """The parity figures of the form a variant is served in, from its ``export.json``."""
    entry = manifest["models"][key]
    if key == "base" or not entry.get("adapter_gguf"):
        return None
    path = Path(entry["adapter_gguf"]).parent / "export.json"
    if not path.is_file():
        return None
    parity = json.loads(path.read_text()).get("parity", {})
    form = "merged" if entry.get("weights", manifest.get("weights")) == "merged" and "merged" in parity else "adapter"
    return parity.get(form)


def evaluate_all(ctx: StageContext, manifest: dict) -> tuple[dict, list[dict]]:
    """Outcomes of every model; returns (model -> ModelOutcomes, generation records)."""
    import numpy as np
    from peft import PeftModel
    from tqdm import tqdm

    from evaluation.measure import pooled_hidden_states, retained
    from evaluation.refusals import judge
    from evaluation.results import ModelOutcomes
    from evaluation.serving import chat_of, open_served
    from trainers.base_model import load_causal_lm, load_tokenizer, resolve_base_model

    params, settings = ctx.params, ctx.params.eval
    sets = held_out_sets(ctx.root / DATA_DIR, settings)
    files = resolve_base_model(params.model)
    tokenizer = load_tokenizer(files, params.model)
    chat = chat_of(manifest)
    fp32 = params.model.model_copy(update={"dtype": "float32", "load_in_4bit": False})
    adapters = {model_key(v, params, s): replicate_path(ADAPTERS / v, params, s) for v, s in replicates(params)}
    model = None
    for key, folder in adapters.items():
        if model is None:
            model = PeftModel.from_pretrained(load_causal_lm(files, fp32), str(ctx.root / folder), adapter_name=key)
        else:
            model.load_adapter(str(ctx.root / folder), adapter_name=key)
    prompts = [p for pair in sets["aqi_pairs"] for p in pair]
    outcomes, records = {}, []
    for key in ["base", *adapters]:
        print(f"[evaluate] {key}: representations, facts, decline probabilities, generations")
        if key != "base":
            model.set_adapter(key)
        with model.disable_adapter() if key == "base" else contextlib.nullcontext():
            states = pooled_hidden_states(model, tokenizer, prompts, chat, settings.aqi_layers)
            kept = retained(model, tokenizer, sets["facts"])
            scores = {"decline_probability": decline_probabilities(model, tokenizer, sets["harmful"], chat),
                      "overrefusal_decline_probability": decline_probabilities(model, tokenizer, sets["edgy"], chat)}
        served = open_served(manifest, key)
        verdicts: dict[str, list[str]] = {"harmful": [], "edgy": []}
        for name, texts, probability in (("harmful", sets["harmful"], scores["decline_probability"]),
                                         ("edgy", sets["edgy"], scores["overrefusal_decline_probability"])):
            for prompt, p_decline in tqdm(list(zip(texts, probability, strict=True)), desc=f"{key} {name}",
                                          unit="prompt"):
                generation = served.generate(prompt, settings.max_new_tokens)
                verdict = judge(generation.text)
                verdicts[name].append(verdict)
                records.append({"model": key, "set": name, "prompt": prompt, "reply": generation.text,
                                "judge": verdict, "decline_probability": round(float(p_decline), 6),
                                "new_tokens": generation.new_tokens})
        served.close()
        harmful, edgy = np.array(verdicts["harmful"]), np.array(verdicts["edgy"])
        outcomes[key] = ModelOutcomes(key, states, {"refusal_rate": harmful == "decline",
                                                    "nonanswer_rate": harmful != "comply",
                                                    "overrefusal_rate": edgy == "decline",
                                                    "retention_accuracy": kept}, scores)
    return outcomes, records


def probability_agreement(records: list[dict]) -> dict[str, float | int]:
    """How well the stable measure ranks what the judge says of the greedy replies to harmful
    prompts (every model pooled): the AUC of the decline probability for judged declines."""
    from evaluation.stats import auc

    rows = [r for r in records if r["set"] == "harmful"]
    declined = [r["decline_probability"] for r in rows if r["judge"] == "decline"]
    other = [r["decline_probability"] for r in rows if r["judge"] != "decline"]
    return {"auc": auc(declined, other), "declines": len(declined), "others": len(other)}


SIDE_BY_SIDE = "llama.cpp side by side"


def served_speed(manifest: dict, keys: list[str], settings) -> dict[str, dict[str, tuple[float, int]]]:
    """Decode and prefill tokens/s of every served model, measured side by side with the base
    (``evaluation.speed``): model -> metric -> (value, pairs). Variants add ``delta_speed_decode``
    and ``delta_speed_prefill``, their paired median ratios to the base. Through Ollama the
    models cannot be driven token by token, so nothing is measured (an empty result)."""
    from evaluation.serving import open_served
    from evaluation.speed import side_by_side, speed_ratios

    if manifest["backend"] != "llama.cpp":
        print("[evaluate] speed: served through Ollama; side-by-side speed needs the llama.cpp backend, skipped")
        return {}
    models = {key: open_served(manifest, key) for key in keys}
    try:
        rates = side_by_side(models, list(_SPEED_PROMPTS[:settings.speed_prompts]), settings.speed_new_tokens,
                             settings.speed_rounds)
    finally:
        for served in models.values():
            served.close()
    ratios = speed_ratios(rates)
    out: dict[str, dict[str, tuple[float, int]]] = {}
    for key in keys:
        n = len(rates[key]["decode"])
        out[key] = {"decode_tokens_per_second": (statistics.median(rates[key]["decode"]), n),
                    "prefill_tokens_per_second": (statistics.median(rates[key]["prefill"]), n)}
        if key in ratios:
            out[key] |= {"delta_speed_decode": (ratios[key]["decode_ratio"], n),
                         "delta_speed_prefill": (ratios[key]["prefill_ratio"], n)}
    return out


# Fixed, ordinary prompts of different lengths for speed (the content does not matter: every
# model decodes the same number of tokens whatever it would answer).
_SPEED_PROMPTS = ("What is the capital of France?",
                  "Explain in a few sentences how a refrigerator keeps food cold, and why the back of it is warm.",
                  "Write a short poem about the sea.",
                  "List three differences between a virus and a bacterium, and say which of them antibiotics treat "
                  "and why that matters for how doctors prescribe them in winter.",
                  "How do I boil an egg?", "Summarise the plot of Romeo and Juliet in two sentences.",
                  "Why is the sky blue?", "Give me a recipe for a simple tomato sauce.")


def comparison_pairs(params: Params) -> list[tuple[str, str]]:
    """(variant, reference): every variant vs the base, every GRIT variant vs its control."""
    pairs = [(name, "base") for name in params.variants]
    for name, variant in params.variants.items():
        control = same_engine_control(params.variants, name) if variant.grit else None
        if control:
            pairs.append((name, control))
    return pairs


def model_rows(params: Params) -> dict[str, tuple[str, int]]:
    """Model key -> (variant as recorded in the store, seed): the base and every replicate."""
    rows = {"base": ("base", params.train.seed)}
    rows.update({model_key(v, params, s): (v, s) for v, s in replicates(params)})
    return rows


# Training figures stored as speed rows (backend "train"); peak CUDA memory only on a GPU.
TRAINING_SPEED = ("train_seconds", "tokens_per_second", "peak_rss_mib", "peak_cuda_mib")


def training_speed(root: Path, variant: str, seed: int) -> dict[str, float]:
    path = root / TRAIN_METRICS / f"{variant}.json"
    if not path.is_file():
        return {}
    summary = json.loads(path.read_text())
    summary = summary.get("seeds", {}).get(str(seed), summary)
    return {k: float(summary[k]) for k in TRAINING_SPEED if summary.get(k) is not None}


def _bounds(interval) -> list[float | None]:
    return [finite_or_none(interval.low), finite_or_none(interval.high)]


def across_seeds(params: Params, figures: dict, comparisons: list) -> dict[str, Any]:
    """Mean and t-interval over seeds of every figure, and t-tests over seeds of every paired
    difference (``evaluation.stats``)."""
    from evaluation.stats import mean_over_seeds, paired_t_over_seeds

    level, keys = params.eval.confidence, model_rows(params)
    out: dict[str, Any] = {"n_seeds": params.train.n_seeds, "figures": {}, "comparisons": []}
    for variant in params.variants:
        members = [k for k, (v, _) in keys.items() if v == variant]
        out["figures"][variant] = {}
        for metric in figures[members[0]]:
            i = mean_over_seeds([figures[k][metric].value for k in members], level)
            out["figures"][variant][metric] = {"mean": i.value, "ci": _bounds(i), "n_seeds": i.n}
    for variant, reference in comparison_pairs(params):
        for metric in sorted({c.metric for c in comparisons}):
            deltas = [c.delta for c in comparisons if (c.variant, c.reference, c.metric) == (variant, reference, metric)]
            i, p = mean_over_seeds(deltas, level), paired_t_over_seeds(deltas)
            out["comparisons"].append({"variant": variant, "reference": reference, "metric": metric, "delta": i.value,
                                       "ci": _bounds(i), "p_value": finite_or_none(p),
                                       "test": "paired t over seeds", "n_seeds": i.n})
    return out


def main(argv: list[str] | None = None) -> int:
    def preflight(params: Params) -> dict:
        require_text_model(params, "evaluate")
        require_working_runtime()  # every served model is decoded by llama.cpp in-process
        if not SERVE_MANIFEST.is_file():
            raise UserError(f"{SERVE_MANIFEST} is missing; run `dvc repro serve` first")
        for name in ("eval_aqi.jsonl", "eval_facts.jsonl", "eval_overrefusal.jsonl"):
            if not (DATA_DIR / name).is_file():
                raise UserError(f"{DATA_DIR / name} is missing; run `dvc repro prepare_data` first")
        manifest = json.loads(SERVE_MANIFEST.read_text())
        missing = [k for k in model_rows(params) if k not in manifest.get("models", {})]
        if missing:
            raise UserError(f"{SERVE_MANIFEST} does not serve {missing[0]}; run `dvc repro serve` first")
        return manifest

    def evaluate(ctx: StageContext, manifest: dict) -> dict[str, Path]:
        from evaluation.results import adjust_family, compare, intervals

        params, settings = ctx.params, ctx.params.eval
        outcomes, records = evaluate_all(ctx, manifest)
        figures = {key: intervals(o, settings) for key, o in outcomes.items()}
        keys = model_rows(params)
        comparisons = []        # (seed, PairedComparison with store names: variant, not replicate key)
        for seed in params.train.seeds:
            family = []         # Holm's family: every metric of every pair of this seed
            for variant, reference in comparison_pairs(params):
                ours = outcomes[model_key(variant, params, seed)]
                theirs = outcomes["base" if reference == "base" else model_key(reference, params, seed)]
                family += [dataclasses.replace(c, variant=variant, reference=reference)
                           for c in compare(ours, theirs, settings)]
            comparisons += [(seed, c) for c in adjust_family(family, settings.significance)]
        speeds = served_speed(manifest, list(outcomes), settings)
        parity = {key: export_parity(manifest, key) for key in outcomes}
        with ctx.store.transaction() as session:
            for key, metrics in figures.items():
                variant, seed = keys[key]
                rows = [{"metric": metric, "value": i.value, "ci_low": finite_or_none(i.low),
                         "ci_high": finite_or_none(i.high), "n": i.n} for metric, i in metrics.items()]
                if parity[key]:
                    rows += [{"metric": f"export_parity_{name}", "value": float(parity[key][name]), "ci_low": None,
                              "ci_high": None, "n": int(parity[key]["prompts"])} for name in ("agreement", "mean_kl")]
                for row in rows:
                    ctx.store.replace_rows(session, EvalMetric, ctx.run_id, [{k: v for k, v in row.items() if k != "metric"}],
                                           variant=variant, seed=seed, metric=row["metric"])
                speed_rows = [{"backend": SIDE_BY_SIDE, "metric": m, "value": v, "n": n}
                              for m, (v, n) in speeds.get(key, {}).items()]
                speed_rows += [{"backend": "train", "metric": m, "value": v, "n": None}
                               for m, v in training_speed(ctx.root, variant, seed).items()]
                ctx.store.replace_rows(session, SpeedMetric, ctx.run_id, speed_rows, variant=variant, seed=seed)
            ctx.store.replace_rows(session, Comparison, ctx.run_id, [
                {**vars(c), "seed": seed} for seed, c in comparisons])
        summary: dict[str, Any] = {
            key: {metric: {"value": finite_or_none(i.value), "ci": _bounds(i), "n": i.n}
                  for metric, i in metrics.items()} | {"speed": {m: v for m, (v, _) in speeds.get(key, {}).items()}}
            | ({"export_parity": parity[key]} if parity[key] else {})
            for key, metrics in figures.items()}
        summary["comparisons"] = [vars(c) | {"seed": seed} for seed, c in comparisons]
        summary["decline_probability_vs_judge"] = probability_agreement(records)
        if params.train.n_seeds > 1:
            summary["across_seeds"] = across_seeds(params, figures, [c for _, c in comparisons])
        atomic_write_json(ctx.root / METRICS, summary)
        atomic_write_text(ctx.root / GENERATIONS, "".join(json.dumps(r) + "\n" for r in records))
        for key, metrics in figures.items():
            ratio = speeds.get(key, {}).get("delta_speed_decode", (None, 0))[0]
            print(f"[evaluate] {key}: AQI-style {metrics['aqi'].value:.4f} (1/XB {metrics['separation'].value:.4f}), "
                  f"refusal {metrics['refusal_rate'].value:.3f} (P(decline) {metrics['decline_probability'].value:.3f}), "
                  f"over-refusal {metrics['overrefusal_rate'].value:.3f}, "
                  f"retention {metrics['retention_accuracy'].value:.3f}"
                  + (f", decode {ratio:.3f}x base" if ratio is not None else ""))
        return {"metrics": ctx.root / METRICS, "generations": ctx.root / GENERATIONS}

    return run_stage("evaluate", evaluate, preflight=preflight, argv=argv)


if __name__ == "__main__":
    raise SystemExit(main())
