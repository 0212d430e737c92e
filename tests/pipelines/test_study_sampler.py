"""A tuning resumed in a new worker (a later sitting, a killed worker) goes on: it does not ask
the configurations its seeded start-up stream asked before."""

from __future__ import annotations

from pathlib import Path

import optuna

from pipelines.params import Params
from pipelines.study_worker import optuna_study


def test_a_resumed_tuning_does_not_ask_its_first_configuration_again(tmp_path: Path):
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    params = Params()
    params = params.model_copy(update={"store": params.store.model_copy(update={"url": f"sqlite:///{tmp_path}/s.db"})})
    job = {"tuning": "key/pure_grit/32"}
    asked = []
    for _ in range(2):                      # two workers, one after the other, on one study
        tuned = optuna_study(params, tmp_path, job)
        trial = tuned.ask()
        asked.append(trial.suggest_float("learning_rate", 1e-4, 1e-2, log=True))
        tuned.tell(trial, 1.0)
    assert params.study.startup > 2 and asked[0] != asked[1]
