"""GRIT-VLM: LoRA on each modality with its own shape, and one GRIT manager per modality.

``build_vlm_peft`` places LoRA on the layers every modality selects, with the modality's rank,
alpha and dropout. ``VlmGritAdapter`` runs one :class:`~trainers.grit.manager.GritManager` per
modality (its own Fisher approximation, natural gradient on/off, damping, reprojection budget
schedule) behind the manager's interface, so the training recipe's two doors (optimizer wrapper,
Trainer callback) and the probe take it unchanged. One step::

    loss.backward()                      # each modality's hooks capture its own rows
    before_step(max_grad_norm):
        for each modality: before_step(None)    # sync, invert, regularise, precondition
        clip all modalities' gradients together  # one trust region for the whole adapter
    optimizer.step()
    after_step()                         # each modality: reprojection on its own schedule, or
                                         # all at once on one joint budget (joint_budget)

Per-modality statistics of every step (rows captured, gradient norms before/after
preconditioning, preconditioned tensors) are kept in ``history`` and summarised by
``modality_stats``.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from typing import Any

import torch

from trainers.grit import math as gm
from trainers.grit.cadence import for_budget, reprojection_due
from trainers.grit.config import GritParams
from trainers.grit.doors import GritCallback, GritOptimizer, clip_gradients, gradient_norm
from trainers.grit.layer import ModuleState, base_module_name, lora_layers
from trainers.grit.manager import GritManager
from trainers.grit_vlm.config import Modality, VlmGritParams, modality_grit_config, modality_lora_shape
from trainers.grit_vlm.layers import select_modality_modules


def build_vlm_peft(model, config: VlmGritParams):
    """(PEFT model, modality -> adapted module names): LoRA with each modality's shape."""
    from peft import LoraConfig, get_peft_model

    from trainers.engines import target_regex

    selected = select_modality_modules(model, config)
    ranks, alphas, dropouts = {}, {}, {}
    for name, modality in config.modalities().items():
        rank, alpha, dropout = modality_lora_shape(config, modality)
        for module in selected[name]:
            key = re.escape(module)
            ranks[key], alphas[key], dropouts[module] = rank, alpha, dropout
    every = [module for modules in selected.values() for module in modules]
    peft_model = get_peft_model(model, LoraConfig(
        r=config.r, lora_alpha=config.alpha, lora_dropout=0.0, bias="none", target_modules=target_regex(every),
        rank_pattern=ranks, alpha_pattern=alphas,
    ))
    set_lora_dropout(peft_model, dropouts)
    return peft_model, selected


def _own_config(base: GritParams, modality, joint: bool) -> GritParams:
    config = modality_grit_config(base, modality)
    return config.model_copy(update={"reprojection": False}) if joint else config


def set_lora_dropout(peft_model, dropouts: dict[str, float]) -> None:
    """Per-module LoRA dropout (PEFT's config has one value for all), built as PEFT builds it."""
    for name, layer, adapter in lora_layers(peft_model):
        p = dropouts.get(base_module_name(name), 0.0)
        layer.lora_dropout[adapter] = torch.nn.Dropout(p=p) if p > 0 else torch.nn.Identity()


