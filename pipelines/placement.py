"""Where the export and evaluate stages put the model they measure, and in what precision.

Both stages measure the trained adapter on the base model through transformers: export's parity
reference (the logits the served files must reproduce), evaluate's hidden states, fact pairs,
decline probabilities and sampled replies. On a host without CUDA they load the base in fp32,
as every committed figure of the default run was measured. On a CUDA host (the device the model
trained on) they load it on the GPU in the profile's dtype: an 8B base in fp32 on the host is
32 GB of RAM and hours of CPU per model. Never in NF4, even where the profile trains in it: the
served GGUF files are written from the unquantised weights, so export's parity compares like
with like, and NF4 would add its own quantisation error to every figure. The measurements
upcast to fp32 where it matters (``evaluation.measure`` and ``export.parity`` take logits and
hidden states to float before any statistic).
"""

from __future__ import annotations

from dataclasses import dataclass

from trainers.config import ModelParams

CUDA_DEVICE = "cuda:0"      # one GPU: the device the trainers use


@dataclass(frozen=True)
class Placement:
    """``device``: where every tensor of the measured model lives; ``model``: how its base is loaded."""

    device: str
    model: ModelParams

    def describe(self) -> str:
        return f"{self.device} in {self.model.dtype}"


def measurement_placement(model: ModelParams, cuda: bool) -> Placement:
    """On the GPU in the profile's dtype when there is one (``cuda``), else fp32 on the CPU; unquantised either way."""
    dtype = model.dtype if cuda else "float32"
    return Placement(CUDA_DEVICE if cuda else "cpu", model.model_copy(update={"dtype": dtype, "load_in_4bit": False}))


def host_placement(model: ModelParams) -> Placement:
    """:func:`measurement_placement` for this host."""
    import torch

    return measurement_placement(model, torch.cuda.is_available())


def load_measured_base(files, placement: Placement):
    """The base model loaded as ``placement`` says and moved whole, parameters and buffers, to its
    device (``files``: ``trainers.base_model.BaseModelFiles``)."""
    from trainers.base_model import load_causal_lm

    return load_causal_lm(files, placement.model).to(placement.device)
