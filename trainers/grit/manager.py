"""GritManager: which LoRA modules, when, and across ranks; the per-module work is in ``layer.py``.

One optimizer step with GRIT, in order (written once, as code, in :meth:`GritManager.before_step`
and :meth:`GritManager.after_step`; the doors in ``doors.py`` call them)::

    loss.backward()                 # hooks capture u = A x and v = B^T dL/dy per token row
    before_step(max_grad_norm):
        sync factors across ranks   # distributed.allreduce_sum_ (identical factors everywhere)
        refresh inverses if due     # damped Cholesky per module and side, readiness per side
        add regulariser gradients   # curvature / reprojection penalties (warm-up ramped)
        precondition                # natural gradient on every ready side (after ng_warmup_steps)
        clip to max_grad_norm       # the trust region bounds the *preconditioned* step
    optimizer.step()
    after_step():                   # step counter, reprojection / truncation when due

The manager is the policy (when to capture, invert, reproject, truncate); the hooks and taps
that capture rows are in ``capture.py``, the work of a step on all modules at once is the
batched engine's (``batched.py``).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Collection
from typing import Any

import torch
from torch import nn

from trainers.grit import math as gm
from trainers.grit.batched import BatchedEngine, Factor
from trainers.grit.cadence import for_budget, reprojection_due
from trainers.grit.capture import Capture
from trainers.grit.config import GritParams
from trainers.grit.distributed import allreduce_sum_, world_size
from trainers.grit.doors import GritCallback, GritOptimizer, clip_gradients, joint_gradient_norm
from trainers.grit.layer import (
    FACTOR_STATS,
    FactorStats,
    GritError,
    ModuleState,
    base_module_name,
    exact_patterns_first,
    fold_all,
    invert,
    lora_layers,
    module_key,
    rank_pattern_key,
)

__all__ = ["GritError", "GritManager", "ModuleState", "base_module_name", "lora_layers"]


def check_settings(requested: GritParams, total_steps: int | None) -> None:
    """Refuse settings this run cannot honour, in one sentence each."""
    if requested.cadence == "budget" and total_steps is None:
        raise GritError("grit.cadence 'budget' needs the run's length (total_steps)")
    if requested.truncate and world_size() > 1:
        # A truncated factor is a new Parameter: DDP, which registered the old ones, would
        # neither all-reduce its gradients nor keep the replicas equal.
        raise GritError(f"grit.truncate cannot train data-parallel ({world_size()} processes): DDP does not "
                        "synchronise truncated factors; set grit.truncate: false or train.nproc_per_node: 1")


def module_states(layers: list[tuple[str, nn.Module, str]]
                  ) -> tuple[OrderedDict[str, ModuleState], dict[str, str], dict[str, int]]:
    """(module key -> its state, module key -> name in the base model, module key -> the rank the
    model was built with) for PEFT's LoRA ``layers``."""
    if not layers:
        raise GritError("GRIT found no trainable LoRA layer in the model: applied to 0 layers")
    several = len({a for _, _, a in layers}) > 1
    states: OrderedDict[str, ModuleState] = OrderedDict()
    base_names, built_ranks = {}, {}
    for name, layer, adapter in layers:
        rank = layer.lora_A[adapter].weight.shape[0]
        key = module_key(name, adapter, several)
        states[key] = ModuleState(key, layer, adapter, FactorStats(rank), FactorStats(rank))
        base_names[key], built_ranks[key] = base_module_name(name), rank
    return states, base_names, built_ranks