class VlmGritAdapter:
    """One GritManager per modality, driven as one (see the module docstring)."""

    def __init__(self, peft_model, config: VlmGritParams, selected: dict[Modality, list[str]],
                 grit: GritParams | None = None, total_steps: int | None = None) -> None:
        base = grit or GritParams()
        self.config = config
        joint = config.joint_budget is not None
        # With a joint budget the managers never reproject on their own: the adapter reprojects
        # them all together, on the cadence of the run's grit section.
        self.joint_cadence = base.model_copy(update={"reprojection": True}) if joint else None
        self.managers: OrderedDict[Modality, GritManager] = OrderedDict(
            (name, GritManager(peft_model, _own_config(base, modality, joint), total_steps, modules=selected[name]))
            for name, modality in config.modalities().items()
        )
        self.joint_events: list[dict[str, Any]] = []
        self.modality_of = {module: name for name, m in self.managers.items() for module in m.modules}
        self.last_report: dict[str, float] = {}
        self.history: list[dict[str, float]] = []

    # --- the manager interface the recipe, the doors and the probe use

    @property
    def modules(self) -> OrderedDict[str, ModuleState]:
        return OrderedDict((name, state) for m in self.managers.values() for name, state in m.modules.items())

    @property
    def step(self) -> int:
        return next(iter(self.managers.values())).step

    @property
    def total_steps(self) -> int | None:
        return next(iter(self.managers.values())).total_steps

    @total_steps.setter
    def total_steps(self, value: int | None) -> None:
        for manager in self.managers.values():
            manager.total_steps = value

    @property
    def optimizer(self):
        return next(iter(self.managers.values())).optimizer

    @optimizer.setter
    def optimizer(self, value) -> None:
        for manager in self.managers.values():
            manager.optimizer = value

    def lora_parameters(self) -> list[torch.nn.Parameter]:
        return [p for m in self.managers.values() for p in m.lora_parameters()]

    def before_step(self, max_grad_norm: float | None) -> dict[str, float]:
        reports = {name: manager.before_step(None) for name, manager in self.managers.items()}
        parameters = self.lora_parameters()
        clip_gradients(parameters, max_grad_norm)
        report: dict[str, float] = {
            "grad_norm_raw": float(torch.stack([torch.as_tensor(r["grad_norm_raw"]) for r in reports.values()]).norm()),
            "grad_norm_preconditioned": float(torch.stack(
                [torch.as_tensor(r["grad_norm_preconditioned"]) for r in reports.values()]).norm()),
            "grad_norm_clipped": gradient_norm(parameters),
            "preconditioned_tensors": float(sum(r["preconditioned_tensors"] for r in reports.values())),
            "regularizer": sum(r["regularizer"] for r in reports.values()),
            "rows_captured": sum(r["rows_captured"] for r in reports.values()),
        }
        for name, modality_report in reports.items():
            report.update({f"{name}/{key}": float(value) for key, value in modality_report.items()})
        self.last_report = report
        self.history.append({"step": float(self.step + 1), **report})
        return report

    def after_step(self, optimizer=None) -> None:
        for manager in self.managers.values():
            manager.after_step(optimizer)
        if self.joint_cadence is not None:
            cadence = for_budget(self.joint_cadence, self.total_steps) if self.total_steps else self.joint_cadence
            if reprojection_due(self.step, cadence, self.total_steps):
                self.reproject_jointly()

    def vision_ranks(self) -> list[int]:
        """Each vision module's rank by eigen-energy (``joint_budget.energy_threshold``)."""
        manager, settings = self.managers["vision"], self.config.joint_budget
        ranks = []
        for state in manager.modules.values():
            sigma_u, _, rows = manager.covariances(state.name)
            if sigma_u is not None and rows >= manager.config.min_samples:
                eigenvalues, _ = gm.top_eigenvectors(sigma_u, state.rank)
                ranks.append(gm.rank_by_energy(eigenvalues, settings.energy_threshold, 1, state.rank))
        return ranks

    def reproject_jointly(self) -> int:
        """Reproject every modality onto the joint budget k; returns k."""
        settings = self.config.joint_budget
        vision = self.vision_ranks()
        k = gm.joint_budget(vision, settings.factor, settings.min_k)
        for manager in self.managers.values():
            manager.reproject(k)
        self.joint_events.append({"step": self.step, "vision_rank_median": sorted(vision)[len(vision) // 2]
                                  if vision else None, "k": k})
        return k

    def all_ready(self) -> bool:
        return all(m.all_ready() for m in self.managers.values())

    def diagnostics(self) -> dict[str, dict[str, Any]]:
        return {name: {**entry, "modality": self.modality_of[name]}
                for m in self.managers.values() for name, entry in m.diagnostics().items()}

    def effective_ranks(self) -> dict[str, int]:
        return {name: rank for m in self.managers.values() for name, rank in m.effective_ranks().items()}

    def collect_captured(self) -> None:
        for manager in self.managers.values():
            manager.collect_captured()

    def settle(self) -> None:
        for manager in self.managers.values():
            manager.settle()

    def detach(self) -> None:
        for manager in self.managers.values():
            manager.detach()

    def wrap_optimizer(self, optimizer, max_grad_norm: float | None = None) -> GritOptimizer:
        self.optimizer = optimizer
        return GritOptimizer(optimizer, self, max_grad_norm)

    def callback(self) -> GritCallback:
        return GritCallback(self)

    def state_dict(self) -> dict[str, Any]:
        return {name: manager.state_dict() for name, manager in self.managers.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, manager in self.managers.items():
            manager.load_state_dict(state[name])

    # --- per-modality statistics

    def modality_stats(self) -> dict[Modality, dict[str, Any]]:
        """Per modality: its GRIT settings, layers, rows captured, inverse readiness, condition
        numbers and how much preconditioning changed its gradient norm over the run."""
        stats: dict[Modality, dict[str, Any]] = {}
        for name, manager in self.managers.items():
            entries = manager.diagnostics().values()
            conditions = [e[f"condition_{s}"] for e in entries for s in ("A", "B") if e[f"condition_{s}"] is not None]
            ratios = [row[f"{name}/grad_norm_preconditioned"] / row[f"{name}/grad_norm_raw"]
                      for row in self.history if row.get(f"{name}/grad_norm_raw")]
            cfg = manager.config
            stats[name] = {
                "modules": len(manager.modules), "fisher": cfg.fisher, "precondition": cfg.precondition,
                "reprojection": cfg.reprojection, "budget_schedule": cfg.budget_schedule,
                "ranks": sorted(set(manager.effective_ranks().values())),
                "rows_captured": int(sum(s.u.count for s in manager.modules.values())),
                "inverses_ready": sum(int(e["inverse_ready_A"]) + int(e["inverse_ready_B"]) for e in entries),
                "inverses_total": 2 * len(manager.modules),
                "max_condition": max(conditions) if conditions else None,
                "median_norm_ratio": float(torch.tensor(ratios).median()) if ratios else None,
            }
        return stats
