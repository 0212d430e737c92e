"""Which linear layers of a VLM each modality adapts, and what there is to choose from.

``select_modality_modules`` applies every modality's patterns and strategy separately (block
indices count within the modality: vision block 0 is not decoder block 0). A modality whose
patterns match nothing is an error that lists the model's candidate linear layers, collapsed
to patterns with counts (``model.text_model.layers.*.self_attn.q_proj  x30``), so the fix can be
copied from the message. A layer claimed by two modalities is an error too.

Run ``python -m trainers.grit_vlm.layers <model dir | tiny:idefics3 | tiny:qwen2_vl | tiny:llava>
[--preset NAME]`` to print the candidates, and what a preset selects per modality.
"""

from __future__ import annotations

import argparse
import re
import tempfile
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

from trainers.base_model import embedded_tokenizer_dir
from trainers.grit.layer_selection import LayerSelectionError, candidate_linear_layers, select_target_modules
from trainers.grit_vlm.config import Modality, TinyVisionParams, VlmGritParams, modality_selection
from trainers.grit_vlm.models import load_vlm
from trainers.grit_vlm.presets import PRESETS, preset
from trainers.grit_vlm.tiny import build_tiny_vlm

if TYPE_CHECKING:
    from torch import nn

_NUMBERED = re.compile(r"(?<=\.)\d+(?=\.)")


def collapse_name(name: str) -> str:
    """``a.layers.3.q_proj`` -> ``a.layers.*.q_proj`` (block numbers become wildcards)."""
    return _NUMBERED.sub("*", name)


def linear_layer_patterns(model: nn.Module) -> list[tuple[str, int]]:
    """Every distinct collapsed linear-layer name with how many layers it stands for, in model order."""
    return list(Counter(collapse_name(name) for name in candidate_linear_layers(model)).items())


def describe_candidates(model: nn.Module) -> str:
    return "; ".join(f"{pattern} x{count}" for pattern, count in linear_layer_patterns(model))


def select_modality_modules(model: nn.Module, config: VlmGritParams) -> dict[Modality, list[str]]:
    """modality -> the full names (in the base model) of the linear layers it adapts."""
    chosen: dict[Modality, list[str]] = {}
    for name, modality in config.modalities().items():
        try:
            chosen[name] = select_target_modules(model, modality.patterns, modality_selection(config, modality))
        except LayerSelectionError as error:
            raise LayerSelectionError(
                f"GRIT-VLM {name}: {error}. GRIT would be applied to 0 layers of the {name} modality; "
                f"the model's linear layers are: {describe_candidates(model)}"
            ) from None
    owners: dict[str, Modality] = {}
    for name, modules in chosen.items():
        for module in modules:
            if module in owners:
                raise LayerSelectionError(f"GRIT-VLM: {module} is selected by both {owners[module]} and {name}; "
                                          "make the modality patterns disjoint")
            owners[module] = name
    return chosen


def load_for_inspection(spec: str):
    """A model to list layers of: ``tiny:<architecture>`` (built in memory) or an HF directory."""
    if spec.startswith("tiny:"):
        architecture = spec.split(":", 1)[1]
        text = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
                "num_key_value_heads": 2}
        with tempfile.TemporaryDirectory() as scratch:
            build_tiny_vlm(text, TinyVisionParams(architecture=architecture), embedded_tokenizer_dir(), Path(scratch))
            return load_vlm(Path(scratch))
    return load_vlm(Path(spec))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="List a VLM's candidate linear layers and a preset's selection")
    parser.add_argument("model", help="an HF model directory, or tiny:<architecture> for a random tiny VLM")
    parser.add_argument("--preset", choices=sorted(PRESETS), help="also show what this preset selects")
    args = parser.parse_args(argv)
    model = load_for_inspection(args.model)
    for pattern, count in linear_layer_patterns(model):
        print(f"{pattern}  x{count}")
    if args.preset:
        for modality, modules in select_modality_modules(model, preset(args.preset)).items():
            print(f"\n[{args.preset}] {modality}: {len(modules)} layers")
            for module in modules:
                print(f"  {module}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
