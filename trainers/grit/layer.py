"""One LoRA module under GRIT: its rank-space statistics and the operations on it.

Everything here concerns a single module (as PEFT's ``lora/layer.py`` and kfac-pytorch's
``layers/`` do): the u- and v-side second moments, their damped inverses, preconditioning of the
module's own ``lora_A`` / ``lora_B`` gradients, the regulariser gradients, reprojection onto
the top eigen-directions and truncation to a smaller rank. The math itself is in ``math.py``;
which modules, when, and across ranks is the manager's business (``manager.py``).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from trainers.grit import math as gm
from trainers.grit.config import GritParams

SIDES = ("A", "B")
# Which statistics precondition which factor, by ``grit.factor_sides``: K-FAC's sides (dL/dB =
# s g u^T, so B's rank-side factor is E[u u^T]; A's is E[v v^T]) or the paper code's swapped ones.
FACTOR_STATS = {"kfac": {"A": "v", "B": "u"}, "reference": {"A": "u", "B": "v"}}

# How many parameters have been registered in this process (a truncation's new factor, a loaded
# adapter): what GRIT reads of a module's factors each step is read again only when this changed.
REGISTRATIONS = [0]


def _count_registration(_module: nn.Module, _name: str, _parameter: object) -> None:
    REGISTRATIONS[0] += 1


torch.nn.modules.module.register_module_parameter_registration_hook(_count_registration)


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

    def add(self, outer: torch.Tensor, rows: int) -> None:
        self.place(outer.device)
        self.pending += outer
        self.pending_count += rows

    def place(self, device: torch.device) -> None:
        """Statistics live on the layer's device: no host sync per layer on a GPU."""
        if self.pending.device != device:
            self.to(device)

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
        """Move the statistics to ``device``. Empty ones are made there: copying them from host
        memory waits for the device (on SmolLM2's 210 modules, 840 synchronisations in the first
        GRIT step, seen on an H100)."""
        if self.count == 0 and self.pending_count == 0 and self.ema is None:
            self.total = torch.zeros(self.rank, self.rank, device=device)
            self.pending = torch.zeros(self.rank, self.rank, device=device)
            return
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

    def state(self) -> dict[str, Any]:
        return {"rank": self.rank, "total": _clone(self.total), "count": self.count, "ema": _clone(self.ema),
                "pending": _clone(self.pending), "pending_count": self.pending_count}

    @classmethod
    def from_state(cls, saved: dict[str, Any]) -> FactorStats:
        return cls(rank=saved["rank"], total=_clone(saved["total"]), count=int(saved["count"]),
                   ema=_clone(saved["ema"]), pending=_clone(saved["pending"]),
                   pending_count=int(saved["pending_count"]))


def stacked_covariances(stats: list[FactorStats], statistics: str) -> torch.Tensor:
    """:meth:`FactorStats.covariance` of many sides of one rank and device, stacked [M, r, r]
    in two operations (every side has rows), nothing copied to the device."""
    if statistics == "ema":
        return torch.stack([s.ema for s in stats])
    # the counts go in as scalars: a tensor of them would be a copy to the device, which waits
    return torch.stack(torch._foreach_div([s.total for s in stats], [float(s.count) for s in stats]))


def fold_all(stats: list[FactorStats], statistics: str, decay: float) -> None:
    """:meth:`FactorStats.fold` of many sides at once: running means by two list operations
    (``_foreach``), whatever their number; EMAs side by side."""
    live = [s for s in stats if s.pending_count > 0]
    if statistics == "ema":
        for s in live:
            s.fold(statistics, decay)
        return
    if live:
        torch._foreach_add_([s.total for s in live], [s.pending for s in live])
        torch._foreach_zero_([s.pending for s in live])
    for s in live:
        s.count += s.pending_count
        s.pending_count = 0


