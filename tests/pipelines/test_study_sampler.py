"""A tuning resumed in a new worker (a later sitting, a killed worker) goes on: it does not ask
the configurations its seeded start-up stream asked before."""

from __future__ import annotations

from pathlib import Path

import optuna

from pipelines.params import Params
from pipelines.study.tuning import optuna_study


def test_a_resumed_tuning_does_not_ask_its_first_configuration_again(tmp_path: Path):
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    params = Params()
    params = params.model_copy(update={"store": params.store.model_copy(update={"url": f"sqlite:///{tmp_path}/s.db"})})
    job = {"tuning": "key/pure_grit/32", "method": "pure_grit", "steps": 32}
    asked = []
    for _ in range(2):                      # two workers, one after the other, on one study
        tuned = optuna_study(params, tmp_path, job)
        trial = tuned.ask()
        asked.append(trial.suggest_float("learning_rate", 1e-4, 1e-2, log=True))
        tuned.tell(trial, 1.0)
    assert params.study.startup > 2 and asked[0] != asked[1]


JOB = {"tuning": "k/m/4", "method": "m", "steps": 4}


def _tune(params: Params, root: Path, job: dict, configurations: int, kill_at: int | None = None) -> list:
    """Ask, report at steps 2 and 4 (pruning as told), tell; with ``kill_at``, the worker dies
    in the first configuration from number ``kill_at`` on that passes its first rung, and a new
    worker resumes."""
    from pipelines.study.tuning import finished_configurations, reseed

    tuned = optuna_study(params, root, job)
    while finished_configurations(tuned) < configurations:
        reseed(tuned, params, job)
        trial = tuned.ask()
        rate = trial.suggest_float("learning_rate", 1e-4, 1e-2, log=True)
        loss = (rate * 1e5) % 1.0            # uneven: every rung has close calls
        state = None
        for step in (2, 4):
            trial.report(loss * (1 + 1 / step), step)
            if trial.should_prune():
                state = optuna.trial.TrialState.PRUNED
                break
            if kill_at is not None and finished_configurations(tuned) >= kill_at and step == 2:
                kill_at = None                        # left RUNNING, its first rung's value recorded
                tuned = optuna_study(params, root, job)
                break
        else:
            tuned.tell(trial, loss)
            continue
        if state is not None:
            tuned.tell(trial, state=state)
    return [(t.params, t.state) for t in tuned.trials if not t.user_attrs.get("interrupted")]


