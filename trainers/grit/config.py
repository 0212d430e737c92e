"""GRIT configuration: a typed, validated section (``grit`` in params.yaml).

Defaults follow the paper code where it is sound (docs/method.md, 'GRIT core') and depart from it
where the reference was shown to be inert (section 4): factors on the K-FAC sides, damping
relative to each factor's scale, readiness per module and per side, and clipping after
preconditioning.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from core.section import Section


class GritParams(Section):
    """How GRIT captures curvature, preconditions and reprojects LoRA updates.

    Shapes: for a LoRA layer with rank r, ``A`` is [r, d_in], ``B`` is [d_out, r] and the
    rank-space covariances ``Sigma_u`` (of u = A x) and ``Sigma_v`` (of v = B^T dL/dy) are [r, r].
    """


    # --- curvature capture
    # How GRIT reads each module's rank-space rows: hooks on PEFT's LoRA forward, or GRIT's fused
    # LoRA functions (trainers/grit/fused.py: Unsloth's saved activations, rows from backward).
    # auto: fused on the Unsloth engine (the hybrid keeps Unsloth's memory), hooks on PEFT's.
    capture: Literal["auto", "hooks", "fused"] = "auto"
    # The dtype the fused functions run the LoRA path in: the layer input's (as Unsloth's fused
    # LoRA does: bf16 in a bf16 model) or the adapter's (as PEFT's forward does: the input cast to
    # fp32 adapters). auto: the engine's; a manager built without an engine takes PEFT's, the
    # forward its layers have.
    fused_lora_dtype: Literal["auto", "input", "adapter"] = "auto"
    fisher: Literal["rank_kfac", "diagonal", "block_diagonal"] = "rank_kfac"
    block_size: Annotated[int, Field(gt=0)] = 4
    statistics: Literal["running_mean", "ema"] = "running_mean"
    ema_decay: Annotated[float, Field(gt=0, lt=1)] = 0.95
    capture_every: Annotated[int, Field(gt=0)] = 1          # capture on every k-th optimizer step
    min_samples: Annotated[int, Field(gt=0)] = 64           # token rows before a side may be inverted

    # --- natural gradient
    precondition: bool = True
    # The paper's warm-ups, all counted in optimizer steps completed (GritManager.step); 0 = off.
    # The first ng_warmup_steps steps take the plain (clipped) gradient while the factors fill.
    ng_warmup_steps: Annotated[int, Field(ge=0)] = 0
    factor_sides: Literal["kfac", "reference"] = "kfac"
    damping: Annotated[float, Field(gt=0)] = 1e-3
    # relative: lambda is scaled by the factor's mean eigenvalue, so the preconditioner's shape
    # does not depend on the loss scale (per-token gradients are ~1/N_tokens); absolute: as is.
    damping_mode: Literal["relative", "absolute"] = "relative"
    damping_escalation: Annotated[list[float], Field(min_length=1)] = [1, 3, 10, 30, 100, 300]
    update_freq: Annotated[int, Field(gt=0)] = 10            # optimizer steps between inversions
    # graft_norm: keep each tensor's raw gradient norm and take only the direction from the
    # natural gradient. The inverse of a small rank-space factor inflates the gradient by orders
    # of magnitude that vary step to step; clipped and fed to Adam that mostly shrinks updates.
    graft_norm: bool = True

    # --- reprojection and rank adaptation
    reprojection: bool = False
    reprojection_freq: Annotated[int, Field(gt=0)] = 50
    reprojection_k: Annotated[int, Field(gt=0)] = 8
    two_sided: bool = True
    min_samples_g: Annotated[int, Field(gt=0)] = 64         # G-side (Sigma_v) gating for two-sided
    budget_schedule: Literal["constant", "linear", "cosine", "adaptive"] = "constant"
    budget_start: Annotated[int, Field(gt=0)] | None = None  # k at step 0 (linear/cosine)
    budget_end: Annotated[int, Field(gt=0)] | None = None    # k at the last step (linear/cosine)
    energy_threshold: Annotated[float, Field(gt=0, le=1)] = 0.99   # tau, for adaptive k
    min_rank: Annotated[int, Field(gt=0)] = 4
    truncate: bool = False   # really shrink A and B to rank k (else rank stays r: accounting only)
    reprojection_warmup_steps: Annotated[int, Field(ge=0)] = 0    # no reprojection before this step
    # Before this step a reprojection keeps every module's full rank (k = rank, no truncation).
    rank_adaptation_start_step: Annotated[int, Field(ge=0)] = 0
    # steps: the warm-ups and cadences above as written. budget: set from the run's length
    # (trainers/grit/cadence.py): ng warm-up and reprojection warm-up as shares of it, then at
    # least `reprojections` reprojections, the last with training after it.
    cadence: Literal["steps", "budget"] = "steps"
    ng_warmup_fraction: Annotated[float, Field(ge=0, lt=1)] = 0.1
    reprojection_warmup_fraction: Annotated[float, Field(ge=0, lt=1)] = 0.25
    reprojections: Annotated[int, Field(gt=0)] = 3

    # --- regularisers (warm-up ramped)
    lambda_curvature: Annotated[float, Field(ge=0)] = 0.0
    lambda_reprojection: Annotated[float, Field(ge=0)] = 0.0
    regularizer_warmup_steps: Annotated[int, Field(ge=0)] = 0

    # --- data parallel
    allreduce: bool = True

    @model_validator(mode="after")
    def _consistent(self) -> GritParams:
        if self.budget_schedule in ("linear", "cosine") and (self.budget_start is None or self.budget_end is None):
            raise ValueError(f"budget_schedule '{self.budget_schedule}' needs budget_start and budget_end")
        if sorted(self.damping_escalation) != list(self.damping_escalation) or self.damping_escalation[0] <= 0:
            raise ValueError("damping_escalation must be positive and increasing")
        return self
