"""Zero-shot classification as CLIP does it: one text vector per class, the nearest class wins.

A class vector is the normalised mean of the normalised embeddings of the class name in every
prompt template (`{c}` replaced by the name). Accuracies are computed on the device of the image
features, a block of images at a time. Ties are broken against the model: a wrong class scoring
exactly as high as the true one ranks before it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from lift_fast.eval.metrics import SIMILARITY_BLOCK_ELEMENTS, check_feature_pair, check_index, check_ks


def class_vectors(encode: Callable[[list[str]], torch.Tensor], classnames: Sequence[str],
                  templates: Sequence[str]) -> torch.Tensor:
    """[C, D] class vectors: for each class name, normalize(mean over templates of normalize(encode(prompt))).

    encode: list of T*C prompts -> [T*C, D] embeddings (the run's frozen text encoder).
    Raises ValueError for no class names or no templates.
    """
    if not classnames or not templates:
        raise ValueError(f"zero-shot needs class names and templates, got {len(classnames)} and {len(templates)}")
    prompts = [template.format(c=name) for name in classnames for template in templates]
    embeddings = F.normalize(encode(prompts).float(), dim=-1)  # [C*T, D]
    per_class = embeddings.view(len(classnames), len(templates), -1).mean(dim=1)  # [C, D]
    return F.normalize(per_class, dim=-1)


def zeroshot_metrics(image_features: torch.Tensor, class_features: torch.Tensor, labels,
                     ks: Sequence[int] = (1, 5), block_rows: int | None = None) -> dict[str, float]:
    """Top-k accuracy and mean per-class recall of nearest-class prediction.

    Takes `image_features` [N, D], `class_features` [C, D] (L2-normalised) and `labels` [N] (ints in
    [0, C)). Returns `top{k}` for each k (the fraction of images whose class is among the k best;
    for k >= C every image counts), and `mean_per_class_recall`: the top-1 recall of each class
    present in `labels`, averaged (scikit-learn's balanced accuracy). Raises ValueError for shapes
    that disagree or labels out of range.
    """
    check_feature_pair("image_features", image_features, "class_features", class_features)
    num_images, num_classes = image_features.shape[0], class_features.shape[0]
    ks = check_ks(ks)
    device = image_features.device
    labels = check_index("labels", labels, num_images, num_classes, device, rows="image_features",
                         items=f"C = {num_classes} classes")
    if block_rows is None:
        block_rows = max(1, SIMILARITY_BLOCK_ELEMENTS // num_classes)
    classes = class_features.to(device=device, dtype=torch.float32)
    ahead = torch.empty(num_images, dtype=torch.long, device=device)
    for start in range(0, num_images, block_rows):
        similarity = image_features[start:start + block_rows].float() @ classes.T  # [B, C]
        true = similarity.gather(1, labels[start:start + block_rows, None])
        ahead[start:start + block_rows] = (similarity >= true).sum(dim=1) - 1
    metrics = {f"top{k}": int((ahead < k).sum()) / num_images for k in ks}
    per_class_hits = torch.bincount(labels[ahead == 0], minlength=num_classes).double()
    per_class_count = torch.bincount(labels, minlength=num_classes).double()
    present = per_class_count > 0
    metrics["mean_per_class_recall"] = (per_class_hits[present] / per_class_count[present]).mean().item()
    return metrics
