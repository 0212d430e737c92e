"""DVC stage ``study``: does GRIT beat LoRA when each is tuned? (docs/study.md)

Reads the ``study`` section and, for every part of the study (a method at a run length of
``study.steps``), trains its trials in processes of their own (``job.py``, one per method and
job):

1. tuning: Optuna asks ``study.configurations`` configurations of the method's declared space
   (``evaluation/tuning.py``), the first its published defaults (trained to the end), each
   trained on ``train.seed`` and judged on the validation split only; the successive-halving
   pruner stops the weak ones early, at rungs where every method's mechanism has acted. A best
   setting at the edge of any tuned range widens that range within its hard limit and tunes
   again (``study.edge_extensions`` times at most);
2. selection: the ``study.finalists`` best configurations re-run with ``study.finalist_seeds``
   more seeds; the method's setting is the finalist with the lowest mean validation loss;
3. test: every method at its chosen setting, ``study.seeds`` seeds from ``study.test_seed`` on
   (never a seed selection saw), measured on the test split and the held-out test sets; GRIT
   methods against their controls by the paired test over seeds (and prompts), Holm.

Every trial is a row of ``study_trials`` in the results store as soon as it finishes, and
Optuna's journal lives in the same store (``tuning_journal``): a killed study resumes where it
stopped. Writes ``reports/study/`` (report.md, plots, trials.csv) and ``metrics/study.json``. With
``study.methods`` empty (the default profile) the stage trains nothing and keeps the last
study's report.

The package, from the command line down:

- ``__main__.py``: ``python -m pipelines.study`` (its flags, the stage, the report);
- ``worker.py``: the study workers (``--workers N``, ``--worker``): claims on parts, heartbeats;
- ``part.py``: one part: tune, choose over the selection seeds, test;
- ``sitting.py``: where a sitting starts (``open_sitting``), the ledger kept in step with the store;
- ``plan.py``: what the study runs (parts, spaces, defaults, rungs, names), from the params alone;
- ``job.py``: the process that trains one job's trials (``python -m pipelines.study.job``);
- ``tuning.py``: the Optuna study of one tuning (storage, sampler, pruner, resumption);
- ``trial.py``: one trial: its params, training, measurement, and its record in the store.
"""
