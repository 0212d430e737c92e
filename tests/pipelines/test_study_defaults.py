"""Each tuning starts from its method's published defaults: enqueued as its first configuration
and trained to the end, whatever the pruner would say of it."""

from __future__ import annotations

import json
import math
from pathlib import Path

import optuna

from pipelines.params import Params
from pipelines.study import job as trial_job
from pipelines.study import tuning
from pipelines.study.plan import method_space, published_defaults, study_rungs
from trainers.config import variant_grit


def test_the_defaults_are_the_papers_and_loras_customary_ones(study_profile):
    params = study_profile
    for method in params.study.methods:
        defaults = published_defaults(params, method, method_space(params, method))
        assert defaults["learning_rate"] == 2e-4                       # LoRA's customary rate, every method's
        if not params.variants[method].grit:
            assert set(defaults) == {"learning_rate"}
            continue
        assert defaults["damping"] == 1e-3
        grit = variant_grit(params.grit, params.variants[method])
        if grit.cadence == "budget":                                     # the paper variants
            assert defaults["energy_threshold"] == 0.99 and defaults["reprojection_warmup_fraction"] == 0.25
            assert grit.two_sided and grit.min_rank == 4 and grit.ng_warmup_fraction == 0.1


def fake_trial(params: Params, spec: dict, root: Path, scratch: Path, on_validation=None) -> dict:
    """A trial whose validation loss is the distance of its learning rate from 3e-3 (the defaults'
    2e-4 is far behind), reported at the study's rungs and at the end as the recipe reports it."""
    steps = spec["steps"]
    stopped, curve = None, []
    for step in [*study_rungs(params, steps), steps]:
        loss = abs(math.log(spec["setting"]["learning_rate"] / 3e-3)) + 1 / step
        curve.append((step, loss))
        if on_validation is not None and on_validation(step, loss):
            stopped = step
            break
    return {**spec, "val_loss": None if stopped else curve[-1][1], "curve": curve, "stopped_at": stopped,
            "metrics": {}, "per_prompt": {}, "train_seconds": 1.0, "tokens_per_second": 1.0,
            "trainable_parameters": 1, "trial_seconds": 1.0}


def test_the_defaults_are_the_first_trial_of_each_tuning_and_train_to_the_end(tmp_path: Path, monkeypatch):
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    monkeypatch.setattr(trial_job, "run_trial", fake_trial)
    monkeypatch.setattr(trial_job, "store_trial", lambda store, run_id, record: None)
    params = Params()
    params = params.model_copy(update={
        "store": params.store.model_copy(update={"url": f"sqlite:///{tmp_path}/s.db"}),
        "study": params.study.model_copy(update={"methods": ["peft_lora"], "startup": 2})})
    space = method_space(params, "peft_lora")
    for steps in (32, 96):
        results = tmp_path / f"results-{steps}.jsonl"
        job = {"kind": "tune", "method": "peft_lora", "steps": steps, "seed": 42, "tuning": f"k/peft_lora/{steps}",
               "configurations": 6, "space": [vars(d) for d in space], "run_id": "r",
               "defaults": published_defaults(params, "peft_lora", space)}
        trial_job.tune(params, job, tmp_path, results)
        records = [json.loads(line) for line in results.read_text().splitlines()]
        assert records[0]["setting"] == {"learning_rate": 2e-4} and records[0]["stopped_at"] is None
        assert any(r["stopped_at"] is not None for r in records)      # the pruner does prune the others
        assert all(r["setting"] != records[0]["setting"] for r in records[1:])   # enqueued once


def test_the_pruner_never_stops_the_defaults_even_when_they_fall_behind(tmp_path: Path):
    """Retried after a kill, say, the defaults meet configurations that did better at the rung:
    they still train to the end, and their losses at the rungs are recorded for the others."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    params = Params()
    params = params.model_copy(update={"study": params.study.model_copy(update={"methods": ["peft_lora"]})})
    study = optuna.create_study(pruner=tuning.study_pruner(params, 32))
    for value in (1.0, 1.1, 1.2):
        trial = study.ask()
        for step in (8, 24):
            trial.report(value, step)
            trial.should_prune()
        study.tell(trial, value)
    study.enqueue_trial({"learning_rate": 2e-4}, user_attrs={tuning.DEFAULTS: True})
    trial = study.ask()
    trial.suggest_float("learning_rate", 1e-4, 1e-2, log=True)
    for step in (8, 24):
        trial.report(9.0, step)
        assert not trial.should_prune()
    assert study.trials[-1].system_attrs.get("completed_rung_0") == 9.0
    worse = study.ask()
    worse.report(9.0, 8)
    assert worse.should_prune()                                           # an ordinary trial as bad is stopped
