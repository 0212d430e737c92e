"""The ``probe`` params section: how long the probe runs and when GRIT counts as effective."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from core.section import Section


class ProbeParams(Section):
    """Thresholds of the verdict (``trainers/probe/verdict.py``); a GRIT variant is ``effective``
    only when every check passes. Defaults sit far from both sides of the line on the tiny test
    model: inert set-ups change the update direction by 0 (bit-identical arms) to ~1e-3 (a
    scalar preconditioner under Adam), a working GRIT by ~0.5 (figures in the README)."""


    # K optimizer steps per arm (the first K steps of training: same batches, same LR schedule).
    # At least 2: at LoRA init B = 0, so A's side has nothing to invert before the second step.
    steps: Annotated[int, Field(ge=2)] = 5
    # capture coverage: every targeted module must capture at least this many token rows.
    min_rows_per_module: Annotated[int, Field(gt=0)] = 1
    # readiness: fraction of targeted modules with a usable (finite) inverse on both sides.
    min_ready_fraction: Annotated[float, Field(gt=0, le=1)] = 1.0
    # shape: an inverse within this relative distance of c*I is scalar (Adam cancels a scalar);
    # the check fails when more than max_scalar_fraction of the ready modules are scalar.
    scalar_tolerance: Annotated[float, Field(ge=0)] = 1e-2
    max_scalar_fraction: Annotated[float, Field(ge=0, le=1)] = 0.5
    # the decisive check: a module's K-step update dW = s B A counts as changed when its direction
    # moved, || dW_grit/||dW_grit|| - dW_control/||dW_control|| || = sqrt(2 - 2 cos) >= min_update_change
    # (a rescaled update is unchanged: that is all Adam leaves of a scalar preconditioner), and at
    # least min_changed_fraction of the modules must change.
    min_update_change: Annotated[float, Field(gt=0, le=2)] = 5e-2
    min_changed_fraction: Annotated[float, Field(gt=0, le=1)] = 0.9
    # beyond a step size: the same measure between GRIT's update and its scalar twin's (every
    # inverse replaced by its closest c*I, clipping and the rest as they are), for at least
    # min_changed_fraction of the modules. Adam turns an update by a few hundredths even for an
    # inverse 0.02-0.04 from a scalar (0.06-0.18 on the tiny test model); a working GRIT turns it
    # by 0.29-0.63 there (tests/trainers/probe/test_failure_modes.py).
    min_scalar_twin_change: Annotated[float, Field(gt=0, le=2)] = 0.2
    # trajectory: trained loss curves of a GRIT variant and its same-engine control that never
    # differ by more than this are identical (the original experiment's symptom).
    trajectory_tolerance: Annotated[float, Field(ge=0)] = 1e-6
    # gradients the optimizer consumed that change afterwards by more than this (relative) were
    # modified after optimizer.step(): too late to matter.
    post_step_tolerance: Annotated[float, Field(ge=0)] = 1e-6
    # exit 0 even when a GRIT variant is inert (the verdict is still recorded).
    allow_inert: bool = False
