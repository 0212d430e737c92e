"""Export and evaluate measure on the device the model trains on (``pipelines.placement``): fp32
on a CPU host, as the committed figures were measured; on a CUDA host, the unquantised base in
the profile's dtype, every tensor on the GPU. Without a GPU here, the move itself is checked on
torch's ``meta`` device, which stands in for a device other than the host's memory."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from pipelines.placement import CUDA_DEVICE, load_measured_base, measurement_placement
from trainers.base_model import resolve_base_model
from trainers.config import ModelParams

PROFILES = [ModelParams(), ModelParams(dtype="bfloat16", load_in_4bit=True), ModelParams(dtype="float16")]


@pytest.mark.parametrize("model", PROFILES, ids=["default", "nf4-bf16", "fp16"])
def test_a_cpu_host_measures_the_unquantised_base_in_fp32(model):
    placement = measurement_placement(model, cuda=False)
    assert placement.device == "cpu"
    assert (placement.model.dtype, placement.model.load_in_4bit) == ("float32", False)
    precision = {"dtype", "load_in_4bit"}
    assert placement.model.model_dump(exclude=precision) == model.model_dump(exclude=precision)


@pytest.mark.parametrize("model", PROFILES, ids=["default", "nf4-bf16", "fp16"])
def test_a_cuda_host_measures_on_the_gpu_in_the_profiles_dtype_never_in_nf4(model):
    placement = measurement_placement(model, cuda=True)
    assert placement.device == CUDA_DEVICE
    assert (placement.model.dtype, placement.model.load_in_4bit) == (model.dtype, False)
    assert placement.describe() == f"{CUDA_DEVICE} in {model.dtype}"


def test_the_measured_base_is_loaded_in_its_precision_and_moved_whole_to_its_device():
    model = ModelParams(source="tiny", dtype="bfloat16")
    files = resolve_base_model(model)
    on_cpu = load_measured_base(files, measurement_placement(model, cuda=False))
    tensors = [*on_cpu.parameters(), *on_cpu.buffers()]
    assert {t.device.type for t in tensors} == {"cpu"}
    assert {p.dtype for p in on_cpu.parameters()} == {torch.float32}

    # As on a CUDA host, with the meta device in the GPU's place: parameters and buffers (the
    # rotary frequencies) all move, in the profile's dtype.
    elsewhere = dataclasses.replace(measurement_placement(model, cuda=True), device="meta")
    moved = load_measured_base(files, elsewhere)
    assert {t.device.type for t in [*moved.parameters(), *moved.buffers()]} == {"meta"}
    assert {p.dtype for p in moved.parameters()} == {torch.bfloat16}
    assert moved.device.type == "meta"          # what evaluation.measure and export.parity batch onto
