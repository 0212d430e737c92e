"""Instruments that measure a training step from outside it: how long it takes, what memory it
peaks at, what operations and Python calls it makes, and where its time goes by phase. The GPU
check's ``overhead`` and ``profile`` items (``pipelines/gpu_check``) and the benchmarks
(``benchmarks/grit_overhead.py``, ``benchmarks/capture_paths.py``) measure GRIT against LoRA
with them, one way.

- ``timing.py``: both arms' steps interleaved in one process, median and mean step times, and
  the garbage collections in each arm's timed steps;
- ``memory.py``: one arm's training peak (CUDA or peak RSS), the activation bytes autograd saves;
- ``operations.py``: aten operations, host reads and copies from the host, Python-level calls;
- ``phases.py``: one arm's steps under ``torch.profiler``, per phase of the step;
- ``lora_llama.py``: a Llama of random weights with LoRA on its 7 projections (a model's layout
  without its weights).

A step function takes one batch and runs one whole training step (forward, backward, the
optimizer, GRIT's work); what it returns is ignored.
"""
