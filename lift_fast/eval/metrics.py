"""Evaluation metrics as pure functions over feature matrices.

Every function takes features that are already L2-normalised, so a similarity is a dot product.
The math runs in float32 on the device of the image features. The image-text similarity is built
a block of image rows at a time, so N = 50k images against M = 50k texts never holds N x M floats.

Ties are broken against the model: an item that scores exactly as high as the true one is ranked
before it. A model that gives every pair the same score therefore gets recall ~0 (not 1), and a
collapsed model cannot look good by accident.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

# 2**24 similarities (64 MiB of float32, plus a bool mask of the same shape) per block of image rows.
SIMILARITY_BLOCK_ELEMENTS = 1 << 24


def unique_captions(captions: Sequence[str]) -> tuple[list[str], list[int]]:
    """Deduplicate captions.

    Takes one caption per sample. Returns the unique captions in first-seen order, and for each
    sample the index of its caption in that list (so `unique[index[i]] == captions[i]`).
    """
    position: dict[str, int] = {}
    caption_index = [position.setdefault(caption, len(position)) for caption in captions]
    return list(position), caption_index


def check_features(name: str, features: torch.Tensor) -> None:
    """Raise TypeError/ValueError naming `name` unless features is a finite 2-D tensor with rows."""
    if not isinstance(features, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(features).__name__}")
    if features.ndim != 2:
        raise ValueError(f"{name} must be 2-D [rows, dim], got shape {tuple(features.shape)}")
    if features.shape[0] == 0:
        raise ValueError(f"{name} has no rows (shape {tuple(features.shape)})")
    if not torch.isfinite(features).all():
        # A NaN compares false with everything, which would silently count as a hit or a miss.
        raise ValueError(f"{name} (shape {tuple(features.shape)}) holds NaN or inf values")


def check_feature_pair(name: str, features: torch.Tensor, other_name: str, other: torch.Tensor) -> None:
    """check_features of both, and the same feature dim D; the message names both shapes."""
    check_features(name, features)
    check_features(other_name, other)
    if other.shape[1] != features.shape[1]:
        raise ValueError(f"{name} {tuple(features.shape)} and {other_name} {tuple(other.shape)} must have the same "
                         f"feature dim D ({features.shape[1]} != {other.shape[1]})")


def check_ks(ks) -> tuple[int, ...]:
    """ks as a tuple; raises ValueError unless it is non-empty and holds positive ints."""
    ks = tuple(ks)
    if not ks or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in ks):
        raise ValueError(f"ks must be positive ints, got {ks}")
    return ks


def check_index(name: str, values, length: int, limit: int, device: torch.device, *, rows: str, items: str) -> torch.Tensor:
    """values as a long tensor [length] of ints in [0, limit) on `device`; raises ValueError naming
    `name`, what its rows match (`rows`, e.g. "image_features") and what it indexes (`items`, e.g. "M texts")."""
    values = torch.as_tensor(values, device=device)
    if values.dtype.is_floating_point or values.dtype == torch.bool or values.is_complex():
        raise ValueError(f"{name} must hold integers, got dtype {values.dtype}")
    if values.shape != (length,):
        raise ValueError(f"{name} must have shape [N] = ({length},) to match {rows}, got {tuple(values.shape)}")
    values = values.long()
    low, high = int(values.min()), int(values.max())
    if low < 0 or high >= limit:
        raise ValueError(f"{name} values must lie in [0, {limit}) ({items}), got values in [{low}, {high}]")
    return values


def retrieval_metrics(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    caption_index,
    ks: Sequence[int] = (1, 5),
    block_rows: int | None = None,
) -> dict[str, float]:
    """Image-to-text and text-to-image recall@k.

    Takes `image_features` [N, D] and `text_features` [M, D] (both L2-normalised), and
    `caption_index` [N] (ints in [0, M)): the row of each image's true text. Several images may
    share one text (repeated captions). `block_rows` caps the image rows per similarity block
    (default: about 2**24 similarities per block).

    - `i2t_r{k}`: fraction of the N images whose true text is among the k highest-scoring texts.
    - `t2i_r{k}`: fraction of query texts for which at least one image with that text is among the
      k highest-scoring images. The queries are the texts that are the caption of at least one
      image (all M when `caption_index` covers every text); a text no image has can never be
      found, so it is only a distractor for i2t.
    - `chance_r1`: 1/M, the i2t R@1 of a random ranking.
    - `t2i_chance_r1`: mean over the query texts of (#images with that text)/N, the t2i R@1 of a
      random ranking.

    Ties are broken against the model: any other item scoring >= the true one ranks above it.
    Returns floats in [0, 1]. Raises ValueError when shapes disagree (naming them), when
    `caption_index` is out of range, when features are not finite, or when a k is not a
    positive int.
    """
    check_feature_pair("image_features", image_features, "text_features", text_features)
    num_images, num_texts = image_features.shape[0], text_features.shape[0]
    ks = check_ks(ks)
    device = image_features.device
    caption_index = check_index("caption_index", caption_index, num_images, num_texts, device, rows="image_features",
                                items=f"M = {num_texts} texts")
    if block_rows is None:
        block_rows = max(1, SIMILARITY_BLOCK_ELEMENTS // num_texts)
    elif block_rows < 1:
        raise ValueError(f"block_rows must be >= 1, got {block_rows}")

    image_features = image_features.to(torch.float32)
    text_features = text_features.to(device=device, dtype=torch.float32)
    text_ids = torch.arange(num_texts, device=device)

    def similarity_blocks():
        for start in range(0, num_images, block_rows):
            stop = min(start + block_rows, num_images)
            # similarity: [C, M]
            yield start, stop, image_features[start:stop] @ text_features.T

    # Pass 1 (i2t): rank of each image's true text = #other texts scoring >= it. The true score
    # is gathered from the same block, so it compares equal to itself exactly.
    true_score = torch.empty(num_images, device=device)
    i2t_texts_ahead = torch.empty(num_images, dtype=torch.long, device=device)
    for start, stop, similarity in similarity_blocks():
        block_true = similarity.gather(1, caption_index[start:stop, None])  # [C, 1]
        true_score[start:stop] = block_true[:, 0]
        i2t_texts_ahead[start:stop] = (similarity >= block_true).sum(dim=1) - 1

    # Pass 2 (t2i): a text's first relevant image is its best-scoring one; images of other texts
    # scoring >= that score rank before it.
    images_per_text = torch.bincount(caption_index, minlength=num_texts)
    best_true_score = torch.full((num_texts,), float("-inf"), device=device)
    best_true_score.scatter_reduce_(0, caption_index, true_score, reduce="amax")
    t2i_images_ahead = torch.zeros(num_texts, dtype=torch.long, device=device)
    for start, stop, similarity in similarity_blocks():
        is_true_pair = caption_index[start:stop, None] == text_ids[None, :]  # [C, M]
        t2i_images_ahead += ((similarity >= best_true_score[None, :]) & ~is_true_pair).sum(dim=0)

    queries = images_per_text > 0
    t2i_images_ahead = t2i_images_ahead[queries]
    num_queries = t2i_images_ahead.numel()
    metrics: dict[str, float] = {}
    for k in ks:
        # Integer hit counts divided in Python: exact fractions, no float32 mean rounding.
        metrics[f"i2t_r{k}"] = int((i2t_texts_ahead < k).sum()) / num_images
        metrics[f"t2i_r{k}"] = int((t2i_images_ahead < k).sum()) / num_queries
    metrics["chance_r1"] = 1.0 / num_texts
    metrics["t2i_chance_r1"] = (images_per_text[queries].double() / num_images).mean().item()
    return metrics


def compositional_accuracy(
    image_features: torch.Tensor,
    positive_features: torch.Tensor,
    negative_features: torch.Tensor,
) -> float:
    """SugarCrepe-style accuracy: does each image prefer its caption over the hard negative?

    Takes `image_features`, `positive_features` and `negative_features`, each [N, D] and
    L2-normalised, row i of each belonging to test item i. Returns the fraction of rows where
    sim(image, positive) > sim(image, negative); a tie counts as wrong. Raises ValueError when
    the shapes differ, N is 0 or a feature is not finite.
    """
    for name, features in (
        ("image_features", image_features),
        ("positive_features", positive_features),
        ("negative_features", negative_features),
    ):
        check_features(name, features)
    if not (image_features.shape == positive_features.shape == negative_features.shape):
        raise ValueError(
            "image_features, positive_features and negative_features must share one shape [N, D], got "
            f"{tuple(image_features.shape)}, {tuple(positive_features.shape)}, {tuple(negative_features.shape)}"
        )
    device = image_features.device
    image_features = image_features.to(torch.float32)
    positive_score = (image_features * positive_features.to(device=device, dtype=torch.float32)).sum(dim=1)
    negative_score = (image_features * negative_features.to(device=device, dtype=torch.float32)).sum(dim=1)
    return int((positive_score > negative_score).sum()) / image_features.shape[0]
