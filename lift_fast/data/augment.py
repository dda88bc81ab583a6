"""Image preparation shared by the loaders: crop windows, PIL decode, resize and normalisation.

The crop window of a training sample is drawn here from the sample's own seed and the image's
size (known from the file header), so the PIL and the DALI loader cut exactly the same pixels.
"""

from __future__ import annotations

import io
import math

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from lift_fast.data.shards import ShardError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
ASPECT_RATIO = (3 / 4, 4 / 3)  # torchvision's RandomResizedCrop default

Box = tuple[int, int, int, int]  # left, top, width, height in source pixels


def random_resized_crop_box(width: int, height: int, scale: tuple[float, float], rng: np.random.Generator,
                            ratio: tuple[float, float] = ASPECT_RATIO) -> Box:
    """torchvision's RandomResizedCrop window: area fraction in `scale`, aspect in `ratio`, 10 tries,
    then the centre square."""
    area = width * height
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1)), w, h
    return center_box(width, height)


def center_box(width: int, height: int) -> Box:
    """The centre square of side min(width, height)."""
    side = min(width, height)
    return (width - side) // 2, (height - side) // 2, side, side


def train_view(width: int, height: int, scale: tuple[float, float], hflip: bool,
               seed: list[int]) -> tuple[Box, bool]:
    """A training sample's crop window and flip, drawn from its own seed sequence."""
    rng = np.random.default_rng(seed)
    box = random_resized_crop_box(width, height, scale, rng)
    return box, bool(hflip and rng.random() < 0.5)


def open_image(data: bytes, where: str) -> Image.Image:
    """Open an encoded image lazily (header only); raises ShardError naming `where` when it is not one."""
    try:
        return Image.open(io.BytesIO(data))
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise ShardError(f"{where} cannot be decoded ({err})") from None


def crop_resize(image: Image.Image, box: Box, size: int, flip: bool, where: str) -> Image.Image:
    """Decode `image` to RGB, cut `box`, resize it to size x size (bicubic, antialiased) and mirror it."""
    left, top, width, height = box
    try:
        image = image.convert("RGB")
    except (OSError, ValueError, SyntaxError) as err:  # truncated or corrupt data shows only when decoding
        raise ShardError(f"{where} cannot be decoded ({err})") from None
    image = image.resize((size, size), Image.Resampling.BICUBIC, box=(left, top, left + width, top + height))
    return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else image


def to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB -> [3, H, W] float32 normalised with CLIP's mean/std."""
    array = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(CLIP_STD).view(3, 1, 1)
    return (array - mean) / std
