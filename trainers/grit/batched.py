"""GRIT's batched engine: the per-module math of ``layer.py`` done for all modules at once.

The manager decides when to capture, invert, reproject and truncate; this module does the work
of one step on stacks, so that a host-bound GPU step launches a handful of operations, not a
dozen per module: the captured rows folded into stacked statistics, the batched inversion and
its deferred outcome, the grouped preconditioning and the clip on the natural gradients' stacks.
Each result equals the per-module reference (``ModuleState``) bit for bit.

What it keeps between steps (the stacks and groupings) is checked by object identity each step,
so a replaced factor, total or inverse is seen at once.
"""

from __future__ import annotations

import operator
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from trainers.grit import math as gm
from trainers.grit.config import GritParams
from trainers.grit.host import host_copy, read_host_copy
from trainers.grit.layer import REGISTRATIONS, SIDES, FactorStats, ModuleState, Stash, stacked_covariances

Factor = tuple[ModuleState, str, nn.Parameter]

def capture_groups(stash: Stash) -> dict[tuple, list[int]]:
    """The stash's entries that got a gradient, grouped by what one batched product shares: the
    forward's mask, u's shape, device and dtype, the gradient's dtype and the module's scaling."""
    all_states, us, masks, _ = stash.columns()
    groups: dict[tuple, list[int]] = {}
    for i, grad in enumerate(stash.grads):
        if grad is not None:            # a forward whose output got no gradient counts nothing
            state, u = all_states[i], us[i]
            # the scaling as PEFT stores it (``state.scaling`` reads it through a Python property)
            key = (id(masks[i]), u.shape, u.device, u.dtype, grad.dtype, state.layer.scaling[state.adapter])
            groups.setdefault(key, []).append(i)
    return groups


class BatchedEngine:
    """The stacked state of one manager's modules (``modules``, shared with the manager) and
    the batched operations on them; ``config`` is the manager's current one."""

    def __init__(self, modules: Mapping[str, ModuleState], config: GritParams) -> None:
        self.modules = modules
        self.config = config
        # Inversions whose outcome (which matrices factorised) the host has not read yet: the
        # step that inverts preconditions with them masked on the device; the next one settles
        # them (settle) from a copy made without waiting. Entries: (sides, host copy of the damping
        # each used, the copy's event or None).
        self.unsettled: list[tuple[list[tuple[ModuleState, str]], torch.Tensor, Any]] = []
        self._ok: dict[tuple[int, str], torch.Tensor] = {}      # (id(state), side) -> factorised, on the device
        # stacked inverses per group (side, shape, device, dtype), with the inverses they stack
        self._inverse_stacks: dict[tuple, tuple[list[torch.Tensor], torch.Tensor]] = {}
        # per side ("u", "v"): the running sums stacked, and the row views the statistics hold
        self._running_sums: dict[str, tuple[list[torch.Tensor], torch.Tensor]] = {}
        # factors(): (the registration count it was built at, its list); the grouping of the
        # factors with an inverse and a gradient, with what it was built from (_grouping)
        self._factors: tuple[int, list[Factor]] | None = None
        self._groups: tuple[list, list, tuple[list[tuple[tuple, list[int]]], list[int]]] | None = None
        # the clip's order of the groups' norms (_clip_order), with the grouping it was made from
        self._clip_positions: tuple[tuple, torch.Tensor] | None = None

    # -------------------------------------------------------------------------- capture

    def fold_captured(self, stash: Stash, fold: bool = False) -> bool:
        """Add the outer products of everything in ``stash`` to each module's pending statistics:
        per forward and shape, one batched masked product per side.
        dL/du = s B^T g, so v = B^T g = (dL/du) / s and v v^T = (dL/du)(dL/du)^T / s^2.

        ``fold``: the caller would fold the pending sums into the running sums right after, and
        nothing else is pending. Then a lone group (one forward) is added to the running sums
        directly, bit for bit what adding it to the zero pending sums and folding those gives,
        in one operation per side on the stacked sums (:meth:`stacked_sums`), where list
        operations over every side added, folded and cleared (2,100 tensors a step on SmolLM2,
        each costing a GPU step's host its own checks). Returns whether it folded so."""
        all_states, us, masks, all_rows = stash.columns()
        groups = capture_groups(stash)
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
                    self._add_to_running_sums(states, outer_u, outer_v, rows)
                    return True
                torch._foreach_add_([s.u.pending for s in states], list(outer_u.unbind(0)))
                torch._foreach_add_([s.v.pending for s in states], list(outer_v.unbind(0)))
                for state in states:
                    state.u.pending_count += rows
                    state.v.pending_count += rows
        return False

    def _add_to_running_sums(self, states: list[ModuleState], outer_u: torch.Tensor, outer_v: torch.Tensor,
                             rows: int) -> None:
        for side, stats, outer in (("u", [s.u for s in states], outer_u), ("v", [s.v for s in states], outer_v)):
            sums = self.stacked_sums(side, stats)
            if sums is None:
                torch._foreach_add_([s.total for s in stats], list(outer.unbind(0)))
            else:
                sums.add_(outer)
        for state in states:
            state.u.count += rows
            state.v.count += rows

    def stacked_sums(self, side: str, stats: list[FactorStats]) -> torch.Tensor | None:
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

    # ------------------------------------------------------------------------- inversion

    def invert(self, wanted: list[tuple[ModuleState, str, FactorStats]]) -> None:
        """Damped inverses of the ``wanted`` sides' covariances: one batched Cholesky per (rank,
        device) group, instead of a few operations per matrix."""
        cfg = self.config
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
            self.unsettled.append(([(state, side) for state, side, _ in items], *host_copy(used)))
            for (state, side, _), ok in zip(items, (used > 0).unbind(0), strict=True):
                self._ok[(id(state), side)] = ok

    def settle(self) -> None:
        """Read what the last inversions found (the damping each factorisation used, 0 where none
        did) and drop the inverses that failed, as if never set: the host learns it a step late,
        without waiting for the device (the copy is long done by then)."""
        for sides, copied, done in self.unsettled:
            for (state, side), damping in zip(sides, read_host_copy(copied, done), strict=True):
                if damping > 0:
                    state.damping_used[side] = damping
                else:
                    state.set_inverse(side, None)
        self.forget_inversions()

    def forget_inversions(self) -> None:
        self.unsettled.clear()
        self._ok.clear()

    # -------------------------------------------------------------------- preconditioning

    def factors(self) -> list[Factor]:
        """(state, side, weight) of every module's two factors. Kept while no parameter has been
        registered anywhere since it was built (``layer.REGISTRATIONS``; a truncation or anything
        else that replaces a factor registers its new weight, and is seen at the next call), so
        a step looks no factor up through PEFT's module dictionaries (four Python calls a factor,
        840 factors on SmolLM2); the same list object then, which :meth:`_grouping` keys its kept
        grouping on."""
        cached = self._factors
        if cached is None or cached[0] != REGISTRATIONS[0]:
            cached = (REGISTRATIONS[0], [(state, side, state.weight(side))
                                          for state in self.modules.values() for side in SIDES])
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

    def _natural_groups(self, factors: list, raw_norms: list[torch.Tensor] | None
                        ) -> Iterator[tuple[list[torch.Tensor], torch.Tensor, int | torch.Tensor]]:
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

    def precondition(self, factors: list[Factor] | None = None,
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

    def precondition_and_clip(self, factors: list[Factor], raw_norms: list[torch.Tensor] | None,
                              max_grad_norm: float) -> tuple[int | torch.Tensor, torch.Tensor | None]:
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
