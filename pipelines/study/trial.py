"""One trial of the study (``pipelines/study/``, docs/study.md): its params (the run's, at a run
length, seed and setting), its training with the recipe every variant trains with
(``trainers.recipe``), its measurement (the adapter reloaded the way export and evaluation load it,
in fp32: tuning and finalist trials on the validation split only, test trials also on the test
split and the held-out test sets), and its record. :func:`run_trial` builds a trial's result
record, :func:`provenance` adds the code, host and data that trained it, and :func:`store_trial`
writes it to the results store (:func:`stored_result` reads it back).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from core.jsonl import read_jsonl
from pipelines.params import Params
from pipelines.paths import DATA_DIR
from pipelines.study.plan import study_rungs

# The module every trial process runs (``python -m``, pipelines/study/part.py): its import closure
# is what a trial's code fingerprint hashes (``provenance``). Named, not imported: it imports this.
TRIAL_ENTRY = "pipelines.study.job"
PER_PROMPT_KINDS = ("rate", "probability")     # their values are one per prompt (or fact pair)


def trial_params(params: Params, method: str, steps: int, seed: int, setting: dict[str, float]) -> Params:
    """The params of one trial: the run's, at this run length, seed and setting (the learning rate
    sets ``train``; every other tuned field is a GRIT field of the variant). No checkpoint is
    written during a trial (a trial is short; an interrupted study resumes at the next one). The
    validation loss is measured at the pruner's rungs and at the end only."""
    train = params.train.model_copy(update={
        "max_steps": steps, "seed": seed, "save_steps": steps + 1, "learning_rate": setting["learning_rate"],
        "eval_at": study_rungs(params, steps)})
    variants = dict(params.variants)
    grit = {name: value for name, value in setting.items() if name != "learning_rate"}
    if grit:
        variant = variants[method]
        variants[method] = variant.model_copy(update={"grit_overrides": {**variant.grit_overrides, **grit}})
    return params.model_copy(update={"train": train, "variants": variants})


def validation_harmful_prompts(data_dir: Path) -> list[str]:
    return [row["prompt"] for row in read_jsonl(data_dir / "validation.jsonl") if row.get("kind") == "harmful"]


def measure_trial(model, tokenizer, chat, params: Params, root: Path, phase: str) -> tuple[dict, dict]:
    """(figures, per-prompt values) of one trained adapter on the evaluate stage's measurement
    path (``evaluation.measure``): a tuning or finalist trial on validation prompts only, a test
    trial also on the test split and the held-out test sets (the registry's study endpoints,
    capped by the ``study`` section)."""
    from evaluation.held_out import held_out_sets
    from evaluation.measure import Subject, measure, sampling_of
    from evaluation.metrics import VALIDATION_DECLINE, study_endpoints
    from evaluation.results import point_figures

    study = params.study
    sets = {"validation_harmful": validation_harmful_prompts(root / DATA_DIR)}
    metrics = [VALIDATION_DECLINE] if sets["validation_harmful"] else []
    extra: dict[str, float] = {}
    if phase == "test":
        sets |= held_out_sets(root / DATA_DIR, params.eval.model_copy(update={
            "refusal_prompts": study.refusal_prompts, "overrefusal_prompts": study.overrefusal_prompts,
            "fact_pairs": study.fact_pairs, "aqi_pairs": study.aqi_pairs}))
        metrics += [m for m in study_endpoints() if m.source == "fp32"]
        extra["test_loss"], per_example = split_loss(model, tokenizer, root / DATA_DIR / "test.jsonl")
    subject = Subject("trial", model, tokenizer, chat, sets, params.eval.aqi_layers, progress=False,
                      max_new_tokens=params.eval.max_new_tokens, sampling=sampling_of(params.eval))
    outcomes = measure(subject, metrics)
    figures = point_figures(outcomes, params.eval.gamma)
    per_prompt = {m.name: [float(v) for v in outcomes.values[m.name]] for m in metrics
                  if m.kind in PER_PROMPT_KINDS and m.name in outcomes.values and m is not VALIDATION_DECLINE}
    if phase == "test":
        per_prompt["test_loss"] = per_example
        per_prompt.update(pair_contributions(outcomes, figures, params.eval.gamma))
    return {VALIDATION_DECLINE.name: math.nan} | {m.name: figures[m.name] for m in metrics} | extra, per_prompt


