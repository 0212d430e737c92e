"""A trained PEFT adapter -> a GGUF LoRA that llama.cpp (and Ollama) apply with the same scale.

llama.cpp scales every LoRA tensor pair by ``alpha / rank`` with one global alpha and the rank
read from the tensor's shape; PEFT scales each module by its own ``s`` (alpha / r, alpha / sqrt(r)
with rsLoRA, per-module alpha, and the unchanged s of a rank GRIT truncated). So the whole
difference is folded into B before conversion::

    B' = B * s / (alpha_gguf / rank)        (then llama.cpp's scale gives s B A exactly)

and the converter (llama.cpp's own, from the pinned sdist) sees a plain adapter.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from core.errors import UserError
from export.llama_cpp import converter

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


class AdapterExportError(UserError):
    pass


def peft_scaling(config: dict, module: str) -> float:
    """PEFT's scale of ``module`` from its adapter_config (alpha_pattern / rank_pattern honoured).

    The patterns are matched as PEFT matches them when it loads the adapter: keys are regexes
    for the end of the module's name in the base model (GRIT's truncation writes escaped full
    names), and the first key that matches wins."""
    from peft.utils.other import get_pattern_key

    name = module.removeprefix("base_model.model.")

    def pattern(key: str, default):
        patterns = config.get(key) or {}
        return patterns.get(get_pattern_key(patterns.keys(), name), default)

    r = pattern("rank_pattern", config["r"])
    alpha = pattern("alpha_pattern", config["lora_alpha"])
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def fold_scale_into_B(B: torch.Tensor, scaling: float, gguf_alpha: float) -> torch.Tensor:
    """``B * s / (gguf_alpha / rank)`` with rank = B.shape[1] (module docstring)."""
    return B * (scaling * B.shape[1] / gguf_alpha)


def module_of(tensor_name: str) -> str:
    """``base_model.model.model.layers.0.self_attn.q_proj`` from a lora_A/lora_B tensor name."""
    return tensor_name.split(".lora_")[0]


def folded_adapter(adapter_dir: Path, out_dir: Path, scalings: dict[str, float] | None = None,
                   scale_factor: float = 1.0) -> Path:
    """Write a copy of the PEFT adapter whose B tensors carry PEFT's scaling for llama.cpp.

    ``scalings`` (module -> s, as trained; e.g. from grit_metadata.json) wins over the config;
    ``scale_factor`` exists for the parity tests' deliberately wrong export only."""
    config = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
    tensors = load_file(adapter_dir / ADAPTER_WEIGHTS)
    unexpected = [name for name in tensors if ".lora_A." not in name and ".lora_B." not in name]
    if unexpected:
        raise AdapterExportError(f"{adapter_dir}: llama.cpp adapters hold only lora_A/lora_B tensors, "
                                 f"found {unexpected[0]} (modules_to_save or DoRA?)")
    gguf_alpha = float(config["r"])
    folded = {}
    for name, tensor in tensors.items():
        if ".lora_B." in name:
            module = module_of(name)
            trained = (scalings or {}).get(module)   # GRIT metadata keys are these PEFT module names
            scaling = trained if trained is not None else peft_scaling(config, module)
            tensor = fold_scale_into_B(tensor.float(), scaling * scale_factor, gguf_alpha)
        folded[name] = tensor.float().contiguous()
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(folded, out_dir / ADAPTER_WEIGHTS)
    plain = {**config, "lora_alpha": gguf_alpha, "use_rslora": False, "alpha_pattern": {}, "rank_pattern": {},
             "use_dora": False}
    (out_dir / ADAPTER_CONFIG).write_text(json.dumps(plain, indent=2))
    return out_dir


def convert_adapter(folded_dir: Path, base_hf_dir: Path, out_file: Path) -> Path:
    """llama.cpp's convert_lora_to_gguf.py (f32: the adapter is small and exactness matters)."""
    out_file.parent.mkdir(parents=True, exist_ok=True)
    partial = out_file.with_name(f".{out_file.name}.partial")
    result = converter("lora").run(folded_dir, "--base", base_hf_dir, "--outfile", partial, "--outtype", "f32",
                                   check=False)
    if result.returncode != 0 or not partial.is_file():
        tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
        raise AdapterExportError(f"convert_lora_to_gguf.py failed on {folded_dir}: {tail[0]}")
    partial.replace(out_file)
    return out_file
