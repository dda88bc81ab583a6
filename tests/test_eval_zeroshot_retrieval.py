"""Zero-shot classification and multi-caption retrieval on hand-built features with known answers,
against float64 sorting references, scikit-learn, and CLIP_benchmark's own recall function."""

from __future__ import annotations

import pytest
import torch
from sklearn.metrics import balanced_accuracy_score

from lift_fast.eval.retrieval import multi_caption_retrieval
from lift_fast.eval.zeroshot import class_vectors, zeroshot_metrics


def normalize(features: torch.Tensor) -> torch.Tensor:
    return features / features.norm(dim=1, keepdim=True)


# --- class vectors ---------------------------------------------------------------------------------


def test_class_vector_is_the_normalised_mean_of_normalised_template_embeddings():
    generator = torch.Generator().manual_seed(1)
    classnames, templates = ["cat", "dog", "red fox"], ["a {c}", "a photo of a {c}.", "{c}!", "art of {c}"]
    table = {f"{t}".format(c=c): torch.randn(7, generator=generator, dtype=torch.float64) * (1 + i)
             for i, (c, t) in enumerate((c, t) for c in classnames for t in templates)}
    asked = []

    def encode(prompts):
        asked.extend(prompts)
        return torch.stack([table[p] for p in prompts]).float()

    vectors = class_vectors(encode, classnames, templates)
    assert vectors.shape == (3, 7)
    for row, name in enumerate(classnames):
        rows = torch.stack([table[t.format(c=name)] for t in templates])
        expected = (rows / rows.norm(dim=1, keepdim=True)).mean(0)
        torch.testing.assert_close(vectors[row].double(), expected / expected.norm(), atol=1e-6, rtol=0)
    assert sorted(asked) == sorted(table)  # every prompt embedded once


def test_class_vectors_need_names_and_templates():
    with pytest.raises(ValueError, match="class names and templates"):
        class_vectors(lambda p: torch.zeros(len(p), 2), [], ["a {c}"])


# --- zero-shot accuracy ----------------------------------------------------------------------------


def test_known_answers_top1_top5_and_mean_per_class_recall():
    # 6 classes on the axes; image i lies nearest class `nearest[i]`, its label is labels[i].
    classes = torch.eye(6)
    nearest = [0, 1, 2, 3, 4, 5, 0, 0]
    labels = [0, 1, 2, 3, 4, 0, 1, 1]  # images 5, 6, 7 are wrong
    images = normalize(torch.eye(6)[nearest] * 2 + 0.1 * torch.arange(6.0))  # a small tilt orders the others
    metrics = zeroshot_metrics(images, classes, labels, ks=(1, 5))
    assert metrics["top1"] == 5 / 8
    # mean recall over classes 0..4 present: class 0: 1/2, class 1: 1/3, classes 2, 3, 4: 1
    assert metrics["mean_per_class_recall"] == pytest.approx((0.5 + 1 / 3 + 3) / 5)
    assert metrics["mean_per_class_recall"] == pytest.approx(balanced_accuracy_score(labels, nearest))


def reference_topk(image_features, class_features, labels, k):
    """Rank by fully sorting float64 scores, ties ordered against the model (true class last)."""
    similarity = (image_features.double() @ class_features.double().T).tolist()
    hits = 0
    for row, label in zip(similarity, labels):
        order = sorted(range(len(row)), key=lambda j: (-row[j], j == label))
        hits += order.index(label) < k
    return hits / len(labels)


@pytest.mark.parametrize("num_images, num_classes, dim, block_rows", [(1, 1, 3, None), (37, 7, 5, 4), (130, 24, 16, 1)])
def test_matches_float64_reference_and_sklearn_on_random_features(num_images, num_classes, dim, block_rows):
    generator = torch.Generator().manual_seed(num_images)
    images = normalize(torch.randn(num_images, dim, generator=generator))
    classes = normalize(torch.randn(num_classes, dim, generator=generator))
    labels = torch.randint(num_classes, (num_images,), generator=generator)
    metrics = zeroshot_metrics(images, classes, labels, ks=(1, 5), block_rows=block_rows)
    for k in (1, 5):
        assert metrics[f"top{k}"] == pytest.approx(reference_topk(images, classes, labels.tolist(), k))
    predicted = (images.double() @ classes.double().T).argmax(1)
    assert metrics["mean_per_class_recall"] == pytest.approx(balanced_accuracy_score(labels, predicted))


def test_zeroshot_ties_count_against_the_model():
    images = normalize(torch.ones(4, 3))
    classes = torch.eye(3)  # every class scores the same
    assert zeroshot_metrics(images, classes, [0, 1, 2, 0])["top1"] == 0.0


def test_zeroshot_errors_name_what_is_wrong():
    with pytest.raises(ValueError, match=r"labels values must lie in \[0, 3\)"):
        zeroshot_metrics(torch.eye(3), torch.eye(3), [0, 1, 3])
    with pytest.raises(ValueError, match="same feature dim"):
        zeroshot_metrics(torch.eye(3), torch.eye(4), [0, 1, 2])
    with pytest.raises(ValueError, match="NaN or inf"):
        zeroshot_metrics(torch.full((2, 3), float("nan")), torch.eye(3), [0, 1])


