"""What a GRIT step costs the host, counted on CPU (``operation_counts``): on a GPU a small
model's step is bound by the host, so GRIT's added aten operations and host reads predict its
GPU overhead where CPU seconds cannot. Counted on SmolLM2's layout (30 blocks x 7 projections =
210 LoRA modules) at tiny width, against plain LoRA with the same optimizer and clipping."""

from __future__ import annotations

import pytest
import torch

from profiling.lora_llama import random_lora_llama
from profiling.operations import operation_counts
from tests.tiny_lora import VOCAB, batches
from trainers.grit import GritManager, GritParams
from trainers.grit.fused import attach_fused
from trainers.grit.host import DeferredCount
from trainers.grit.layer import FactorStats, lora_layers


def smollm2_layout(grit: GritParams | None, fused_lora: bool = False):
    """SmolLM2-135M's 30 blocks with LoRA r=16 on its 7 projections, at width 64. ``fused_lora``:
    plain LoRA through the fused functions (Unsloth-style LoRA, what the hybrid is compared with)."""
    model = random_lora_llama(30, 64, 128, 4, 2, VOCAB)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    if grit is None:
        if fused_lora:
            attach_fused(model, {n: (layer, a) for n, layer, a in lora_layers(model)}, lambda key: None)
        return model, optimizer, None
    manager = GritManager(model, grit)
    return model, manager.wrap_optimizer(optimizer, max_grad_norm=1.0), manager


def train_step(model, optimizer, manager, inputs) -> None:
    model(**inputs).loss.backward()
    if manager is None:
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def counts_at(grit: GritParams | None, step: int, fused_lora: bool = False):
    """Operation counts of step ``step`` (0-based; the steps before it run uncounted)."""
    arm = smollm2_layout(grit, fused_lora)
    data = batches(step + 1, batch_size=2, length=8)
    for inputs in data[:step]:
        train_step(*arm, inputs)
    return operation_counts(lambda inputs: train_step(*arm, inputs), data[step]), arm[2]


def test_the_counter_sees_backward_and_host_reads():
    x = torch.ones(3, requires_grad=True)
    forward = operation_counts(lambda t: (t * 2).sum(), x)
    both = operation_counts(lambda t: (t * 2).sum().backward(), x)
    read = operation_counts(lambda t: float((t * 2).sum()), x)
    assert forward.host_reads == 0 and both.operations > forward.operations and read.host_reads == 1
    # a read of a host copy made without waiting (on a GPU: pinned memory after its event) is none
    deferred = operation_counts(lambda t: int(DeferredCount((t * 2).sum())), x)
    assert deferred.host_reads == 0 and int(DeferredCount(x.sum())) == 3
    # linear algebra that checks its LAPACK / cuSOLVER status on the host inside the kernel
    eye = torch.eye(3)
    assert operation_counts(lambda m: torch.cholesky_inverse(m), eye).host_reads == 1
    assert operation_counts(lambda m: torch.linalg.cholesky(m), eye).host_reads == 1
    assert operation_counts(lambda m: torch.linalg.eigh(m), eye).host_reads == 1
    assert operation_counts(lambda m: torch.linalg.cholesky_ex(m), eye).host_reads == 0
    assert operation_counts(lambda m: torch.linalg.solve_triangular(m, m, upper=False), eye).host_reads == 0
    # host data brought to the device: on a GPU each waits for it as a read does
    assert operation_counts(lambda t: t * torch.tensor([1.0, 2.0, 3.0]), x).host_copies == 1
    assert operation_counts(lambda t: t.detach().to("meta"), x).host_copies == 1
    assert operation_counts(lambda t: torch.zeros(3, device="meta"), x).host_copies == 0


def test_statistics_are_made_on_the_device_not_copied_there():
    """A module's statistics start on the host and move to its layer's device at the first
    capture. Copying the zeros there took 4 host copies per module (840 synchronisations in the
    first GRIT step on an H100); empty statistics are now made on the device, and only ones that
    hold something (restored from a checkpoint) are copied."""
    empty = FactorStats(rank=4)
    counts = operation_counts(lambda device: empty.place(device), torch.device("meta"))
    assert counts.host_copies == 0 and empty.total.is_meta and empty.pending.is_meta
    restored = FactorStats(rank=4, total=torch.eye(4), count=8)
    copied = operation_counts(lambda device: restored.place(device), torch.device("meta"))
    assert copied.host_copies == 2 and restored.total.is_meta and restored.count == 8


@pytest.fixture(scope="module")
def lora_counts():
    return counts_at(None, 3)[0]


@pytest.fixture(scope="module")
def fused_lora_counts():
    return counts_at(None, 3, fused_lora=True)[0]


