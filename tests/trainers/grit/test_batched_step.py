"""The batched GRIT step equals the per-module reference bit for bit (fp32, CPU): the manager
preconditions all modules of one shape with one batched matmul, ``ModuleState.precondition``
does it module by module, as the math is written."""

from __future__ import annotations

import pytest
import torch

from tests.tiny_lora import batches, lora_grads, tiny_lora_model
from trainers.grit import GritManager, GritParams


def captured(random_B: bool, config: GritParams) -> tuple[torch.nn.Module, GritManager]:
    model = tiny_lora_model(seed=3, random_B=random_B)
    manager = GritManager(model, config)
    model(**batches(1, seed=5)[0]).loss.backward()
    manager.sync_factors()
    manager.refresh_inverses(force=True)
    return model, manager


@pytest.mark.parametrize("settled", [False, True])
@pytest.mark.parametrize("graft_norm", [True, False])
@pytest.mark.parametrize("random_B", [True, False])      # B = 0: the A side has no inverse yet
def test_the_batched_step_equals_the_per_module_reference(graft_norm: bool, random_B: bool, settled: bool):
    """The step that inverts preconditions before the host has read which factorisations failed
    (failed ones masked on the device); ``settled``: the host has read it (the next step)."""
    config = GritParams(min_samples=1, graft_norm=graft_norm)
    batched_model, batched = captured(random_B, config)
    if settled:
        batched.settle()
    reference_model, reference = captured(random_B, config)
    reference.settle()          # the reference works on inverses known to exist
    assert lora_grads(batched_model).keys() and all(
        torch.equal(a, b) for a, b in zip(lora_grads(batched_model).values(), lora_grads(reference_model).values(),
                                          strict=True))
    applied = batched.engine.precondition()
    with torch.no_grad():
        expected = sum(state.precondition(config) for state in reference.modules.values())
    assert applied == expected == (2 if random_B else 1) * len(batched.modules)
    after, wanted = lora_grads(batched_model), lora_grads(reference_model)
    assert all(torch.equal(after[n], wanted[n]) for n in wanted)
    changed = sum(not torch.equal(after[n], g) for n, g in lora_grads(captured(random_B, config)[0]).items())
    assert changed >= applied           # the step did precondition (a no-op would pass equality)


def test_the_batched_capture_equals_the_per_module_reference():
    """Hooks only stash u and the gradient at u; ``collect_captured`` folds them per forward with
    one batched masked product per side. The reference is the math per module, as written
    (``masked_outer_sum``), fed by hooks of its own on the same forward: equal bit for bit,
    padding rows weighing nothing, over two forwards (gradient accumulation)."""
    from trainers.grit import math as gm
    from trainers.grit.layer import FactorStats

    model = tiny_lora_model(seed=3, random_B=True)
    manager = GritManager(model, GritParams(min_samples=1))
    reference = {name: (FactorStats(s.rank), FactorStats(s.rank)) for name, s in manager.modules.items()}
    mask: list[torch.Tensor] = []

    def hook_for(name: str, scaling: float):
        def hook(_module, _inputs, output):
            u, weight = output.detach(), mask[0].float()

            def on_grad(grad):
                reference[name][0].add(gm.masked_outer_sum(u, weight), int(weight.sum()))
                reference[name][1].add(gm.masked_outer_sum(grad, weight) / scaling**2, int(weight.sum()))

            output.register_hook(on_grad)
        return hook

    handles = [s.lora_A.register_forward_hook(hook_for(n, s.scaling)) for n, s in manager.modules.items()]
    for batch in batches(2, seed=9):
        assert (batch["attention_mask"] == 0).any()         # padding rows are there to be left out
        mask[:] = [batch["attention_mask"]]
        model(**batch).loss.backward()
    for handle in handles:
        handle.remove()
    manager.collect_captured()
    for name, state in manager.modules.items():
        u, v = reference[name]
        assert torch.equal(state.u.pending, u.pending) and torch.equal(state.v.pending, v.pending), name
        assert state.u.pending_count == u.pending_count == state.v.pending_count > 0


