"""The trials of one study method, in a process of their own (``pipelines/study.py`` starts it):

    python -m pipelines.study_worker --params P --trials T --results R

``T`` lists trials (phase, method, budget, seed, setting) of one method; each is trained with the
recipe every variant trains with (``trainers.recipe.train_variant``) at its setting, budget and
seed, reloaded from the saved adapter the way export and evaluation load it, and measured in
fp32: a tuning trial on the validation split only, a test trial also on the held-out test sets.
Each finished trial is appended to ``R`` as one JSON line; the study process records it in the
store. One process per method: importing Unsloth patches libraries for the whole process.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path
from typing import Any

from core.jsonl import read_jsonl
from pipelines.params import Params, load_params
from pipelines.paths import DATA_DIR


def trial_params(params: Params, method: str, budget: int, seed: int, setting: dict[str, float]) -> Params:
    """The params of one trial: the run's, at this budget, seed and setting (learning rate, and
    for a GRIT method its damping). No checkpoint is written during a trial (a trial is short;
    an interrupted study resumes at the next unfinished trial)."""
    train = params.train.model_copy(update={"max_steps": budget, "seed": seed, "save_steps": budget + 1,
                                            "learning_rate": setting["learning_rate"]})
    variants = dict(params.variants)
    if "damping" in setting:
        variant = variants[method]
        variants[method] = variant.model_copy(update={"grit_overrides": {**variant.grit_overrides,
                                                                         "damping": setting["damping"]}})
    return params.model_copy(update={"train": train, "variants": variants})


def validation_harmful_prompts(data_dir: Path) -> list[str]:
    return [row["prompt"] for row in read_jsonl(data_dir / "validation.jsonl") if row.get("kind") == "harmful"]


def measure_trial(model, tokenizer, chat, params: Params, root: Path, phase: str) -> dict[str, float]:
    """fp32 figures of one trained adapter on the evaluate stage's measurement path
    (``evaluation.measure``): a tuning trial on validation prompts only, a test trial also on the
    held-out test sets (the registry's study endpoints, capped by the ``study`` section)."""

    from evaluation.held_out import held_out_sets
    from evaluation.measure import Subject, measure, sampling_of
    from evaluation.metrics import VALIDATION_DECLINE, study_endpoints
    from evaluation.results import point_figures

    study = params.study
    sets = {"validation_harmful": validation_harmful_prompts(root / DATA_DIR)}
    metrics = [VALIDATION_DECLINE] if sets["validation_harmful"] else []
    if phase != "tune":
        sets |= held_out_sets(root / DATA_DIR, params.eval.model_copy(update={
            "refusal_prompts": study.refusal_prompts, "overrefusal_prompts": study.overrefusal_prompts,
            "fact_pairs": study.fact_pairs, "aqi_pairs": study.aqi_pairs}))
        metrics += [m for m in study_endpoints() if m.source == "fp32"]
    subject = Subject("trial", model, tokenizer, chat, sets, params.eval.aqi_layers, progress=False,
                      max_new_tokens=params.eval.max_new_tokens, sampling=sampling_of(params.eval))
    figures = point_figures(measure(subject, metrics), params.eval.gamma)
    return {VALIDATION_DECLINE.name: math.nan} | {m.name: figures[m.name] for m in metrics}


def run_trial(params: Params, spec: dict[str, Any], root: Path, scratch: Path) -> dict[str, Any]:
    from peft import PeftModel

    from export.chat_format import chat_format
    from trainers.base_model import load_causal_lm, load_tokenizer, resolve_base_model
    from trainers.recipe import train_variant

    method = spec["method"]
    run = trial_params(params, method, spec["budget"], spec["seed"], spec["setting"])
    files = resolve_base_model(run.model)
    started = time.perf_counter()
    result = train_variant(method, run.variants[method], run, files, root / DATA_DIR, scratch / "adapter",
                           scratch / "checkpoints", live=None)
    meta = result.metadata
    fp32 = run.model.model_copy(update={"dtype": "float32", "load_in_4bit": False})
    tokenizer = load_tokenizer(files, run.model)
    model = PeftModel.from_pretrained(load_causal_lm(files, fp32), str(scratch / "adapter")).eval()
    figures = measure_trial(model, tokenizer, chat_format(tokenizer), run, root, spec["phase"])
    curve = [(int(r["step"]), float(r["val_loss"])) for r in result.steps if r.get("val_loss") is not None]
    return {**spec, "val_loss": meta.get("final_val_loss"), "curve": curve,
            "metrics": {"val_loss": meta.get("final_val_loss"), **figures},
            "train_seconds": meta["train_seconds"], "tokens_per_second": meta.get("tokens_per_second"),
            "trainable_parameters": meta.get("trainable_parameters"),
            "trial_seconds": time.perf_counter() - started}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.study_worker")
    for flag in ("--params", "--trials", "--results"):
        parser.add_argument(flag, required=True)
    args = parser.parse_args(argv)
    params = load_params(Path(args.params))
    for spec in json.loads(Path(args.trials).read_text()):
        print(f"[study] {spec['phase']} trial {spec.get('position', '?')}: {spec['method']}, budget {spec['budget']}, "
              f"seed {spec['seed']}, "
              f"{json.dumps(spec['setting'], sort_keys=True)}", flush=True)
        with tempfile.TemporaryDirectory(prefix="study-trial-") as scratch:
            record = run_trial(params, spec, Path.cwd(), Path(scratch))
        with Path(args.results).open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        print(f"[study]   validation loss {record['val_loss']:.4f} in {record['trial_seconds']:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
