"""Image-text pairs: synthetic ones drawn here, or a user's JSONL of (image, prompt, caption).

Synthetic pairs are coloured shapes on a plain background with a caption that names both
(``a red circle``): learnable only by looking at the image, so a falling loss on them means the
vision side and the connector carry information, not only the decoder. A JSONL dataset has one
object per line: ``{"image": "<path, relative to the file>", "prompt": "...", "caption": "..."}``.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core.errors import UserError

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220), "yellow": (230, 210, 40)}
SHAPES = ("circle", "square", "triangle")
PROMPT = "What is in the picture?"


@dataclass(frozen=True)
class ImageTextExample:
    image: np.ndarray          # [H, W, 3] uint8
    prompt: str
    caption: str


def draw_shape(shape: str, colour: tuple[int, int, int], size: int, rng: random.Random) -> np.ndarray:
    """A [size, size, 3] uint8 image: one filled shape at a random place and scale on grey."""
    image = np.full((size, size, 3), 128, dtype=np.uint8)
    radius = rng.uniform(0.25, 0.4) * size
    cy, cx = (rng.uniform(radius, size - radius) for _ in range(2))
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    if shape == "circle":
        mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2
    elif shape == "square":
        mask = (np.abs(yy - cy) <= radius * 0.8) & (np.abs(xx - cx) <= radius * 0.8)
    else:  # an upright triangle: rows widen from the apex down
        top, bottom = cy - radius, cy + radius
        half_width = (yy - top) / (2 * radius) * radius
        mask = (yy >= top) & (yy <= bottom) & (np.abs(xx - cx) <= half_width)
    image[mask] = colour
    return image


def synthetic_pairs(n: int, seed: int, image_size: int = 32) -> list[ImageTextExample]:
    """``n`` pairs cycling through every colour x shape, with seeded positions and sizes."""
    rng = random.Random(seed)
    kinds = [(c, s) for c in COLOURS for s in SHAPES]
    pairs = []
    for i in range(n):
        colour, shape = kinds[i % len(kinds)]
        pairs.append(ImageTextExample(draw_shape(shape, COLOURS[colour], image_size, rng), PROMPT,
                                      f"a {colour} {shape}"))
    return pairs


def write_pairs(pairs: list[ImageTextExample], path: Path) -> None:
    """Images as PNG files next to the JSONL that lists them (paths relative to it)."""
    from PIL import Image

    images = path.parent / f"{path.stem}_images"
    images.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, pair in enumerate(pairs):
        image_path = images / f"{i:05d}.png"
        Image.fromarray(pair.image).save(image_path)
        lines.append(json.dumps({"image": str(image_path.relative_to(path.parent)), "prompt": pair.prompt,
                                 "caption": pair.caption}))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def read_pairs(path: Path) -> list[ImageTextExample]:
    from PIL import Image

    if not path.is_file():
        raise UserError(f"{path} is missing; run `dvc repro prepare_data` first")
    pairs = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        row = json.loads(line)
        missing = {"image", "prompt", "caption"} - set(row)
        if missing:
            raise UserError(f"{path}:{number}: an image-text pair needs {sorted(missing)}")
        image_path = path.parent / row["image"]
        if not image_path.is_file():
            raise UserError(f"{path}:{number}: image {image_path} does not exist")
        pairs.append(ImageTextExample(np.asarray(Image.open(image_path).convert("RGB")), row["prompt"], row["caption"]))
    if not pairs:
        raise UserError(f"{path} holds no image-text pairs")
    return pairs