# --- multi-caption retrieval -----------------------------------------------------------------------


def test_any_caption_in_the_top_k_is_an_image_to_text_hit():
    # 3 images on the axes; image 0 has captions 0 (far) and 1 (exact), image 1 caption 2, image 2 caption 3.
    images = torch.eye(3)
    texts = normalize(torch.tensor([[0.1, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]))
    metrics = multi_caption_retrieval(images, texts, [0, 0, 1, 2], ks=(1, 2))
    assert metrics["i2t_r1"] == 1.0  # image 0 finds caption 1 first: a hit, though caption 0 is far
    # t2i: caption 0 ([0.1, 1, 0]) is nearest image 1, so its image 0 is second
    assert metrics["t2i_r1"] == 3 / 4 and metrics["t2i_r2"] == 1.0
    assert metrics["chance_r1"] == pytest.approx((2 / 4 + 1 / 4 + 1 / 4) / 3)


def reference_multi_caption(images, texts, text_image, ks):
    similarity = (images.double() @ texts.double().T).tolist()
    num_images, num_texts = len(similarity), len(similarity[0])
    metrics = {}
    for k in ks:
        hits = 0
        for i in range(num_images):
            order = sorted(range(num_texts), key=lambda j: (-similarity[i][j], text_image[j] == i))
            hits += any(text_image[j] == i for j in order[:k])
        metrics[f"i2t_r{k}"] = hits / num_images
        hits = 0
        for j in range(num_texts):
            order = sorted(range(num_images), key=lambda i: (-similarity[i][j], i == text_image[j]))
            hits += text_image[j] in order[:k]
        metrics[f"t2i_r{k}"] = hits / num_texts
    return metrics


@pytest.mark.parametrize("num_images, max_captions, dim, block_rows", [(1, 1, 4, None), (23, 5, 6, 3), (61, 3, 9, 1)])
def test_multi_caption_matches_float64_reference_and_clip_benchmark(num_images, max_captions, dim, block_rows):
    from clip_benchmark.metrics.zeroshot_retrieval import recall_at_k

    generator = torch.Generator().manual_seed(num_images + dim)
    counts = torch.randint(1, max_captions + 1, (num_images,), generator=generator)
    text_image = torch.repeat_interleave(torch.arange(num_images), counts)
    images = normalize(torch.randn(num_images, dim, generator=generator))
    texts = normalize(images[text_image] + 0.8 * torch.randn(len(text_image), dim, generator=generator))
    ks = (1, 5, 10)
    metrics = multi_caption_retrieval(images, texts, text_image, ks=ks, block_rows=block_rows)
    expected = reference_multi_caption(images, texts, text_image.tolist(), ks)
    positive = torch.zeros(len(text_image), num_images, dtype=torch.bool)
    positive[torch.arange(len(text_image)), text_image] = True
    scores = texts @ images.T
    for k in ks:
        assert metrics[f"i2t_r{k}"] == pytest.approx(expected[f"i2t_r{k}"])
        assert metrics[f"t2i_r{k}"] == pytest.approx(expected[f"t2i_r{k}"])
        kk = min(k, num_images), min(k, len(text_image))
        assert metrics[f"t2i_r{k}"] == pytest.approx((recall_at_k(scores, positive, kk[0]) > 0).float().mean().item())
        assert metrics[f"i2t_r{k}"] == pytest.approx((recall_at_k(scores.T, positive.T, kk[1]) > 0).float().mean().item())


def test_multi_caption_errors():
    with pytest.raises(ValueError, match="image 1 has no caption"):
        multi_caption_retrieval(torch.eye(3), torch.eye(3), [0, 0, 2])
    with pytest.raises(ValueError, match=r"text_image values must lie in \[0, 3\)"):
        multi_caption_retrieval(torch.eye(3), torch.eye(3), [0, 1, 3])
    with pytest.raises(ValueError, match="text_image must hold integers"):
        multi_caption_retrieval(torch.eye(3), torch.eye(3), [0.0, 1.0, 2.0])


class LargestTensor(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the largest number of elements of any tensor an operation returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(value, torch.Tensor):
                self.largest = max(self.largest, value.numel())
        return out


@pytest.mark.parametrize("metric", ["multi_caption", "zeroshot", "shard_retrieval"])
def test_no_operation_makes_a_full_similarity_matrix(metric):
    """With block_rows rows per block, no tensor of N x M (or N x C) elements is ever made."""
    from lift_fast.eval.metrics import retrieval_metrics

    generator = torch.Generator().manual_seed(5)
    num, dim, block = 300, 8, 16
    images = normalize(torch.randn(num, dim, generator=generator))
    texts = normalize(torch.randn(num, dim, generator=generator))
    run = {"multi_caption": lambda: multi_caption_retrieval(images, texts, torch.arange(num), block_rows=block),
           "zeroshot": lambda: zeroshot_metrics(images, texts, torch.arange(num), block_rows=block),
           "shard_retrieval": lambda: retrieval_metrics(images, texts, torch.arange(num), block_rows=block)}[metric]
    with LargestTensor() as recorder:
        run()
    assert num * dim <= recorder.largest <= block * num  # the features themselves, and one block of similarities
