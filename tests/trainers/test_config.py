"""What a variant's LoRA settings allow (``lora_capabilities``, the one rule the stages ask) and
where the default variants come from (the default profile, so adding one is a params change)."""

from __future__ import annotations

import yaml

from trainers.config import (
    DEFAULT_PROFILE,
    LoraParams,
    VariantParams,
    default_variants,
    lora_capabilities,
    variant_capabilities,
)


def test_plain_lora_is_servable_and_mergeable_on_every_engine_with_grit():
    for lora in (LoraParams(), LoraParams(r=2), LoraParams(use_rslora=True)):
        can = lora_capabilities(lora)
        assert can.servable and can.mergeable and can.grit and set(can.engines) == {"unsloth", "peft"}
        assert can.why_not_served is None and can.why_not_trained is None


def test_dora_is_not_servable_and_says_why_in_one_line():
    can = lora_capabilities(LoraParams(use_dora=True))
    assert not can.servable and not can.mergeable and not can.grit and can.engines == ("peft",)
    assert can.why_not_served.startswith("DoRA adapters cannot be served: llama.cpp's LoRA converter takes "
                                         "lora_A/lora_B tensors only") and "\n" not in can.why_not_served
    assert can.why_not_trained.startswith("DoRA (use_dora) trains on the peft engine without GRIT")


def test_a_variant_is_judged_by_its_own_lora_settings():
    dora = VariantParams(engine="peft", lora_overrides={"use_dora": True})
    assert not variant_capabilities(LoraParams(), dora).servable
    assert variant_capabilities(LoraParams(), VariantParams(engine="peft", lora_overrides={"r": 8})).servable
    # the shared section's DoRA is the variant's too, unless the variant turns it off
    assert not variant_capabilities(LoraParams(use_dora=True), VariantParams(engine="peft")).servable
    off = VariantParams(engine="peft", lora_overrides={"use_dora": False})
    assert variant_capabilities(LoraParams(use_dora=True), off).servable


def test_the_default_variants_are_the_default_profile_s():
    declared = yaml.safe_load(DEFAULT_PROFILE.read_text())["variants"]
    variants = default_variants()
    assert {name: v.model_dump() for name, v in variants.items()} == declared
    variants.pop(next(iter(variants)))              # a caller's copy: the default stays whole
    assert set(default_variants()) == set(declared)
