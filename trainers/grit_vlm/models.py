"""Vision-language base models: loading one, and how each turns (image, prompt, caption) into
model inputs.

Tiny VLMs (``model.kind: vlm``, ``model.source: tiny``, built by ``trainers/grit_vlm/tiny.py``)
use the real SmolLM2 tokenizer with the architecture's image tokens added, and a small vision
tower; nothing is downloaded. Their inputs
are built here (``TinyEncoding``) exactly as the architecture expects them (the processors of
transformers 5 need torchvision, which the CPU build of torch here cannot load). Hub VLMs use
their own ``AutoProcessor`` (``ProcessorEncoding``).

Labels: only the caption's tokens (and the closing end-of-sequence token) carry a loss; the
image tokens and the prompt are masked with -100.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from core.errors import UserError
from trainers.grit_vlm.config import TinyVisionParams
from trainers.grit_vlm.data import ImageTextExample

IMAGE_MEAN, IMAGE_STD = 0.5, 0.5
def load_vlm(hf_dir: Path, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False):
    from transformers import AutoModelForImageTextToText

    try:
        return AutoModelForImageTextToText.from_pretrained(hf_dir, dtype=dtype, trust_remote_code=trust_remote_code)
    except ValueError as error:
        raise UserError(f"{hf_dir} is not an image-text-to-text model ({str(error).splitlines()[0]}); "
                        "model.kind: vlm needs a VLM such as SmolVLM, Qwen2-VL or LLaVA") from None


# ------------------------------------------------------------------------------- encodings


def normalized_pixels(image: np.ndarray, size: int) -> torch.Tensor:
    """[H, W, 3] uint8 -> [3, size, size] float, resized bilinearly and scaled to [-1, 1]."""
    pixels = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).float().div(255.0)
    if pixels.shape[1:] != (size, size):
        pixels = torch.nn.functional.interpolate(pixels[None], size=(size, size), mode="bilinear",
                                                 align_corners=False)[0]
    return (pixels - IMAGE_MEAN) / IMAGE_STD


def qwen2_vl_patches(pixels: torch.Tensor, patch: int, temporal: int, merge: int) -> tuple[torch.Tensor, list[int]]:
    """One image [C, H, W] -> (patches [h*w, C*temporal*patch*patch], grid [1, h, w]) in
    Qwen2-VL's layout: the frame repeated ``temporal`` times, patches ordered so that each
    ``merge x merge`` window is contiguous (the merger concatenates those rows)."""
    channels, height, width = pixels.shape
    grid_h, grid_w = height // patch, width // patch
    frames = pixels[None].expand(temporal, -1, -1, -1)
    tiles = frames.reshape(1, temporal, channels, grid_h // merge, merge, patch, grid_w // merge, merge, patch)
    tiles = tiles.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return tiles.reshape(grid_h * grid_w, channels * temporal * patch * patch), [1, grid_h, grid_w]


class TinyEncoding:
    """Model inputs for a tiny VLM built by :func:`trainers.grit_vlm.tiny.build_tiny_vlm`, per architecture."""

    def __init__(self, tokenizer, config, image_size: int) -> None:
        self.tokenizer, self.config, self.image_size = tokenizer, config, image_size
        self.architecture = config.model_type
        self.patch_size = config.vision_config.patch_size

    def _image_tokens(self) -> tuple[list[int], int]:
        """(token ids standing for one image, pixels per side the image is resized to)."""
        ids = self.tokenizer.convert_tokens_to_ids
        if self.architecture == "idefics3":
            per_side = self.image_size // self.patch_size
            seq_len = per_side * per_side // self.config.scale_factor**2
            block = ["<fake_token_around_image>", "<global-img>", *["<image>"] * seq_len, "<fake_token_around_image>"]
            return [ids(t) for t in block], self.image_size
        if self.architecture == "llava":
            per_side = self.image_size // self.patch_size
            return [ids("<image>")] * (per_side * per_side), self.image_size
        merge = self.config.vision_config.spatial_merge_size
        count = (self.image_size // self.patch_size) ** 2 // merge**2   # patches, merged merge x merge
        return [ids("<|vision_start|>"), *[ids("<|image_pad|>")] * count, ids("<|vision_end|>")], self.image_size

    def __call__(self, examples: list[ImageTextExample]) -> dict[str, torch.Tensor]:
        image_ids, size = self._image_tokens()
        rows, labels, pixels, grids = [], [], [], []
        eos = self.tokenizer.eos_token_id
        for example in examples:
            prompt = self.tokenizer(example.prompt + "\n", add_special_tokens=False)["input_ids"]
            caption = self.tokenizer(example.caption, add_special_tokens=False)["input_ids"] + [eos]
            rows.append(image_ids + prompt + caption)
            labels.append([-100] * (len(image_ids) + len(prompt)) + caption)
            image = normalized_pixels(example.image, size)
            if self.architecture == "qwen2_vl":
                vision = self.config.vision_config
                patches, grid = qwen2_vl_patches(image, vision.patch_size, vision.temporal_patch_size,
                                                 vision.spatial_merge_size)
                pixels.append(patches)
                grids.append(grid)
            else:
                pixels.append(image)
        batch = pad_rows(rows, labels, self.tokenizer.pad_token_id)
        if self.architecture == "qwen2_vl":
            # M-RoPE places image tokens on a 2-D grid: it needs to know which tokens they are (1: image)
            image_token = self.tokenizer.convert_tokens_to_ids("<|image_pad|>")
            batch.update(pixel_values=torch.cat(pixels), image_grid_thw=torch.tensor(grids),
                         mm_token_type_ids=(batch["input_ids"] == image_token).long())
        elif self.architecture == "idefics3":
            batch["pixel_values"] = torch.stack(pixels)[:, None]      # [B, images per example = 1, 3, S, S]
        else:
            batch["pixel_values"] = torch.stack(pixels)
        return batch


def pad_rows(rows: list[list[int]], labels: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad token rows and their labels to the longest row."""
    width = max(len(r) for r in rows)
    return {
        "input_ids": torch.tensor([r + [pad_id] * (width - len(r)) for r in rows]),
        "attention_mask": torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows]),
        "labels": torch.tensor([lab + [-100] * (width - len(lab)) for lab in labels]),
    }


