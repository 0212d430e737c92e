"""``lora.adapter_dtype: model``: a bf16 model's adapters stay bf16 (no fp32 copy of every LoRA
input), while GRIT's statistics, inverses and preconditioning stay fp32."""

from __future__ import annotations

import torch

from pipelines.params import parse_params
from trainers.base_model import resolve_base_model
from trainers.engines import build_peft
from trainers.grit import GritManager, GritParams
from trainers.probe.arms import module_gradients


def bf16_step(adapter_dtype: str):
    params = parse_params({"model": {"source": "tiny", "dtype": "bfloat16"}, "lora": {"r": 4, "alpha": 8,
                                                                                      "adapter_dtype": adapter_dtype}})
    torch.manual_seed(0)
    model = build_peft(resolve_base_model(params.model), params).model
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=torch.Generator().manual_seed(1)) * 0.02)
    manager = GritManager(model, GritParams(min_samples=1, update_freq=1, graft_norm=False))
    ids = torch.randint(0, 90, (2, 16), generator=torch.Generator().manual_seed(2))
    model(input_ids=ids, labels=ids).loss.backward()
    manager.precondition_step()
    lora_dtypes = {p.dtype for n, p in model.named_parameters() if "lora_" in n}
    statistics = {t.dtype for s in manager.modules.values()
                  for t in (s.u.total, s.v.total, *(i for i in s.inverse.values() if i is not None))}
    return lora_dtypes, statistics, module_gradients(model), manager


def test_bf16_adapters_keep_fp32_statistics_and_precondition_as_fp32_adapters_do():
    dtypes, statistics, gradients, manager = bf16_step("model")
    assert dtypes == {torch.bfloat16} and statistics == {torch.float32}
    assert manager.all_ready() and manager.report["preconditioned_tensors"] == 2 * len(manager.modules)
    reference_dtypes, _, reference, _ = bf16_step("float32")
    assert reference_dtypes == {torch.float32}               # PEFT's default casts adapters up
    for name, wanted in reference.items():
        assert torch.isfinite(gradients[name]).all()
        assert torch.nn.functional.cosine_similarity(gradients[name], wanted, dim=0) > 0.98, name