def test_a_folded_step_leaves_nothing_alive_for_the_garbage_collector():
    """What the hooks stash is freed by reference counting once folded: a cycle through the
    gradient hook would keep every step's autograd graph until the collector ran (measured: a
    peak 600-900 MiB higher on SmolLM2-135M)."""
    import gc
    import weakref

    model = tiny_lora_model(seed=3, random_B=True)
    manager = GritManager(model, GritParams(min_samples=1))
    outputs: list[weakref.ref] = []
    state = next(iter(manager.modules.values()))
    handle = state.lora_A.register_forward_hook(lambda _m, _i, out: outputs.append(weakref.ref(out)))
    gc.disable()
    try:
        model(**batches(1)[0]).loss.backward()
        manager.before_step(1.0)
        assert outputs and outputs[0]() is None
    finally:
        gc.enable()
        handle.remove()


def test_a_failed_factorisation_keeps_its_raw_gradient_and_is_tried_again_the_next_step():
    """B = 0 at LoRA's start: Sigma_v is 0, A's side cannot be inverted. The inverting step does not
    read that (its inverse is set tentatively, masked on the device); the next step settles it:
    no inverse, as before, so that side is inverted again as soon as it can be."""
    model, manager = captured(False, GritParams(min_samples=1))
    state = next(iter(manager.modules.values()))
    assert state.inverse["A"] is not None and manager.engine.unsettled          # not read yet
    with torch.no_grad():      # a gradient the failed (all-zero) inverse would wipe out if used
        state.weight("A").grad.normal_()
    raw = state.weight("A").grad.clone()
    manager.engine.precondition()
    assert torch.equal(state.weight("A").grad, raw)                       # kept its raw gradient
    manager.settle()
    assert state.inverse["A"] is None and state.damping_used["A"] is None
    assert state.inverse["B"] is not None and state.damping_used["B"] > 0
    assert not manager.engine.unsettled and not manager.all_ready()


def both_ways(manager: GritManager, config: GritParams) -> tuple[int, int, bool]:
    """(tensors the batched step preconditioned, tensors the per-module reference did, whether
    the two left equal gradients), both from the same gradients and inverses."""
    parameters = [p for p in manager.lora_parameters() if p.grad is not None]
    before = [p.grad.clone() for p in parameters]
    applied = manager.engine.precondition()
    batched = [p.grad.clone() for p in parameters]
    for parameter, grad in zip(parameters, before, strict=True):
        parameter.grad.copy_(grad)
    with torch.no_grad():
        expected = sum(state.precondition(config) for state in manager.modules.values())
    changed = sum(not torch.equal(a, b) for a, b in zip(batched, before, strict=True))
    return applied, expected, changed >= expected and all(
        torch.equal(a, p.grad) for a, p in zip(batched, parameters, strict=True))


def test_the_kept_grouping_follows_readiness_as_it_changes():
    """``precondition`` keeps its grouping of the ready factors from step to step. B = 0 at LoRA's
    start, so A's side has no inverse and the first step preconditions B's factors only; once B
    has moved, A's side is inverted and the grouping must take it in (kept as it was, A's
    gradients would stay raw)."""
    config = GritParams(min_samples=1)
    model, manager = captured(False, config)
    manager.settle()
    assert both_ways(manager, config) == (len(manager.modules), len(manager.modules), True)
    with torch.no_grad():
        for state in manager.modules.values():
            state.lora_B.weight.normal_(std=0.1)
    model.zero_grad(set_to_none=True)
    model(**batches(1, seed=6)[0]).loss.backward()
    manager.sync_factors()
    manager.refresh_inverses(force=True)
    manager.settle()
    assert both_ways(manager, config) == (2 * len(manager.modules), 2 * len(manager.modules), True)


