"""Image-text retrieval with several captions per image (COCO, Flickr30k), as CLIP_benchmark counts it.

Image-to-text recall@K counts a hit when ANY of the image's captions is among the K best texts;
text-to-image recall@K, when the caption's one image is among the K best images. Everything runs
on the device of the image features, a block of image rows at a time, so N = 50k images against
M = 250k captions never holds an [N, M] matrix, on the device or on the host. Ties are broken
against the model, as in lift_fast.eval.metrics.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lift_fast.eval.metrics import SIMILARITY_BLOCK_ELEMENTS, check_feature_pair, check_index, check_ks

KS = (1, 5, 10)


def multi_caption_retrieval(image_features: torch.Tensor, text_features: torch.Tensor, text_image,
                            ks: Sequence[int] = KS, block_rows: int | None = None) -> dict[str, float]:
    """Recall@K of image-to-text and text-to-image retrieval where each image has one or more captions.

    Takes `image_features` [N, D] and `text_features` [M, D] (L2-normalised), and `text_image` [M]
    (ints in [0, N)): the image each caption belongs to. Returns `i2t_r{k}` and `t2i_r{k}` for each
    k (fractions of the N images and of the M captions), `chance_r1` (the i2t R@1 of a random
    ranking: mean over images of #captions/M) and `t2i_chance_r1` (1/N). Raises ValueError when shapes
    disagree, a value of `text_image` is out of range, an image has no caption, or a k is not a
    positive int.
    """
    check_feature_pair("image_features", image_features, "text_features", text_features)
    num_images, num_texts = image_features.shape[0], text_features.shape[0]
    ks = check_ks(ks)
    device = image_features.device
    text_image = check_index("text_image", text_image, num_texts, num_images, device, rows="text_features",
                             items=f"N = {num_images} images")
    captions_per_image = torch.bincount(text_image, minlength=num_images)
    if int((captions_per_image == 0).sum()):
        first = int((captions_per_image == 0).nonzero()[0])
        raise ValueError(f"image {first} has no caption in text_image; every image needs at least one")
    if block_rows is None:
        block_rows = max(1, SIMILARITY_BLOCK_ELEMENTS // num_texts)
    images = image_features.float()
    texts = text_features.to(device=device, dtype=torch.float32)
    image_ids = torch.arange(num_images, device=device)

    def blocks():
        for start in range(0, num_images, block_rows):
            stop = min(start + block_rows, num_images)
            own = text_image[None, :] == image_ids[start:stop, None]  # [C, M]: caption j belongs to image i
            yield start, stop, images[start:stop] @ texts.T, own  # similarity [C, M]

    # Pass 1: i2t rank of each image's best own caption; the true score of every caption.
    i2t_ahead = torch.empty(num_images, dtype=torch.long, device=device)
    true_score = torch.empty(num_texts, device=device)
    for start, stop, similarity, own in blocks():
        best_own = similarity.masked_fill(~own, float("-inf")).amax(dim=1, keepdim=True)  # [C, 1]
        i2t_ahead[start:stop] = ((similarity >= best_own) & ~own).sum(dim=1)
        rows, cols = own.nonzero(as_tuple=True)
        true_score[cols] = similarity[rows, cols]
    # Pass 2: t2i rank of each caption's image = other images scoring >= it.
    t2i_ahead = torch.zeros(num_texts, dtype=torch.long, device=device)
    for _, _, similarity, own in blocks():
        t2i_ahead += ((similarity >= true_score[None, :]) & ~own).sum(dim=0)
    metrics: dict[str, float] = {}
    for k in ks:
        metrics[f"i2t_r{k}"] = int((i2t_ahead < k).sum()) / num_images
        metrics[f"t2i_r{k}"] = int((t2i_ahead < k).sum()) / num_texts
    metrics["chance_r1"] = (captions_per_image.double() / num_texts).mean().item()
    metrics["t2i_chance_r1"] = 1.0 / num_images
    return metrics
