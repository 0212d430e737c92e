"""Folding PEFT's scale into B so that llama.cpp's alpha / rank reproduces it exactly."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
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
    # keys are regexes, matched as PEFT matches them (GRIT's truncation writes escaped full names)
    exact = {r"model\.layers\.0\.self_attn\.q_proj": 2, "q_proj": 4}
    assert peft_scaling({**config, "rank_pattern": exact, "alpha_pattern": exact}, MODULE) == 1.0
    assert peft_scaling({**config, "rank_pattern": {r"model\.layers\.1\.self_attn\.q_proj": 2}}, MODULE) == 2.0


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


def test_a_grit_truncated_adapter_converts_with_each_modules_rank_and_scale(tmp_path: Path):
    """GRIT truncation leaves modules of several ranks with their scaling unchanged (recorded in
    rank_pattern / alpha_pattern); llama.cpp's converter takes them, and every delta it applies
    is PEFT's s B A (the Q/K projections, whose rows the converter permutes, are left out)."""
    from peft import LoraConfig, get_peft_model

    from export.adapter import convert_adapter
    from export.gguf_edit import lora_deltas
    from trainers.base_model import load_causal_lm, resolve_base_model
    from trainers.config import ModelParams
    from trainers.grit import GritManager, GritParams

    params = ModelParams(source="tiny")
    files = resolve_base_model(params)
    torch.manual_seed(0)
    model = get_peft_model(load_causal_lm(files, params), LoraConfig(
        r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]))
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.05)
    shrunk = [f"model.layers.{i}.{m}" for i in range(2) for m in ("self_attn.v_proj", "mlp.down_proj")]
    manager = GritManager(model, GritParams(min_samples=1, truncate=True), modules=shrunk)
    ids = torch.randint(0, 1000, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    manager.sync_factors()
    manager.reproject(k=2)
    model.save_pretrained(tmp_path / "adapter")

    adapter = convert_adapter(folded_adapter(tmp_path / "adapter", tmp_path / "folded"), files.hf_dir,
                              tmp_path / "adapter.gguf")
    deltas = lora_deltas(adapter)
    gguf_names = {"self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "mlp.down_proj": "ffn_down"}
    ranks = set()
    for name, layer in model.named_modules():
        suffix = next((s for s in gguf_names if name.endswith(s)), None)
        if suffix is None or not hasattr(layer, "lora_A"):
            continue
        A, B = layer.lora_A["default"].weight.double(), layer.lora_B["default"].weight.double()
        ranks.add(A.shape[0])
        block = name.split(".layers.")[1].split(".")[0]
        expected = (layer.scaling["default"] * B @ A).detach().numpy()
        np.testing.assert_allclose(deltas[f"blk.{block}.{gguf_names[suffix]}.weight"], expected, atol=1e-6)
    assert ranks == {2, 4}
