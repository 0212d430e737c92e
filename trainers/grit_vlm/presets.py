"""Predefined GRIT-VLM configurations, with the module names of current implementations.

Module paths were read from transformers 5.x (``Idefics3ForConditionalGeneration``,
``Qwen2VLForConditionalGeneration``, ``LlavaForConditionalGeneration``: every one nests its
parts under ``model.``) and, for Phi-3.5-vision (remote code ``modeling_phi3_v.py``), from its
``Phi3VForCausalLM``. ``tests/trainers/grit_vlm/test_presets.py`` checks each against a model
built from a config. Patterns are ``fnmatch`` globs (``*`` also matches dots); the strategy then
picks block indices (the number after ``layers.`` / ``blocks.``) within each modality.

=================  =======================================  ====================================
preset             vision / language / connector            intent
=================  =======================================  ====================================
smolvlm_fast       first 3 blocks / last 4 blocks / all     quick runs (the guides' "fast" config)
smolvlm_256m       every 2nd block / last 8 blocks / all    SmolVLM-256M quality runs
qwen2_vl           every 2nd block / last 8 blocks / merger Qwen2-VL-2B/7B
llava              last 6 read blocks / last 8 / all           LLaVA-1.5 / LLaVA-NeXT (CLIP + Llama)
phi3_5_vision      last 6 read blocks / last 8 / all           Phi-3.5-vision-instruct (remote code)
=================  =======================================  ====================================
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import ValidationError

from core.errors import UserError
from trainers.grit.layer_selection import LayerSelection
from trainers.grit_vlm.config import ModalityParams, VlmGritParams

if TYPE_CHECKING:
    from trainers.config import TrainingSections

_ATTENTION = ("q_proj", "k_proj", "v_proj")
_DECODER = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# LLaVA (vision_feature_layer -2) and Phi-3.5-vision (layer_idx -2) read the second-to-last
# vision block: the last one gets no gradient, so it is skipped.
_LAST_6_READ_BLOCKS = LayerSelection(strategy="last_n", n_layers=6, skip_last=1)


def _linear_budget(start: int, end: int) -> dict:
    """Reprojection keeps k rank-space directions, k moving linearly from start to end. A budget
    acts only through reprojection, so the preset turns it on, on a cadence set by the run's
    length (at least ``reprojections`` times, the last with training after it)."""
    return {"reprojection": True, "cadence": "budget", "budget_schedule": "linear", "budget_start": start,
            "budget_end": end}


def _under(prefix: str, names: tuple[str, ...]) -> list[str]:
    return [f"{prefix}.*.{name}" for name in names]


# --- Idefics3 / SmolVLM: SigLIP encoder, pixel-shuffle + linear connector, SmolLM2 decoder
_IDEFICS3_VISION = _under("model.vision_model.encoder.layers",
                          tuple(f"self_attn.{n}" for n in (*_ATTENTION, "out_proj")))
_IDEFICS3_LANGUAGE = _under("model.text_model.layers", tuple(f"self_attn.{n}" for n in _DECODER[:4]))
_IDEFICS3_CONNECTOR = ["model.connector.modality_projection.proj"]
# The connector sees one row per image token (64 per SmolVLM tile), far fewer than the
# decoder: it may invert its factors from fewer rows.
_CONNECTOR_GRIT = {"fisher": "diagonal", "min_samples": 16}

SMOLVLM_FAST = VlmGritParams(
    architecture="idefics3",
    description="SmolVLM fast: first 3 vision blocks, last 4 decoder blocks, the connector",
    vision=ModalityParams(patterns=_IDEFICS3_VISION, layers=LayerSelection(strategy="first_n", n_layers=3), r=8,
                          alpha=16),
    language=ModalityParams(patterns=_IDEFICS3_LANGUAGE, layers=LayerSelection(strategy="last_n", n_layers=4)),
    connector=ModalityParams(patterns=_IDEFICS3_CONNECTOR, grit=_CONNECTOR_GRIT),
    r=16, alpha=32,
)

SMOLVLM_256M = VlmGritParams(
    architecture="idefics3",
    description=("SmolVLM-256M quality: every 2nd vision block, last 8 decoder blocks (attention and MLP), "
                 "the connector"),
    vision=ModalityParams(patterns=_IDEFICS3_VISION, layers=LayerSelection(strategy="every_nth", step_size=2),
                          r=8, alpha=16, grit=_linear_budget(4, 8)),
    language=ModalityParams(
        patterns=_under("model.text_model.layers", tuple(f"self_attn.{n}" for n in _DECODER[:4])
                        + tuple(f"mlp.{n}" for n in _DECODER[4:])),
        layers=LayerSelection(strategy="last_n", n_layers=8),
        grit=_linear_budget(8, 16)),
    connector=ModalityParams(patterns=_IDEFICS3_CONNECTOR, grit=_CONNECTOR_GRIT),
    r=16, alpha=32, max_layers_per_modality=20,
)

# --- Qwen2-VL: ViT with fused qkv in ``blocks``, PatchMerger MLP as the connector
QWEN2_VL = VlmGritParams(
    architecture="qwen2_vl",
    description="Qwen2-VL: every 2nd vision block (fused qkv, proj), last 8 decoder blocks, the patch merger",
    vision=ModalityParams(patterns=_under("model.visual.blocks", ("attn.qkv", "attn.proj")),
                          layers=LayerSelection(strategy="every_nth", step_size=2), r=8, alpha=16),
    language=ModalityParams(patterns=_under("model.language_model.layers",
                                            tuple(f"self_attn.{n}" for n in _DECODER[:4])),
                            layers=LayerSelection(strategy="last_n", n_layers=8)),
    connector=ModalityParams(patterns=["model.visual.merger.mlp.0", "model.visual.merger.mlp.2"],
                             grit=_CONNECTOR_GRIT),
    r=16, alpha=32, max_layers_per_modality=20,
)

# --- LLaVA: CLIP vision tower (transformers 5 flattens CLIPVisionModel: no ``vision_model.``),
# two-layer MLP projector, Llama/Mistral/Vicuna decoder
LLAVA = VlmGritParams(
    architecture="llava",
    description="LLaVA: last 6 CLIP blocks, last 8 decoder blocks, the multi-modal projector",
    vision=ModalityParams(patterns=_under("model.vision_tower.*encoder.layers",
                                          tuple(f"self_attn.{n}" for n in (*_ATTENTION, "out_proj"))),
                          layers=_LAST_6_READ_BLOCKS, r=8, alpha=16),
    language=ModalityParams(patterns=_under("model.language_model.layers",
                                            tuple(f"self_attn.{n}" for n in _DECODER[:4])),
                            layers=LayerSelection(strategy="last_n", n_layers=8)),
    connector=ModalityParams(patterns=["model.multi_modal_projector.linear_1", "model.multi_modal_projector.linear_2"],
                             grit=_CONNECTOR_GRIT),
    r=16, alpha=32, max_layers_per_modality=20,
)

# --- Phi-3.5-vision (trust_remote_code): CLIP ViT-L/14-336 under vision_embed_tokens.img_processor
# (with or without ``vision_model.``, depending on the transformers version), img_projection
# Sequential(Linear, GELU, Linear), Phi-3 decoder with fused qkv_proj / gate_up_proj.
PHI3_5_VISION = VlmGritParams(
    architecture="phi3_v",
    description="Phi-3.5-vision: last 6 CLIP blocks, last 8 decoder blocks (fused qkv, o), the image projection",
    vision=ModalityParams(
        patterns=_under("model.vision_embed_tokens.img_processor.*encoder.layers",
                        tuple(f"self_attn.{n}" for n in (*_ATTENTION, "out_proj"))),
        layers=_LAST_6_READ_BLOCKS, r=8, alpha=16),
    language=ModalityParams(patterns=_under("model.layers", ("self_attn.qkv_proj", "self_attn.o_proj")),
                            layers=LayerSelection(strategy="last_n", n_layers=8)),
    connector=ModalityParams(patterns=["model.vision_embed_tokens.img_projection.0",
                                       "model.vision_embed_tokens.img_projection.2"],
                             grit=_CONNECTOR_GRIT),
    r=16, alpha=32, max_layers_per_modality=20,
)

PRESETS: dict[str, VlmGritParams] = {
    "smolvlm_fast": SMOLVLM_FAST,
    "smolvlm_256m": SMOLVLM_256M,
    "qwen2_vl": QWEN2_VL,
    "llava": LLAVA,
    "phi3_5_vision": PHI3_5_VISION,
}


def preset(name: str) -> VlmGritParams:
    if name not in PRESETS:
        raise UserError(f"no GRIT-VLM preset named {name!r}; presets: {', '.join(PRESETS)}")
    return PRESETS[name]


def vlm_config(params: TrainingSections) -> VlmGritParams:
    """The GRIT-VLM configuration ``params.vlm`` names: its ``custom`` one, or its preset with
    ``overrides`` applied, checked against the tiny VLM ``params.model`` builds. Raises
    :class:`UserError` with one line naming the key. The params schema checks only the section's
    shape, so the VLM stages call this first (a text stage never loads these tables)."""
    vlm = params.vlm
    if vlm.custom is not None:
        config = vlm.custom
    else:
        if vlm.preset not in PRESETS:
            raise UserError(f"vlm.preset: no preset named {vlm.preset!r}; presets: {', '.join(PRESETS)}")
        try:
            config = PRESETS[vlm.preset].with_overrides(vlm.overrides)
        except ValidationError as error:
            first = error.errors()[0]
            where = ".".join(str(part) for part in first["loc"])
            raise UserError(f"vlm.overrides.{where}: {first['msg'].removeprefix('Value error, ')}") from None
    model = params.model
    if model.kind == "vlm" and model.source == "tiny" and config.architecture != model.vision.architecture:
        raise UserError(f"vlm: the GRIT-VLM configuration is written for {config.architecture} but "
                        f"model.vision.architecture is {model.vision.architecture}")
    return config
