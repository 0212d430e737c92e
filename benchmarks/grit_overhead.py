"""GRIT's overhead over plain LoRA, measured side by side in one run.

Embedded SmolLM2-135M, LoRA r=16 on all 7 projections, fp32 on CPU, capture and
preconditioning (inversion) on *every* step — the most expensive GRIT setting.

- Step time: the two models train in the same process, steps interleaved (LoRA, GRIT, LoRA,
  GRIT, ...) on the same batches, so machine noise hits both alike; the ratio of medians is
  printed. Target: <= 1.05.
- Peak memory: each variant runs in its own fresh subprocess; after loading, the kernel's
  peak-RSS mark is reset (``/proc/self/clear_refs``), so the peak seen is the training peak.
  Printed: the ratio of training peaks (whole process) and of the memory training added on
  top of the loaded model. Target: <= 1.02.

- Host-bound: the same two arms on SmolLM2's layout at tiny width (30 blocks x 7 projections =
  210 LoRA modules, hidden 64): the step is bound by the host, as the real model's is on a GPU,
  so the ratio here is the one a GPU user feels, not the compute-bound one above. Also printed:
  the aten operations and host reads of one step of each arm, and what GRIT adds (counted with a
  ``TorchDispatchMode``; a host read stalls a GPU's launch queue).

The timing, memory and counting loops are the ones the GPU check uses too (``profiling/``); this
script builds the models and prints the figures.

    python benchmarks/grit_overhead.py [--steps 8] [--batch 4] [--seq 128]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as ``python benchmarks/grit_overhead.py``: the project is importable

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build(grit: bool):
    import torch
    from peft import LoraConfig, get_peft_model

    from trainers.base_model import load_causal_lm, resolve_base_model
    from trainers.config import ModelParams
    from trainers.grit import GritManager, GritParams

    params = ModelParams()
    torch.manual_seed(0)
    model = get_peft_model(load_causal_lm(resolve_base_model(params), params),
                           LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    if grit:
        manager = GritManager(model, GritParams(capture_every=1, update_freq=1, min_samples=16))
        return model, manager.wrap_optimizer(optimizer, max_grad_norm=1.0), manager
    return model, optimizer, None


def build_host_bound(grit: bool):
    """SmolLM2's layout at tiny width (``random_lora_llama``), the same optimizer and GRIT setting."""
    import torch

    from profiling.lora_llama import random_lora_llama
    from trainers.grit import GritManager, GritParams

    model = random_lora_llama(30, 64, 128, 4, 2, TINY_VOCAB)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    if grit:
        manager = GritManager(model, GritParams(capture_every=1, update_freq=1, min_samples=16))
        return model, manager.wrap_optimizer(optimizer, max_grad_norm=1.0), manager
    return model, optimizer, None


TINY_VOCAB = 96


def batch(step: int, size: int, length: int, vocab: int = 49152):
    import torch

    generator = torch.Generator().manual_seed(step)
    ids = torch.randint(0, vocab, (size, length), generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def train_step(model, optimizer, manager, inputs) -> None:
    import torch

    loss = model(**inputs).loss
    loss.backward()
    if manager is None:
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def memory_child(grit: bool, steps: int, size: int, length: int) -> None:
    from profiling.memory import peak_memory

    step = partial(train_step, *build(grit))
    memory = peak_memory(step, (batch(k, size, length) for k in range(steps)), device="cpu")
    print(json.dumps({"after_load_mib": memory.after_load_mib, "peak_mib": memory.peak_mib}))


def measure_memory(grit: bool, steps: int, size: int, length: int) -> dict[str, float]:
    output = subprocess.run(
        [sys.executable, __file__, "--memory-child", "grit" if grit else "lora", "--steps", str(steps),
         "--batch", str(size), "--seq", str(length)],
        capture_output=True, text=True, check=True,
    ).stdout
    return json.loads(output.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--memory-child", choices=["lora", "grit"])
    args = parser.parse_args()
    if args.memory_child:
        memory_child(args.memory_child == "grit", 3, args.batch, args.seq)
        return 0

    from profiling.timing import interleaved_step_times

    lora = build(grit=False)
    grit = build(grit=True)
    batches = (batch(step, args.batch, args.seq) for step in range(args.warmup + args.steps))
    timed = interleaved_step_times(partial(train_step, *lora), partial(train_step, *grit), batches, args.warmup)
    manager = grit[2]
    ready = sum(d["inverse_ready_A"] and d["inverse_ready_B"] for d in manager.diagnostics().values())
    lora_median, grit_median = timed.lora_s, timed.grit_s
    del lora, grit

    memory = {name: measure_memory(name == "grit", 3, args.batch, args.seq) for name in ("lora", "grit")}
    train_part = {n: m["peak_mib"] - m["after_load_mib"] for n, m in memory.items()}
    time_ratio = grit_median / lora_median
    memory_ratio = memory["grit"]["peak_mib"] / memory["lora"]["peak_mib"]
    print(f"GRIT overhead on SmolLM2-135M, r=16, 7 projections, batch {args.batch}x{args.seq}, "
          f"{args.steps} interleaved steps (capture + inversion + preconditioning every step)")
    print(f"  modules preconditioned on both sides at the end: {ready}/{len(manager.modules)}")
    print(f"  step time  LoRA {lora_median:.3f} s   GRIT {grit_median:.3f} s   ratio {time_ratio:.3f}"
          "  (target <= 1.05)")
    print(f"  peak RSS while training   LoRA {memory['lora']['peak_mib']:.0f} MiB"
          f"   GRIT {memory['grit']['peak_mib']:.0f} MiB"
          f"   ratio {memory_ratio:.3f}  (target <= 1.02)")
    print(f"  added by training         LoRA {train_part['lora']:.0f} MiB   GRIT {train_part['grit']:.0f} MiB"
          f"   ratio {train_part['grit'] / train_part['lora']:.3f}")
    host_bound(args)
    return 0


def host_bound(args) -> None:
    """The host-bound ratio and the operation counts on SmolLM2's layout at tiny width."""
    from profiling.operations import operation_counts
    from profiling.timing import interleaved_step_times

    lora, grit = build_host_bound(grit=False), build_host_bound(grit=True)
    steps = 5 * args.steps          # a step is ~0.2 s here: more of them for a steadier median
    batches = [batch(step, args.batch, args.seq, TINY_VOCAB) for step in range(args.warmup + steps + 1)]
    timed = interleaved_step_times(partial(train_step, *lora), partial(train_step, *grit), batches[:-1], args.warmup)
    counts = {name: operation_counts(partial(train_step, *arm), batches[-1]) for name, arm in
              (("lora", lora), ("grit", grit))}
    print(f"Host-bound: SmolLM2's layout at tiny width ({len(grit[2].modules)} LoRA modules, hidden 64), "
          f"batch {args.batch}x{args.seq}, {steps} interleaved steps, inversion every step")
    print(f"  step time  LoRA {timed.lora_s * 1e3:.1f} ms   GRIT {timed.grit_s * 1e3:.1f} ms   ratio "
          f"{timed.ratio:.3f}  (target <= 1.05)")
    print(f"  aten operations per step   LoRA {counts['lora'].operations}   GRIT {counts['grit'].operations}"
          f"   added {counts['grit'].operations - counts['lora'].operations}  (target <= 250)")
    print(f"  host reads per step        LoRA {counts['lora'].host_reads}   GRIT {counts['grit'].host_reads}"
          f"   added {counts['grit'].host_reads - counts['lora'].host_reads}  (target 0; AdamW reads its "
          "step count per parameter on CPU)")


if __name__ == "__main__":
    raise SystemExit(main())