@pytest.mark.parametrize("capture", ["hooks", "fused"])
def test_a_grit_step_reads_nothing_on_the_host(lora_counts, fused_lora_counts, capture):
    """Step 3 captures and preconditions but does not invert (update_freq 10): GRIT adds no host
    read. The attention mask's row count is summed on the device at the forward and read at the
    GRIT step from a copy made without waiting (it was one read per forward); per-module
    readbacks (factor counts, grafting's zero test, the report's norms) added hundreds. Capture,
    folding and preconditioning of 210 modules are batched: at most 250 added operations (the
    issue's budget), where work per module added thousands. The same with GRIT's fused LoRA
    functions (the hybrid's path, against Unsloth-style LoRA through the same functions), whose
    backward hands over the rows it computes anyway."""
    counts, manager = counts_at(GritParams(min_samples=8, update_freq=10, capture=capture), 3)
    assert {path.split("-")[0] for path in manager.capture_paths.values()} == {capture}
    lora_counts = fused_lora_counts if capture == "fused" else lora_counts
    assert len(manager.modules) == 210 and manager.report["preconditioned_tensors"] > 0
    assert counts.host_reads - lora_counts.host_reads == 0, (counts, lora_counts)
    assert counts.operations - lora_counts.operations <= 250, (counts, lora_counts)
    assert counts.host_copies - lora_counts.host_copies == 0, (counts, lora_counts)


def test_a_step_that_captures_nothing_attaches_nothing(lora_counts):
    """With capture_every 2, step 3 captures nothing: no hook runs, not even the mask's, and
    the preconditioning of 420 gradients is a few batched operations (66 added here, where a
    capturing step adds 83 and an inverting one 174, all within the budget of 250; the clip done
    on the preconditioning's stacks is 5 of them)."""
    counts, manager = counts_at(GritParams(min_samples=8, update_freq=10, capture_every=2), 3)
    assert manager.step == 4 and manager.capturing          # step 3 did not capture, step 4 will
    assert counts.host_reads == lora_counts.host_reads, (counts, lora_counts)
    assert counts.operations - lora_counts.operations <= 250, (counts, lora_counts)
    assert counts.host_copies - lora_counts.host_copies == 0, (counts, lora_counts)
    captured, _ = counts_at(GritParams(min_samples=8, update_freq=10, capture_every=2), 2)
    assert captured.operations > counts.operations


def test_an_inverting_step_stays_within_the_budget(lora_counts):
    """Step 3 with update_freq 1 also inverts 420 factors: their covariances, damping and every
    escalation level in one batched Cholesky per rank group, so the whole step adds at most 250
    operations (546 when escalation ran level by level with a read per level), and no host read:
    which factors factorised is not read in this step (the failed ones are masked on the device);
    the next step reads a copy made without waiting (``settle``; it was one read per rank group).
    The inverses come from triangular solves: on CPU ``torch.cholesky_inverse`` reads LAPACK's
    status on the host. (It was taken for the one synchronisation in 10 steps the H100 and H200
    reports showed; that one was torch's sync-debug notice, docs/gpu.md.)
    """
    counts, manager = counts_at(GritParams(min_samples=8, update_freq=1), 3)
    assert manager.all_ready() and manager.report["inversions"] == 420
    assert counts.host_reads - lora_counts.host_reads == 0, (counts, lora_counts)
    assert counts.operations - lora_counts.operations <= 250, (counts, lora_counts)
    assert counts.host_copies - lora_counts.host_copies == 0, (counts, lora_counts)


def test_a_grit_step_walks_the_modules_few_times():
    """The H100's profile put GRIT's extra host time on the PEFT engine in Python that launches
    little (``before_step`` 27 ms more than LoRA's clipping, 118 more launches per step): per
    module walks that each look every factor up through PEFT's module dictionaries. Counted
    here as Python calls of one non-inverting ``before_step`` beyond the clipping it ends with:
    10,499 when each step walked the modules for the parameters, for preconditioning, again for
    clipping, stacked every inverse again and took the preconditioned norm twice; one walk per
    step and the inverses stacked once per inversion made it 6,734. Each factor's weight read
    from the modules' dictionaries (no ``__getattr__``), the preconditioning groups kept while
    nothing they depend on changes, and the capture, fold and inversion checks done in
    comprehensions make it 1,280, and those left are C calls (a dictionary's ``setdefault``, an
    ``id``, a ``getattr``), no Python function per module. At most 1,500."""
    from profiling.operations import python_calls
    from trainers.grit.doors import clip_gradients

    model = random_lora_llama(30, 64, 128, 4, 2, VOCAB)
    lora = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(lora, lr=1e-3)
    manager = GritManager(model, GritParams(min_samples=8, update_freq=10))
    for step, inputs in enumerate(batches(4, batch_size=2, length=8)):
        model(**inputs).loss.backward()
        if step == 3:
            grit_calls = python_calls(lambda: manager.before_step(1.0))
            clip_calls = python_calls(lambda: clip_gradients(lora, 1.0))
        else:
            manager.before_step(1.0)
        optimizer.step()
        manager.after_step(optimizer)
        optimizer.zero_grad(set_to_none=True)
    assert manager.report["preconditioned_tensors"] > 0 and manager.report["inversions"] == 0
    assert grit_calls - clip_calls <= 1500, (grit_calls, clip_calls)
