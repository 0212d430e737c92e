"""GRIT's warm-ups and cadences for a run of known length.

The paper's schedule is written for thousands of steps (natural-gradient and reprojection
warm-ups of 100-150 steps, reprojection every 50-300): on a budget of 32 or 96 steps it would
reproject once or never. ``cadence: budget`` instead reads these as shares of the run: the
natural gradient starts after ``ng_warmup_fraction`` of it, reprojection and rank adaptation
after ``reprojection_warmup_fraction``, and then reproject at least ``reprojections`` times,
evenly, the last one with steps left to train after it; the factors are inverted at least twice
between two reprojections. ``cadence: steps`` (the default) takes every field as written.
"""

from __future__ import annotations

from trainers.grit.config import GritParams


def reprojection_due(step: int, config: GritParams, total_steps: int | None) -> bool:
    """Reproject after optimizer step ``step`` (1-based, just completed)? Never on the last
    step of a known run: a reprojection, and above all a truncation, with no training after it
    only removes what was learned."""
    if not config.reprojection or step < config.reprojection_warmup_steps:
        return False
    if total_steps is not None and step >= total_steps:
        return False
    return step % config.reprojection_freq == 0


def for_budget(config: GritParams, total_steps: int) -> GritParams:
    """``config`` with its step fields set from ``total_steps`` (module docstring); unchanged
    when ``config.cadence`` is ``steps``."""
    if config.cadence == "steps":
        return config
    if total_steps < 2:
        raise ValueError(f"grit.cadence 'budget' needs a run of at least 2 steps, got {total_steps}")
    warmup = min(total_steps - 1, round(config.reprojection_warmup_fraction * total_steps))
    # multiples of the interval in [warmup, total_steps - 1] are at least `reprojections` many
    interval = max(1, (total_steps - warmup) // (config.reprojections + 1))
    return config.model_copy(update={
        "ng_warmup_steps": round(config.ng_warmup_fraction * total_steps),
        "reprojection_warmup_steps": warmup,
        "rank_adaptation_start_step": warmup,
        "reprojection_freq": interval,
        "update_freq": max(1, min(config.update_freq, interval // 2)),
    })


def reprojection_steps(config: GritParams, total_steps: int) -> list[int]:
    """The steps after which a run of ``total_steps`` reprojects (for reports and tests)."""
    return [s for s in range(1, total_steps + 1) if reprojection_due(s, config, total_steps)]
