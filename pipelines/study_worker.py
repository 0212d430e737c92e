"""The trials of one study method, in a process of their own (``pipelines/study.py`` starts it):

    python -m pipelines.study_worker --params P --job J --results R

``J`` is one job of one method:

- ``tune``: Optuna tuning at one run length. The worker opens (or resumes) the Optuna study
  named in the job, whose journal lives in the results store (``db/tuning_journal.py``), and
  asks for configurations of the method's declared space until the study holds
  ``configurations`` finished ones. The first is the method's published defaults (enqueued,
  trained to the end: the pruner never stops it, though its losses at the rungs are the ones
  later configurations must beat); the sampler draws the rest. Each trains on ``train.seed``,
  reports its validation loss whenever it is measured, and stops when the successive-halving
  pruner says so.
- ``runs``: fixed trials (finalists, tests): each a (phase, steps, seed, setting).

Every trial is trained with the recipe every variant trains with (``trainers.recipe``), reloaded
from the saved adapter the way export and evaluation load it, and measured in fp32: tuning and
finalist trials on the validation split only, test trials also on the test split (its loss) and
the held-out test sets. Each finished trial is recorded in the results store by this process
*before* Optuna is told of it (a kill in between leaves a trial Optuna re-asks and that replaces
its row: every trial is recorded once), then appended to ``R`` as one JSON line for the study
process's ledger. One process per method: importing Unsloth patches libraries for the whole
process.

A tuning is the same whoever runs it and however often it is interrupted: the configuration a
killed worker was training is asked again first, the sampler is seeded by the tuning's method,
run length and range extension and by how many configurations it has finished (not by its history
of restarts), and the pruner ignores interrupted trials; so a study spread over workers chooses
what one worker would. No configuration goes to the end only for coming first: a tuning's first
is the method's defaults, an extension's the best configuration so far (carried, not retrained).
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
from core.quiet import silence_known_import_noise
from evaluation.config import HARD_LIMITS
from evaluation.tuning import Dimension, Mechanism, first_rung, rungs, sampler_seed
from pipelines.params import Params, load_params
from pipelines.paths import DATA_DIR

PER_PROMPT_KINDS = ("rate", "probability")     # their values are one per prompt (or fact pair)
DEFAULTS = "published_defaults"                 # the user attribute of a tuning's enqueued defaults
CARRIED = "carried"                             # ... of the incumbent an extension starts from


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


def mechanisms(params: Params, method: str, steps: int) -> list[Mechanism]:
    """When ``method``'s mechanism acts in a run of ``steps``, for every configuration the study
    may give it: a tuned reprojection warm-up (cadence ``budget``) anywhere within its hard limits
    (the first reprojection does not move monotonically with it: the interval shrinks as the
    warm-up grows). LoRA has none."""
    from trainers.config import variant_grit
    from trainers.grit.cadence import for_budget, reprojection_steps

    variant = params.variants[method]
    if not variant.grit:
        return []
    grit = variant_grit(params.grit, variant)
    fractions = [grit.reprojection_warmup_fraction]
    if grit.cadence == "budget":              # its warm-up is tuned (evaluation.tuning.search_space)
        latest = HARD_LIMITS["reprojection_warmup_fraction"][1]
        fractions = [k / steps for k in range(round(latest * steps) + 1)]
    found = []
    for fraction in fractions:
        run = for_budget(grit.model_copy(update={"reprojection_warmup_fraction": fraction}), steps)
        reprojections = reprojection_steps(run, steps)
        found.append(Mechanism(run.ng_warmup_steps + 1 if run.precondition else None,
                               reprojections[0] if reprojections else None, run.reprojection_freq))
    return found


def study_rungs(params: Params, steps: int) -> list[int]:
    """The pruner's rungs at a run length: the same for every method (LoRA's too), the first
    where every method's mechanism has acted (``evaluation.tuning.first_rung``)."""
    study = params.study
    acting = [m for method in study.methods if method in params.variants for m in mechanisms(params, method, steps)]
    return rungs(first_rung(steps, acting, study.natural_gradient_share, study.min_steps), study.reduction_factor,
                 steps)


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
        extra["test_loss"] = split_loss(model, tokenizer, root / DATA_DIR / "test.jsonl", params)
    subject = Subject("trial", model, tokenizer, chat, sets, params.eval.aqi_layers, progress=False,
                      max_new_tokens=params.eval.max_new_tokens, sampling=sampling_of(params.eval))
    outcomes = measure(subject, metrics)
    figures = point_figures(outcomes, params.eval.gamma)
    per_prompt = {m.name: [float(v) for v in outcomes.values[m.name]] for m in metrics
                  if m.kind in PER_PROMPT_KINDS and m.name in outcomes.values and m is not VALIDATION_DECLINE}
    return {VALIDATION_DECLINE.name: math.nan} | {m.name: figures[m.name] for m in metrics} | extra, per_prompt