def pair_contributions(outcomes, figures: dict, gamma: float) -> dict[str, list[float]]:
    """1/XB per prompt pair: the figure with each pair left out, linearised
    (``evaluation.stats.jackknife_contributions``), so the report resamples the pairs with the
    seeds, as it resamples the prompts of a rate; {} when no pooled states were measured."""
    import numpy as np

    from evaluation.stats import jackknife_contributions

    pairs = len(outcomes.states) // 2
    if pairs < 2 or "separation" not in figures:
        return {}
    left_out = outcomes.separation(1.0 - np.eye(pairs), gamma)["separation"]
    return {"separation": jackknife_contributions(figures["separation"], left_out)}


def split_loss(model, tokenizer, path: Path) -> tuple[float, list[float]]:
    """Mean response-token loss of the trained model on a held-out split (the test split: never
    selected on), and one value per example whose mean is that loss
    (``evaluation.stats.pooled_contributions``): the report resamples the examples as well as the
    seeds, as it resamples prompts for the rates."""
    import torch

    from evaluation.stats import pooled_contributions
    from trainers.sft import PaddingCollator, summed_token_loss, tokenized_examples

    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the study's test loss needs data.test_fraction > 0")
    collate, device = PaddingCollator(tokenizer.pad_token_id), next(model.parameters()).device
    sums, counts = [], []
    with torch.no_grad():
        for example in tokenized_examples(read_jsonl(path), tokenizer):
            batch = collate([example])
            logits = model(input_ids=batch["input_ids"].to(device),
                           attention_mask=batch["attention_mask"].to(device)).logits
            total, count = summed_token_loss(logits, batch["labels"].to(device))
            sums.append(total)
            counts.append(count)
    return pooled_contributions(sums, counts)


# What a probe run keeps of the probe's summary (``pipelines.probe.summary``), beside its verdict
PROBE_FIGURES = ("update_cosine_median", "scalar_twin_cosine_median", "update_relative_difference_median",
                 "twin_control_cosine_median")


def probe_run(params: Params, spec: dict[str, Any], root: Path, scratch: Path) -> dict[str, Any]:
    """The probe of ``spec``'s method at its chosen setting: does its preconditioner still change
    the update where tuning put it (a damping at the top of its range can make GRIT's step a
    rescaled LoRA step)? The probe stage's measurement (``trainers.probe``), on these params."""
    from pipelines.probe import summary
    from trainers.base_model import resolve_base_model
    from trainers.probe.variant import probe_variant

    run = trial_params(params, spec["method"], spec["steps"], spec["seed"], spec["setting"])
    started = time.perf_counter()
    probed = summary(probe_variant(spec["method"], run, resolve_base_model(run.model), root / DATA_DIR, scratch))
    figures = {name: probed[name] for name in PROBE_FIGURES if probed.get(name) is not None}
    return {**spec, "val_loss": None, "curve": [], "stopped_at": None, "per_prompt": {},
            "metrics": {**figures, "effective": float(probed["verdict"] == "effective")},
            "train_seconds": 0.0, "tokens_per_second": None, "trainable_parameters": None,
            "trial_seconds": time.perf_counter() - started}


def run_trial(params: Params, spec: dict[str, Any], root: Path, scratch: Path, on_validation=None) -> dict[str, Any]:
    """One trial's result record: trained and measured, or for a ``probe`` spec, probed."""
    from peft import PeftModel

    if spec["phase"] == "probe":
        return probe_run(params, spec, root, scratch)
    from export.chat_format import chat_format
    from trainers.base_model import load_causal_lm, load_tokenizer, resolve_base_model
    from trainers.recipe import train_variant

    method = spec["method"]
    run = trial_params(params, method, spec["steps"], spec["seed"], spec["setting"])
    files = resolve_base_model(run.model)
    started = time.perf_counter()
    result = train_variant(method, run.variants[method], run, files, root / DATA_DIR, scratch / "adapter",
                           scratch / "checkpoints", live=None, on_validation=on_validation)
    meta = result.metadata
    curve = [(int(r["step"]), float(r["val_loss"])) for r in result.steps if r.get("val_loss") is not None]
    figures, per_prompt = {}, {}
    if meta.get("stopped_at") is None:         # a pruned trial is not measured: it is not a candidate
        fp32 = run.model.model_copy(update={"dtype": "float32", "load_in_4bit": False})
        tokenizer = load_tokenizer(files, run.model)
        model = PeftModel.from_pretrained(load_causal_lm(files, fp32), str(scratch / "adapter")).eval()
        figures, per_prompt = measure_trial(model, tokenizer, chat_format(tokenizer), run, root, spec["phase"])
    return {**spec, "val_loss": meta.get("final_val_loss"), "curve": curve, "stopped_at": meta.get("stopped_at"),
            "metrics": {"val_loss": meta.get("final_val_loss"), **figures}, "per_prompt": per_prompt,
            "train_seconds": meta["train_seconds"], "tokens_per_second": meta.get("tokens_per_second"),
            "trainable_parameters": meta.get("trainable_parameters"),
            "trial_seconds": time.perf_counter() - started}


