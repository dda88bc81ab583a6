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


# Draws per sample: 10 tries of (area fraction, log aspect), the window's left and top, the flip.
TRIES = 10
DRAWS = 2 * TRIES + 3
_GOLDEN, _MIX1, _MIX2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on uint64 arrays (wrapping arithmetic): a well-mixed hash of each value."""
    x = x + np.uint64(_GOLDEN)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(_MIX1)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(_MIX2)
    return x ^ (x >> np.uint64(31))


def sample_uniforms(seed: int, epoch: int, positions: np.ndarray) -> np.ndarray:
    """[n, DRAWS] float64 uniforms in [0, 1) for the samples at `positions` of `epoch`'s stream.

    Counter-based (a hash of seed, epoch, position and draw number), so a sample's draws do not
    depend on which batch, rank or worker asks, and a whole batch costs one vectorised call.
    """
    with np.errstate(over="ignore"):
        key = _splitmix64(np.array([seed], dtype=np.uint64) ^ _splitmix64(np.array([epoch], dtype=np.uint64)))
        counters = np.asarray(positions, dtype=np.uint64)[:, None] * np.uint64(DRAWS) + np.arange(DRAWS, dtype=np.uint64)
        bits = _splitmix64(_splitmix64(counters ^ key))
    return (bits >> np.uint64(11)).astype(np.float64) * 2.0**-53


def random_resized_crop_box(width: int, height: int, scale: tuple[float, float], draws: np.ndarray,
                            ratio: tuple[float, float] = ASPECT_RATIO) -> Box:
    """torchvision's RandomResizedCrop window from one sample's `draws` (a row of sample_uniforms):
    area fraction in `scale`, aspect in `ratio` (log-uniform), 10 tries, then the centre square."""
    area = width * height
    log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
    for attempt in range(TRIES):
        target = area * (scale[0] + (scale[1] - scale[0]) * draws[2 * attempt])
        aspect = math.exp(log_low + (log_high - log_low) * draws[2 * attempt + 1])
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return int(draws[2 * TRIES] * (width - w + 1)), int(draws[2 * TRIES + 1] * (height - h + 1)), w, h
    return center_box(width, height)


def center_box(width: int, height: int) -> Box:
    """The centre square of side min(width, height)."""
    side = min(width, height)
    return (width - side) // 2, (height - side) // 2, side, side


def train_view(width: int, height: int, scale: tuple[float, float], hflip: bool, draws: np.ndarray) -> tuple[Box, bool]:
    """A training sample's crop window and flip, from its row of sample_uniforms."""
    return random_resized_crop_box(width, height, scale, draws), bool(hflip and draws[DRAWS - 1] < 0.5)


_JPEG_SOF = frozenset((0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF))


def image_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a JPEG's frame header or a PNG's IHDR, without decoding; None for other
    formats or a header that does not parse (the caller then asks PIL, which names the problem)."""
    if data[:2] == b"\xff\xd8":
        at = 2
        while at + 9 <= len(data):
            if data[at] != 0xFF:
                return None
            marker = data[at + 1]
            if marker == 0xFF:  # fill byte
                at += 1
                continue
            if marker in _JPEG_SOF:
                height, width = int.from_bytes(data[at + 5:at + 7], "big"), int.from_bytes(data[at + 7:at + 9], "big")
                return (width, height) if width and height else None
            if marker == 0xD8 or 0xD0 <= marker <= 0xD7:  # no length field
                at += 2
                continue
            at += 2 + int.from_bytes(data[at + 2:at + 4], "big")
        return None
    if data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR":
        return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    return None


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


def to_uint8(image: Image.Image) -> torch.Tensor:
    """PIL RGB -> [3, H, W] uint8: what the loaders ship (a quarter of float32's bytes); normalize_images
    turns a batch of them into the model's input where it runs."""
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)


def to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB -> [3, H, W] float32 normalised with CLIP's mean/std (normalize_images of to_uint8)."""
    return normalize_images(to_uint8(image))


NORMALIZE_CHUNK = 1 << 25  # pixels normalised at a time into a narrower dtype: a 128 MiB float32 scratch, not the
# batch's (ViT-B/16's 2,048 x 3 x 224 x 224 would need 1.2 GiB of float32 beside its 0.6 GiB of bf16)


def normalize_images(images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 pixels [..., 3, H, W] -> CLIP-normalised images (/255, - CLIP_MEAN, / CLIP_STD) in `dtype`,
    on the images' device. The one place the pixels are normalised: every loader's normalised images,
    the training step's (on the GPU, after a uint8 copy) and the eval view (to_tensor) come from here.

    Computed in float32 (the values the PIL loader always gave, bit for bit), then cast; into a
    narrower dtype NORMALIZE_CHUNK pixels at a time. Mean and std are Python numbers, one channel at
    a time: a tensor of them made per call would be a host-to-device copy per step (and one cached
    per device would outlive a FakeTensorMode that made it).
    Raises TypeError for images that are not uint8.
    """
    if images.dtype != torch.uint8:
        raise TypeError(f"normalize_images takes uint8 pixels, got {images.dtype} images of shape {tuple(images.shape)}")
    if dtype == torch.float32 or images.dim() < 4 or images.numel() <= NORMALIZE_CHUNK:
        return _normalized(images).to(dtype)
    out = torch.empty(images.shape, dtype=dtype, device=images.device)
    step = max(1, NORMALIZE_CHUNK // images[0].numel())  # whole images per chunk
    for start in range(0, images.shape[0], step):
        out[start:start + step] = _normalized(images[start:start + step])
    return out


def _normalized(images: torch.Tensor) -> torch.Tensor:
    normalized = images.to(torch.float32).div_(255.0)
    for channel, (mean, std) in enumerate(zip(CLIP_MEAN, CLIP_STD)):
        normalized[..., channel, :, :].sub_(mean).div_(std)
    return normalized
