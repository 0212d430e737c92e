"""``lora.adapter_dtype: model``: a bf16 model's adapters stay bf16 (no fp32 copy of every LoRA
input), while GRIT's statistics, inverses and preconditioning stay fp32."""

from __future__ import annotations

import json

import pytest
import torch

from pipelines.params import parse_params
from trainers.base_model import resolve_base_model
from trainers.engines import build_peft
from trainers.grit import GritManager, GritParams
from trainers.probe.arms import module_gradients


def bf16_step(adapter_dtype: str, capture: str = "hooks"):
    params = parse_params({"model": {"source": "tiny", "dtype": "bfloat16"}, "lora": {"r": 4, "alpha": 8,
                                                                                      "adapter_dtype": adapter_dtype}})
    torch.manual_seed(0)
    model = build_peft(resolve_base_model(params.model), params).model
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=torch.Generator().manual_seed(1)) * 0.02)
    manager = GritManager(model, GritParams(min_samples=1, update_freq=1, graft_norm=False, capture=capture))
    ids = torch.randint(0, 90, (2, 16), generator=torch.Generator().manual_seed(2))
    model(input_ids=ids, labels=ids).loss.backward()
    manager.before_step(None)
    lora_dtypes = {p.dtype for n, p in model.named_parameters() if "lora_" in n}
    statistics = {t.dtype for s in manager.modules.values()
                  for t in (s.u.total, s.v.total, *(i for i in s.inverse.values() if i is not None))}
    return lora_dtypes, statistics, module_gradients(model), manager


@pytest.mark.parametrize("capture", ["hooks", "fused"])
def test_bf16_adapters_keep_fp32_statistics_and_precondition_as_fp32_adapters_do(capture):
    """On both capture paths: PEFT's forward with hooks, and GRIT's fused functions (the hybrid's),
    which compute the LoRA path in the input's dtype whatever the adapters' dtype."""
    dtypes, statistics, gradients, manager = bf16_step("model", capture)
    assert dtypes == {torch.bfloat16} and statistics == {torch.float32}
    assert manager.all_ready() and manager.report["preconditioned_tensors"] == 2 * len(manager.modules)
    reference_dtypes, _, reference, _ = bf16_step("float32")
    assert reference_dtypes == {torch.float32}               # PEFT's default casts adapters up
    for name, wanted in reference.items():
        assert torch.isfinite(gradients[name]).all()
        assert torch.nn.functional.cosine_similarity(gradients[name], wanted, dim=0) > 0.98, name


UNSLOTH_DTYPES = """
import json, sys
from pipelines.params import parse_params
from trainers.base_model import resolve_base_model
from trainers.config import VariantParams
from trainers.engines import build_unsloth

params = parse_params({"model": {"source": "tiny", "dtype": "bfloat16"},
                       "lora": {"r": 4, "alpha": 8, "adapter_dtype": sys.argv[1]}})
model = build_unsloth(resolve_base_model(params.model), params, VariantParams(engine="unsloth", grit=True)).model
print("DTYPES " + json.dumps(sorted({str(p.dtype) for n, p in model.named_parameters() if "lora_" in n})))
"""


@pytest.mark.parametrize("adapter_dtype, expected", [("model", ["torch.bfloat16"]), ("float32", ["torch.float32"])])
def test_the_unsloth_engine_keeps_the_adapter_dtype_it_is_given(adapter_dtype, expected):
    """Unsloth keeps LoRA weights fp32 in a bf16 model; ``adapter_dtype: model`` now means the
    model's dtype on this engine too (its own process: importing Unsloth patches transformers)."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", UNSLOTH_DTYPES, adapter_dtype], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.split("DTYPES ", 1)[1]) == expected
