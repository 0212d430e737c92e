"""Gradient-divergence probes: does GRIT's preconditioning change what the optimizer does?

Two arms start from the same initial adapter and train on the same batches with the same
Trainer wiring as ``trainers/recipe.py``: the *control* (GRIT off) and the *GRIT* arm (GRIT
attached as the variant attaches it). Instruments around the optimizer step record what GRIT
captured, inverted and preconditioned, the gradients the optimizer actually consumed, and the
adapter after every step; ``verdict.decide`` turns those measurements into ``effective`` or
``inert`` with the reasons (docs/method.md lists the ways GRIT was silently inert).

- ``math.py``: pure functions (low-rank update comparison, curve comparison);
- ``config.py``: the ``probe`` params section (thresholds, documented);
- ``arms.py``: the instruments and one arm's run;
- ``verdict.py``: measurements -> checks -> verdict (pure).
"""
