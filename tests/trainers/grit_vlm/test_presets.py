"""Which layers each predefined GRIT-VLM configuration selects, per modality, on tiny models
built from the current transformers configs (Idefics3, Qwen2-VL, LLaVA) and on the module tree
of Phi-3.5-vision's remote code."""

from __future__ import annotations

import pytest
from tiny_vlm import tiny_vlm
from torch import nn

from trainers.grit.layer_selection import LayerSelection, LayerSelectionError
from trainers.grit_vlm.config import ModalityParams, VlmGritParams
from trainers.grit_vlm.layers import collapse_name, linear_layer_patterns, select_modality_modules
from trainers.grit_vlm.presets import PRESETS, preset


def _names(prefix: str, blocks, leaves) -> list[str]:
    return [f"{prefix}.{b}.{leaf}" for b in blocks for leaf in leaves]


VIT_ATTENTION = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj"]
DECODER_ATTENTION = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"]


def test_smolvlm_fast_on_idefics3_first_3_vision_last_4_decoder_and_the_connector():
    chosen = select_modality_modules(tiny_vlm("idefics3"), preset("smolvlm_fast"))
    assert sorted(chosen["vision"]) == sorted(_names("model.vision_model.encoder.layers", range(3), VIT_ATTENTION))
    assert sorted(chosen["language"]) == sorted(_names("model.text_model.layers", range(4), DECODER_ATTENTION))
    assert chosen["connector"] == ["model.connector.modality_projection.proj"]


def test_smolvlm_256m_takes_every_second_vision_block_and_the_decoder_mlp():
    chosen = select_modality_modules(tiny_vlm("idefics3"), preset("smolvlm_256m"))
    assert sorted(chosen["vision"]) == sorted(_names("model.vision_model.encoder.layers", [0, 2], VIT_ATTENTION))
    mlp = ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    assert sorted(chosen["language"]) == sorted(_names("model.text_model.layers", range(4), DECODER_ATTENTION + mlp))
    assert chosen["connector"] == ["model.connector.modality_projection.proj"]


def test_qwen2_vl_fused_qkv_blocks_decoder_and_patch_merger():
    chosen = select_modality_modules(tiny_vlm("qwen2_vl"), preset("qwen2_vl"))
    assert sorted(chosen["vision"]) == sorted(_names("model.visual.blocks", [0, 2], ["attn.qkv", "attn.proj"]))
    assert sorted(chosen["language"]) == sorted(_names("model.language_model.layers", range(4), DECODER_ATTENTION))
    assert chosen["connector"] == ["model.visual.merger.mlp.0", "model.visual.merger.mlp.2"]


def test_llava_skips_the_vision_block_whose_output_is_discarded():
    # vision_feature_layer -2: the last of the 3 CLIP blocks never reaches the decoder.
    chosen = select_modality_modules(tiny_vlm("llava"), preset("llava"))
    assert sorted(chosen["vision"]) == sorted(_names("model.vision_tower.encoder.layers", [0, 1], VIT_ATTENTION))
    assert sorted(chosen["language"]) == sorted(_names("model.language_model.layers", range(4), DECODER_ATTENTION))
    assert chosen["connector"] == ["model.multi_modal_projector.linear_1", "model.multi_modal_projector.linear_2"]


def _phi3_v_tree(vision_blocks: int, decoder_blocks: int, with_vision_model: bool) -> nn.Module:
    """Phi3VForCausalLM's linear layers at their module paths (modeling_phi3_v.py: CLIP under
    vision_embed_tokens.img_processor, img_projection = Sequential(Linear, GELU, Linear), Phi-3
    decoder with fused qkv_proj / gate_up_proj). The remote code cannot be fetched offline."""
    def block(names):
        module = nn.Module()
        for dotted in names:
            parent = module
            *path, leaf = dotted.split(".")
            for part in path:
                if not hasattr(parent, part):
                    parent.add_module(part, nn.Module())
                parent = getattr(parent, part)
            parent.add_module(leaf, nn.Linear(2, 2))
        return module

    clip = nn.Module()
    clip.add_module("encoder", nn.Module())
    clip.encoder.add_module("layers", nn.ModuleList(
        [block([*VIT_ATTENTION, "mlp.fc1", "mlp.fc2"]) for _ in range(vision_blocks)]))
    processor = nn.Module()
    if with_vision_model:
        processor.add_module("vision_model", clip)
    else:
        processor = clip
    embed = nn.Module()
    embed.add_module("img_processor", processor)
    embed.add_module("img_projection", nn.Sequential(nn.Linear(2, 2), nn.GELU(), nn.Linear(2, 2)))
    inner = nn.Module()
    inner.add_module("vision_embed_tokens", embed)
    inner.add_module("layers", nn.ModuleList([block(["self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj",
                                                     "mlp.down_proj"]) for _ in range(decoder_blocks)]))
    root = nn.Module()
    root.add_module("model", inner)
    root.add_module("lm_head", nn.Linear(2, 2))
    return root


