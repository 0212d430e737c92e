"""What each way of capturing GRIT's rows costs the host, counted (not timed) per step phase.

On a GPU a small model's step is bound by the host: its cost is the operations it dispatches and
the Python it runs. This counts both for one training step on SmolLM2's layout at tiny width
(30 blocks x 7 projections = 210 LoRA modules, hidden 64, fp32 on CPU), three arms side by side:

- ``lora``: plain LoRA through PEFT's forward (no GRIT);
- ``hooks``: GRIT capturing through PEFT's forward, a forward hook on each ``lora_A`` and a
  tensor hook on its output (the PEFT engine's default, ``grit.capture: hooks``);
- ``fused``: GRIT's fused LoRA functions (``grit.capture: fused``; the hybrid's path on Unsloth);
- ``fused_lora``: the same functions without GRIT (no tap), plain LoRA's step after them: the
  hybrid's baseline as far as CPU can run it (Unsloth's fused LoRA, without its compile and with
  q, k and v in one function where these take three), so ``fused`` against it is what GRIT
  itself adds to the hybrid.

Per phase (forward, backward, and between backward and the optimizer: GRIT's ``before_step``,
which ends with the clipping, against LoRA's clipping): aten operations (a ``TorchDispatchMode``),
Python-level calls (``sys.setprofile``) and the tensors handed to operations in lists (a
``_foreach_`` operation or a ``stack`` over 420 gradients checks each one on the host). Counts
do not depend on the machine, so they can be taken beside other work; which path is faster on a
GPU is for ``make gpu-check`` with ``--grit-capture fused`` to measure (docs/gpu.md). ``--time``
times the arms in pairs instead, side by side on this CPU (indicative: a quiet machine only).

    python benchmarks/capture_paths.py
    python benchmarks/capture_paths.py --time
"""

from __future__ import annotations

import argparse
import sys
from contextlib import nullcontext
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as ``python benchmarks/capture_paths.py``: the project is importable

ARMS = ("lora", "hooks", "fused", "fused_lora")
PHASES = ("forward", "backward", "before_step")


def build_arm(arm: str):
    """(model, GRIT manager or None, LoRA parameters, optimizer) of ``arm`` on SmolLM2's layout at tiny width."""
    import torch

    from profiling.lora_llama import random_lora_llama
    from tests.tiny_lora import VOCAB
    from trainers.grit import GritManager, GritParams
    from trainers.grit.fused import attach_without_grit

    torch.manual_seed(0)
    model = random_lora_llama(30, 64, 128, 4, 2, VOCAB)
    manager = None if arm in ("lora", "fused_lora") else GritManager(model, GritParams(min_samples=8, capture=arm))
    if arm == "fused_lora":
        attach_without_grit(model)
    lora = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(lora, lr=1e-3)       # B leaves 0, so A's side can be inverted
    return model, manager, lora, optimizer


def finish_step(manager, lora: list, optimizer) -> None:
    """Everything after backward: GRIT's step (its clip included) or LoRA's clip, the optimizer,
    GRIT's after_step."""
    from trainers.grit.doors import clip_gradients

    if manager is None:
        clip_gradients(lora, 1.0)
    else:
        manager.before_step(1.0)
    optimizer.step()
    if manager is not None:
        manager.after_step(optimizer)
    optimizer.zero_grad(set_to_none=True)


def counted_step(arm: str, counter: str, warmup: int = 4) -> dict[str, int]:
    """``counter`` ("operations", "calls" or "tensors", those in lists) per phase of one step after ``warmup`` steps of
    ``arm``: by then every side has been inverted (A's once B has left 0), so the step is one of
    the nine in ten that invert nothing (``update_freq`` 10). One counter per step: the operation
    counter is itself Python, and would be counted."""
    import torch

    from profiling.operations import counting_operations, python_calls
    from tests.tiny_lora import batches
    from trainers.grit.doors import clip_gradients

    def count(run) -> int:
        if counter == "calls":
            return python_calls(run)
        with counting_operations() as counted:
            run()
        return counted.listed_tensors if counter == "tensors" else counted.operations

    model, manager, lora, optimizer = build_arm(arm)
    data = batches(warmup + 1, batch_size=2, length=8)
    for inputs in data[:warmup]:
        model(**inputs).loss.backward()
        finish_step(manager, lora, optimizer)
    loss: dict[str, torch.Tensor] = {}
    out = {"forward": count(lambda: loss.setdefault("value", model(**data[warmup]).loss)),
           "backward": count(lambda: loss["value"].backward())}
    # between backward and the optimizer: GRIT's step (its clipping included), LoRA's clipping
    out["before_step"] = count(lambda: clip_gradients(lora, 1.0) if manager is None else manager.before_step(1.0))
    if manager is not None and manager.report["inversions"]:
        raise RuntimeError(f"the counted step of {arm} inverted {manager.report['inversions']:.0f} matrices")
    return out


