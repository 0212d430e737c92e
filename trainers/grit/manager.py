"""GritManager: wires GRIT's math (``trainers/grit/math.py``) onto a PEFT model's LoRA layers.

One optimizer step with GRIT, in order (this order lives only in :meth:`GritManager.before_step`
and :meth:`GritManager.after_step`)::

    loss.backward()                 # hooks capture u = A x and v = B^T dL/dy per token row
    before_step(max_grad_norm):
        sync factors across ranks   # distributed.allreduce_sum_ (identical factors everywhere)
        refresh inverses if due     # damped Cholesky per module and side, readiness per side
        add regulariser gradients   # curvature / reprojection penalties (warm-up ramped)
        precondition()              # natural gradient on every ready side
        clip to max_grad_norm       # the trust region bounds the *preconditioned* step
    optimizer.step()
    after_step():                   # reprojection / truncation when due, step counter

``wrap_optimizer`` (pure GRIT) and ``callback`` (hybrid, at ``on_pre_optimizer_step``) are two
thin doors to the same sequence. The Trainer clips *before* ``on_pre_optimizer_step``, so the
callback takes over clipping (sets the Trainer's ``max_grad_norm`` to 0 and clips itself after
preconditioning).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from trainers.grit import math as gm
from trainers.grit.config import GritConfig
from trainers.grit.distributed import allreduce_sum_

if TYPE_CHECKING:
    from trainers.grit.callback import GritCallback
    from trainers.grit.optim import GritOptimizer


class GritError(RuntimeError):
    pass


@dataclass
class FactorStats:
    """Rank-space second moments of one side (u or v) of one module, in fp32."""

    rank: int
    total: torch.Tensor = None          # running mean: sum of outer products so far
    count: int = 0                      # token rows folded in
    ema: torch.Tensor | None = None     # EMA mode: the moving average itself
    pending: torch.Tensor = None        # captured since the last sync, not yet folded in
    pending_count: int = 0

    def __post_init__(self) -> None:
        if self.total is None:
            self.total = torch.zeros(self.rank, self.rank)
        if self.pending is None:
            self.pending = torch.zeros(self.rank, self.rank)

    def covariance(self, statistics: str) -> torch.Tensor | None:
        if self.count == 0:
            return None
        return self.ema if statistics == "ema" else self.total / self.count

    def fold(self, statistics: str, decay: float) -> None:
        if self.pending_count == 0:
            return
        if statistics == "ema":
            self.ema = gm.ema_update(self.ema, self.pending / self.pending_count, decay)
        else:
            self.total += self.pending
        self.count += self.pending_count
        self.pending.zero_()
        self.pending_count = 0

    def to(self, device: torch.device) -> None:
        self.total, self.pending = self.total.to(device), self.pending.to(device)
        if self.ema is not None:
            self.ema = self.ema.to(device)

    def transform(self, basis: torch.Tensor) -> None:
        """Express the statistics in a truncated basis: Sigma' = V^T Sigma V."""
        self.rank = basis.shape[1]
        self.total = basis.T @ self.total @ basis
        self.pending = basis.T @ self.pending @ basis
        if self.ema is not None:
            self.ema = basis.T @ self.ema @ basis


@dataclass
class ModuleState:
    name: str
    layer: nn.Module
    adapter: str
    u: FactorStats
    v: FactorStats
    inverse: dict[str, torch.Tensor | None] = field(default_factory=lambda: {"A": None, "B": None})
    damping_used: dict[str, float | None] = field(default_factory=lambda: {"A": None, "B": None})
    basis_u: torch.Tensor | None = None
    basis_v: torch.Tensor | None = None

    @property
    def lora_A(self) -> nn.Linear:
        return self.layer.lora_A[self.adapter]

    @property
    def lora_B(self) -> nn.Linear:
        return self.layer.lora_B[self.adapter]

    @property
    def scaling(self) -> float:
        return float(self.layer.scaling[self.adapter])

    @property
    def rank(self) -> int:
        return self.lora_A.weight.shape[0]