def test_a_tuning_killed_mid_trial_goes_on_as_if_it_had_not_been(tmp_path: Path):
    """The killed configuration is asked again first, the sampler draws the k-th configuration
    the same way, and the pruner does not count the killed trial's reports: the finished trials
    equal an uninterrupted tuning's."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    params = Params()
    # A seed whose tuning promotes trials often enough that a killed one's reports would change
    # later promotions if the pruner counted them (it does with Optuna's pruner as it is).
    study = params.study.model_copy(update={"startup": 2, "min_steps": 2, "seed": 1})
    params = params.model_copy(update={"study": study})

    def at(url: str) -> Params:
        return params.model_copy(update={"store": params.store.model_copy(update={"url": url})})

    whole = _tune(at(f"sqlite:///{tmp_path}/whole.db"), tmp_path, JOB, 12)
    assert any(state == optuna.trial.TrialState.PRUNED for _, state in whole)
    for kill_at in range(12):
        killed = _tune(at(f"sqlite:///{tmp_path}/killed-{kill_at}.db"), tmp_path, JOB, 12, kill_at)
        assert killed == whole, f"killed after configuration {kill_at}"


def test_a_finished_tuning_is_read_as_finished_without_a_worker(tmp_path: Path):
    """The study process reads how far a tuning is (and starts no worker for a finished one); a
    trial a killed worker left running is not a finished configuration."""
    from db.store import open_store
    from db.tuning_journal import journal_logs
    from pipelines.study.tuning import configurations_finished

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    params = Params()
    url = f"sqlite:///{tmp_path}/s.db"
    params = params.model_copy(update={"store": params.store.model_copy(update={"url": url})})
    store = open_store(url, tmp_path)
    assert configurations_finished(store, "k/m/4") == 0
    assert journal_logs(store, "k/m/4") == []                                  # reading created nothing
    _tune(params, tmp_path, JOB, 3)
    assert configurations_finished(store, "k/m/4") == 3
    optuna_study(params, tmp_path, JOB).ask()                 # left running, as by a kill
    assert configurations_finished(store, "k/m/4") == 3
    assert configurations_finished(store, "k/other/4") == 0


def draws(params: Params, root: Path, job: dict, count: int) -> list[dict]:
    tuned = optuna_study(params, root, job)
    asked = []
    for _ in range(count):
        trial = tuned.ask()
        asked.append({"learning_rate": trial.suggest_float("learning_rate", 1e-4, 1e-2, log=True),
                      "damping": trial.suggest_float("damping", 1e-4, 1e-1, log=True)})
        tuned.tell(trial, 1.0)
    return asked


def test_each_method_and_run_length_draws_its_own_settings(tmp_path: Path):
    """One seed for every tuning drew the same sequence everywhere (the 192-step search tried the
    96-step settings again); the sampler's seed is now the tuning's, and stable: the same part
    draws the same settings in another store, and the seed is a hash, not Python's salted one."""
    from evaluation.tuning import sampler_seed

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    params = Params()

    def at(name: str) -> Params:
        return params.model_copy(update={"store": params.store.model_copy(update={"url": f"sqlite:///{tmp_path}/{name}.db"})})

    short = draws(at("a"), tmp_path, {"tuning": "k/pure_grit/96", "method": "pure_grit", "steps": 96}, 3)
    long = draws(at("b"), tmp_path, {"tuning": "k/pure_grit/192", "method": "pure_grit", "steps": 192}, 3)
    other = draws(at("c"), tmp_path, {"tuning": "k/grit_paper/96", "method": "grit_paper", "steps": 96}, 3)
    again = draws(at("d"), tmp_path, {"tuning": "k/pure_grit/96", "method": "pure_grit", "steps": 96}, 3)
    assert all(a != b for a, b in zip(short, long, strict=True))
    assert all(a != b for a, b in zip(short, other, strict=True))
    assert again == short
    assert sampler_seed(0, "pure_grit", 96) == 1710004285 and sampler_seed(0, "pure_grit", 96, 1) != 1710004285


def test_an_extension_starts_from_the_best_configuration_so_far_not_a_lone_first_draw(tmp_path: Path):
    """An extension's study holds the best configuration of the tunings before it, as it ended
    there (not one of its configurations, not trained again): a first draw worse than it at the
    first rung is stopped there, where a lone first trial would always go on."""
    from pipelines.study.plan import study_rungs
    from pipelines.study.tuning import configurations_finished

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    params = Params()
    params = params.model_copy(update={"store": params.store.model_copy(update={"url": f"sqlite:///{tmp_path}/s.db"}),
                                       "study": params.study.model_copy(update={"methods": ["peft_lora"]})})
    assert study_rungs(params, 32) == [8, 24]
    space = [{"name": "learning_rate", "low": 1e-5, "high": 1e-2, "log": True, "target": "train"}]
    job = {"tuning": "k/peft_lora/32/extended-1", "method": "peft_lora", "steps": 32, "extension": 1, "space": space,
           "carried": {"setting": {"learning_rate": 1.2e-4}, "curve": [[8, 1.0], [24, 0.9], [32, 0.8]],
                       "val_loss": 0.8, "stopped_at": None}}
    tuned = optuna_study(params, tmp_path, job)
    assert [t.params for t in tuned.trials] == [{"learning_rate": 1.2e-4}]
    from db.store import open_store

    assert configurations_finished(open_store(params.store.url, tmp_path), job["tuning"]) == 0
    trial = tuned.ask()
    trial.suggest_float("learning_rate", 1e-5, 1e-2, log=True)
    trial.report(1.5, 8)
    assert trial.should_prune()
    alone = optuna.create_study(pruner=optuna.pruners.SuccessiveHalvingPruner(min_resource=8, reduction_factor=3))
    first = alone.ask()
    first.report(1.5, 8)
    assert not first.should_prune()                                      # the artefact it removes
