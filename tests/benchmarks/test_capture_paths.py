"""The capture-path counts (benchmarks/capture_paths.py): what each way GRIT captures its rows
adds to plain LoRA's step, on SmolLM2's 210-module layout at tiny width."""

import importlib.util
import sys
from pathlib import Path

import pytest

SPEC = importlib.util.spec_from_file_location(
    "capture_paths", Path(__file__).resolve().parents[2] / "benchmarks" / "capture_paths.py")
capture_paths = importlib.util.module_from_spec(SPEC)
sys.modules["capture_paths"] = capture_paths
SPEC.loader.exec_module(capture_paths)

MODULES = 210


@pytest.mark.slow        # six model steps at SmolLM2's layout
def test_the_hooks_add_python_and_the_fused_functions_run_fewer_operations_than_peft():
    operations = {arm: capture_paths.counted_step(arm, "operations") for arm in capture_paths.ARMS}
    calls = {arm: capture_paths.counted_step(arm, "calls") for arm in capture_paths.ARMS}
    # hooks: no operation per module (the forward's mask is its only work), Python per module
    assert operations["hooks"]["backward"] == operations["lora"]["backward"]
    assert operations["hooks"]["forward"] - operations["lora"]["forward"] <= 2
    assert calls["hooks"]["forward"] - calls["lora"]["forward"] >= 10 * MODULES
    # fused: u recomputed in backward, but every product on token rows (one mm, where a product
    # of [batch, seq, d] tensors adds two views and a transpose): fewer operations than PEFT's
    # forward and backward (they added 905 when products ran on [batch, seq, d] tensors)
    fused, lora = (sum(operations[arm][p] for p in ("forward", "backward")) for arm in ("fused", "lora"))
    assert fused <= lora, (fused, lora)
    # a backward in Python, but no call that changes nothing: 29 a module with a .to per tensor
    # whatever its dtype and the views, 18 without
    added = calls["fused"]["backward"] - calls["lora"]["backward"]
    assert 10 * MODULES <= added < 20 * MODULES, added
    # and a forward lighter than PEFT's: the LoRA tensors read from the modules' dictionaries
    # (nn.Module's attribute lookups were seven Python calls a module), no .to that changes nothing
    # (3.6 calls a module fewer than PEFT's before, 14.5 after)
    assert calls["lora"]["forward"] - calls["fused"]["forward"] >= 10 * MODULES, calls
    # what GRIT itself adds to the hybrid's path (the same functions without GRIT): the forward's
    # mask (2 operations) and a tap a module (6 Python calls: made in forward, called in backward)
    grit, alone = ({kind: sum(counted[arm][p] for p in ("forward", "backward")) for kind, counted in
                    (("operations", operations), ("calls", calls))} for arm in ("fused", "fused_lora"))
    assert grit["operations"] - alone["operations"] <= 2, (grit, alone)
    assert grit["calls"] - alone["calls"] <= 7 * MODULES, (grit, alone)
    # GRIT's step is the same whichever path captured the rows, and does no Python per module
    assert operations["fused"]["before_step"] == operations["hooks"]["before_step"]
    assert calls["fused"]["before_step"] == calls["hooks"]["before_step"]
    # GRIT's whole step, its clip done on the stacks preconditioning makes, runs no more Python
    # than torch's clip alone (1,333 calls against 1,379; it was 2,672)
    assert calls["hooks"]["before_step"] - calls["lora"]["before_step"] < MODULES
    # nor hands every module's statistics and gradients to list operations beyond what batching
    # needs: the statistics were folded through pending sums and cleared, then added module by
    # module, and the raw norm took a list operation over every gradient (5,880 tensors in lists
    # against the clipping's 1,260: 22 a module beyond it); stacked running sums and the raw norm
    # from preconditioning's stacks made it 2,945 (8 a module); the clip on those stacks, 1,690
    # (2 a module: the rows stacked once, the gradients stacked and copied back, and torch's clip
    # no longer hands each gradient to three list operations)
    tensors = {arm: capture_paths.counted_step(arm, "tensors")["before_step"] for arm in ("lora", "hooks")}
    assert tensors["hooks"] - tensors["lora"] <= 3 * MODULES, tensors


@pytest.mark.slow        # 3 x 44 model steps at SmolLM2's layout
def test_grit_keeps_few_objects_alive_for_the_garbage_collector():
    """Python's collector tracks every object a step keeps alive from its forward to its GRIT
    step; the more there are, the more often it collects (its full collection, which walks the
    whole process, included) on a host-bound GPU step. Per module, GRIT keeps u, the gradient at
    u and what the hook leaves on u (6 objects on the hooks path, 2 on the fused one, which has
    no hook); with a record per module and a weak reference to it in the hook the hooks kept 8
    and the fused path 3, and GRIT's steps set off 2.87 young collections a step against LoRA's
    1.83 (1.95 now). LoRA keeps none. The fused path's taps are made in each forward: as closures
    (six tracked objects a module) they set off one young collection a step more than the same
    functions without GRIT."""
    collected = {arm: capture_paths.collections_over(arm, steps=40) for arm in capture_paths.ARMS}
    assert collected["lora"]["held_after_backward"] <= 8, collected["lora"]
    assert collected["fused_lora"]["held_after_backward"] <= 8, collected["fused_lora"]
    assert 2 * MODULES <= collected["fused"]["held_after_backward"] <= 2.5 * MODULES, collected["fused"]
    assert 2 * MODULES <= collected["hooks"]["held_after_backward"] <= 6.5 * MODULES, collected["hooks"]
    assert collected["hooks"]["per_step"][0] <= collected["lora"]["per_step"][0] + 0.5, collected
    assert collected["fused"]["per_step"][0] <= collected["fused_lora"]["per_step"][0] + 0.25, collected


@pytest.mark.slow        # a few model steps per arm at SmolLM2's layout
def test_the_timed_pairs_interleave_each_arm_with_its_baseline():
    """``--time``'s plumbing (no speed is asserted: timing is for a quiet machine): each pair runs
    its two arms on the same steps and reports both step times and their ratios."""
    assert {arm for pair in capture_paths.TIMED_PAIRS for arm in pair} == set(capture_paths.ARMS)
    timed = capture_paths.timed_pair("fused_lora", "fused", steps=3, warmup=1)
    assert timed.steps == 3 and timed.lora_s > 0 and timed.grit_s > 0
    assert timed.ratio == pytest.approx(timed.grit_s / timed.lora_s)
