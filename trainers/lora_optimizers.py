"""GRIT's peers: LoRA optimizers of PEFT's (``peft.optimizers``) in place of the Trainer's.

A variant with ``lora_optimizer`` trains plain LoRA adapters (served like any) with ``train.optim``'s
optimizer class, ``train``'s learning rate and weight decay, changed as the method says:

- ``riemannian`` (Zhang & Pilanci 2024): before each step, per LoRA module, ``g_A <- (B^T B + reg
  I)^-1 g_A`` ([r, d_in]) and ``g_B <- g_B (A A^T + reg I)^-1`` ([d_out, r]): a preconditioner
  built from the factors themselves, which the probe tests like GRIT's (and its scalar twin);
- ``loraplus`` (Hayou et al. 2024): B's learning rate ``lr_ratio`` times A's: a step size per
  factor, no preconditioner matrix.
"""

from __future__ import annotations

from typing import Any

import torch

from trainers.config import LoraOptimizerParams, RiemannianParams

# The attribute every optimizer built here carries: the kind of its method (what the probe and the
# training metadata read from the optimizer that really stepped).
KIND = "lora_optimizer"


def build_lora_optimizer(model, config: LoraOptimizerParams, optimizer_cls: type[torch.optim.Optimizer],
                         optimizer_kwargs: dict[str, Any], weight_decay: float) -> torch.optim.Optimizer:
    """PEFT's optimizer of ``config``'s kind over ``model``'s trainable parameters: ``optimizer_cls``
    built with ``optimizer_kwargs`` (``lr`` among them: A's rate, and every other parameter's)."""
    # imported here: the Unsloth engine must import PEFT itself, after Unsloth (trainers/engines.py)
    from peft.optimizers import create_loraplus_optimizer, create_riemannian_optimizer

    kwargs = dict(optimizer_kwargs)
    lr = kwargs.pop("lr")
    if isinstance(config, RiemannianParams):
        optimizer = create_riemannian_optimizer(model, optimizer_cls, lr=lr, reg=config.reg,
                                                weight_decay=weight_decay, **kwargs)
    else:
        optimizer = create_loraplus_optimizer(model, optimizer_cls, lr=lr, loraplus_lr_ratio=config.lr_ratio,
                                              loraplus_weight_decay=weight_decay, **kwargs)
    setattr(optimizer, KIND, config.kind)
    return optimizer


def lora_optimizer_kind(optimizer) -> str | None:
    """The kind of LoRA optimizer ``optimizer`` is (under accelerate's and GRIT's wrappers), or None."""
    return getattr(innermost_optimizer(optimizer), KIND, None)


def innermost_optimizer(optimizer):
    """The torch optimizer under accelerate's and GRIT's wrappers: the one that updates weights."""
    while True:
        inner = getattr(optimizer, "inner", None) or getattr(optimizer, "optimizer", None)
        if inner is None or inner is optimizer:
            return optimizer
        optimizer = inner