def test_a_replaced_factor_is_preconditioned_in_place_of_the_old_one():
    """``factors`` is kept while every factor's weight is the object it was; a weight replaced
    (a truncation does it; so could a user's code) is seen at the next call, and the step
    preconditions the new weight's gradient, not the old one's."""
    config = GritParams(min_samples=1)
    _, manager = captured(True, config)
    manager.settle()
    first = manager.factors()
    assert manager.factors() is first
    state = next(iter(manager.modules.values()))
    old = state.lora_A.weight
    state.lora_A.weight = torch.nn.Parameter(old.detach().clone())
    new = state.lora_A.weight
    new.grad, raw = old.grad.clone(), old.grad.clone()
    factors = manager.factors()
    looked_up = [w for s in manager.modules.values() for w in (s.lora_A.weight, s.lora_B.weight)]
    assert factors is not first and all(a is b for (_, _, a), b in zip(factors, looked_up, strict=True))
    manager.engine.precondition()
    assert torch.equal(old.grad, raw) and not torch.equal(new.grad, raw)



def test_a_lone_forward_folds_straight_into_the_running_sums_as_the_pending_path_does():
    """One forward per step on one process: ``sync_factors`` adds its products to the running sums
    directly, stacked in one tensor per side, without the pending sums and the list operations
    that fold and clear them. Bit for
    bit what the pending path gives (the probe collects the stash before the sync, which takes
    that path), with the same rows counted and the same coverage, over two steps. Two forwards
    before a sync (gradient accumulation) and EMA statistics still go through the pending sums."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Names(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names: set[str] = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.add(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    def stepped(config: GritParams, forwards: int, collect_first: bool) -> tuple[GritManager, list[bool]]:
        model = tiny_lora_model(seed=3, random_B=True)
        manager = GritManager(model, config)
        cleared = []                # whether each sync cleared pending sums
        for step in range(2):
            for seed in range(forwards):
                model(**batches(1, seed=5 + 2 * step + seed)[0]).loss.backward()
            if collect_first:
                manager.collect_captured()
            with Names() as seen:
                manager.sync_factors()
            cleared.append("_foreach_zero_" in seen.names or "zero_" in seen.names)
            manager.after_step()
            model.zero_grad(set_to_none=True)
        return manager, cleared

    def stats(manager: GritManager) -> list:
        return [(s.u.total, s.v.total, s.u.ema, s.v.ema, s.u.count, s.v.count) for s in manager.modules.values()]

    def equal(a, b) -> bool:
        return torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b

    for config, forwards, straight in ((GritParams(min_samples=1), 1, True), (GritParams(min_samples=1), 2, False),
                                       (GritParams(min_samples=1, statistics="ema"), 1, False)):
        (direct, direct_cleared), (pending, pending_cleared) = (stepped(config, forwards, False),
                                                                stepped(config, forwards, True))
        assert direct_cleared == [not straight] * 2 and pending_cleared == [True, True]
        assert all(equal(x, y) for a, b in zip(stats(direct), stats(pending), strict=True)
                   for x, y in zip(a, b, strict=True))
        assert direct._captured_modules == pending._captured_modules == len(direct.modules)
        assert all(s.u.count > 0 and s.u.pending_count == 0 for s in direct.modules.values())


def test_the_stacked_running_sums_follow_a_replaced_total():
    """The stacked running sums are kept while every statistic still holds its row; a total
    replaced (a move, a truncation's transform, a loaded state) is stacked again with its new
    value, and what is added then reaches every statistic."""
    _, manager = captured(True, GritParams(min_samples=1))
    stats = [state.u for state in manager.modules.values()]
    first = manager.engine.stacked_sums("u", stats)
    assert manager.engine.stacked_sums("u", stats) is first and all(s.total._base is first for s in stats)
    replaced = torch.full_like(stats[0].total, 2.0)
    stats[0].total = replaced.clone()
    again = manager.engine.stacked_sums("u", stats)
    assert again is not first and torch.equal(again[0], replaced) and torch.equal(again[1:], first[1:])
    before = [s.total.clone() for s in stats]
    again.add_(torch.ones_like(again))
    assert all(torch.equal(s.total, b + 1) for s, b in zip(stats, before, strict=True))
    assert manager.engine.stacked_sums("u", [stats[0], stats[0]]) is None     # a module twice: rows would alias


@pytest.mark.parametrize("random_B", [True, False])      # B = 0: A's gradients stay raw
def test_the_reported_raw_norm_is_the_raw_gradients_joint_norm(random_B: bool):
    """The report's raw gradient norm is taken from the stacks the preconditioning makes (and the
    gradients it leaves raw), not from a list operation over every gradient: the same joint norm
    of the gradients as they were before the step."""
    from trainers.grit.doors import joint_gradient_norm

    # without grafting, which would give each preconditioned gradient its raw norm back
    model, manager = captured(random_B, GritParams(min_samples=1, graft_norm=False))
    manager.settle()
    parameters = [p for p in model.parameters() if p.grad is not None]
    expected = float(joint_gradient_norm(parameters))
    report = manager.before_step(None)
    assert float(report["preconditioned_tensors"]) == (2 if random_B else 1) * len(manager.modules)
    assert float(report["grad_norm_raw"]) == pytest.approx(expected, rel=1e-6)
    assert float(report["grad_norm_preconditioned"]) != pytest.approx(expected, rel=1e-3)


@pytest.mark.parametrize("settled", [False, True])       # not settled: failed factorisations masked on the device
@pytest.mark.parametrize("max_norm", [1e-3, 1e3])        # clipping, and a bound the gradients are within
@pytest.mark.parametrize("random_B", [True, False])      # B = 0: A's gradients stay raw, clipped in a list
def test_the_clip_on_the_stacks_equals_torchs_clip_after_preconditioning(random_B: bool, max_norm: float,
                                                                          settled: bool):
    """``before_step`` clips the natural gradients on their stacks before writing them back: bit
    for bit what preconditioning and then torch's ``clip_grad_norm_`` give (fp32, CPU), the joint
    norm included. torch's clip hands every gradient to three list operations (its norms, their
    stack, its scaling); on the stacks the clip adds one list, of the groups' norms, beyond
    preconditioning alone, and keeps torch's three for the gradients left raw."""
    from profiling.operations import counting_operations

    config = GritParams(min_samples=1)
    (clipped_model, clipped), (_, counted) = captured(random_B, config), captured(random_B, config)
    (reference_model, reference), (plain_model, plain) = captured(random_B, config), captured(random_B, config)
    for manager in (reference, plain, *((clipped, counted) if settled else ())):
        manager.settle()
    applied, norm = clipped.engine.precondition_and_clip(clipped.factors(), None, max_norm)
    expected = reference.engine.precondition()
    expected_norm = torch.nn.utils.clip_grad_norm_([p for p in reference_model.parameters() if p.grad is not None],
                                                   max_norm)
    plain.engine.precondition()
    assert int(applied) == int(expected) == (2 if random_B else 1) * len(clipped.modules)
    assert torch.equal(norm, expected_norm)
    after, wanted, unclipped = lora_grads(clipped_model), lora_grads(reference_model), lora_grads(plain_model)
    assert all(torch.equal(after[n], wanted[n]) for n in wanted)
    scaled = [not torch.equal(after[n], unclipped[n]) for n in after if unclipped[n].any()]
    assert scaled and all(scaled) == (max_norm < 1) and any(scaled) == (max_norm < 1)   # it clipped when it had to
    # counted on a step after the first, which also puts the parameter order on the device
    counted.engine.precondition_and_clip(counted.factors(), None, max_norm)
    with counting_operations() as clip_counts:
        counted.engine.precondition_and_clip(counted.factors(), None, max_norm)
    with counting_operations() as precondition_counts:
        counted.engine.precondition()
    groups, raw_only = counted.engine._groups[2]
    assert clip_counts.listed_tensors == precondition_counts.listed_tensors + len(groups) + (1 if raw_only else 0) \
        + 3 * len(raw_only), (clip_counts.listed_tensors, precondition_counts.listed_tensors, len(groups), raw_only)


def test_a_grit_step_clips_as_torchs_clip_would():
    """``before_step`` with a bound: its preconditioned norm is the clip's joint norm, and every
    gradient ends within the bound (the stacks' clip took over from torch's)."""
    from trainers.grit.doors import joint_gradient_norm

    model, manager = captured(True, GritParams(min_samples=1))
    manager.settle()
    report = manager.before_step(1e-3)
    parameters = [p for p in model.parameters() if p.grad is not None]
    assert float(report["grad_norm_preconditioned"]) > 1e-3
    assert float(joint_gradient_norm(parameters)) == pytest.approx(1e-3, rel=1e-3)
