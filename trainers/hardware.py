"""Settings this machine cannot honour, refused in one line before any heavy work.

One rule for every setting that needs hardware: :data:`CUDA_ONLY` lists them, :func:`unmet_needs`
says which of them a machine without CUDA cannot run (pure: CUDA's presence is an argument), and
:func:`check_hardware` applies it. The first stage of ``dvc repro`` (``prepare_model``) checks the
whole params file, so ``train.optim: adamw_8bit`` on a CPU machine is refused before
``prepare_data`` spends minutes on llama.cpp answers; later stages check again for themselves.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from core.errors import UserError
from trainers.config import ModelParams, TrainParams


class HardwareError(UserError):
    pass


@dataclass(frozen=True)
class CudaOnly:
    """``section.field: value`` runs on a CUDA GPU only: ``why`` not on CPU, ``instead`` what to set there."""

    section: str
    field: str
    value: object
    why: str
    instead: str

    def refusal(self) -> str:
        shown = json.dumps(self.value) if isinstance(self.value, bool) else self.value
        return (f"{self.section}.{self.field}: {shown} needs a CUDA GPU and none is visible ({self.why}); "
                f"{self.instead}")


CUDA_ONLY: tuple[CudaOnly, ...] = (
    CudaOnly("model", "load_in_4bit", True, "bitsandbytes NF4 has no CPU kernels",
             "set model.load_in_4bit: false to train in full precision on CPU"),
    CudaOnly("model", "dtype", "float16", "float16 training is not supported on CPU", "use float32 or bfloat16"),
    CudaOnly("train", "optim", "adamw_8bit", "bitsandbytes' 8-bit AdamW has no CPU kernels",
             "use adamw_torch or sgd on CPU"),
)


def unmet_needs(model: ModelParams | None, train: TrainParams | None, cuda: bool) -> list[str]:
    """One refusal per setting of ``model`` and ``train`` (either may be None: not checked) that
    needs CUDA, on a machine with (``cuda``) or without it."""
    if cuda:
        return []
    sections = {"model": model, "train": train}
    return [need.refusal() for need in CUDA_ONLY
            if sections[need.section] is not None and getattr(sections[need.section], need.field) == need.value]


def check_hardware(model: ModelParams | None, train: TrainParams | None = None) -> None:
    """Raise one line naming every setting this machine cannot honour."""
    if not unmet_needs(model, train, cuda=False):      # nothing needs CUDA: torch is not asked
        return
    import torch

    refusals = unmet_needs(model, train, cuda=torch.cuda.is_available())
    if refusals:
        raise HardwareError("; ".join(refusals))