_PLACEHOLDERS = {"idefics3": "<image>", "smolvlm": "<image>", "llava": "<image>", "llava_next": "<image>",
                 "qwen2_vl": "<|vision_start|><|image_pad|><|vision_end|>",
                 "qwen2_5_vl": "<|vision_start|><|image_pad|><|vision_end|>", "phi3_v": "<|image_1|>\n"}


class ProcessorEncoding:
    """Model inputs through a hub model's own processor (expands the image placeholder)."""

    def __init__(self, processor, model_type: str) -> None:
        if model_type not in _PLACEHOLDERS:
            raise UserError(f"no image placeholder known for model_type {model_type!r}; known: {sorted(_PLACEHOLDERS)}")
        self.processor, self.placeholder = processor, _PLACEHOLDERS[model_type]
        self.tokenizer = processor.tokenizer

    def __call__(self, examples: list[ImageTextExample]) -> dict[str, torch.Tensor]:
        from PIL import Image

        eos = self.tokenizer.eos_token or ""
        texts = [f"{self.placeholder}{e.prompt}\n{e.caption}{eos}" for e in examples]
        images = [[Image.fromarray(e.image)] for e in examples]
        self.tokenizer.padding_side = "right"
        batch = dict(self.processor(text=texts, images=images, return_tensors="pt", padding=True,
                                    return_mm_token_type_ids=self.placeholder.startswith("<|vision_start|>")))
        labels = torch.full_like(batch["input_ids"], -100)
        for row, example in enumerate(examples):
            n = len(self.tokenizer(example.caption + eos, add_special_tokens=False)["input_ids"])
            end = int(batch["attention_mask"][row].sum())
            labels[row, end - n:end] = batch["input_ids"][row, end - n:end]
        batch["labels"] = labels
        return batch


def encoding_for(hf_dir: Path, model, trust_remote_code: bool = False):
    """The encoding a base model needs: its own for tiny VLMs, else its hub processor."""
    from transformers import AutoTokenizer

    if (hf_dir / "tiny_vlm.json").is_file():
        vision = TinyVisionParams.model_validate_json((hf_dir / "tiny_vlm.json").read_text())
        return TinyEncoding(AutoTokenizer.from_pretrained(hf_dir), model.config, vision.image_size)
    try:
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained(hf_dir, trust_remote_code=trust_remote_code)
    except ImportError as error:
        raise UserError(f"the processor of {hf_dir} cannot load ({str(error).strip().splitlines()[0]}); "
                        "install torchvision matching your torch build") from None
    return ProcessorEncoding(processor, model.config.model_type)
