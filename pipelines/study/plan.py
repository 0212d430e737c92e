"""What the study runs (``pipelines/study/``, docs/study.md): its parts, each method's declared
space and published defaults, the Optuna study of each tuning, the pruner's rungs, and how a
trial, a tuning's best configuration and the report's range notes are named and read. No
training, no store: every function here is a function of the params (and of recorded trials).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from evaluation.config import HARD_LIMITS
from evaluation.study import Trial
from evaluation.tuning import (
    Dimension,
    Mechanism,
    Scored,
    edges,
    finalists,
    first_rung,
    rungs,
    search_space,
    setting_key,
    widens,
)
from pipelines.params import Params
from pipelines.stage import stage_params
from trainers.config import variant_grit


def declared_study_params(params: Params, root: Path) -> dict[str, Any]:
    """The values of the params the study stage declares in ``dvc.yaml`` (what DVC re-runs it
    for); every param where there is no ``dvc.yaml`` to say."""
    dumped = params.model_dump(mode="json")
    keys = stage_params(root).get("study")
    if not keys:
        return dumped
    declared: dict[str, Any] = {}
    for key in keys:
        value, node = dumped, declared
        for part in key.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        *parents, last = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return declared


def method_space(params: Params, method: str) -> list[Dimension]:
    """The declared space of ``method`` (``evaluation.tuning.search_space``)."""
    variant, study = params.variants[method], params.study
    budget_cadence = variant.grit and variant_grit(params.grit, variant).cadence == "budget"
    return search_space(variant.grit, budget_cadence, study.learning_rate_range, study.damping_range,
                        study.reprojection_warmup_range, study.energy_range)


def published_defaults(params: Params, method: str, space: list[Dimension]) -> dict[str, float]:
    """The setting ``method`` is published with, in its tuned dimensions: LoRA's customary learning
    rate (``study.default_learning_rate``) and, for GRIT, the variant's own damping (the paper's
    1e-3), eigen-energy (tau 0.99) and reprojection warm-up (the cadence rule's share of the run);
    what is not tuned (two-sided reprojection, the minimum rank) the variant fixes."""
    variant = params.variants[method]
    grit = variant_grit(params.grit, variant) if variant.grit else None
    return {d.name: params.study.default_learning_rate if d.name == "learning_rate" else float(getattr(grit, d.name))
            for d in space}


def tuning_name(prefix: str, steps: int, extension: int) -> str:
    """The Optuna study of one method's tuning at one run length (and range extension); ``prefix``
    is the method's in the study's ledger (``Ledger.tuning``), which outlives a run id across
    sittings."""
    return f"{prefix}/{steps}" + (f"/extended-{extension}" if extension else "")


def identity(trial: dict | Trial) -> tuple:
    """What makes a trial the same trial: a planned spec (dict) or a recorded ``Trial``."""
    fields = trial if isinstance(trial, dict) else vars(trial)
    return fields["phase"], fields["method"], fields["steps"], fields["seed"], setting_key(fields["setting"])


def study_parts(params: Params) -> list[tuple[str, int]]:
    """The study's independent parts, in plan order: each method at each run length is tuned,
    selected and tested on its own (only the report compares them)."""
    return [(method, steps) for steps in params.study.steps for method in params.study.methods]


def mechanisms(params: Params, method: str, steps: int) -> list[Mechanism]:
    """When ``method``'s mechanism acts in a run of ``steps``, for every configuration the study
    may give it: a tuned reprojection warm-up (cadence ``budget``) anywhere within its hard limits
    (the first reprojection does not move monotonically with it: the interval shrinks as the
    warm-up grows). LoRA has none."""
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


def span(dimension: Dimension) -> str:
    return f"[{dimension.low:.3g}, {dimension.high:.3g}]"


def remaining_edges(params: Params, method: str, steps: int, space: list[Dimension],
                    setting: dict[str, float]) -> list[str]:
    """The report's word on each tuned value of the chosen setting still at an edge of its range as
    last searched: at its hard limit, or after the last extension the study allows."""
    study = params.study
    return [f"{method} at {steps} steps: the chosen {d.name} {setting[d.name]:.3g} lies at the {side} edge of "
            f"{span(d)}, " + (f"its hard limit ({HARD_LIMITS[d.name][0 if side == 'low' else 1]:g}, "
                              "evaluation/tuning.py)" if not widens(d, side)
                              else f"after the {study.edge_extensions} extension(s) the study allows")
            for d, side in edges(space, setting, study.edge_margin)]


def incumbent(tuning: list[Trial]) -> dict[str, Any]:
    """The best tuning trial so far as a range extension's study starts from it
    (``pipelines.study.tuning.carried_trial``)."""
    best = setting_key(finalists([scored(t) for t in tuning], 1)[0])
    trial = next(t for t in tuning if setting_key(t.setting) == best)
    return {"setting": trial.setting, "curve": trial.curve, "val_loss": trial.val_loss, "stopped_at": trial.stopped_at}


def scored(trial: Trial) -> Scored:
    """A tuning trial as selection sees it: its last validation loss and the step it was at."""
    reached = trial.stopped_at if trial.pruned else trial.steps
    loss = trial.curve[-1][1] if trial.pruned and trial.curve else trial.val_loss
    return Scored(trial.setting, trial.seed, loss, reached)