def split_loss(model, tokenizer, path: Path, params: Params) -> float:
    """Mean token loss of the trained model on a held-out split (the test split: never selected on)."""
    from trainers.sft import ValidationLoss, tokenized_examples

    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the study's test loss needs data.test_fraction > 0")
    examples = tokenized_examples(read_jsonl(path), tokenizer)
    return ValidationLoss(examples, tokenizer.pad_token_id, 1, params.train.per_device_batch_size).measure(model)


def run_trial(params: Params, spec: dict[str, Any], root: Path, scratch: Path, on_validation=None) -> dict[str, Any]:
    from peft import PeftModel

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
                                        "revision": result.get("revision"), "host": result.get("host"),
                                        "data": result.get("data")}),
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
            "setting": json.loads(row.setting), "tuning": extra.get("tuning", ""), "val_loss": row.val_loss,
            "curve": json.loads(row.curve_json), "stopped_at": extra.get("stopped_at"), "metrics": figures,
            "per_prompt": extra.get("per_prompt", {}), "train_seconds": row.train_seconds,
            "tokens_per_second": row.tokens_per_second, "trainable_parameters": row.trainable_parameters,
            "trial_seconds": trial_seconds, "revision": extra.get("revision"), "host": extra.get("host"),
            "data": extra.get("data")}


def _without_interrupted(study):
    """``study`` as the pruner should see it: a trial a killed worker left has reported values at
    some rungs, and counting them would change every later promotion (the configuration is
    asked again and reports them once more)."""

    class Completed:
        def __getattr__(self, name: str):
            return getattr(study, name)

        def get_trials(self, deepcopy: bool = True, states=None):
            trials = study.get_trials(deepcopy=deepcopy, states=states)
            return [t for t in trials if not t.user_attrs.get("interrupted")]

    return Completed()


def study_pruner(params: Params, steps: int):
    """Successive halving at the study's rungs for a run of ``steps`` (:func:`study_rungs`); with
    no rung below the run length it never prunes."""
    import optuna

    class Pruner(optuna.pruners.SuccessiveHalvingPruner):
        def prune(self, study, trial) -> bool:
            stop = super().prune(_without_interrupted(study), trial)    # records its value at the rung
            return stop and not trial.user_attrs.get(DEFAULTS)          # the defaults train to the end

    first = (study_rungs(params, steps) or [steps + 1])[0]
    return Pruner(min_resource=first, reduction_factor=params.study.reduction_factor)


def tuning_seed(params: Params, job: dict[str, Any]) -> int:
    """The sampler's seed for the job's tuning: the study's seed, the method, the run length and
    the range extension together (``evaluation.tuning.sampler_seed``)."""
    return sampler_seed(params.study.seed, job["method"], job["steps"], job.get("extension", 0))


def reseed(tuned, params: Params, job: dict[str, Any]) -> None:
    """TPE seeded by the tuning (:func:`tuning_seed`) and how many configurations it has finished:
    the k-th configuration is drawn the same way in one worker, after a restart or in another
    worker (a TPE seeded once per process asked a resumed study's start-up configurations again,
    or other ones)."""
    import optuna

    if params.study.sampler == "tpe":
        tuned.sampler = optuna.samplers.TPESampler(seed=tuning_seed(params, job) + finished_configurations(tuned),
                                                   n_startup_trials=params.study.startup)