def base_module_name(peft_name: str) -> str:
    """``base_model.model.model.layers.0.q_proj`` -> ``model.layers.0.q_proj`` (the name in the
    base model, which layer selection and configurations use)."""
    return peft_name.removeprefix("base_model.model.")


def lora_layers(model: nn.Module, adapter: str | None = None) -> list[tuple[str, nn.Module, str]]:
    """(PEFT module name, layer, adapter) of every LoRA linear layer with a trainable adapter."""
    from peft.tuners.lora import LoraLayer

    found = []
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        adapters = [adapter] if adapter else list(module.lora_A.keys())
        for name_of_adapter in adapters:
            if name_of_adapter in module.lora_A and module.lora_A[name_of_adapter].weight.requires_grad:
                if getattr(module, "use_dora", {}).get(name_of_adapter, False):
                    raise GritError(f"{name}: DoRA adapters are not supported by GRIT")
                found.append((name, module, name_of_adapter))
    return found


class GritManager:
    """Attaches GRIT to every LoRA layer of ``peft_model`` (see the module docstring)."""

    def __init__(self, peft_model: nn.Module, config: GritConfig | None = None, total_steps: int | None = None,
                 modules: Collection[str] | None = None):
        """``modules``: only these LoRA modules (names relative to the base model, e.g.
        ``model.vision_model.encoder.layers.0.self_attn.q_proj``); all of them by default."""
        self.model = peft_model
        self.config = config or GritConfig()
        self.total_steps = total_steps
        self.step = 0
        self.capturing = True
        self.optimizer: torch.optim.Optimizer | None = None
        self.last_report: dict[str, float] = {}
        self._row_mask: torch.Tensor | None = None
        self._row_count: int | None = None
        self._handles: list[Any] = []
        layers = lora_layers(peft_model)
        if modules is not None:
            wanted = set(modules)
            layers = [layer for layer in layers if base_module_name(layer[0]) in wanted]
        if not layers:
            raise GritError("GRIT found no trainable LoRA layer in the model: applied to 0 layers")
        self.modules: OrderedDict[str, ModuleState] = OrderedDict()
        for name, layer, adapter in layers:
            rank = layer.lora_A[adapter].weight.shape[0]
            key = name if len({a for _, _, a in layers}) == 1 else f"{name}[{adapter}]"
            self.modules[key] = ModuleState(key, layer, adapter, FactorStats(rank), FactorStats(rank))
        self._attach_hooks()

    # ------------------------------------------------------------------------------ capture

    def _attach_hooks(self) -> None:
        self._handles.append(self.model.register_forward_pre_hook(self._remember_mask, with_kwargs=True))
        for state in self.modules.values():
            self._handles.append(state.lora_A.register_forward_hook(self._capture_hook(state)))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _remember_mask(self, _module, args, kwargs) -> None:
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 2:
            self._row_mask = mask.to(torch.float32)
            self._row_count = int(mask.sum())  # once per forward, not once per layer
        else:
            self._row_mask, self._row_count = None, None

    def _capture_hook(self, state: ModuleState):
        def hook(_module, _inputs, output: torch.Tensor) -> None:
            # Only a forward whose output will receive a gradient counts; with gradient
            # checkpointing the recomputed forward's tensors get none, so nothing is counted twice.
            if not (self.capturing and torch.is_grad_enabled() and output.requires_grad):
                return
            u = output.detach()
            mask, rows = self._row_mask, self._row_count
            if mask is None or tuple(mask.shape) != tuple(u.shape[:-1]):
                # no attention mask, or packed/reshaped inputs: every row counts
                mask, rows = None, u.numel() // u.shape[-1]

            def on_grad(grad_u: torch.Tensor) -> None:
                # dL/du = s * B^T g, so v = B^T g = (dL/du) / s and v v^T = (dL/du)(dL/du)^T / s^2.
                self._accumulate(state, gm.masked_outer_sum(u, mask),
                                 gm.masked_outer_sum(grad_u.detach(), mask) / state.scaling**2, rows)

            output.register_hook(on_grad)

        return hook

    @staticmethod
    def _accumulate(state: ModuleState, outer_u: torch.Tensor, outer_v: torch.Tensor, rows: int) -> None:
        # Statistics live on the layer's device: no host sync per layer on a GPU.
        for stats, outer in ((state.u, outer_u), (state.v, outer_v)):
            if stats.pending.device != outer.device:
                stats.to(outer.device)
            stats.pending += outer
            stats.pending_count += rows

    # ------------------------------------------------------------------------- factors

    def sync_factors(self) -> None:
        """All-reduce what every rank captured since the last sync, then fold it in."""
        states = list(self.modules.values())
        if self.config.allreduce:
            tensors = [t for s in states for t in (s.u.pending, s.v.pending)]
            counts = torch.tensor([c for s in states for c in (s.u.pending_count, s.v.pending_count)],
                                  dtype=torch.float64, device=tensors[0].device)
            allreduce_sum_([*tensors, counts])
            for i, s in enumerate(states):
                s.u.pending_count, s.v.pending_count = int(counts[2 * i]), int(counts[2 * i + 1])
        for s in states:
            s.u.fold(self.config.statistics, self.config.ema_decay)
            s.v.fold(self.config.statistics, self.config.ema_decay)

    def check_capture_coverage(self) -> None:
        """Fail loudly when a targeted module captured nothing in a captured step: its LoRA
        forward was bypassed (e.g. by fused kernels), and GRIT would silently be inert there."""
        blind = [name for name, s in self.modules.items() if s.u.count == 0]
        if blind:
            raise GritError(
                f"GRIT captured 0 token rows on {len(blind)}/{len(self.modules)} LoRA modules "
                f"(first: {blind[0]}); their LoRA forward was bypassed (fused kernels?), so GRIT "
                "would be inert there. Use the unfused path or disable those modules."
            )

    def covariances(self, module_name: str) -> tuple[torch.Tensor | None, torch.Tensor | None, int]:
        """(Sigma_u, Sigma_v, token rows) of one module, by its PEFT name."""
        state = self.modules[module_name]
        stats = self.config.statistics
        return state.u.covariance(stats), state.v.covariance(stats), state.u.count

    def _factor_for(self, state: ModuleState, side: str) -> FactorStats:
        """Which statistics precondition which factor (K-FAC sides, or the paper code's)."""
        kfac = {"B": state.u, "A": state.v}
        reference = {"B": state.v, "A": state.u}
        return (kfac if self.config.factor_sides == "kfac" else reference)[side]

    def _invert(self, sigma: torch.Tensor) -> tuple[torch.Tensor, float] | None:
        cfg = self.config
        damping = gm.effective_damping(sigma, cfg.damping, cfg.damping_mode)
        if damping <= 0:
            return None  # an all-zero factor (B = 0 at init): nothing to precondition with yet
        if cfg.fisher == "rank_kfac":
            return gm.damped_inverse(sigma, damping, cfg.damping_escalation)
        if cfg.fisher == "diagonal":
            return gm.diagonal_inverse(sigma, damping), damping
        inverse = gm.block_diagonal_inverse(sigma, damping, cfg.block_size, cfg.damping_escalation)
        return None if inverse is None else (inverse, damping)

    def refresh_inverses(self, force: bool = False) -> None:
        """Invert every side whose statistics are gated in; due every ``update_freq`` steps, and
        at once for a side that has become eligible but has no inverse yet."""
        due = force or self.step % self.config.update_freq == 0
        wanted: list[tuple[ModuleState, str, torch.Tensor]] = []
        for state in self.modules.values():
            for side in ("A", "B"):
                stats = self._factor_for(state, side)
                if stats.count < self.config.min_samples or (not due and state.inverse[side] is not None):
                    continue
                wanted.append((state, side, stats.covariance(self.config.statistics)))
        if self.config.fisher != "rank_kfac":
            for state, side, sigma in wanted:
                solved = self._invert(sigma)
                state.inverse[side], state.damping_used[side] = solved if solved else (None, None)
            return
        # rank_kfac: one batched Cholesky per (rank, device) group instead of one per matrix
        groups: dict[tuple[int, torch.device], list[tuple[ModuleState, str, torch.Tensor]]] = {}
        for item in wanted:
            groups.setdefault((item[2].shape[0], item[2].device), []).append(item)
        for items in groups.values():
            sigmas = torch.stack([sigma for _, _, sigma in items])
            dampings = self._dampings(sigmas)
            inverses, used = gm.damped_inverse_batched(sigmas, dampings, self.config.damping_escalation)
            for (state, side, _), inverse, damping in zip(items, inverses, used.tolist(), strict=True):
                ok = damping > 0
                state.inverse[side], state.damping_used[side] = (inverse, damping) if ok else (None, None)

    def _dampings(self, sigmas: torch.Tensor) -> torch.Tensor:
        """Per-matrix lambda for a stack [M, r, r] (see ``math.effective_damping``)."""
        if self.config.damping_mode == "absolute":
            return torch.full((sigmas.shape[0],), self.config.damping, dtype=sigmas.dtype, device=sigmas.device)
        traces = torch.diagonal(sigmas, dim1=-2, dim2=-1).sum(-1)
        return self.config.damping * traces / sigmas.shape[-1]

    # -------------------------------------------------------------------- the GRIT step

    def lora_parameters(self) -> list[torch.nn.Parameter]:
        return [p for s in self.modules.values() for p in (s.lora_A.weight, s.lora_B.weight)]

    def precondition(self) -> int:
        """Rewrite ``.grad`` of every lora_A / lora_B whose side has an inverse; returns how many.
        With ``graft_norm`` each natural gradient keeps its raw gradient's norm (direction from
        GRIT, magnitude from the gradient), as Shampoo grafts onto a base optimizer."""
        applied = 0
        with torch.no_grad():
            for state in self.modules.values():
                for side, weight, apply in (("A", state.lora_A.weight, gm.precondition_A),
                                            ("B", state.lora_B.weight, gm.precondition_B)):
                    inverse = state.inverse[side]
                    if inverse is None or weight.grad is None:
                        continue
                    natural = apply(weight.grad, inverse.to(weight.grad.device))
                    if self.config.graft_norm:
                        natural = gm.graft(natural, weight.grad)
                    weight.grad.copy_(natural)
                    applied += 1
        return applied

    def _regularizer_scale(self) -> float:
        warmup = self.config.regularizer_warmup_steps
        return 1.0 if warmup == 0 else min(1.0, self.step / warmup)

    def add_regularizer_gradients(self) -> float:
        """Add the gradients of the curvature and reprojection penalties; returns their value."""
        cfg = self.config
        if cfg.lambda_curvature == 0 and cfg.lambda_reprojection == 0:
            return 0.0
        scale, value = self._regularizer_scale(), 0.0
        with torch.no_grad():
            for state in self.modules.values():
                A, B = state.lora_A.weight, state.lora_B.weight
                sigma_u, sigma_v, _ = self.covariances(state.name)
                terms: list[tuple[torch.nn.Parameter, torch.Tensor, float]] = []
                if cfg.lambda_curvature and sigma_u is not None and sigma_v is not None:
                    su, sv = sigma_u.to(A), sigma_v.to(B)
                    # d/dA tr(A^T Su A) = 2 Su A ; d/dB tr(B Sv B^T) = 2 B Sv
                    terms += [(A, 2 * su @ A, float(torch.trace(A.T @ su @ A))),
                              (B, 2 * B @ sv, float(torch.trace(B @ sv @ B.T)))]
                    terms = [(p, cfg.lambda_curvature * g, cfg.lambda_curvature * v) for p, g, v in terms]
                if cfg.lambda_reprojection and state.basis_u is not None:
                    eye = torch.eye(state.rank, dtype=A.dtype, device=A.device)
                    off_u = eye - state.basis_u.to(A) @ state.basis_u.to(A).T
                    basis_v = state.basis_v if state.basis_v is not None else state.basis_u
                    off_v = eye - basis_v.to(B) @ basis_v.to(B).T
                    residual_A, residual_B = off_u @ A, B @ off_v
                    terms += [(A, cfg.lambda_reprojection * 2 * residual_A,
                               cfg.lambda_reprojection * float(residual_A.pow(2).sum())),
                              (B, cfg.lambda_reprojection * 2 * residual_B,
                               cfg.lambda_reprojection * float(residual_B.pow(2).sum()))]
                for parameter, gradient, term in terms:
                    if parameter.grad is not None:
                        parameter.grad.add_(scale * gradient)
                    value += scale * term
        return value

    def before_step(self, max_grad_norm: float | None) -> dict[str, float]:
        """Everything between backward and ``optimizer.step()``, in order (module docstring)."""
        report = self.precondition_step()
        clip_gradients(self.lora_parameters(), max_grad_norm)
        return report

    def precondition_step(self) -> dict[str, float]:
        """The GRIT part of :meth:`before_step` (everything but clipping): sync, invert,
        regularise, precondition. Several managers sharing one optimizer (one per modality of a
        VLM) each run this, then one clip bounds all their gradients together."""
        parameters = [p for p in self.lora_parameters() if p.grad is not None]
        self.sync_factors()
        if self.step == 0:
            self.check_capture_coverage()
        self.refresh_inverses()
        regularizer = self.add_regularizer_gradients()
        raw_norm = gradient_norm(parameters)
        applied = self.precondition() if self.config.precondition else 0
        rows = sum(s.u.count for s in self.modules.values())
        self.last_report = {
            "grad_norm_raw": raw_norm, "grad_norm_preconditioned": gradient_norm(parameters),
            "preconditioned_tensors": float(applied), "regularizer": regularizer, "rows_captured": float(rows),
        }
        return self.last_report

    def after_step(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """After ``optimizer.step()``: reprojection (and truncation) when due; advance the step."""
        self.step += 1
        self.capturing = self.step % self.config.capture_every == 0
        if optimizer is not None:
            self.optimizer = optimizer
        if self.config.reprojection and self.step % self.config.reprojection_freq == 0:
            self.reproject()

    # ------------------------------------------------------------- reprojection / ranks

    def budget(self, state: ModuleState, eigenvalues: torch.Tensor) -> int:
        cfg = self.config
        if cfg.budget_schedule == "adaptive":
            k = gm.rank_by_energy(eigenvalues, cfg.energy_threshold, cfg.min_rank, state.rank)
        elif cfg.budget_schedule in ("linear", "cosine"):
            k = gm.budget_at(cfg.budget_schedule, self.step, self.total_steps or self.step,
                             cfg.budget_start, cfg.budget_end)
        else:
            k = cfg.reprojection_k
        return max(1, min(state.rank, k))

    def reproject(self, k: int | None = None) -> dict[str, int]:
        """Project A onto the top-k u-directions and B onto the top-k v-directions (two-sided,
        when Sigma_v has enough rows; else B uses the u-basis). With ``truncate`` the factors
        then shrink to rank k, which leaves the layer's function unchanged. Returns ranks."""
        ranks = {}
        with torch.no_grad():
            for state in self.modules.values():
                sigma_u, sigma_v, rows = self.covariances(state.name)
                if sigma_u is None or rows < self.config.min_samples:
                    ranks[state.name] = state.rank
                    continue
                eigenvalues, _ = gm.top_eigenvectors(sigma_u, state.rank)
                k_here = min(state.rank, k) if k is not None else self.budget(state, eigenvalues)
                _, basis_u = gm.top_eigenvectors(sigma_u, k_here)
                use_v = self.config.two_sided and sigma_v is not None and state.v.count >= self.config.min_samples_g \
                    and float(torch.trace(sigma_v)) > 0
                basis_v = gm.top_eigenvectors(sigma_v, k_here)[1] if use_v else basis_u
                A, B = state.lora_A.weight, state.lora_B.weight
                A.copy_(gm.reproject_A(A, basis_u.to(A)))
                B.copy_(gm.reproject_B(B, basis_v.to(B)))
                state.basis_u, state.basis_v = basis_u, basis_v
                if self.config.truncate and k_here < state.rank:
                    self._truncate(state, basis_u)
                ranks[state.name] = state.rank
        return ranks

    def _truncate(self, state: ModuleState, basis: torch.Tensor) -> None:
        """Shrink A to [k, d_in] and B to [d_out, k] in the basis V (exact after reprojection),
        keep the layer's scaling, remap the optimizer state, and move the statistics."""
        old_A, old_B = state.lora_A.weight, state.lora_B.weight
        basis = basis.to(old_A)
        new_A_data, new_B_data = gm.truncate_factors(old_A.data, old_B.data, basis)
        new_A, new_B = nn.Parameter(new_A_data.contiguous()), nn.Parameter(new_B_data.contiguous())
        k = basis.shape[1]
        state.lora_A.weight, state.lora_A.out_features = new_A, k
        state.lora_B.weight, state.lora_B.in_features = new_B, k
        state.layer.r[state.adapter] = k  # scaling stays as it was: the function must not change
        if self.optimizer is not None:
            remap_optimizer_state(self.optimizer, old_A, new_A, lambda t: basis.T @ t, lambda t: (basis.T ** 2) @ t)
            remap_optimizer_state(self.optimizer, old_B, new_B, lambda t: t @ basis, lambda t: t @ basis ** 2)
        state.u.transform(basis.to(state.u.total.device, torch.float32))
        state.v.transform(basis.to(state.v.total.device, torch.float32))
        state.inverse = {"A": None, "B": None}
        state.basis_u = state.basis_v = torch.eye(k, device=basis.device, dtype=basis.dtype)

    def truncate(self) -> dict[str, int]:
        """Shrink every module to the rank of its current u-basis (set by :meth:`reproject`)."""
        with torch.no_grad():
            for state in self.modules.values():
                if state.basis_u is not None and state.basis_u.shape[1] < state.rank:
                    self._truncate(state, state.basis_u)
        return self.effective_ranks()

    def effective_ranks(self) -> dict[str, int]:
        return {name: state.rank for name, state in self.modules.items()}

    # ---------------------------------------------------------------------- reporting

    def all_ready(self) -> bool:
        """True only when *every* module has an inverse on *both* sides."""
        return all(s.inverse["A"] is not None and s.inverse["B"] is not None for s in self.modules.values())

    def diagnostics(self) -> dict[str, dict[str, Any]]:
        report = {}
        for name, state in self.modules.items():
            entry: dict[str, Any] = {
                "rows_captured": state.u.count, "rank": state.rank,
                "inverse_ready_A": state.inverse["A"] is not None,
                "inverse_ready_B": state.inverse["B"] is not None,
            }
            for side in ("A", "B"):
                inverse = state.inverse[side]
                entry[f"condition_{side}"] = gm.condition_number(inverse) if inverse is not None else None
                entry[f"scalar_distance_{side}"] = gm.distance_from_scalar(inverse) if inverse is not None else None
                entry[f"damping_{side}"] = state.damping_used[side]
            report[name] = entry
        return report

    # ------------------------------------------------------------------- doors and state

    def wrap_optimizer(self, optimizer: torch.optim.Optimizer, max_grad_norm: float | None = None) -> GritOptimizer:
        from trainers.grit.optim import GritOptimizer

        self.optimizer = optimizer
        return GritOptimizer(optimizer, self, max_grad_norm)

    def callback(self) -> GritCallback:
        from trainers.grit.callback import GritCallback

        return GritCallback(self)

    def state_dict(self) -> dict[str, Any]:
        modules = {}
        for name, s in self.modules.items():
            modules[name] = {
                "rank": s.rank,
                "u": _stats_state(s.u), "v": _stats_state(s.v),
                "inverse": {k: _clone(v) for k, v in s.inverse.items()},
                "damping_used": dict(s.damping_used),
                "basis_u": _clone(s.basis_u), "basis_v": _clone(s.basis_v),
            }
        return {"step": self.step, "capturing": self.capturing, "config": self.config.model_dump(),
                "modules": modules}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = set(self.modules) ^ set(state["modules"])
        if missing:
            raise GritError(f"GRIT state does not match the model's LoRA modules: {sorted(missing)[:3]}")
        self.step, self.capturing = int(state["step"]), bool(state["capturing"])
        for name, saved in state["modules"].items():
            s = self.modules[name]
            if saved["rank"] != s.rank:
                raise GritError(f"{name}: saved rank {saved['rank']} but the model has rank {s.rank}")
            s.u, s.v = _stats_from(saved["u"]), _stats_from(saved["v"])
            s.inverse = {k: _clone(v) for k, v in saved["inverse"].items()}
            s.damping_used = dict(saved["damping_used"])
            s.basis_u, s.basis_v = _clone(saved["basis_u"]), _clone(saved["basis_v"])


def gradient_norm(parameters: list[torch.nn.Parameter]) -> float:
    """L2 norm of all these gradients together (0 when there are none)."""
    norms = [p.grad.norm() for p in parameters if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0


def clip_gradients(parameters: list[torch.nn.Parameter], max_grad_norm: float | None) -> None:
    """The trust region: bound the (preconditioned) gradients' joint norm; 0/None: no clipping."""
    with_grad = [p for p in parameters if p.grad is not None]
    if max_grad_norm and max_grad_norm > 0 and with_grad:
        torch.nn.utils.clip_grad_norm_(with_grad, max_grad_norm)


def remap_optimizer_state(optimizer, old: torch.Tensor, new: torch.Tensor, first_moment, second_moment) -> None:
    """Point the optimizer at ``new`` instead of ``old`` and carry its state over: tensors
    shaped like the parameter are mapped (first moments exactly, second moments through the
    squared basis, an approximation), scalars such as the step count are kept."""
    for group in optimizer.param_groups:
        group["params"] = [new if p is old else p for p in group["params"]]
    state = optimizer.state.pop(old, None)
    if state is None:
        return
    remapped = {}
    for key, value in state.items():
        if isinstance(value, torch.Tensor) and value.shape == old.shape:
            remapped[key] = (second_moment if "sq" in key else first_moment)(value).contiguous()
        else:
            remapped[key] = value
    optimizer.state[new] = remapped


def _clone(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().cpu().clone()


def _stats_state(stats: FactorStats) -> dict[str, Any]:
    return {"rank": stats.rank, "total": _clone(stats.total), "count": stats.count, "ema": _clone(stats.ema),
            "pending": _clone(stats.pending), "pending_count": stats.pending_count}


def _stats_from(saved: dict[str, Any]) -> FactorStats:
    return FactorStats(rank=saved["rank"], total=_clone(saved["total"]), count=int(saved["count"]),
                       ema=_clone(saved["ema"]), pending=_clone(saved["pending"]),
                       pending_count=int(saved["pending_count"]))