class GritManager:
    """Attaches GRIT to every LoRA layer of ``peft_model`` (see the module docstring)."""

    def __init__(self, peft_model: nn.Module, config: GritParams | None = None, total_steps: int | None = None,
                 modules: Collection[str] | None = None):
        """``modules``: only these LoRA modules (names relative to the base model, e.g.
        ``model.vision_model.encoder.layers.0.self_attn.q_proj``); all of them by default."""
        self.model = peft_model
        self.requested = config or GritParams()
        check_settings(self.requested, total_steps)
        self.step = 0
        self.optimizer: torch.optim.Optimizer | None = None
        self.report: dict[str, torch.Tensor | float] = {}     # the last step's, on the device until read
        # Counters the GRIT paper logs (host integers, no device read): Fisher inversions, and
        # every reprojection or rank event with the ranks kept and the spectrum they keep.
        self.inversions = 0                   # (module, side) inverses computed since the start
        self._inverted_now = 0
        self._captured_modules = 0            # modules that captured rows in the last sync
        self.rank_events: list[dict[str, float | int]] = []
        layers = lora_layers(peft_model)
        self.targeted = [base_module_name(name) for name, _, _ in layers]   # for rank_pattern keys
        if modules is not None:
            wanted = set(modules)
            layers = [layer for layer in layers if base_module_name(layer[0]) in wanted]
        self.modules, self.base_names, self.built_ranks = module_states(layers)
        self.engine = BatchedEngine(self.modules, self.requested)
        self.total_steps = total_steps
        self.capture = Capture(peft_model, self.modules)
        # how each module hands GRIT its rows ("fused-<kind>" or "hooks"), and why not fused
        self.capture_paths, self.notes = self.capture.paths, self.capture.notes
        if self.config.capture == "fused":
            self.capture.attach_fused(self.config.fused_lora_dtype)
        self.capture.attach_hooks()

    @property
    def config(self) -> GritParams:
        """The settings in force (the requested ones, or with ``cadence: budget`` those for the
        run's length); the engine works with the same."""
        return self.engine.config

    @config.setter
    def config(self, config: GritParams) -> None:
        self.engine.config = config

    @property
    def capturing(self) -> bool:
        """Whether this step captures rows (``capture_every``)."""
        return self.capture.capturing

    def detach(self) -> None:
        """Remove everything GRIT put on the model: hooks and fused forwards."""
        self.capture.detach()

    def collect_captured(self, fold: bool = False) -> bool:
        """Fold what the hooks and taps stashed since the last call into the statistics
        (:meth:`BatchedEngine.fold_captured`; ``fold``: straight into the running sums)."""
        return self.engine.fold_captured(self.capture.take_stash(), fold)

    # ------------------------------------------------------------------------- factors

    def sync_factors(self) -> None:
        """All-reduce what every rank captured since the last sync, then fold it in."""
        states = list(self.modules.values())
        reduce = self.config.allreduce and world_size() > 1
        # the running means of one process take a lone forward's products straight in
        # (collect_captured); what is summed across ranks, or into an EMA, goes through pending
        straight = not reduce and self.config.statistics != "ema" and not any(
            [s.u.pending_count or s.v.pending_count for s in states])
        counts = [s.u.count for s in states]
        if self.collect_captured(fold=straight):
            # the modules whose rows were folded in (one counted once, however often it ran)
            self._captured_modules = sum([s.u.count != count for s, count in zip(states, counts, strict=True)])
            return
        # One process has nothing to add: reading the summed counts back would cost one host
        # read per module and side.
        if reduce:
            tensors = [t for s in states for t in (s.u.pending, s.v.pending)]
            counts = torch.tensor([c for s in states for c in (s.u.pending_count, s.v.pending_count)],
                                  dtype=torch.float64, device=tensors[0].device)
            allreduce_sum_([*tensors, counts])
            for i, s in enumerate(states):
                s.u.pending_count, s.v.pending_count = int(counts[2 * i]), int(counts[2 * i + 1])
        self._captured_modules = sum([s.u.pending_count > 0 for s in states])
        fold_all([stats for s in states for stats in (s.u, s.v)], self.config.statistics, self.config.ema_decay)

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

    def refresh_inverses(self, force: bool = False) -> None:
        """Invert every side whose statistics are gated in; due every ``update_freq`` steps, and
        at once for a side that has become eligible but has no inverse yet."""
        cfg = self.config
        self.settle()
        due = force or self.step % cfg.update_freq == 0
        # a comprehension, not a call per module and side: this runs every step (a host-bound GPU step)
        a_side, b_side = FACTOR_STATS[cfg.factor_sides]["A"], FACTOR_STATS[cfg.factor_sides]["B"]
        wanted: list[tuple[ModuleState, str, FactorStats]] = [
            (state, side, stats) for state in self.modules.values()
            for side, stats in (("A", getattr(state, a_side)), ("B", getattr(state, b_side)))
            if stats.count >= cfg.min_samples and (due or state.inverse[side] is None)]
        self._inverted_now = len(wanted)
        self.inversions += len(wanted)
        if cfg.fisher != "rank_kfac":
            for state, side, stats in wanted:
                state.set_inverse(side, invert(stats.covariance(cfg.statistics), cfg))
            return
        self.engine.invert(wanted)     # rank_kfac: one batched Cholesky per (rank, device) group

    def settle(self) -> None:
        """Read what the last inversions found; drop the ones that failed (:meth:`BatchedEngine.settle`)."""
        self.engine.settle()

    # -------------------------------------------------------------------- the GRIT step

    def lora_parameters(self) -> list[torch.nn.Parameter]:
        return [weight for _, _, weight in self.factors()]

    def factors(self) -> list[Factor]:
        """(state, side, weight) of every module's two factors, in ``lora_parameters`` order."""
        return self.engine.factors()

    def _regularizer_scale(self) -> float:
        warmup = self.config.regularizer_warmup_steps
        return 1.0 if warmup == 0 else min(1.0, self.step / warmup)

    def add_regularizer_gradients(self) -> float:
        """Add the gradients of the curvature and reprojection penalties; returns their value."""
        cfg = self.config
        if cfg.lambda_curvature == 0 and cfg.lambda_reprojection == 0:
            return 0.0
        scale = self._regularizer_scale()
        with torch.no_grad():
            return sum(state.add_regularizer_gradients(cfg, scale) for state in self.modules.values())


    def before_step(self, max_grad_norm: float | None) -> dict[str, torch.Tensor | float]:
        """GRIT's step: everything between backward and ``optimizer.step()``, in order (module
        docstring). ``max_grad_norm`` None or 0: no clip; several managers sharing one optimizer
        (one per modality of a VLM) each step so, then one clip bounds all their gradients. The
        report's norms stay on the device (:attr:`last_report` reads them)."""
        factors = self.factors()
        parameters = [weight for _, _, weight in factors if weight.grad is not None]
        self.sync_factors()
        if self.step == 0:
            self.check_capture_coverage()
        self.refresh_inverses()
        regularizer = self.add_regularizer_gradients()
        applied, raw_norm, clipped = self._natural_gradient(factors, parameters, max_grad_norm)
        rows = sum([s.u.count for s in self.modules.values()])
        self.report = {
            "grad_norm_raw": raw_norm, "preconditioned_tensors": applied, "regularizer": regularizer,
            "rows_captured": float(rows),
            "inversions": float(self._inverted_now), "inversions_total": float(self.inversions),
            "capture_coverage": self._captured_modules / max(1, len(self.modules)),
        }
        # the clip's own total norm is the preconditioned gradients' joint norm: not computed twice
        norm = clipped if clipped is not None else clip_gradients(parameters, max_grad_norm)
        self.report["grad_norm_preconditioned"] = norm if norm is not None else joint_gradient_norm(parameters)
        return self.report

    def _natural_gradient(self, factors: list[Factor], parameters: list[torch.nn.Parameter],
                          max_grad_norm: float | None
                          ) -> tuple[int | torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Precondition (after ``ng_warmup_steps``; before, the factors fill and invert but the step
        is plain): (tensors preconditioned, the raw joint norm, and, where ``max_grad_norm`` asks
        for a clip, the joint norm of the clip done on the stacks; None: nothing clipped yet)."""
        if not (self.config.precondition and self.step >= self.config.ng_warmup_steps):
            return 0, joint_gradient_norm(parameters), None
        # the raw norm from the stacks preconditioning makes anyway (joint_gradient_norm's list
        # operations over every gradient cost a host-bound GPU step 840 tensors)
        norms: list[torch.Tensor] = []
        clipped = None
        if max_grad_norm and max_grad_norm > 0 and parameters:
            applied, clipped = self.engine.precondition_and_clip(factors, norms, max_grad_norm)
        else:
            applied = self.engine.precondition(factors, norms)
        raw_norm = torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())
        return applied, raw_norm, clipped


    @property
    def last_report(self) -> dict[str, float]:
        """The last step's report, read on the host (for logging)."""
        return {key: float(value) for key, value in self.report.items()}

    @property
    def total_steps(self) -> int | None:
        return self._total_steps

    @total_steps.setter
    def total_steps(self, steps: int | None) -> None:
        """The run's length; with ``cadence: budget`` it sets the warm-ups and cadences."""
        self._total_steps = steps
        self.config = for_budget(self.requested, steps) if steps is not None else self.requested

    def after_step(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """After ``optimizer.step()``: reprojection (and truncation) when due; advance the step."""
        self.step += 1
        self.capture.set_capturing(self.step % self.config.capture_every == 0)
        if optimizer is not None:
            self.optimizer = optimizer
        if reprojection_due(self.step, self.config, self.total_steps):
            self.reproject()

    # ------------------------------------------------------------- reprojection / ranks

    def budget(self, state: ModuleState, eigenvalues: torch.Tensor) -> int:
        """The projection budget k of ``state`` now: constant, scheduled, or by eigen-energy."""
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
        """Reproject every module with enough statistics onto its top-k directions
        (``ModuleState.reproject``); with ``truncate`` shrink it to rank k. Returns ranks.

        k: the given one, else the module's full rank before ``rank_adaptation_start_step``
        (a rotation that changes nothing, so no truncation), else the budget."""
        self.settle()          # a rare event: which inverses exist must be known before ranks change
        adapting = self.step >= self.config.rank_adaptation_start_step
        ranks, kept_energy, budgets = {}, [], []
        with torch.no_grad():
            for state in self.modules.values():
                sigma_u, _, rows = self.covariances(state.name)
                if sigma_u is None or rows < self.config.min_samples:
                    ranks[state.name] = state.rank
                    continue
                eigenvalues, _ = gm.top_eigenvectors(sigma_u, state.rank)
                if k is not None:
                    k_here = min(state.rank, k)
                else:
                    k_here = self.budget(state, eigenvalues) if adapting else state.rank
                kept_energy.append(gm.kept_energy(eigenvalues, k_here))
                budgets.append(k_here)
                basis_u = state.reproject(k_here, self.config)
                if self.config.truncate and k_here < state.rank:
                    state.truncate(basis_u, self.optimizer)
                ranks[state.name] = state.rank
        self.record_ranks_in_peft_config()
        self._record_rank_event(ranks, kept_energy, budgets)
        return ranks

    def _record_rank_event(self, ranks: dict[str, int], kept_energy: list[torch.Tensor], budgets: list[int]) -> None:
        """One reprojection: the ranks kept, the projection budgets k, and the share of Sigma_u's
        eigen-energy the top k keep (median over the modules reprojected), in :attr:`rank_events`
        and this step's report."""
        kept = sorted(ranks.values())
        energies = sorted(float(e) for e in kept_energy)      # a rare event: one read per module
        event = {"step": self.step, "reprojected_modules": len(energies), "rank_min": kept[0],
                 "rank_median": kept[len(kept) // 2], "rank_max": kept[-1], "rank_total": sum(kept),
                 "budget_min": min(budgets, default=0), "budget_max": max(budgets, default=0),
                 "kept_energy_median": energies[len(energies) // 2] if energies else float("nan")}
        self.rank_events.append(event)
        self.report = {**self.report, **{k: float(v) for k, v in event.items() if k != "step"}}

    def truncate(self) -> dict[str, int]:
        """Shrink every module to the rank of its current u-basis (set by :meth:`reproject`)."""
        self.settle()
        with torch.no_grad():
            for state in self.modules.values():
                if state.basis_u is not None and state.basis_u.shape[1] < state.rank:
                    state.truncate(state.basis_u, self.optimizer)
        self.record_ranks_in_peft_config()
        return self.effective_ranks()

    def effective_ranks(self) -> dict[str, int]:
        return {name: state.rank for name, state in self.modules.items()}

    def record_ranks_in_peft_config(self) -> None:
        """Write each truncated module's rank k and an alpha giving its unchanged scaling into its
        adapter's PEFT config (``rank_pattern`` / ``alpha_pattern``), so that ``save_pretrained``
        writes the shapes it saves and ``from_pretrained`` rebuilds the same function."""
        configs = getattr(self.model, "peft_config", None) or {}
        truncated = [s for s in self.modules.values() if s.rank < self.built_ranks[s.name]]
        for adapter in dict.fromkeys(s.adapter for s in truncated):
            config = configs[adapter]
            ranks, alphas = {}, {}
            for state in (s for s in truncated if s.adapter == adapter):
                key = rank_pattern_key(self.base_names[state.name], self.targeted)
                ranks[key] = state.rank
                alphas[key] = gm.lora_alpha_for(state.scaling, state.rank, config.use_rslora)
            config.rank_pattern = exact_patterns_first(ranks, config.rank_pattern)
            config.alpha_pattern = exact_patterns_first(alphas, config.alpha_pattern)

    # ---------------------------------------------------------------------- reporting

    def all_ready(self) -> bool:
        """True only when *every* module has an inverse on *both* sides."""
        self.settle()
        return all(s.ready() for s in self.modules.values())

    def diagnostics(self) -> dict[str, dict[str, Any]]:
        self.settle()
        return {name: state.diagnostics() for name, state in self.modules.items()}

    # ------------------------------------------------------------------- doors and state

    def wrap_optimizer(self, optimizer: torch.optim.Optimizer, max_grad_norm: float | None = None) -> GritOptimizer:
        self.optimizer = optimizer
        return GritOptimizer(optimizer, self, max_grad_norm)

    def callback(self) -> GritCallback:
        return GritCallback(self)

    def state_dict(self) -> dict[str, Any]:
        self.settle()
        return {"step": self.step, "capturing": self.capturing, "config": self.config.model_dump(),
                "modules": {name: state.state() for name, state in self.modules.items()},
                "inversions": self.inversions, "rank_events": list(self.rank_events)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a saved state; call it before the optimizer is built and before the adapter
        weights are loaded (as a resumed Trainer does), since modules saved after truncation are
        first shrunk to their saved rank."""
        missing = set(self.modules) ^ set(state["modules"])
        if missing:
            raise GritError(f"GRIT state does not match the model's LoRA modules: {sorted(missing)[:3]}")
        shrinking = [n for n, saved in state["modules"].items() if saved["rank"] < self.modules[n].rank]
        if shrinking and self.optimizer is not None:
            raise GritError(f"GRIT state: {shrinking[0]} was truncated, so its factors must be rebuilt before "
                            "the optimizer is; load the GRIT state before building the optimizer")
        self.engine.forget_inversions()
        self.step = int(state["step"])
        self.inversions = int(state.get("inversions", 0))
        self.rank_events = list(state.get("rank_events", []))
        self.capture.set_capturing(bool(state["capturing"]))
        for name, saved in state["modules"].items():
            self.modules[name].load(saved)
        self.record_ranks_in_peft_config()
