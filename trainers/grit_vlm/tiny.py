"""Tiny random vision-language models built from configs, for fast tests and the smoke runs.

Base-model resolution builds one (``model.kind: vlm``, ``model.source: tiny``); it lives apart
from ``models.py`` (loading and encodings) so that resolving a base model does not load the
VLM encodings.
"""

from __future__ import annotations

import json
from pathlib import Path

from trainers.grit_vlm.config import TinyVisionParams

_IMAGE_TOKENS: dict[str, list[str]] = {
    "idefics3": ["<image>", "<fake_token_around_image>", "<global-img>", "<end_of_utterance>"],
    "qwen2_vl": ["<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>"],
    "llava": ["<image>"],
}


def build_tiny_vlm(text: dict, vision: TinyVisionParams, tokenizer_dir: Path, out_dir: Path, seed: int = 0) -> None:
    """Save a random VLM of ``vision.architecture`` (decoder shape ``text``: hidden_size, layers,
    heads, ...) with the SmolLM2 tokenizer plus the architecture's image tokens."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoTokenizer, Idefics3Config, LlavaConfig, Qwen2VLConfig

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.add_special_tokens({"additional_special_tokens": _IMAGE_TOKENS[vision.architecture]})
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in _IMAGE_TOKENS[vision.architecture]}
    text_config = {**text, "vocab_size": len(tokenizer), "max_position_embeddings": 2048,
                   "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                   "pad_token_id": tokenizer.pad_token_id}
    vit = {"hidden_size": vision.hidden_size, "intermediate_size": 2 * vision.hidden_size,
           "num_hidden_layers": vision.num_hidden_layers, "num_attention_heads": vision.num_attention_heads,
           "image_size": vision.image_size, "patch_size": vision.patch_size}
    if vision.architecture == "idefics3":
        config = Idefics3Config(vision_config=vit, text_config={"model_type": "llama", **text_config}, scale_factor=2,
                                image_token_id=ids["<image>"], pad_token_id=tokenizer.pad_token_id)
    elif vision.architecture == "llava":
        config = LlavaConfig(vision_config={"model_type": "clip_vision_model",
                                            "projection_dim": vision.hidden_size, **vit},
                             text_config={"model_type": "llama", **text_config}, image_token_id=ids["<image>"],
                             pad_token_id=tokenizer.pad_token_id)
    else:
        head_dim = text["hidden_size"] // text["num_attention_heads"]
        # mrope splits each head's rotary half-dimension into (temporal, height, width) sections
        half = head_dim // 2
        sections = [half - 2 * (half // 3), half // 3, half // 3]
        config = Qwen2VLConfig(
            vision_config={"depth": vision.num_hidden_layers, "embed_dim": vision.hidden_size,
                           "hidden_size": text["hidden_size"], "num_heads": vision.num_attention_heads, "mlp_ratio": 2,
                           "patch_size": vision.patch_size // 2, "spatial_merge_size": 2, "temporal_patch_size": 2},
            text_config={**text_config, "rope_scaling": {"type": "mrope", "mrope_section": sections}},
            image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
            vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        )
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config).to(torch.float32)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    (out_dir / "tiny_vlm.json").write_text(json.dumps(vision.model_dump(), indent=2))