def store_trial(store, run_id: str, result: dict) -> None:
    """One finished trial into the store, in its own transaction (a later failure leaves it
    recorded); the same trial recorded again replaces its row."""
    from db.models import StudyTrial
    from evaluation.tuning import setting_key

    with store.transaction() as session:
        store.replace_rows(session, StudyTrial, run_id, [{
            "val_loss": result["val_loss"], "curve_json": json.dumps(result["curve"]),
            # What has no column rides with the figures: the trial's wall time, its per-prompt
            # values, where the pruner stopped it, which Optuna study asked for it, and the code
            # and host that trained it.
            "metrics_json": json.dumps({"figures": {**result["metrics"], "trial_seconds": result.get("trial_seconds")},
                                        "per_prompt": result.get("per_prompt", {}),
                                        "stopped_at": result.get("stopped_at"), "tuning": result.get("tuning", ""),
                                        "defaults": result.get("defaults", False),
                                        "revision": result.get("revision"), "host": result.get("host"),
                                        "data": result.get("data"), "provenance": result.get("provenance")}),
            "train_seconds": result["train_seconds"],
            "tokens_per_second": result["tokens_per_second"],
            "trainable_parameters": result["trainable_parameters"]}],
            phase=result["phase"], method=result["method"], steps=result["steps"], seed=result["seed"],
            setting=setting_key(result["setting"]))


def stored_result(row) -> dict[str, Any]:
    """A ``study_trials`` row as the trial's result (what :func:`store_trial` was given)."""
    extra = json.loads(row.metrics_json)
    figures = dict(extra.get("figures", {}))
    trial_seconds = figures.pop("trial_seconds", None)
    return {"phase": row.phase, "method": row.method, "steps": row.steps, "seed": row.seed,
            "setting": json.loads(row.setting), "tuning": extra.get("tuning", ""),
            "defaults": extra.get("defaults", False), "val_loss": row.val_loss,
            "curve": json.loads(row.curve_json), "stopped_at": extra.get("stopped_at"), "metrics": figures,
            "per_prompt": extra.get("per_prompt", {}), "train_seconds": row.train_seconds,
            "tokens_per_second": row.tokens_per_second, "trainable_parameters": row.trainable_parameters,
            "trial_seconds": trial_seconds, "revision": extra.get("revision"), "host": extra.get("host"),
            "data": extra.get("data"), "provenance": extra.get("provenance")}


def run_summary(record: dict[str, Any]) -> str:
    """The line a finished finalist or test run prints: which run it was (two workers' lines
    interleave) and the loss its phase is judged on, the held-out test loss for a test run."""
    name = f"{record['method']}, {record['steps']} steps, seed {record['seed']}"
    if record.get("phase") == "probe":
        figures = record["metrics"]
        cosine = figures.get("update_cosine_median")
        return (f"[study]   probe done: {name}: {'effective' if figures.get('effective') else 'inert'}"
                + (f", update cosine against the control {cosine:.3f}" if cosine is not None else "")
                + f" in {record['trial_seconds']:.0f} s")
    losses = f"validation loss {record['val_loss']:.4f}"
    test_loss = record.get("metrics", {}).get("test_loss")
    if record.get("phase") == "test" and test_loss is not None:
        losses = f"test loss {test_loss:.4f} ({losses})"
    return f"[study]   {record.get('phase', 'run')} done: {name}: {losses} in {record['trial_seconds']:.0f} s"


def trial_store(params: Params, root: Path):
    """The repository's store, as the study process's: the params handed over record its URL
    without the password, which ``$GRIT_STORE_URL`` (inherited) or PGPASSWORD/~/.pgpass give."""
    from db.config import store_url
    from db.store import open_store
    from pipelines.stage import store_root

    return open_store(store_url(params.store), store_root(root))


def provenance(record: dict[str, Any], job: dict[str, Any], params: Params, root: Path) -> dict[str, Any]:
    """The code, host and data that trained a trial, kept with it in the store and the ledger, and
    its fingerprint (``db.provenance``): the project files a trial needs (the import closure of
    the trial process's entry module, ``TRIAL_ENTRY``), the lock files, the data and the
    variant's params."""
    import os

    from db.provenance import needed_files, trial_provenance

    variant = params.variants[record["method"]].model_dump(mode="json")
    return {**record, "revision": job.get("revision"), "host": os.uname().nodename, "data": job.get("data"),
            "provenance": trial_provenance(needed_files([TRIAL_ENTRY], root), root, job.get("data"), variant)}
