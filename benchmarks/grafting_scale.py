"""Why GRIT without grafting learns slowly under AdamW: the scale of its natural-gradient steps.

The study's ``grit_paper`` (GRIT as its paper runs it: no grafting) and ``grit_paper_grafted``
differ in one switch, and at 32 steps their validation losses are far apart. This diagnosis
trains both from the same seed with one setting (``grit_paper``'s chosen one at that run length,
read from the committed study ledger, or ``--setting``) and measures, on every step where the
natural gradient is applied, what the optimizer then receives:

- the global norm of the preconditioned gradient over the raw one (before clipping);
- the factor by which ``train.max_grad_norm`` clipping then shrinks every LoRA tensor;
- per LoRA tensor, its preconditioned-over-raw norm ratio (their spread across the model's
  tensors: one global clip shrinks them all by the same factor, so the tensors with the smallest
  ratio get gradients orders of magnitude below their raw size);
- the share of LoRA tensors whose clipped gradient's root-mean-square per element is below
  AdamW's epsilon (``1e-8``), where AdamW's update is no longer scale-free and shrinks with it.

It uses the pipeline's own training path (``trainers.recipe.train_variant``, the study's trial
parameters) and only observes GRIT's preconditioning (``GritManager._natural_gradient``, asked
not to clip, so that ``before_step`` clips with torch's clip: the same result, bit for bit on CPU).

    python -m pipelines.profile study && dvc repro prepare_data
    python benchmarks/grafting_scale.py [--steps 32] [--setting JSON | --ledger DIR] [--damping-mode MODE]
                                        [--json FILE]

``--damping-mode`` sets the damping rule of both arms: ``absolute`` as the paper's code applies it
(lambda as is; the study's paper arms now use it), ``relative`` as the pipeline's default does
(lambda scaled by each factor's mean eigenvalue; the paper arms used it until this measurement).
Without it each arm keeps its variant's rule. The setting is read from the ledger only once the
study has run ``grit_paper``'s finalists at that run length; before that pass ``--setting``. The
figures in docs/study.md came from the superseded study's 32-step choice: ``--ledger
reports/study/superseded/da5b7eb144ec/ledger``.

It times nothing, so it may run beside other work.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

METHODS = ("grit_paper", "grit_paper_grafted")      # differ only in graft_norm
ADAM_EPS = 1e-8                                       # adamw_torch's default epsilon


@dataclass(frozen=True)
class StepScale:
    """What one preconditioned step hands the optimizer."""

    step: int
    global_ratio: float          # ||natural|| / ||raw|| over every LoRA tensor
    clip: float                  # the factor max_grad_norm clipping multiplies every tensor by
    ratio_low: float             # smallest per-tensor ||natural|| / ||raw||
    ratio_high: float            # largest
    starved: float               # share of tensors whose clipped RMS per element < AdamW's epsilon


def clip_factor(norm: float, max_norm: float | None) -> float:
    """torch's ``clip_grad_norm_`` coefficient (1 when no clipping or within the bound)."""
    return 1.0 if not max_norm else min(1.0, max_norm / (norm + 1e-6))


def step_scale(step: int, raw: list[float], natural: list[float], sizes: list[int],
               max_norm: float | None, eps: float = ADAM_EPS) -> StepScale:
    """The scale figures of one step from each LoRA tensor's raw and preconditioned gradient norm."""
    raw_total = math.sqrt(sum(r * r for r in raw))
    natural_total = math.sqrt(sum(n * n for n in natural))
    clip = clip_factor(natural_total, max_norm)
    ratios = [n / r for n, r in zip(natural, raw, strict=True) if r > 0]
    starved = sum(n * clip / math.sqrt(size) < eps for n, size in zip(natural, sizes, strict=True)) / len(sizes)
    return StepScale(step, natural_total / raw_total if raw_total else math.nan, clip, min(ratios), max(ratios),
                     starved)


def chosen_setting(ledger: Path, method: str, steps: int) -> dict[str, float]:
    """The setting the study in ``ledger`` chose for ``method`` at ``steps`` (its finalists'
    lowest mean validation loss)."""
    from db.study_ledger import TRIALS_FILE, jsonl_records
    from evaluation.tuning import Scored, choose_finalist

    trials = jsonl_records((ledger / TRIALS_FILE).read_text())
    runs = [Scored(t["setting"], t["seed"], t["val_loss"]) for t in trials
            if t["method"] == method and t["steps"] == steps and t["phase"] == "finalist"]
    if not runs:
        raise SystemExit(f"error: the study ledger {ledger} has no finalist runs of {method} at {steps} steps; "
                         "pass --setting or another --ledger")
    return choose_finalist(runs)[0]