class Stash:
    """What was captured since the last GRIT step, one entry per module and forward: the module,
    u = A x, its row weights and row count in ``entries`` (flat, 4 items an entry), and (once
    backward reached it) the gradient at u in ``grads``. Lists, not a record per entry: Python's
    garbage collector tracks every object a step keeps alive from its forward to its GRIT step,
    and runs more often (its full collection, which walks the whole process, included) the more
    there are. Per entry, after backward: u, its gradient, and what the hook leaves on u
    (``Tensor.register_hook``'s dictionary, the hook and the list method it calls, u's
    ``grad_fn`` as a Python object): 6, where a record per entry and a weak reference to it in
    the hook made 8."""

    __slots__ = ("entries", "grads")
    WIDTH = 4

    def __init__(self) -> None:
        self.entries: list[Any] = []       # state, u, mask, rows (an int, or a DeferredCount, host.py)
        self.grads: list[torch.Tensor | None] = []

    def add(self, state: ModuleState, u: torch.Tensor, mask: torch.Tensor | None, rows: Any,
            grad: torch.Tensor | None = None) -> Callable[[torch.Tensor], None] | None:
        """Stash one entry. Without its gradient, returns the hook that stores the gradient at u
        when backward reaches it. The hook holds the list of gradients, not u: u -> its hook -> u
        would be a cycle that keeps each step's autograd graph alive until the garbage collector
        runs (hundreds of MiB on SmolLM2). A gradient that comes after its stash was folded lands
        in that old list, and is dropped with it."""
        self.entries.extend((state, u, mask, rows))
        self.grads.append(grad)
        return None if grad is not None else functools.partial(self.grads.__setitem__, len(self.grads) - 1)

    def columns(self) -> tuple[list[ModuleState], list[torch.Tensor], list[torch.Tensor | None], list[Any]]:
        """(states, us, masks, rows), each in entry order."""
        return tuple(self.entries[k::self.WIDTH] for k in range(self.WIDTH))


def invert(sigma: torch.Tensor, config: GritParams) -> tuple[torch.Tensor, float] | None:
    """(damped inverse of ``sigma``, the damping used) by ``config.fisher``; None when there is
    nothing to invert yet (an all-zero factor, as B's v-side at LoRA init) or every try failed."""
    damping = float(gm.effective_damping(sigma, config.damping, config.damping_mode))
    if damping <= 0:
        return None
    if config.fisher == "rank_kfac":
        return gm.damped_inverse(sigma, damping, config.damping_escalation)
    if config.fisher == "diagonal":
        return gm.diagonal_inverse(sigma, damping), damping
    inverse = gm.block_diagonal_inverse(sigma, damping, config.block_size, config.damping_escalation)
    return None if inverse is None else (inverse, damping)