def optuna_study(params: Params, root: Path, job: dict[str, Any]):
    """The job's Optuna study (created or resumed) on the results store's journal, with the
    study section's sampler and pruner. A trial a killed worker left running is marked
    interrupted (not counted) and its configuration queued to be asked again first."""
    import optuna

    from db.tuning_journal import StoreJournal

    study = params.study
    store = trial_store(params, root)
    storage = optuna.storages.JournalStorage(StoreJournal(store, job["tuning"]))
    seed = tuning_seed(params, job)
    sampler = (optuna.samplers.TPESampler(seed=seed, n_startup_trials=study.startup) if study.sampler == "tpe"
               else optuna.samplers.QMCSampler(qmc_type="sobol", scramble=True, seed=seed))
    tuned = optuna.create_study(study_name=job["tuning"], storage=storage, sampler=sampler,
                                pruner=study_pruner(params, job["steps"]), direction="minimize",
                                load_if_exists=True)
    if not tuned.get_trials(deepcopy=False):
        if job.get("carried"):
            tuned.add_trial(carried_trial(params, job))
        if job.get("defaults"):
            tuned.enqueue_trial(job["defaults"], user_attrs={DEFAULTS: True})   # the first, trained to the end
    for stale in tuned.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        storage.set_trial_user_attr(stale._trial_id, "interrupted", True)   # asked again, not counted
        storage.set_trial_state_values(stale._trial_id, optuna.trial.TrialState.FAIL)
        if stale.params:
            kept = {DEFAULTS: True} if stale.user_attrs.get(DEFAULTS) else {}
            tuned.enqueue_trial(stale.params, user_attrs={"retry_of": stale.number, **kept})
    reseed(tuned, params, job)
    return tuned


def carried_trial(params: Params, job: dict[str, Any]):
    """The best configuration of the tunings before a range extension, put into the extension's
    study as it ended there (not trained again: the same setting on the same seed): the first
    configuration the extension's pruner compares a draw with, so that no draw goes to the end
    only for coming first (sequential successive halving promotes a lone first trial). It is not
    one of the extension's configurations."""
    import optuna

    carried = job["carried"]
    curve = {int(step): float(loss) for step, loss in carried["curve"]}
    ended = carried["stopped_at"] is None
    reached = {f"completed_rung_{n}": curve[step] for n, step in enumerate(study_rungs(params, job["steps"]))
               if step in curve}
    distributions = {d["name"]: optuna.distributions.FloatDistribution(d["low"], d["high"], log=d["log"])
                     for d in job["space"]}
    return optuna.trial.create_trial(
        state=optuna.trial.TrialState.COMPLETE if ended else optuna.trial.TrialState.PRUNED,
        value=carried["val_loss"] if ended else None, params=carried["setting"], distributions=distributions,
        intermediate_values=curve, user_attrs={CARRIED: True}, system_attrs=reached)


def finished_configurations(tuned) -> int:
    """Configurations tried to a verdict: trained to the end, pruned, or diverged (a diverged one
    counts: it is a configuration the method was given); not those a killed worker left."""
    import optuna

    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.FAIL)
    return sum(not (t.user_attrs.get("interrupted") or t.user_attrs.get(CARRIED))
               for t in tuned.get_trials(deepcopy=False, states=states))


def configurations_finished(store, tuning: str) -> int:
    """How many configurations the Optuna study ``tuning`` in ``store`` has tried to a verdict
    (0 before it begins); it only reads, so the study process can skip a finished tuning without
    starting a worker for it."""
    import optuna

    from db.tuning_journal import StoreJournal, journal_logs

    if not journal_logs(store, tuning):
        return 0
    storage = optuna.storages.JournalStorage(StoreJournal(store, tuning))
    return finished_configurations(optuna.load_study(study_name=tuning, storage=storage))


def sitting_over(job: dict[str, Any], trained: int) -> bool:
    """Past the sitting's deadline, start no new trial (the study process then stops the sitting);
    a job trains at least one, so every sitting moves the study on, however short."""
    return trained > 0 and job.get("deadline") is not None and time.time() >= job["deadline"]