def observe(method: str, steps: int, setting: dict[str, float], scratch: Path,
            grit: dict | None = None) -> tuple[list[StepScale], dict]:
    """Train ``method`` for ``steps`` steps with ``setting`` (the study's trial params, seed
    ``train.seed``, ``grit`` added to the variant's GRIT overrides) and the scale of every
    preconditioned step."""
    from pipelines.params import load_params
    from pipelines.paths import DATA_DIR
    from pipelines.study.trial import trial_params
    from trainers.base_model import resolve_base_model
    from trainers.grit.manager import GritManager
    from trainers.recipe import train_variant

    params = load_params(ROOT / "params.yaml")
    run = trial_params(params, method, steps, params.train.seed, setting)
    variant = run.variants[method]
    variant = variant.model_copy(update={"grit_overrides": {**variant.grit_overrides, **(grit or {})}})
    run = run.model_copy(update={"train": run.train.model_copy(update={"eval_at": [steps]}),
                                 "variants": {**run.variants, method: variant}})
    scales: list[StepScale] = []
    original = GritManager._natural_gradient

    def natural_gradient(manager, factors, tensors, _max_grad_norm):
        raw = [float(p.grad.norm()) for p in tensors]
        done = original(manager, factors, tensors, None)
        if manager.config.precondition and manager.step >= manager.config.ng_warmup_steps:   # it preconditioned
            scales.append(step_scale(manager.step, raw, [float(p.grad.norm()) for p in tensors],
                                     [p.numel() for p in tensors], run.train.max_grad_norm))
        return done

    GritManager._natural_gradient = natural_gradient
    try:
        result = train_variant(method, run.variants[method], run, resolve_base_model(run.model), ROOT / DATA_DIR,
                               scratch / method / "adapter", scratch / method / "checkpoints")
    finally:
        GritManager._natural_gradient = original
    meta = result.metadata
    return scales, {"final_val_loss": meta.get("final_val_loss"),
                    "trainable_parameters": meta.get("trainable_parameters")}


def summary(scales: list[StepScale]) -> dict[str, float]:
    """Medians over the preconditioned steps."""
    def median(values):
        return statistics.median(values) if values else math.nan
    return {"steps_preconditioned": len(scales),
            "global_ratio": median([s.global_ratio for s in scales]),
            "clip": median([s.clip for s in scales]),
            "ratio_spread": median([s.ratio_high / s.ratio_low for s in scales]),
            "starved": median([s.starved for s in scales])}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--setting", help="JSON setting (default: grit_paper's chosen one at --steps in the ledger)")
    parser.add_argument("--ledger", type=Path, default=ROOT / "reports/study/ledger",
                        help="the study ledger to read the setting from (the superseded study's, which ran "
                             "32 steps: reports/study/superseded/da5b7eb144ec/ledger)")
    parser.add_argument("--damping-mode", choices=["relative", "absolute"])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    setting = json.loads(args.setting) if args.setting else chosen_setting(args.ledger, METHODS[0], args.steps)
    grit = {"damping_mode": args.damping_mode} if args.damping_mode else {}
    print(f"setting for both: {json.dumps(setting | grit, sort_keys=True)}, {args.steps} steps", flush=True)
    out: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="grafting-scale-") as scratch:
        for method in METHODS:
            scales, end = observe(method, args.steps, setting, Path(scratch), grit)
            out[method] = {"setting": setting | grit, "steps": args.steps, **end, **summary(scales),
                           "per_step": [s.__dict__ for s in scales]}
    print(f"\n{'method':<20}{'||NG||/||g||':>14}{'clip factor':>13}{'tensor ratio spread':>21}"
          f"{'starved (<eps)':>16}{'val loss':>10}")
    for method, row in out.items():
        print(f"{method:<20}{row['global_ratio']:>14.3g}{row['clip']:>13.3g}{row['ratio_spread']:>21.3g}"
              f"{row['starved']:>16.2f}{row['final_val_loss']:>10.4f}")
    print("(medians over the steps where the natural gradient was applied)")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
