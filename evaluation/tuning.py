"""The study's tuning rules, as small pure functions (docs/study.md):

- each method's declared search space (``Dimension``s: the learning rate for every method, the
  damping for GRIT, and for a GRIT run with the budget cadence its reprojection warm-up and the
  eigen-energy that sets its rank), searched jointly by Optuna, never paired by index;
- a best setting at the edge of a range widens that range, any tuned dimension, within its hard
  limits (``evaluation.config.HARD_LIMITS``, which the params check too; the report names the
  edges that remain);
- finalists: the best configurations on validation loss, re-run with more seeds and chosen on
  their mean validation loss;
- seeds: tuning seeds (``train.seed`` and the finalists' extra seeds) and test seeds never meet
  (``evaluation/config.py``, so that params check it before any work).
"""

from __future__ import annotations

import hashlib
import json
import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from evaluation.config import HARD_LIMITS

Target = Literal["train", "grit"]


@dataclass(frozen=True)
class Dimension:
    """One tuned hyperparameter: its range, whether it is searched in log space, and which params
    section it sets (``train.learning_rate`` or a GRIT field of the variant)."""

    name: str
    low: float
    high: float
    log: bool = True
    target: Target = "grit"

    def __post_init__(self) -> None:
        valid = 0 < self.low < self.high if self.log else self.low < self.high
        if not valid:
            raise ValueError(f"{self.name}: the range [{self.low}, {self.high}] is empty or not positive in log space")

    def position(self, value: float) -> float:
        """Where ``value`` lies in the range, 0 at the low end and 1 at the high end."""
        if self.log:
            return (math.log(value) - math.log(self.low)) / (math.log(self.high) - math.log(self.low))
        return (value - self.low) / (self.high - self.low)


def search_space(grit: bool, budget_cadence: bool, learning_rate: tuple[float, float], damping: tuple[float, float],
                 reprojection_warmup: tuple[float, float], energy: tuple[float, float]) -> list[Dimension]:
    """The declared space of one method (module docstring). GRIT has more knobs to tune on the
    same number of configurations, and that cost counts against it, as it would for a user."""
    space = [Dimension("learning_rate", *learning_rate, target="train")]
    if grit:
        space.append(Dimension("damping", *damping))
    if grit and budget_cadence:
        space += [Dimension("reprojection_warmup_fraction", *reprojection_warmup, log=False),
                  Dimension("energy_threshold", *energy, log=False)]
    return space


EdgeSide = Literal["low", "high"]


def at_edge(dimension: Dimension, value: float, margin: float) -> EdgeSide | None:
    """``low`` / ``high`` when ``value`` lies in the outer ``margin`` of the range (in its own
    scale): the best setting may then lie outside it."""
    position = dimension.position(value)
    return "low" if position < margin else "high" if position > 1 - margin else None


def edges(space: Sequence[Dimension], setting: dict[str, float], margin: float) -> list[tuple[Dimension, EdgeSide]]:
    """The tuned dimensions of ``setting`` that lie at an edge of their range: the best value may
    lie beyond it (a damping at its top edge, say, keeps GRIT close to plain LoRA)."""
    return [(d, side) for d in space if d.name in setting
            and (side := at_edge(d, setting[d.name], margin)) is not None]


def widens(dimension: Dimension, side: EdgeSide) -> bool:
    """Whether the range may still widen past ``side``: it has not reached its hard limit there."""
    floor, ceiling = HARD_LIMITS.get(dimension.name, (-math.inf, math.inf))
    return dimension.low > floor if side == "low" else dimension.high < ceiling


def extended(dimension: Dimension, side: EdgeSide, factor: float) -> Dimension:
    """The range widened past ``side`` (a log range ``factor``-fold, a linear one by its own width),
    kept on its other side, and never past its hard limit (``HARD_LIMITS``)."""
    floor, ceiling = HARD_LIMITS.get(dimension.name, (-math.inf, math.inf))
    low, high = dimension.low, dimension.high
    if side == "high":
        high = min(ceiling, high * factor if dimension.log else high + (high - low))
    else:
        low = max(floor, low / factor if dimension.log else low - (high - low))
    return Dimension(dimension.name, low, high, dimension.log, dimension.target)


def widen(space: Sequence[Dimension], setting: dict[str, float], margin: float,
          factor: float) -> tuple[list[Dimension], list[tuple[Dimension, EdgeSide]]]:
    """``space`` with every dimension at whose edge ``setting`` lies widened past that edge (the
    learning rate, the damping, the reprojection warm-up, the eigen-energy alike), within its hard
    limit; and the (old dimension, side) of each one widened. An edge at a hard limit stays."""
    widened = [(d, side) for d, side in edges(space, setting, margin) if widens(d, side)]
    sides = {d.name: side for d, side in widened}
    return [extended(d, sides[d.name], factor) if d.name in sides else d for d in space], widened


