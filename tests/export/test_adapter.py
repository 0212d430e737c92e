"""Folding PEFT's scale into B so that llama.cpp's alpha / rank reproduces it exactly."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from export.adapter import AdapterExportError, fold_scale_into_B, folded_adapter, peft_scaling

MODULE = "base_model.model.model.layers.0.self_attn.q_proj"


@pytest.mark.parametrize("rank", [2, 4, 7])
def test_llama_cpp_scale_of_the_folded_B_is_the_peft_scale(rank):
    B, A = torch.randn(6, rank, dtype=torch.float64), torch.randn(rank, 5, dtype=torch.float64)
    s, gguf_alpha = 1.7, 16.0
    folded = fold_scale_into_B(B, s, gguf_alpha)
    torch.testing.assert_close((gguf_alpha / rank) * folded @ A, s * B @ A)


def test_peft_scaling_plain_rslora_and_patterns():
    config = {"r": 16, "lora_alpha": 32, "use_rslora": False, "alpha_pattern": {}, "rank_pattern": {}}
    assert peft_scaling(config, MODULE) == 2.0
    assert peft_scaling({**config, "use_rslora": True}, MODULE) == pytest.approx(32 / math.sqrt(16))
    assert peft_scaling({**config, "alpha_pattern": {"q_proj": 8}}, MODULE) == 0.5
    assert peft_scaling({**config, "rank_pattern": {"q_proj": 4}}, MODULE) == 8.0


def _adapter(folder: Path, extra: dict[str, torch.Tensor] | None = None, **config) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {f"{MODULE}.lora_A.weight": torch.randn(4, 8), f"{MODULE}.lora_B.weight": torch.randn(8, 4),
               **(extra or {})}
    save_file(tensors, folder / "adapter_model.safetensors")
    (folder / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 8, "use_rslora": True, **config}))
    return folder


def test_folded_adapter_carries_rslora_and_trained_scalings_in_B(tmp_path: Path):
    source = _adapter(tmp_path / "a")
    original = load_file(source / "adapter_model.safetensors")
    out = folded_adapter(source, tmp_path / "folded")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["use_rslora"] is False and config["lora_alpha"] == 4.0
    folded = load_file(out / "adapter_model.safetensors")
    expected = (8 / math.sqrt(4)) * original[f"{MODULE}.lora_B.weight"]   # rsLoRA scale, llama scale 4/4 = 1
    torch.testing.assert_close(folded[f"{MODULE}.lora_B.weight"], expected)
    torch.testing.assert_close(folded[f"{MODULE}.lora_A.weight"], original[f"{MODULE}.lora_A.weight"])
    # A scaling recorded at training time (e.g. kept by GRIT's truncation) wins over the config.
    trained = load_file(folded_adapter(source, tmp_path / "trained", {MODULE: 0.25}) / "adapter_model.safetensors")
    torch.testing.assert_close(trained[f"{MODULE}.lora_B.weight"], 0.25 * original[f"{MODULE}.lora_B.weight"])


def test_tensors_llama_cpp_cannot_express_are_rejected(tmp_path: Path):
    source = _adapter(tmp_path / "dora", {f"{MODULE}.lora_magnitude_vector.default": torch.ones(8)})
    with pytest.raises(AdapterExportError, match="only lora_A/lora_B"):
        folded_adapter(source, tmp_path / "out")
