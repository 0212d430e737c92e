"""``Section.with_overrides``: the one merge of ``grit_overrides``, ``lora_overrides`` and
``vlm.overrides`` (mappings merge key by key, anything else replaces, the result validated)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from trainers.config import LoraParams, VariantParams, variant_lora
from trainers.grit_vlm.presets import PRESETS


def test_no_overrides_is_the_section_itself():
    lora = LoraParams()
    assert lora.with_overrides({}) is lora


def test_nested_fields_merge_and_lists_replace():
    lora = LoraParams(layers={"strategy": "last_n", "n_layers": 4, "skip_last": 1})
    changed = lora.with_overrides({"r": 8, "layers": {"n_layers": 2}, "target_modules": ["q_proj"]})
    assert (changed.r, changed.alpha, changed.target_modules) == (8, lora.alpha, ["q_proj"])
    assert (changed.layers.strategy, changed.layers.n_layers, changed.layers.skip_last) == ("last_n", 2, 1)
    variant = VariantParams(engine="peft", lora_overrides={"layers": {"n_layers": 2}})
    assert variant_lora(lora, variant).layers == changed.layers


def test_a_bad_override_is_a_validation_error_and_the_preset_is_untouched():
    with pytest.raises(ValidationError):
        LoraParams().with_overrides({"r": 0})
    preset = next(iter(PRESETS.values()))
    before = preset.model_dump()
    preset.with_overrides({"vision": {"grit": {"budget_end": 16}}})
    assert preset.model_dump() == before
