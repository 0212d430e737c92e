"""Image-text pairs and how they become model inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_vlm import tiny_vlm, tiny_vlm_files

from core.errors import UserError
from pipelines.params import ParamsError, parse_params
from trainers.grit_vlm.data import COLOURS, SHAPES, read_pairs, synthetic_pairs, write_pairs
from trainers.grit_vlm.models import encoding_for, qwen2_vl_patches
from trainers.grit_vlm.presets import preset, vlm_config


def test_synthetic_pairs_cover_every_colour_and_shape_and_show_them():
    pairs = synthetic_pairs(len(COLOURS) * len(SHAPES), seed=3)
    assert {p.caption for p in pairs} == {f"a {c} {s}" for c in COLOURS for s in SHAPES}
    for pair in pairs:
        colour = COLOURS[pair.caption.split()[1]]
        assert (pair.image == colour).all(axis=-1).sum() > 20    # the shape is drawn in its colour
    assert synthetic_pairs(4, seed=3)[0].image.tobytes() == pairs[0].image.tobytes()   # seeded


def test_pairs_round_trip_through_png_and_jsonl(tmp_path):
    pairs = synthetic_pairs(5, seed=0)
    write_pairs(pairs, tmp_path / "train_pairs.jsonl")
    again = read_pairs(tmp_path / "train_pairs.jsonl")
    assert [p.caption for p in again] == [p.caption for p in pairs]
    assert all(np.array_equal(a.image, b.image) for a, b in zip(again, pairs, strict=True))
    (tmp_path / "train_pairs_images" / "00002.png").unlink()
    with pytest.raises(UserError, match=r"train_pairs.jsonl:3: image .* does not exist"):
        read_pairs(tmp_path / "train_pairs.jsonl")


def test_qwen2_vl_patches_keep_each_merge_window_contiguous():
    # pixel value = its row * 100 + column: each patch row must hold one patch's pixels, and
    # rows 0..3 the top-left 2x2 window of patches (what the merger concatenates).
    height = width = 8
    grid = torch.arange(height)[:, None] * 100 + torch.arange(width)[None, :]
    pixels = grid[None].expand(3, -1, -1).float()
    patches, thw = qwen2_vl_patches(pixels, patch=2, temporal=2, merge=2)
    assert thw == [1, 4, 4] and patches.shape == (16, 3 * 2 * 2 * 2)
    first_pixel = patches[:, 0].tolist()   # channel 0, frame 0, top-left pixel of each patch
    assert first_pixel[:4] == [0, 2, 200, 202]          # window (0,0): patches (0,0) (0,1) (1,0) (1,1)
    assert first_pixel[4:8] == [4, 6, 204, 206]         # window (0,1)


@pytest.mark.parametrize("architecture", ["idefics3", "qwen2_vl", "llava"])
def test_tiny_encodings_put_one_image_token_per_image_feature_and_mask_all_but_the_caption(architecture):
    model = tiny_vlm(architecture)
    encoding = encoding_for(tiny_vlm_files(architecture).hf_dir, model)
    pairs = synthetic_pairs(2, seed=0)
    batch = encoding(pairs)
    caption_tokens = [len(encoding.tokenizer(p.caption, add_special_tokens=False)["input_ids"]) + 1 for p in pairs]
    assert ((batch["labels"] != -100).sum(dim=1)).tolist() == caption_tokens
    image_token = model.config.image_token_id
    with torch.no_grad():
        features = model.model.get_image_features(**{k: v for k, v in batch.items()
                                                     if k in ("pixel_values", "image_grid_thw")})
    features = features.pooler_output if hasattr(features, "pooler_output") else features
    rows = sum(f.shape[-2] if f.dim() > 1 else 1 for f in features) if isinstance(features, (list, tuple)) \
        else features.reshape(-1, features.shape[-1]).shape[0]
    assert int((batch["input_ids"] == image_token).sum()) == rows
    assert model(**batch).loss.isfinite()


def test_vlm_params_are_checked_at_the_edge():
    with pytest.raises(ParamsError, match="kind 'vlm' needs source 'tiny' or 'hf'"):
        parse_params({"model": {"kind": "vlm"}})
    with pytest.raises(ParamsError, match="path is needed with source 'jsonl'"):
        parse_params({"vlm": {"data": {"source": "jsonl"}}})
    with pytest.raises(ParamsError, match="overrides change a preset"):
        parse_params({"vlm": {"preset": None, "custom": preset("smolvlm_fast").model_dump(), "overrides": {"r": 8}}})


def test_the_vlm_stages_resolve_the_preset_and_check_it_against_the_tiny_model():
    """The schema checks the section's shape only (no stage's code loads the preset tables for
    it); the VLM stages resolve the preset first and refuse in one line."""
    with pytest.raises(UserError, match="written for idefics3 but model.vision.architecture is qwen2_vl"):
        vlm_config(parse_params({"model": {"kind": "vlm", "source": "tiny", "vision": {"architecture": "qwen2_vl"}}}))
    with pytest.raises(UserError, match="vlm.preset: no preset named 'smolvlm'"):
        vlm_config(parse_params({"vlm": {"preset": "smolvlm"}}))
    assert vlm_config(parse_params({})).architecture == "idefics3"


def test_the_hub_path_through_a_saved_processor_gives_the_same_inputs_as_the_tiny_encoding(tmp_path):
    """A model directory with its own processor (as a hub VLM has) goes through AutoProcessor
    (``ProcessorEncoding``); for LLaVA, whose processor runs without torchvision, the token ids,
    labels, pixels and loss equal the tiny encoding's."""
    import shutil

    from transformers import AutoTokenizer, LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from trainers.grit_vlm.models import ProcessorEncoding, TinyEncoding

    files = tiny_vlm_files("llava")
    local = tmp_path / "llava"
    shutil.copytree(files.hf_dir, local)
    (local / "tiny_vlm.json").unlink()                     # now it looks like any downloaded model
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                            image_mean=[0.5] * 3, image_std=[0.5] * 3)
    LlavaProcessor(image_processor=image_processor, tokenizer=AutoTokenizer.from_pretrained(local), patch_size=8,
                   vision_feature_select_strategy="default", image_token="<image>",
                   num_additional_image_tokens=1).save_pretrained(local)
    model = tiny_vlm("llava")
    hub, tiny = encoding_for(local, model), encoding_for(files.hf_dir, model)
    assert isinstance(hub, ProcessorEncoding) and isinstance(tiny, TinyEncoding)
    pairs = synthetic_pairs(3, seed=0)
    from_hub, from_tiny = hub(pairs), tiny(pairs)
    for key in ("input_ids", "attention_mask", "labels", "pixel_values"):
        assert torch.equal(from_hub[key], from_tiny[key]), key
    with torch.no_grad():
        assert float(model(**from_hub).loss) == float(model(**from_tiny).loss)