@dataclass
class ModuleState:
    """GRIT's state for one LoRA module (one adapter of one PEFT ``LoraLayer``)."""

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

    def weight(self, side: str) -> nn.Parameter:
        return self.lora_A.weight if side == "A" else self.lora_B.weight

    # ---------------------------------------------------------------------- statistics

    def factor_for(self, side: str, factor_sides: str) -> FactorStats:
        """Which statistics precondition which factor (:data:`FACTOR_STATS`)."""
        return getattr(self, FACTOR_STATS[factor_sides][side])

    def set_inverse(self, side: str, solved: tuple[torch.Tensor, float] | None) -> None:
        self.inverse[side], self.damping_used[side] = solved if solved else (None, None)

    # ------------------------------------------------------------------- the GRIT step

    def precondition(self, config: GritParams) -> int:
        """Rewrite the ``.grad`` of this module's factors whose side has an inverse; how many.
        With ``graft_norm`` each keeps its raw gradient's norm (direction from GRIT)."""
        applied = 0
        for side, apply in (("A", gm.precondition_A), ("B", gm.precondition_B)):
            weight, inverse = self.weight(side), self.inverse[side]
            if inverse is None or weight.grad is None:
                continue
            # In fp32 whatever the gradient's dtype: the inverse is fp32, and a bf16 product would
            # round it and the sums (copy_ casts the result back to the gradient's dtype).
            raw = weight.grad.float()
            natural = apply(raw, inverse.to(raw.device))
            if config.graft_norm:
                natural = gm.graft(natural, raw)
            weight.grad.copy_(natural)
            applied += 1
        return applied

    def add_regularizer_gradients(self, config: GritParams, scale: float) -> float:
        """Add the curvature and reprojection penalties' gradients; returns their value."""
        A, B = self.lora_A.weight, self.lora_B.weight
        sigma_u, sigma_v = self.u.covariance(config.statistics), self.v.covariance(config.statistics)
        terms: list[tuple[nn.Parameter, torch.Tensor, float]] = []
        if config.lambda_curvature and sigma_u is not None and sigma_v is not None:
            su, sv = sigma_u.to(A), sigma_v.to(B)
            # d/dA tr(A^T Su A) = 2 Su A ; d/dB tr(B Sv B^T) = 2 B Sv
            terms += [(A, 2 * su @ A, float(torch.trace(A.T @ su @ A))),
                      (B, 2 * B @ sv, float(torch.trace(B @ sv @ B.T)))]
            terms = [(p, config.lambda_curvature * g, config.lambda_curvature * v) for p, g, v in terms]
        if config.lambda_reprojection and self.basis_u is not None:
            eye = torch.eye(self.rank, dtype=A.dtype, device=A.device)
            off_u = eye - self.basis_u.to(A) @ self.basis_u.to(A).T
            basis_v = self.basis_v if self.basis_v is not None else self.basis_u
            off_v = eye - basis_v.to(B) @ basis_v.to(B).T
            residual_A, residual_B = off_u @ A, B @ off_v
            terms += [(A, config.lambda_reprojection * 2 * residual_A,
                       config.lambda_reprojection * float(residual_A.pow(2).sum())),
                      (B, config.lambda_reprojection * 2 * residual_B,
                       config.lambda_reprojection * float(residual_B.pow(2).sum()))]
        value = 0.0
        for parameter, gradient, term in terms:
            if parameter.grad is not None:
                parameter.grad.add_(scale * gradient)
            value += scale * term
        return value

    # ------------------------------------------------------------ reprojection / rank

    def reproject(self, k: int, config: GritParams) -> torch.Tensor:
        """A <- V_u V_u^T A and B <- B V_v V_v^T with the top-k eigenvectors (two-sided when
        Sigma_v has ``min_samples_g`` rows and any mass; else V_v = V_u). Returns V_u."""
        sigma_u, sigma_v = self.u.covariance(config.statistics), self.v.covariance(config.statistics)
        _, basis_u = gm.top_eigenvectors(sigma_u, k)
        use_v = config.two_sided and sigma_v is not None and self.v.count >= config.min_samples_g \
            and float(torch.trace(sigma_v)) > 0
        basis_v = gm.top_eigenvectors(sigma_v, k)[1] if use_v else basis_u
        A, B = self.lora_A.weight, self.lora_B.weight
        A.copy_(gm.reproject_A(A, basis_u.to(A)))
        B.copy_(gm.reproject_B(B, basis_v.to(B)))
        self.basis_u, self.basis_v = basis_u, basis_v
        return basis_u

    def _set_factors(self, A: torch.Tensor, B: torch.Tensor) -> tuple[nn.Parameter, nn.Parameter]:
        """Give the layer new factors A [k, d_in], B [d_out, k] and record k as its rank; returns
        the old ones. New Parameters, since the shapes change; the scaling is left as it is."""
        old_A, old_B = self.lora_A.weight, self.lora_B.weight
        k = A.shape[0]
        self.lora_A.weight = nn.Parameter(A.contiguous(), requires_grad=old_A.requires_grad)
        self.lora_B.weight = nn.Parameter(B.contiguous(), requires_grad=old_B.requires_grad)
        self.lora_A.out_features = self.lora_B.in_features = k
        self.layer.r[self.adapter] = k
        return old_A, old_B

    def truncate(self, basis: torch.Tensor, optimizer: torch.optim.Optimizer | None) -> None:
        """Shrink A to [k, d_in] and B to [d_out, k] in the basis V (exact after reprojection),
        keep the layer's scaling, remap the optimizer state, and move the statistics."""
        basis = basis.to(self.lora_A.weight)
        k = basis.shape[1]
        A, B = gm.truncate_factors(self.lora_A.weight.data, self.lora_B.weight.data, basis)
        old_A, old_B = self._set_factors(A, B)   # the scaling stays: the function must not change
        new_A, new_B = self.lora_A.weight, self.lora_B.weight
        if optimizer is not None:
            remap_optimizer_state(optimizer, old_A, new_A, lambda t: basis.T @ t, lambda t: (basis.T ** 2) @ t)
            remap_optimizer_state(optimizer, old_B, new_B, lambda t: t @ basis, lambda t: t @ basis ** 2)
        self.u.transform(basis.to(self.u.total.device, torch.float32))
        self.v.transform(basis.to(self.v.total.device, torch.float32))
        self.inverse = {"A": None, "B": None}
        self.basis_u = self.basis_v = torch.eye(k, device=basis.device, dtype=basis.dtype)

    # ---------------------------------------------------------------- report and state

    def ready(self) -> bool:
        return all(self.inverse[side] is not None for side in SIDES)

    def diagnostics(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"rows_captured": self.u.count, "rank": self.rank,
                                 "inverse_ready_A": self.inverse["A"] is not None,
                                 "inverse_ready_B": self.inverse["B"] is not None}
        for side in SIDES:
            inverse = self.inverse[side]
            entry[f"condition_{side}"] = gm.condition_number(inverse) if inverse is not None else None
            entry[f"scalar_distance_{side}"] = gm.distance_from_scalar(inverse) if inverse is not None else None
            entry[f"damping_{side}"] = self.damping_used[side]
        return entry

    def state(self) -> dict[str, Any]:
        return {"rank": self.rank, "u": self.u.state(), "v": self.v.state(),
                "inverse": {k: _clone(v) for k, v in self.inverse.items()}, "damping_used": dict(self.damping_used),
                "basis_u": _clone(self.basis_u), "basis_v": _clone(self.basis_v)}

    def shrink_to(self, rank: int) -> None:
        """Give the layer factors of a smaller ``rank`` to receive a checkpoint saved after
        truncation (the model is rebuilt at full rank). Their values are placeholders (leading
        rows of A, columns of B) until the checkpoint's adapter weights are loaded into them."""
        with torch.no_grad():
            self._set_factors(self.lora_A.weight[:rank].clone(), self.lora_B.weight[:, :rank].clone())

    def load(self, saved: dict[str, Any]) -> None:
        """Restore the statistics and inverses; a module saved after truncation is shrunk to the
        saved rank first (``shrink_to``), so the checkpoint's weights and optimizer state fit."""
        if saved["rank"] > self.rank:
            raise GritError(f"{self.name}: saved rank {saved['rank']} but the model has rank {self.rank}")
        if saved["rank"] < self.rank:
            self.shrink_to(saved["rank"])
        self.u, self.v = FactorStats.from_state(saved["u"]), FactorStats.from_state(saved["v"])
        self.inverse = {k: _clone(v) for k, v in saved["inverse"].items()}
        self.damping_used = dict(saved["damping_used"])
        self.basis_u, self.basis_v = _clone(saved["basis_u"]), _clone(saved["basis_v"])


