"""The one-command GPU check (``make gpu-check``, ``scripts/gpu_check.py``).

What only a CUDA machine can show, on a tiny model built from a config (no model hub):

1. ``hybrid``: Unsloth's fused LoRA kernels on CUDA, and GRIT attached through the Trainer
   callback capturing on every LoRA module and judged ``effective`` by the probe;
2. ``qlora``: the base model in NF4 through bitsandbytes, LoRA + GRIT trained, the adapter saved
   and reloaded;
3. ``bf16``: a bf16 model whose GRIT statistics and inverses stay fp32, its preconditioned
   gradients against an fp32 recomputation;
4. ``overhead``: GRIT's step time and peak CUDA memory over plain LoRA, side by side.

``report.py`` holds the pass/fail rules and the report (pure, tested on CPU); ``items.py`` the
work, one item per process (importing Unsloth patches libraries for the whole process).
"""
