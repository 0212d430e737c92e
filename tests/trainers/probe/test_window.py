"""The probe judges GRIT after its natural gradient has started: its measured steps are the
``probe.steps`` after the warm-up of the run being probed (``measure.probe_start``). A probe of
the first steps of a variant whose warm-up is longer compared two identical arms and called any
GRIT inert (the study's first probe of ``grit_paper``: cosine 1.0, relative difference 0.0)."""

from __future__ import annotations

from pathlib import Path

import torch

from pipelines.params import parse_params
from pipelines.study.trial import trial_params
from trainers.base_model import resolve_base_model
from trainers.config import preconditioner, variant_grit
from trainers.engines import build_peft
from trainers.grit.cadence import for_budget
from trainers.probe.math import compare_updates
from trainers.probe.measure import probe_setup, probe_start, start_difference, update_between
from trainers.probe.verdict import EFFECTIVE, decide, reasons
from trainers.sft import ordered_examples

PARAMS = parse_params({"model": {"source": "tiny"}, "lora": {"r": 4, "alpha": 8},
                       "train": {"max_steps": 12, "per_device_batch_size": 2, "warmup_steps": 0},
                       "probe": {"steps": 4}})


def test_the_window_follows_the_warm_up_of_the_run_being_probed():
    budget = PARAMS.grit.model_copy(update={"cadence": "budget", "ng_warmup_fraction": 0.1})
    at = lambda steps: PARAMS.train.model_copy(update={"max_steps": steps})      # noqa: E731
    assert probe_start(budget, at(96), 5) == 10 and probe_start(budget, at(192), 5) == 19
    assert probe_start(PARAMS.grit, at(96), 5) == 0                  # cadence steps, no warm-up: as before
    written = PARAMS.grit.model_copy(update={"ng_warmup_steps": 30})
    assert probe_start(written, at(96), 5) == 30
    assert probe_start(written, at(32), 5) == 27                     # the window ends with the run
    assert probe_start(budget.model_copy(update={"precondition": False}), at(96), 5) == 0
    assert probe_start(None, at(96), 5) == 0                         # a peer: no warm-up


def test_every_study_probe_measures_preconditioned_steps_and_the_recorded_kinds_keep_their_window(study_profile):
    params = study_profile
    K = params.probe.steps
    starts = {}
    for steps in params.study.steps:
        for method in params.study.methods:
            variant = params.variants[method]
            if preconditioner(variant) is None:
                continue
            run = trial_params(params, method, steps, params.train.seed, {"learning_rate": 1e-3, "damping": 1e-3})
            grit = (variant_grit(run.grit, run.variants[method]).model_copy(update={"reprojection": False})
                    if variant.grit else None)
            start = starts[method, steps] = probe_start(grit, run.train, K)
            assert start + K <= steps
            if grit is not None:        # every measured step (start + 1 onwards) is a natural-gradient step
                assert start >= for_budget(grit, steps).ng_warmup_steps, (method, steps)
    # pure GRIT and the peers have no warm-up: their probes measure the first K steps, as the
    # probes recorded before this window existed did; the paper's variants start later than K
    assert starts["pure_grit", 96] == starts["riemannian_lora", 96] == 0
    assert all(starts[m, 96] == 10 > K for m in ("grit_paper", "grit_paper_grafted", "grit_paper_full_rank"))


def test_a_variant_whose_warm_up_outlasts_the_probe_is_probed_after_it(tmp_path: Path):
    grit = PARAMS.grit.model_copy(update={"cadence": "budget", "ng_warmup_fraction": 0.4, "reprojection": False})
    K = PARAMS.probe.steps
    start = probe_start(grit, PARAMS.train, K)
    assert start == 5 > K                                   # round(0.4 x 12): the first K steps are all plain
    torch.manual_seed(0)
    engine = build_peft(resolve_base_model(PARAMS.model), PARAMS)
    rows = [{"prompt": f"Question {i}: how long do I bake loaf number {i}?",
             "response": f"Bake loaf {i} for {20 + i} minutes, then let it cool."} for i in range(24)]
    examples = ordered_examples(rows, engine.tokenizer, (start + K) * PARAMS.train.per_device_batch_size, 0)
    measured, control, arm = probe_setup("grit_paper", engine.model, engine.tokenizer, examples, PARAMS.train, grit,
                                         "optimizer", PARAMS.probe, tmp_path)
    verdict, checks = decide(measured, PARAMS.probe)
    assert verdict == EFFECTIVE, reasons(checks)
    assert control.steps == arm.steps == start + K and measured.arm_steps == measured.grit_steps_run == K
    assert start_difference(control, arm, start) == 0.0     # the warm-up trains both arms alike
    assert all(len(m.step_update_cosines) == K for m in measured.modules)
    # what the probe measured before: the first K steps, identical in both arms (inert by construction)
    first = [compare_updates(update_between(arm, name, 0, K), update_between(control, name, 0, K))
             for name in control.scalings]
    assert all(c.relative_difference == 0.0 for c in first)
    assert all(m.update.relative_difference > 0.05 for m in measured.modules)
