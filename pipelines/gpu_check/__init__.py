"""The one-command GPU check (``make gpu-check``, ``python -m pipelines.gpu_check``).

What only a CUDA machine can show, on a tiny model built from a config (no model hub):

1. ``hybrid``: Unsloth's fused LoRA kernels on CUDA, and GRIT attached through the Trainer
   callback capturing on every LoRA module and judged ``effective`` by the probe;
2. ``truncation``: the hybrid with GRIT's rank truncation, the shrunk adapter reloaded;
3. ``qlora``: the base model in NF4 through bitsandbytes, LoRA + GRIT trained, the adapter saved
   and reloaded;
4. ``bf16``: a bf16 model whose GRIT statistics and inverses stay fp32, its preconditioned
   gradients against an fp32 recomputation;
5. ``overhead``: GRIT's step time and peak CUDA memory over plain LoRA, side by side.

``cli.py`` (run by ``__main__.py``) is the orchestrator: one process per item, the verdicts, the
table and the JSON report. ``report.py`` declares each item once (``CHECKS``) with its pass/fail
rule, and renders the report (no torch, tested on CPU); ``processes.py`` starts the worker
processes; ``items.py`` the work, a registry of item kinds run one per process (importing Unsloth
patches libraries for the whole process); ``sizing.py`` the overhead and profile items' shapes
and sizes. Their step-timing, peak-memory and profiling harness is ``profiling/``, shared with
``benchmarks/grit_overhead.py``.
"""