def collections_over(arm: str, steps: int = 200, warmup: int = 4) -> dict[str, object]:
    """Python's garbage collections in ``steps`` steps of ``arm`` after ``warmup`` (counted, not
    timed: ``overhead.counting_collections``), and the objects the collector tracks that the
    step holds after backward beyond what it held before the forward (both counted after a full
    collection, which also untracks what needs no tracking). GRIT's stash keeps u and the
    gradient at u of every module alive from the forward to its step: more collections
    of the young generations, and survivors that bring the full collection, which walks every
    object of the process, round sooner."""
    import gc

    from profiling.timing import Collections, counting_collections
    from tests.tiny_lora import batches

    model, manager, lora, optimizer = build_arm(arm)
    data = batches(4, batch_size=2, length=8)
    tally, held = Collections(), 0
    for k in range(warmup + steps):
        with counting_collections(tally) if k >= warmup else nullcontext():
            if k == warmup - 1:
                gc.collect()
                tracked = len(gc.get_objects())
            model(**data[k % len(data)]).loss.backward()        # nothing of the step held but GRIT's
            if k == warmup - 1:
                # after a full collection, as before the step: what stays tracked, wherever the
                # step's own young collections happened to fall (another thread's allocations
                # move them, and with them which tuples the collector had untracked)
                gc.collect()
                held = len(gc.get_objects()) - tracked
            finish_step(manager, lora, optimizer)
    return {"per_step": [n / steps for n in tally.generations], "full": tally.generations[2], "steps": steps,
            "held_after_backward": held}


# Pairs timed side by side by ``--time``: (baseline, arm).
TIMED_PAIRS = (("lora", "hooks"), ("lora", "fused"), ("fused_lora", "fused"), ("lora", "fused_lora"))


def timed_pair(baseline: str, arm: str, steps: int = 150, warmup: int = 4):
    """Median and mean step-time ratios of ``arm`` over ``baseline``, their steps interleaved on the
    same batches in one process (``overhead.interleaved_step_times``), one thread. A CPU at tiny
    width is host-bound as a GPU step at SmolLM2's size is, but it is not a GPU: indicative only,
    and only on a machine running nothing else."""
    from functools import partial

    import torch

    from profiling.timing import interleaved_step_times
    from tests.tiny_lora import batches

    def step(built, inputs) -> None:
        model, manager, lora, optimizer = built
        model(**inputs).loss.backward()
        finish_step(manager, lora, optimizer)

    torch.set_num_threads(1)
    data = batches(8, batch_size=2, length=8)
    return interleaved_step_times(partial(step, build_arm(baseline)), partial(step, build_arm(arm)),
                                  [data[k % len(data)] for k in range(steps + warmup)], warmup)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--time", action="store_true",
                        help="time the arms in pairs side by side instead of counting (a quiet machine only)")
    if parser.parse_args(argv).time:
        print("host-bound step time, SmolLM2's 210 LoRA modules at tiny width (fp32, CPU, one thread), "
              "150 steps interleaved per pair:")
        for baseline, arm in TIMED_PAIRS:
            timed = timed_pair(baseline, arm)
            print(f"{arm:>10} / {baseline:<10} {1e3 * timed.grit_s:7.2f} / {1e3 * timed.lora_s:7.2f} ms   "
                  f"median ratio {timed.ratio:.3f}   mean ratio {timed.mean_ratio:.3f}", flush=True)
        return 0
    counters = ("operations", "calls", "tensors")
    counts = {arm: {name: tuple(counted[name] for counted in by_counter) for name in PHASES}
              for arm in ARMS for by_counter in [[counted_step(arm, counter) for counter in counters]]}
    print("per step, SmolLM2's 210 LoRA modules at tiny width (fp32, CPU): aten operations / Python calls / "
          "tensors in list operations")
    print(f"{'phase':<12}" + "".join(f"{arm:>26}" for arm in ARMS))
    for name in PHASES:
        cells = [counts[arm][name] for arm in ARMS]
        print(f"{name:<12}" + "".join(f"{f'{c[0]:,} / {c[1]:,} / {c[2]:,}':>26}" for c in cells))
    print("(before_step: GRIT's step with its clipping, a step that inverts nothing; for LoRA, the clipping alone)")
    for arm, baseline in (("hooks", "lora"), ("fused", "lora"), ("fused", "fused_lora")):
        added = [sum(counts[arm][p][i] - counts[baseline][p][i] for p in ("forward", "backward")) for i in (0, 1)]
        step = [counts[arm]["before_step"][i] - counts[baseline]["before_step"][i] for i in (0, 1, 2)]
        print(f"{arm} against {baseline}: forward and backward {added[0]:+,} operations and {added[1]:+,} Python "
              f"calls; before_step {step[0]:+,}, {step[1]:+,} and {step[2]:+,} tensors in lists")
    collected = {arm: collections_over(arm) for arm in ARMS}
    steps = collected["lora"]["steps"]
    print(f"garbage collections per step over {steps} steps (generations 0 / 1 / 2), full collections, and the "
          "objects the collector tracks held after backward:")
    for arm, c in collected.items():
        print(f"{arm:<12}" + " / ".join(f"{n:.3f}" for n in c["per_step"]) + f"   {c['full']} full   "
              f"{c['held_after_backward']:,} held")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
