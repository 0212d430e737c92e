"""Tiny random VLMs built from configs (through the pipeline's own cache), and params for them."""

from __future__ import annotations

from functools import cache

from pipelines.params import Params, parse_params
from trainers.base_model import BaseModelFiles, resolve_base_model
from trainers.grit_vlm.models import load_vlm

TEXT = {"num_hidden_layers": 4, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
        "num_key_value_heads": 2, "seed": 0}
PRESET_FOR = {"idefics3": "smolvlm_fast", "qwen2_vl": "qwen2_vl", "llava": "llava"}


def vlm_params(architecture: str, preset: str | None = None, **sections) -> Params:
    """Params of a tiny ``architecture`` VLM run (sections override, e.g. train={...})."""
    raw = {
        "model": {"kind": "vlm", "source": "tiny", "tiny": TEXT, "vision": {"architecture": architecture}},
        "vlm": {"preset": preset or PRESET_FOR[architecture], "data": {"n_train": 24}},
        "train": {"max_steps": 6, "per_device_batch_size": 4, "learning_rate": 2e-3, "warmup_steps": 0},
        "probe": {"steps": 3},
    }
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value}
    return parse_params(raw)


@cache
def tiny_vlm_files(architecture: str) -> BaseModelFiles:
    return resolve_base_model(vlm_params(architecture).model)


def tiny_vlm(architecture: str):
    """A fresh random model (weights from the cached build, so every call is identical)."""
    return load_vlm(tiny_vlm_files(architecture).hf_dir)
