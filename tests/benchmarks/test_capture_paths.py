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
def test_the_hooks_add_python_and_the_fused_functions_add_backward_operations():
    operations = {arm: capture_paths.counted_step(arm, "operations") for arm in capture_paths.ARMS}
    calls = {arm: capture_paths.counted_step(arm, "calls") for arm in capture_paths.ARMS}
    # hooks: no operation per module (the forward's mask is its only work), Python per module
    assert operations["hooks"]["backward"] == operations["lora"]["backward"]
    assert operations["hooks"]["forward"] - operations["lora"]["forward"] <= 2
    assert calls["hooks"]["forward"] - calls["lora"]["forward"] >= 10 * MODULES
    # fused: u recomputed in backward (a few operations per module), and a backward in Python
    added = operations["fused"]["backward"] - operations["lora"]["backward"]
    assert 2 * MODULES <= added <= 6 * MODULES, added
    assert calls["fused"]["backward"] - calls["lora"]["backward"] >= 10 * MODULES
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


@pytest.mark.slow        # 3 x 24 model steps at SmolLM2's layout
def test_grit_holds_its_stash_alive_for_the_collector_and_no_more():
    """Between the forward and its step GRIT holds, per module, u, the gradient at u and the record
    pairing them: 3 objects the garbage collector tracks (the hooks' per-forward objects are
    gone by then), where LoRA holds none. More would bring Python's collections, the full one
    that walks the whole process included, round sooner on a host-bound GPU step. u and its
    gradient are the floor: the rows' batching reads them after backward."""
    collected = {arm: capture_paths.collections_over(arm, steps=20) for arm in capture_paths.ARMS}
    assert collected["lora"]["held_after_backward"] <= 8, collected["lora"]
    for arm in ("hooks", "fused"):
        assert 2 * MODULES <= collected[arm]["held_after_backward"] <= 3.5 * MODULES, (arm, collected[arm])
        assert collected[arm]["per_step"][0] >= collected["lora"]["per_step"][0]