@dataclass(frozen=True)
class Scored:
    """One run's setting, seed and final validation loss (tuning, finalist or test)."""

    setting: dict[str, float]
    seed: int
    val_loss: float | None
    reached: int = 0            # the step its loss was measured at (a pruned run's rung)

    @property
    def finite(self) -> bool:
        return self.val_loss is not None and math.isfinite(self.val_loss)


@dataclass(frozen=True)
class Mechanism:
    """When a method's mechanism acts in a run of known length: the first step whose update its
    natural gradient shapes (1-based; None: it has none, LoRA), the step after which it first
    reprojects (None: it never does) and the steps between its reprojections."""

    natural_gradient: int | None = None
    reprojection: int | None = None
    interval: int = 0


def first_rung(steps: int, mechanisms: Iterable[Mechanism], natural_gradient_share: float, floor: int) -> int:
    """The first step at which the pruner may judge a configuration of a run of ``steps``: the
    same for every method, and late enough for every method's mechanism to have acted (docs/study.md):
    its natural gradient has shaped at least ``natural_gradient_share`` of the run's steps, and a
    reprojecting method has reprojected and trained half an interval (at least one step) since;
    never before ``floor``. ``mechanisms``: every method's, at the latest any tuned configuration
    may start them."""
    rung = floor
    for acts in mechanisms:
        if acts.natural_gradient is not None:
            rung = max(rung, acts.natural_gradient - 1 + math.ceil(natural_gradient_share * steps))
        if acts.reprojection is not None:
            rung = max(rung, acts.reprojection + max(1, math.ceil(acts.interval / 2)))
    return rung


def rungs(first: int, reduction_factor: int, steps: int) -> list[int]:
    """The steps below ``steps`` at which successive halving compares configurations:
    ``first`` x ``reduction_factor`` ** k. A trial's validation loss is needed there and at
    its end only."""
    found, rung = [], first
    while rung < steps:
        found.append(rung)
        rung *= reduction_factor
    return found


def sampler_seed(seed: int, method: str, steps: int, extension: int = 0) -> int:
    """The seed of one tuning's sampler: its own for every method, run length and range extension
    (one seed for all drew the same sequence in every tuning: the 192-step search tried the 96-step
    settings again), and stable across processes and machines (a hash of the text, not Python's
    salted ``hash``)."""
    text = f"{seed}/{method}/{steps}/{extension}"
    return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16)


def setting_key(setting: dict[str, float]) -> str:
    """The canonical text of a setting (its identity in the store)."""
    return json.dumps(setting, sort_keys=True)


def finalists(tuned: Iterable[Scored], count: int) -> list[dict[str, float]]:
    """The ``count`` best settings as successive halving ranks them: those that went furthest
    first (a run pruned at a rung lost there to the runs that went on), then the lowest
    validation loss at that step; earliest on a tie. With 16 configurations and a reduction
    factor of 3 only one or two train to the end, so the finalists also come from the last rungs
    (the finalist phase trains those to the end on every selection seed)."""
    scored = [s for s in tuned if s.finite]
    if not scored:
        raise ValueError("no tuning run has a finite validation loss; widen or lower the learning-rate range")
    best: dict[str, Scored] = {}
    for run in sorted(scored, key=lambda s: (-s.reached, s.val_loss)):
        best.setdefault(setting_key(run.setting), run)
    return [run.setting for run in list(best.values())[:count]]


def choose_finalist(runs: Iterable[Scored]) -> tuple[dict[str, float], float]:
    """(setting, mean validation loss) of the finalist with the lowest mean over its seeds. A
    finalist with a diverged seed counts as diverged: its mean is infinite."""
    by_setting: dict[str, list[Scored]] = {}
    for run in runs:
        by_setting.setdefault(setting_key(run.setting), []).append(run)
    if not by_setting:
        raise ValueError("no finalist run to choose from")
    means = {key: statistics.fmean(r.val_loss for r in group) if all(r.finite for r in group) else math.inf
             for key, group in by_setting.items()}
    key = min(means, key=lambda k: means[k])
    if not math.isfinite(means[key]):
        raise ValueError("every finalist diverged on some seed; widen or lower the learning-rate range")
    return by_setting[key][0].setting, means[key]