@pytest.mark.parametrize("with_vision_model", [True, False])
def test_phi3_5_vision_last_read_vision_blocks_fused_decoder_and_projection(with_vision_model):
    tree = _phi3_v_tree(vision_blocks=24, decoder_blocks=32, with_vision_model=with_vision_model)
    chosen = select_modality_modules(tree, preset("phi3_5_vision"))
    clip = "model.vision_embed_tokens.img_processor" + (".vision_model" if with_vision_model else "")
    # layer_idx -2: block 23 is computed and discarded, so the last six *read* blocks are 17..22.
    assert sorted(chosen["vision"]) == sorted(_names(f"{clip}.encoder.layers", range(17, 23), VIT_ATTENTION))
    assert sorted(chosen["language"]) == sorted(
        _names("model.layers", range(24, 32), ["self_attn.qkv_proj", "self_attn.o_proj"]))
    assert chosen["connector"] == ["model.vision_embed_tokens.img_projection.0",
                                   "model.vision_embed_tokens.img_projection.2"]


def test_patterns_matching_nothing_are_an_error_that_lists_the_candidates():
    model = tiny_vlm("qwen2_vl")
    with pytest.raises(LayerSelectionError) as raised:
        select_modality_modules(model, preset("smolvlm_fast"))   # Idefics3 names on a Qwen2-VL
    message = str(raised.value)
    assert "0 layers of the vision modality" in message
    assert ("model.visual.blocks.*.attn.qkv x3" in message
            and "model.language_model.layers.*.mlp.down_proj x4" in message)


def test_a_layer_claimed_by_two_modalities_is_an_error():
    both = ModalityParams(patterns=["model.connector.modality_projection.proj"])
    config = VlmGritParams(architecture="idefics3", language=both, connector=both)
    with pytest.raises(LayerSelectionError, match="selected by both language and connector"):
        select_modality_modules(tiny_vlm("idefics3"), config)


def test_max_layers_per_modality_caps_blocks_but_not_an_unnumbered_connector():
    config = PRESETS["smolvlm_256m"].model_copy(update={"max_layers_per_modality": 1})
    chosen = select_modality_modules(tiny_vlm("idefics3"), config)
    assert {n.split(".layers.")[1].split(".")[0] for n in chosen["vision"]} == {"0"}
    assert {n.split(".layers.")[1].split(".")[0] for n in chosen["language"]} == {"3"}   # last_n keeps the last
    assert chosen["connector"] == ["model.connector.modality_projection.proj"]


def test_candidate_listing_collapses_block_numbers():
    assert collapse_name("model.visual.blocks.12.attn.qkv") == "model.visual.blocks.*.attn.qkv"
    assert collapse_name("model.visual.merger.mlp.0") == "model.visual.merger.mlp.0"
    patterns = dict(linear_layer_patterns(tiny_vlm("idefics3")))
    assert patterns["model.vision_model.encoder.layers.*.self_attn.q_proj"] == 3
    assert patterns["model.connector.modality_projection.proj"] == 1


def test_skip_last_drops_blocks_before_the_strategy():
    from trainers.grit.layer_selection import select_blocks

    assert select_blocks(range(6), LayerSelection(strategy="last_n", n_layers=2, skip_last=1)) == [3, 4]
    assert select_blocks(range(6), LayerSelection(skip_last=2)) == [0, 1, 2, 3]
