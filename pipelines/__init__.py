"""The DVC stages (``python -m pipelines.<stage>``) and the study."""

from core.threads import configure_waiting

# Before any stage imports torch: the OpenMP runtime torch loads, which llama.cpp then shares,
# reads its spin count once, when it is loaded (core/threads.py says why it matters).
configure_waiting()
