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
"""

from __future__ import annotations

import functools
import operator
from collections import OrderedDict
from collections.abc import Collection
from typing import Any

import torch
from torch import nn

from trainers.grit import math as gm
from trainers.grit.cadence import for_budget, reprojection_due
from trainers.grit.config import GritParams
from trainers.grit.distributed import allreduce_sum_, world_size
from trainers.grit.doors import GritCallback, GritOptimizer, clip_gradients, joint_gradient_norm
from trainers.grit.fused import FusedAttachment, Tap, attach_fused
from trainers.grit.host import DeferredCount, host_copy, read_host_copy
from trainers.grit.layer import (
    FACTOR_STATS,
    SIDES,
    FactorStats,
    GritError,
    ModuleState,
    Stash,
    base_module_name,
    exact_patterns_first,
    fold_all,
    invert,
    lora_layers,
    module_key,
    rank_pattern_key,
    stacked_covariances,
)

__all__ = ["GritError", "GritManager", "ModuleState", "base_module_name", "lora_layers"]


def row_weights(mask: torch.Tensor | None, rows: Any, u: torch.Tensor, lead: tuple[int, ...]
                ) -> tuple[torch.Tensor | None, Any]:
    """(row weights, token rows) for a module's rows ``u`` in this forward, whose input had the
    leading shape ``lead`` (u is [*lead, r], or its rows [N, r] from a fused function): the
    forward's attention mask and its row count, or, without a mask or for packed/reshaped inputs
    whose rows do not line up with it, no weights and every row counted."""
    if mask is None or tuple(mask.shape) != tuple(lead):
        return None, u.numel() // u.shape[-1]
    return mask, rows


class GritManager:
    """Attaches GRIT to every LoRA layer of ``peft_model`` (see the module docstring)."""

    def __init__(self, peft_model: nn.Module, config: GritParams | None = None, total_steps: int | None = None,
                 modules: Collection[str] | None = None):
        """``modules``: only these LoRA modules (names relative to the base model, e.g.
        ``model.vision_model.encoder.layers.0.self_attn.q_proj``); all of them by default."""
        self.model = peft_model
        self.requested = config or GritParams()
        if self.requested.cadence == "budget" and total_steps is None:
            raise GritError("grit.cadence 'budget' needs the run's length (total_steps)")
        self.config = self.requested
        self.total_steps = total_steps
        if self.config.truncate and world_size() > 1:
            # A truncated factor is a new Parameter: DDP, which registered the old ones, would
            # neither all-reduce its gradients nor keep the replicas equal.
            raise GritError(f"grit.truncate cannot train data-parallel ({world_size()} processes): DDP does not "
                            "synchronise truncated factors; set grit.truncate: false or train.nproc_per_node: 1")
        self.step = 0
        self.capturing = True
        self.optimizer: torch.optim.Optimizer | None = None
        self.report: dict[str, torch.Tensor | float] = {}     # the last step's, on the device until read
        # Counters the GRIT paper logs (host integers, no device read): Fisher inversions, and
        # every reprojection or rank event with the ranks kept and the spectrum they keep.
        self.inversions = 0                   # (module, side) inverses computed since the start
        self._inverted_now = 0
        self._captured_modules = 0            # modules that captured rows in the last sync
        self.rank_events: list[dict[str, float | int]] = []
        self._row_mask: torch.Tensor | None = None
        self._row_count: int | None = None
        self._handles: list[Any] = []
        self._stash = Stash()
        # Inversions whose outcome (which matrices factorised) the host has not read yet: the
        # step that inverts preconditions with them masked on the device; the next one settles
        # them (settle) from a copy made without waiting. Entries: (sides, host copy of the damping
        # each used, the copy's event or None).
        self._unsettled: list[tuple[list[tuple[ModuleState, str]], torch.Tensor, Any]] = []
        self._ok: dict[tuple[int, str], torch.Tensor] = {}      # (id(state), side) -> factorised, on the device
        # precondition's stacked inverses per group (side, shape, device, dtype), with the inverses
        # they stack
        self._inverse_stacks: dict[tuple, tuple[list[torch.Tensor], torch.Tensor]] = {}
        # per side ("u", "v"): the running sums stacked, and the row views the statistics hold
        self._running_sums: dict[str, tuple[list[torch.Tensor], torch.Tensor]] = {}
        # factors(): (the weights it was built from, its list); precondition's grouping of the
        # factors with an inverse and a gradient, with what it was built from (_grouping)
        self._factors: tuple[list[torch.nn.Parameter], list[tuple[ModuleState, str, torch.nn.Parameter]]] | None = None
        self._groups: tuple[list, list, list[tuple[tuple, list[int]]]] | None = None
        # the clip's order of the groups' norms (_clip_order), with the grouping it was made from
        self._clip_positions: tuple[tuple, torch.Tensor] | None = None
        layers = lora_layers(peft_model)
        self.targeted = [base_module_name(name) for name, _, _ in layers]   # for rank_pattern keys
        if modules is not None:
            wanted = set(modules)
            layers = [layer for layer in layers if base_module_name(layer[0]) in wanted]
        if not layers:
            raise GritError("GRIT found no trainable LoRA layer in the model: applied to 0 layers")
        several = len({a for _, _, a in layers}) > 1
        self.modules: OrderedDict[str, ModuleState] = OrderedDict()
        self.base_names: dict[str, str] = {}      # module key -> name in the base model
        self.built_ranks: dict[str, int] = {}     # module key -> rank the model was built with
        for name, layer, adapter in layers:
            rank = layer.lora_A[adapter].weight.shape[0]
            key = module_key(name, adapter, several)
            self.modules[key] = ModuleState(key, layer, adapter, FactorStats(rank), FactorStats(rank))
            self.base_names[key], self.built_ranks[key] = base_module_name(name), rank
        # How each module hands GRIT its rows: "fused" (GRIT's fused LoRA function, rows from its
        # backward) or "hooks" (PEFT's forward, a forward hook on lora_A and a tensor hook).
        self.capture_paths = {key: "hooks" for key in self.modules}
        self.notes: list[str] = []
        self._fused: FusedAttachment | None = None
        if self.config.capture == "fused":
            self._attach_fused()
        self._attach_hooks()

    # ------------------------------------------------------------------------------ capture

    def _attach_fused(self) -> None:
        layers = {key: (state.layer, state.adapter) for key, state in self.modules.items()}
        # A manager built without an engine (auto) takes PEFT's numerics, the forward its layers have.
        lora_dtype = "adapter" if self.config.fused_lora_dtype == "auto" else self.config.fused_lora_dtype
        self._fused = attach_fused(self.model, layers, self._tap, lora_dtype)
        for key, kind in self._fused.fused.items():
            self.capture_paths[key] = f"fused-{kind}"
        if self._fused.unfused:
            first, reason = next(iter(self._fused.unfused.items()))
            self.notes.append(f"GRIT's fused LoRA functions cannot run on {len(self._fused.unfused)}/"
                              f"{len(self.modules)} modules (first: {first}: {reason}); those capture through "
                              "PEFT's forward and hooks, which keep more activations")

    def _attach_hooks(self) -> None:
        self._handles.append(self.model.register_forward_pre_hook(self._remember_mask, with_kwargs=True))
        for key, state in self.modules.items():
            if self.capture_paths[key] == "hooks":
                self._handles.append(state.lora_A.register_forward_hook(self._capture_hook(state)))

    def _detach_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def detach(self) -> None:
        """Remove everything GRIT put on the model: hooks and fused forwards."""
        self._detach_hooks()
        if self._fused is not None:
            self._fused.detach()
            self._fused = None

    def _set_capturing(self, capturing: bool) -> None:
        """Hooks are attached only for steps that capture (``capture_every``): on the others no
        hook runs, not even to return, and the fused functions get no tap."""
        self.capturing = capturing
        if capturing and not self._handles:
            self._attach_hooks()
        elif not capturing:
            self._detach_hooks()

    def _tap(self, key: str) -> Tap | None:
        """The fused function's tap for module ``key`` in this forward: it stashes u and dL/du
        when backward reaches the module (None when this forward captures nothing)."""
        if not (self.capturing and torch.is_grad_enabled()):
            return None
        # this forward's mask bound now (backward may follow another forward), in one partial of
        # the plain function (a bound method would be a second object): a closure was six objects
        # the garbage collector tracks (its function, tuple and four cells) a module, 1,260 a
        # forward on SmolLM2, which set off a young collection every step
        return functools.partial(GritManager._stash_rows, self, self.modules[key], self._row_mask, self._row_count)

    def _stash_rows(self, state: ModuleState, forward_mask: torch.Tensor | None, forward_rows: Any,
                    u: torch.Tensor, grad_u: torch.Tensor, lead: torch.Size) -> None:
        """A tap's body: stash one module's rows u and dL/du with its forward's row weights."""
        mask, rows = row_weights(forward_mask, forward_rows, u, lead)
        self._stash.add(state, u, mask, rows, grad_u)

    def _remember_mask(self, _module, args, kwargs) -> None:
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 2:
            self._row_mask = mask.to(torch.float32)
            # once per forward, not once per layer, and read at the GRIT step, not now (host.py)
            self._row_count = DeferredCount(mask.sum())
        else:
            self._row_mask, self._row_count = None, None

    def _capture_hook(self, state: ModuleState):
        def hook(_module, _inputs, output: torch.Tensor) -> None:
            # Only a forward whose output will receive a gradient counts; with gradient
            # checkpointing the recomputed forward's tensors get none, so nothing is counted twice.
            if not (self.capturing and torch.is_grad_enabled() and output.requires_grad):
                return
            mask, rows = row_weights(self._row_mask, self._row_count, output, output.shape[:-1])
            # Only stashed here (no operation per module): u and, when backward reaches it, the
            # gradient at u; collect_captured turns all of them into statistics at once.
            output.register_hook(self._stash.add(state, output, mask, rows))

        return hook

    def collect_captured(self, fold: bool = False) -> bool:
        """Add the outer products of everything captured since the last call to each module's
        pending statistics: per forward and shape, one batched masked product per side.
        dL/du = s B^T g, so v = B^T g = (dL/du) / s and v v^T = (dL/du)(dL/du)^T / s^2.

        ``fold``: the caller would fold the pending sums into the running sums right after, and
        nothing else is pending. Then a lone group (one forward) is added to the running sums
        directly, bit for bit what adding it to the zero pending sums and folding those gives,
        in one operation per side on the stacked sums (:meth:`_stacked_sums`), where list
        operations over every side added, folded and cleared (2,100 tensors a step on SmolLM2,
        each costing a GPU step's host its own checks). Returns whether it folded so."""
        stash, self._stash = self._stash, Stash()
        all_states, us, masks, all_rows = stash.columns()
        groups: dict[tuple, list[int]] = {}
        for i, grad in enumerate(stash.grads):
            if grad is not None:            # a forward whose output got no gradient counts nothing
                state, u = all_states[i], us[i]
                # the scaling as PEFT stores it (``state.scaling`` reads it through a Python property)
                key = (id(masks[i]), u.shape, u.device, u.dtype, grad.dtype, state.layer.scaling[state.adapter])
                groups.setdefault(key, []).append(i)
        direct = fold and len(groups) == 1
        with torch.no_grad():
            for members in groups.values():
                states = [all_states[i] for i in members]
                mask, scaling = masks[members[0]], float(states[0].scaling)
                outer_u = gm.masked_outer_sum_batched(torch.stack([us[i] for i in members]), mask)
                outer_v = gm.masked_outer_sum_batched(torch.stack([stash.grads[i] for i in members]),
                                                      mask) / scaling**2
                device = outer_u.device
                for state in [s for s in states if s.u.pending.device != device or s.v.pending.device != device]:
                    state.u.place(device)
                    state.v.place(device)
                # One mask is one forward and one row count (a DeferredCount, its copy done by
                # now); without a mask the count is the rows of u, whose shape the group shares.
                rows = int(all_rows[members[0]])
                if direct:
                    for side, stats, outer in (("u", [s.u for s in states], outer_u),
                                               ("v", [s.v for s in states], outer_v)):
                        sums = self._stacked_sums(side, stats)
                        if sums is None:
                            torch._foreach_add_([s.total for s in stats], list(outer.unbind(0)))
                        else:
                            sums.add_(outer)
                    for state in states:
                        state.u.count += rows
                        state.v.count += rows
                    return True
                torch._foreach_add_([s.u.pending for s in states], list(outer_u.unbind(0)))
                torch._foreach_add_([s.v.pending for s in states], list(outer_v.unbind(0)))
                for state in states:
                    state.u.pending_count += rows
                    state.v.pending_count += rows
        return False

    def _stacked_sums(self, side: str, stats: list[FactorStats]) -> torch.Tensor | None:
        """One tensor whose rows are the running sums (``total``) of ``stats``, in order, so that a
        step adds its products in one operation, not a list operation over every module. Kept while
        every ``total`` is still the row it was pointed at (checked by identity); stacked again
        when one was replaced (a move, a truncation's transform, a loaded state), and the totals
        pointed at the new rows. None where a module ran twice in one forward: its rows would
        alias."""
        totals = [s.total for s in stats]
        cached = self._running_sums.get(side)
        if cached is not None and len(cached[0]) == len(totals) and all(map(operator.is_, totals, cached[0])):
            return cached[1]
        if len(set(map(id, stats))) != len(stats) or len({(t.shape, t.device, t.dtype) for t in totals}) != 1:
            self._running_sums.pop(side, None)
            return None
        stacked = torch.stack(totals)
        rows = list(stacked.unbind(0))
        for stat, row in zip(stats, rows, strict=True):
            stat.total = row
        self._running_sums[side] = (rows, stacked)
        return stacked

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
        # rank_kfac: the covariances and one batched Cholesky per (rank, device) group, instead
        # of a few operations per matrix
        groups: dict[tuple[int, torch.device], list[tuple[ModuleState, str, FactorStats]]] = {}
        for item in wanted:
            groups.setdefault((item[2].rank, item[2].total.device), []).append(item)
        for items in groups.values():
            sigmas = stacked_covariances([stats for _, _, stats in items], cfg.statistics)
            dampings = gm.effective_damping(sigmas, cfg.damping, cfg.damping_mode)
            inverses, used = gm.damped_inverse_batched(sigmas, dampings, cfg.damping_escalation)
            # Which matrices factorised decides an inverse or None, but reading it now would stall
            # the device: the inverses are set tentatively, this step masks the failed ones on the
            # device (precondition), and the next step reads a copy made without waiting (settle).
            for (state, side, _), inverse in zip(items, inverses.unbind(0), strict=True):
                state.set_inverse(side, (inverse, float("nan")))
            self._unsettled.append(([(state, side) for state, side, _ in items], *host_copy(used)))
            for (state, side, _), ok in zip(items, (used > 0).unbind(0), strict=True):
                self._ok[(id(state), side)] = ok

    def settle(self) -> None:
        """Read what the last inversions found (the damping each factorisation used, 0 where none
        did) and drop the inverses that failed, as if never set: the host learns it a step late,
        without waiting for the device (the copy is long done by then)."""
        for sides, copied, done in self._unsettled:
            for (state, side), damping in zip(sides, read_host_copy(copied, done), strict=True):
                if damping > 0:
                    state.damping_used[side] = damping
                else:
                    state.set_inverse(side, None)
        self._unsettled.clear()
        self._ok.clear()

    # -------------------------------------------------------------------- the GRIT step

    def lora_parameters(self) -> list[torch.nn.Parameter]:
        return [weight for _, _, weight in self.factors()]

    def _current_weights(self) -> list[torch.nn.Parameter]:
        """Every module's ``lora_A`` and ``lora_B`` weight now, in :meth:`factors` order, read from
        the modules' own dictionaries: the objects ``state.lora_A.weight`` returns, without its
        four Python calls per factor (``nn.Module.__getattr__`` and ``ModuleDict.__getitem__``),
        which a host-bound GPU step pays for (840 factors on SmolLM2)."""
        return [weight for state in self.modules.values() for weight in (
            state.layer._modules["lora_A"]._modules[state.adapter]._parameters["weight"],
            state.layer._modules["lora_B"]._modules[state.adapter]._parameters["weight"])]

    def factors(self) -> list[tuple[ModuleState, str, torch.nn.Parameter]]:
        """(state, side, weight) of every module's two factors, in ``lora_parameters`` order. Kept
        from the last call while every weight is the same object as then (checked each call, by
        identity, so a truncation or anything else that replaces a factor is seen at once); the
        same list object then, which :meth:`_grouping` keys its kept grouping on."""
        weights = self._current_weights()
        cached = self._factors
        if cached is None or len(cached[0]) != len(weights) or not all(map(operator.is_, weights, cached[0])):
            states = [state for state in self.modules.values() for _ in SIDES]
            cached = (weights, list(zip(states, SIDES * len(self.modules), weights, strict=True)))
            self._factors = cached
        return cached[1]

    def _stacked_inverses(self, group: tuple, inverses: list[torch.Tensor], device: torch.device) -> torch.Tensor:
        """The group's inverses stacked on ``device``, stacked again only when one of them changed:
        they change at inversions (every ``update_freq`` steps), the gradients every step. The
        cache holds the inverses it stacked, so a new inverse is never mistaken for an old one
        (they are replaced, never written in place)."""
        cached = self._inverse_stacks.get(group)
        if cached is None or len(cached[0]) != len(inverses) or not all(map(operator.is_, cached[0], inverses)):
            cached = (inverses, torch.stack([inverse.to(device) for inverse in inverses]))
            self._inverse_stacks[group] = cached
        return cached[1]

    def _grouping(self, factors: list, inverses: list, grads: list
                  ) -> tuple[list[tuple[tuple, list[int]]], list[int]]:
        """Which factors precondition together: (side, shape, device, dtype) -> their indices in
        ``factors``, for those with an inverse and a gradient; and the indices of those with a
        gradient but no inverse (left raw). Built again only when that changes (which factors,
        which are ready, a gradient's shape, device or dtype): compared in one comprehension, no
        Python call per factor, as the host-bound GPU step wants."""
        signature = [None if grad is None else False if inverse is None else (grad.shape, grad.device, grad.dtype)
                     for inverse, grad in zip(inverses, grads, strict=True)]
        cached = self._groups
        if cached is None or cached[0] is not factors or cached[1] != signature:
            groups: dict[tuple, list[int]] = {}
            raw_only = []
            for i, ((_, side, _), key) in enumerate(zip(factors, signature, strict=True)):
                if key:
                    groups.setdefault((side, tuple(key[0]), key[1], key[2]), []).append(i)
                elif key is False:
                    raw_only.append(i)
            cached = (factors, signature, (list(groups.items()), raw_only))
            self._groups = cached
        return cached[2]

    def _natural_groups(self, factors: list, raw_norms: list[torch.Tensor] | None):
        """Per group of :meth:`_grouping`: (its gradients, their natural gradients stacked (fp32),
        how many of them were preconditioned). ``raw_norms`` gets the raw gradients' norms as
        :meth:`precondition` says. Nothing is written to a gradient here."""
        inverses = [state.inverse[side] for state, side, _ in factors]
        grads = [weight.grad for _, _, weight in factors]
        groups, raw_only = self._grouping(factors, inverses, grads)
        if raw_norms is not None and raw_only:
            raw_norms.extend(torch._foreach_norm([grads[i] for i in raw_only], dtype=torch.float32))
        for group, members in groups:
            side, device = group[0], group[2]
            group_grads = [grads[i] for i in members]
            # fp32 whatever the gradients' dtype (as the reference: the inverses are fp32).
            raw = torch.stack(group_grads).float()
            if raw_norms is not None:
                raw_norms.append(torch.linalg.vector_norm(raw))
            natural = gm.precondition_batched(raw, self._stacked_inverses(group, [inverses[i] for i in members],
                                                                          device), side)
            if self.config.graft_norm:
                natural = gm.graft_batched(natural, raw)
            # inverted this step, not settled: a matrix that did not factorise keeps its raw
            # gradient, as a side without an inverse does (only an inverting step has flags)
            flags = [self._ok.get((id(factors[i][0]), side)) for i in members] if self._ok else []
            if any([flag is not None for flag in flags]):
                # a flag is on the device already but for a model split across devices: a
                # no-op .to() still costs a dispatch, one per factor on the inverting step
                ok = torch.stack([torch.ones((), dtype=torch.bool, device=device) if flag is None
                                  else flag if flag.device == device else flag.to(device) for flag in flags])
                yield group_grads, torch.where(ok[:, None, None], natural, raw), ok.sum()
            else:
                yield group_grads, natural, len(members)

    def precondition(self, factors: list[tuple[ModuleState, str, torch.nn.Parameter]] | None = None,
                     raw_norms: list[torch.Tensor] | None = None) -> int | torch.Tensor:
        """Natural gradient on every module's ready sides; how many tensors. The per-module step
        (``ModuleState.precondition``, the reference) done for all modules of one shape at once:
        one batched matmul per group of gradients of one side, shape, device and dtype, so the
        host launches a handful of operations instead of a dozen per module. ``factors``: this
        step's :meth:`factors`, when the caller has them. ``raw_norms``: a list that gets the
        fp32 norms whose joint norm is the raw gradients' (one per group, taken from the group's
        stack, and one per gradient left raw), so the report's raw norm needs no list operation
        over every gradient of its own."""
        applied: list[torch.Tensor | int] = []
        with torch.no_grad():
            for group_grads, natural, count in self._natural_groups(factors or self.factors(), raw_norms):
                torch._foreach_copy_(group_grads, list(natural.unbind(0)))
                applied.append(count)
        return sum(applied)

    def precondition_and_clip(self, factors: list[tuple[ModuleState, str, torch.nn.Parameter]],
                              raw_norms: list[torch.Tensor] | None, max_grad_norm: float
                              ) -> tuple[int | torch.Tensor, torch.Tensor | None]:
        """:meth:`precondition`, then the clip to ``max_grad_norm`` of every factor's gradient, done
        on the natural gradients' stacks before they are written back: (preconditioned tensors, the
        joint norm before clipping). Bit for bit torch's ``clip_grad_norm_`` after
        :meth:`precondition` on CPU (each norm taken in the gradients' dtype, joined in parameter
        order, the same coefficient), but in a handful of operations: torch's clip hands every
        gradient to three list operations (1,260 tensors on SmolLM2), each checked on the host of
        a host-bound GPU step. The stacks of all groups are alive at once (one fp32 copy of the
        LoRA gradients, for the moment of the step). The norm is None, and nothing clipped, where
        the gradients do not share one device and dtype: the caller clips with torch's then."""
        with torch.no_grad():
            done = list(self._natural_groups(factors, raw_norms))
            groups, raw_only = self._groups[2]
            raw_grads = [factors[i][2].grad for i in raw_only]
            # the groups' keys hold their gradients' device and dtype: no walk over every gradient
            kinds = {(group[2], group[3]) for group, _ in groups} | {(g.device, g.dtype) for g in raw_grads}
            if len(kinds) != 1:
                for group_grads, natural, _ in done:
                    torch._foreach_copy_(group_grads, list(natural.unbind(0)))
                return sum([count for _, _, count in done]), None
            device, dtype = kinds.pop()
            # each gradient's norm as the clip takes it: of the gradient as written back (its dtype)
            written = [natural.to(dtype) for _, natural, _ in done]
            norms = [gm.stacked_norms(stack) for stack in written]
            if raw_grads:
                norms.append(torch.stack(torch._foreach_norm(raw_grads)))
            total = torch.linalg.vector_norm(torch.cat(norms).index_select(0, self._clip_order(device)))
            coefficient = gm.clip_coefficient(total, max_grad_norm)
            for (group_grads, _, _), stack in zip(done, written, strict=True):
                torch._foreach_copy_(group_grads, list((stack * coefficient).unbind(0)))
            if raw_grads:
                torch._foreach_mul_(raw_grads, coefficient)
        return sum([count for _, _, count in done]), total

    def _clip_order(self, device: torch.device) -> torch.Tensor:
        """Where each gradient's norm sits among the groups' norms and the raw ones, in parameter
        order (the order torch's clip joins them in, which the rounding of the joint norm depends
        on); kept with the grouping it was made from. Made on the device from rows of an
        ``arange`` (a tensor built from a Python list would be a copy from host memory, which
        waits for a GPU), so it costs a list operation only when the grouping changes."""
        grouping = self._groups[2]
        cached = self._clip_positions
        if cached is None or cached[0] is not grouping or cached[1].device != device:
            groups, raw_only = grouping
            stacked_order = [i for _, members in groups for i in members] + raw_only
            rows = torch.arange(len(stacked_order), device=device).unbind(0)
            positions = torch.stack([rows[k] for k in sorted(range(len(stacked_order)),
                                                              key=stacked_order.__getitem__)])
            cached = (grouping, positions)
            self._clip_positions = cached
        return cached[1]

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

    def before_step(self, max_grad_norm: float | None) -> dict[str, float]:
        """Everything between backward and ``optimizer.step()``, in order (module docstring)."""
        report, parameters, clipped = self._precondition_step(max_grad_norm)
        # the clip's own total norm is the preconditioned gradients' joint norm: not computed twice
        norm = clipped if clipped is not None else clip_gradients(parameters, max_grad_norm)
        report["grad_norm_preconditioned"] = norm if norm is not None else joint_gradient_norm(parameters)
        return report

    def precondition_step(self) -> dict[str, torch.Tensor | float]:
        """The GRIT part of :meth:`before_step` (everything but clipping): sync, invert,
        regularise, precondition. Several managers sharing one optimizer (one per modality of a
        VLM) each run this, then one clip bounds all their gradients together. The gradient norms
        of the report stay on the device (:attr:`last_report` reads them)."""
        report, parameters, _ = self._precondition_step(None)
        report["grad_norm_preconditioned"] = joint_gradient_norm(parameters)
        return report

    def _precondition_step(self, max_grad_norm: float | None
                           ) -> tuple[dict[str, torch.Tensor | float], list[torch.nn.Parameter], torch.Tensor | None]:
        """:meth:`precondition_step` without the preconditioned norm, which :meth:`before_step`
        takes from its clip; the factors that have a gradient; and, where the step preconditioned
        and ``max_grad_norm`` asks for a clip, the joint norm of the clip done on the stacks
        (:meth:`precondition_and_clip`; None: nothing clipped yet)."""
        factors = self.factors()
        parameters = [weight for _, _, weight in factors if weight.grad is not None]
        self.sync_factors()
        if self.step == 0:
            self.check_capture_coverage()
        self.refresh_inverses()
        regularizer = self.add_regularizer_gradients()
        # During the natural-gradient warm-up the factors fill and invert, but the step is plain.
        warm = self.step >= self.config.ng_warmup_steps
        clipped = None
        if self.config.precondition and warm:
            # the raw norm from the stacks preconditioning makes anyway (joint_gradient_norm's
            # list operations over every gradient cost a host-bound GPU step 840 tensors)
            norms: list[torch.Tensor] = []
            if max_grad_norm and max_grad_norm > 0 and parameters:
                applied, clipped = self.precondition_and_clip(factors, norms, max_grad_norm)
            else:
                applied = self.precondition(factors, norms)
            raw_norm = torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())
        else:
            applied, raw_norm = 0, joint_gradient_norm(parameters)
        rows = sum([s.u.count for s in self.modules.values()])
        self.report = {
            "grad_norm_raw": raw_norm, "preconditioned_tensors": applied, "regularizer": regularizer,
            "rows_captured": float(rows),
            "inversions": float(self._inverted_now), "inversions_total": float(self.inversions),
            "capture_coverage": self._captured_modules / max(1, len(self.modules)),
        }
        return self.report, parameters, clipped

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
        self._set_capturing(self.step % self.config.capture_every == 0)
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
        self._unsettled.clear()
        self._ok.clear()
        self.step = int(state["step"])
        self.inversions = int(state.get("inversions", 0))
        self.rank_events = list(state.get("rank_events", []))
        self._set_capturing(bool(state["capturing"]))
        for name, saved in state["modules"].items():
            self.modules[name].load(saved)
        self.record_ranks_in_peft_config()
