"""The Optuna study of one tuning (``pipelines/study/``, docs/study.md): a method at a run length
(and range extension), on a journal in the results store (``db/tuning_journal.py``), with the
study section's sampler and the successive-halving pruner at the study's rungs.

A tuning is the same whoever runs it and however often it is interrupted: the configuration a
killed worker was training is asked again first, the sampler is seeded by the tuning's method,
run length and range extension and by how many configurations it has finished (not by its history
of restarts), and the pruner ignores interrupted trials; so a study spread over workers chooses
what one worker would. No configuration goes to the end only for coming first: a tuning's first
is the method's defaults (enqueued, trained to the end: the pruner never stops it, though its
losses at the rungs are the ones later configurations must beat), an extension's the best
configuration so far (carried, not retrained).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from evaluation.tuning import sampler_seed
from pipelines.params import Params
from pipelines.study.plan import study_rungs
from pipelines.study.trial import trial_store

DEFAULTS = "published_defaults"                 # the user attribute of a tuning's enqueued defaults
CARRIED = "carried"                             # ... of the incumbent an extension starts from


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