def tune(params: Params, job: dict[str, Any], root: Path, results: Path) -> None:
    """Ask, train, tell until the Optuna study holds ``configurations`` finished trials (or the
    sitting is over)."""
    import optuna

    tuned = optuna_study(params, root, job)
    store = trial_store(params, root)
    space = [Dimension(**d) for d in job["space"]]
    trained = 0
    while (finished := finished_configurations(tuned)) < job["configurations"] and not sitting_over(job, trained):
        trained += 1
        reseed(tuned, params, job)
        trial = tuned.ask()
        setting = {d.name: float(f"{trial.suggest_float(d.name, d.low, d.high, log=d.log):.4g}") for d in space}
        spec = {"phase": "tune", "method": job["method"], "steps": job["steps"], "seed": job["seed"],
                "setting": setting, "tuning": job["tuning"]}
        print(f"[study] tune {job['method']} at {job['steps']} steps, configuration {finished + 1}/"
              f"{job['configurations']}: {json.dumps(setting, sort_keys=True)}", flush=True)

        def report(step: int, val_loss: float, trial=trial) -> bool:
            trial.report(val_loss, step)
            return step < job["steps"] and trial.should_prune()       # a run at its end is done

        with tempfile.TemporaryDirectory(prefix="study-trial-") as scratch:
            record = provenance(run_trial(params, spec, root, Path(scratch), on_validation=report), job)
        store_trial(store, job["run_id"], record)          # before Optuna hears of it
        loss = record["val_loss"]
        if record["stopped_at"] is not None:
            tuned.tell(trial, state=optuna.trial.TrialState.PRUNED)
        elif loss is None or not math.isfinite(loss):
            tuned.tell(trial, state=optuna.trial.TrialState.FAIL)
        else:
            tuned.tell(trial, loss)
        append(results, record)
        state = f"pruned at step {record['stopped_at']}" if record["stopped_at"] is not None else "trained to the end"
        print(f"[study]   validation loss {loss if loss is None else f'{loss:.4f}'}, {state}, "
              f"{record['trial_seconds']:.0f} s", flush=True)


def runs(params: Params, job: dict[str, Any], root: Path, results: Path) -> None:
    store = trial_store(params, root)
    for trained, spec in enumerate(job["runs"]):
        if sitting_over(job, trained):
            return
        print(f"[study] {spec['phase']} {spec.get('position', '?')}: {spec['method']}, {spec['steps']} steps, "
              f"seed {spec['seed']}, {json.dumps(spec['setting'], sort_keys=True)}", flush=True)
        with tempfile.TemporaryDirectory(prefix="study-trial-") as scratch:
            record = provenance(run_trial(params, spec, root, Path(scratch)), job)
        store_trial(store, job["run_id"], record)
        append(results, record)
        print(run_summary(record), flush=True)


def run_summary(record: dict[str, Any]) -> str:
    """The line a finished finalist or test run prints: which run it was (two workers' lines
    interleave) and the loss its phase is judged on, the held-out test loss for a test run."""
    name = f"{record['method']}, {record['steps']} steps, seed {record['seed']}"
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


def provenance(record: dict[str, Any], job: dict[str, Any]) -> dict[str, Any]:
    """The code, host and data that trained a trial, kept with it in the store and the ledger."""
    import os

    return {**record, "revision": job.get("revision"), "host": os.uname().nodename, "data": job.get("data")}


def append(results: Path, record: dict[str, Any]) -> None:
    with results.open("a") as handle:
        handle.write(json.dumps(record) + "\n")


# the environment variable by which the study process gives a trial process its own pid
STUDY_PARENT = "GRIT_STUDY_PARENT"


def end_with_parent(every: float = 1.0) -> None:
    """End this process when the study process that reads its results ends (killed, say): an
    orphan would go on training and telling Optuna of trials nobody records. The study process
    names itself (``STUDY_PARENT``): a parent read here, after this module's imports, may already
    be whoever adopted the orphan."""
    import os
    import threading

    parent = int(os.environ.get(STUDY_PARENT, os.getppid()))

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(every)
        os._exit(1)

    threading.Thread(target=watch, name="end with parent", daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    end_with_parent()
    silence_known_import_noise()
    parser = argparse.ArgumentParser(prog="python -m pipelines.study_worker")
    for flag in ("--params", "--job", "--results"):
        parser.add_argument(flag, required=True)
    args = parser.parse_args(argv)
    params = load_params(Path(args.params))
    job = json.loads(Path(args.job).read_text())
    (tune if job["kind"] == "tune" else runs)(params, job, Path.cwd(), Path(args.results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