def base_module_name(peft_name: str) -> str:
    """``base_model.model.model.layers.0.q_proj`` -> ``model.layers.0.q_proj`` (the name in the
    base model, which layer selection and configurations use)."""
    return peft_name.removeprefix("base_model.model.")


def rank_pattern_key(module: str, targeted: Collection[str]) -> str:
    """The ``rank_pattern`` / ``alpha_pattern`` key that selects ``module`` (its name in the base
    model) and no other of the ``targeted`` modules. PEFT reads a key as the regex
    ``(.*\\.)?key$`` (``peft.utils.other.get_pattern_key``), so the escaped full name matches the
    module and any module whose name ends in ``.<module>``, which must not exist."""
    clashes = [other for other in targeted if other.endswith("." + module)]
    if clashes:
        raise GritError(f"{module}: no PEFT rank_pattern key can select it alone ({clashes[0]} ends with its "
                        "name), so its truncated rank cannot be saved; set grit.truncate: false")
    return re.escape(module)


def exact_patterns_first(exact: dict[str, Any], existing: dict[str, Any] | None) -> dict[str, Any]:
    """A rank/alpha pattern with the ``exact`` keys first, then the ``existing`` ones they do not
    replace: PEFT uses the first key that matches, and a broader one must not shadow them."""
    return {**exact, **{key: value for key, value in (existing or {}).items() if key not in exact}}


def module_key(peft_name: str, adapter: str, several_adapters: bool) -> str:
    """How GRIT and the probe name a module: its PEFT name, with the adapter when there are several."""
    return f"{peft_name}[{adapter}]" if several_adapters else peft_name


def lora_layers(model: nn.Module, adapter: str | None = None, dora: bool = False) -> list[tuple[str, nn.Module, str]]:
    """(PEFT module name, layer, adapter) of every LoRA linear layer with a trainable adapter; a
    DoRA adapter is an error unless ``dora`` (GRIT cannot precondition one; a report may list it)."""
    from peft.tuners.lora import LoraLayer

    found = []
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        adapters = [adapter] if adapter else list(module.lora_A.keys())
        for name_of_adapter in adapters:
            if name_of_adapter in module.lora_A and module.lora_A[name_of_adapter].weight.requires_grad:
                if not dora and getattr(module, "use_dora", {}).get(name_of_adapter, False):
                    raise GritError(f"{name}: DoRA adapters are not supported by GRIT")
                found.append((name, module, name_of_adapter))
    return found


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
