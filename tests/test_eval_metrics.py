"""Retrieval and compositional metrics on hand-made embeddings, and SugarCrepe file loading."""

from __future__ import annotations

import json
import math

import pytest
import torch

from lift_fast.eval.metrics import compositional_accuracy, retrieval_metrics, unique_captions
from lift_fast.eval.sugarcrepe import SugarCrepeError, load_sugarcrepe


def normalize(features: torch.Tensor) -> torch.Tensor:
    return features / features.norm(dim=1, keepdim=True)


def unit_with_cosine(cosine: float, axis: int, dim: int) -> torch.Tensor:
    """A unit vector whose dot product with e_0 is `cosine`, the rest of it along e_axis."""
    vector = torch.zeros(dim)
    vector[0] = cosine
    vector[axis] = math.sqrt(1.0 - cosine**2)
    return vector


def reference_retrieval(image_features, text_features, caption_index, ks):
    """Recall by fully sorting float64 scores, ties ordered against the model (true item last)."""
    similarity = (image_features.double() @ text_features.double().T).tolist()
    caption_index = [int(c) for c in caption_index]
    num_images, num_texts = len(similarity), len(similarity[0])
    i2t_rank = []
    for i in range(num_images):
        order = sorted(range(num_texts), key=lambda j: (-similarity[i][j], j == caption_index[i]))
        i2t_rank.append(order.index(caption_index[i]))
    t2i_rank = []
    for j in sorted(set(caption_index)):
        order = sorted(range(num_images), key=lambda i: (-similarity[i][j], caption_index[i] == j))
        t2i_rank.append(next(position for position, i in enumerate(order) if caption_index[i] == j))
    metrics = {}
    for k in ks:
        metrics[f"i2t_r{k}"] = sum(rank < k for rank in i2t_rank) / num_images
        metrics[f"t2i_r{k}"] = sum(rank < k for rank in t2i_rank) / len(t2i_rank)
    return metrics


# --- retrieval_metrics -----------------------------------------------------------------------------


def test_identity_features_are_perfect():
    features = torch.eye(6)
    metrics = retrieval_metrics(features, features.clone(), torch.arange(6))
    assert metrics == {
        "i2t_r1": 1.0,
        "i2t_r5": 1.0,
        "t2i_r1": 1.0,
        "t2i_r5": 1.0,
        "chance_r1": pytest.approx(1 / 6),
        "t2i_chance_r1": pytest.approx(1 / 6),
    }


@pytest.mark.parametrize("num_fixed", [0, 1, 3, 9])
def test_permutation_with_k_fixed_points_gives_r1_k_over_n(num_fixed):
    num_items = 9
    # Texts are the image basis permuted by a cyclic shift of the last (num_items - num_fixed)
    # rows, so exactly num_fixed images sit on their own text; the rest score 0 against their
    # true text and tie with N-2 other texts at 0, which ranks them last (ties against the model).
    moved = list(range(num_fixed, num_items))
    permutation = list(range(num_fixed)) + moved[1:] + moved[:1]
    image_features = torch.eye(num_items)
    text_features = torch.eye(num_items)[permutation]
    assert sum(p == i for i, p in enumerate(permutation)) == num_fixed
    metrics = retrieval_metrics(image_features, text_features, torch.arange(num_items), ks=(1, 5))
    assert metrics["i2t_r1"] == pytest.approx(num_fixed / num_items)
    assert metrics["i2t_r5"] == pytest.approx(num_fixed / num_items)
    assert metrics["t2i_r1"] == pytest.approx(num_fixed / num_items)


def test_true_text_ranked_third():
    dim = 8
    image_features = torch.zeros(1, dim)
    image_features[0, 0] = 1.0
    # Scores against the image: 0.9, 0.8, 0.7 (the true text, index 2), 0.1, -0.5.
    cosines = [0.9, 0.8, 0.7, 0.1, -0.5]
    text_features = torch.stack([unit_with_cosine(c, axis, dim) for axis, c in enumerate(cosines, start=1)])
    metrics = retrieval_metrics(image_features, text_features, [2], ks=(1, 2, 3, 5))
    assert (metrics["i2t_r1"], metrics["i2t_r2"], metrics["i2t_r3"], metrics["i2t_r5"]) == (0.0, 0.0, 1.0, 1.0)
    assert metrics["chance_r1"] == pytest.approx(1 / 5)
    # The only image is the best (and only) image for text 2.
    assert metrics["t2i_r1"] == 1.0


def test_repeated_captions_text_to_image():
    dim = 8
    # Text 0 = e_0. Images 0, 1 have text 0; images 2, 3 have text 1 (= e_7); text 2 is unused.
    text_features = torch.zeros(3, dim)
    text_features[0, 0] = 1.0
    text_features[1, 7] = 1.0
    text_features[2, 6] = 1.0
    image_features = torch.stack(
        [
            unit_with_cosine(0.2, 1, dim),  # text 0's worse image
            unit_with_cosine(0.9, 2, dim),  # text 0's best image: t2i rank 1 for text 0
            unit_with_cosine(0.0, 7, dim),  # text 1's best image (score 1.0 against e_7) ...
            unit_with_cosine(0.95, 7, dim),  # ... but scores 0.95 against text 0, above images 0 and 1
        ]
    )
    caption_index = torch.tensor([0, 0, 1, 1])
    metrics = retrieval_metrics(image_features, text_features, caption_index, ks=(1, 2))
    # t2i text 0: image 3 (0.95, wrong) ranks above image 1 (0.9) -> miss at 1, hit at 2.
    # t2i text 1: image 2 scores 1.0 -> hit. Text 2 has no image, so it is no query.
    assert metrics["t2i_r1"] == pytest.approx(1 / 2)
    assert metrics["t2i_r2"] == 1.0
    assert metrics["t2i_chance_r1"] == pytest.approx((2 / 4 + 2 / 4) / 2)
    assert metrics["chance_r1"] == pytest.approx(1 / 3)
    # i2t: image 0 (0.2 vs text 0, 0 vs the rest) hit; image 1 hit; image 2 hit; image 3 scores
    # 0.95 on text 0 and 0.312 on its true text 1 -> miss at 1, hit at 2.
    assert metrics["i2t_r1"] == pytest.approx(3 / 4)
    assert metrics["i2t_r2"] == 1.0
    assert metrics == pytest.approx(reference_retrieval(image_features, text_features, caption_index, (1, 2)) | {
        "chance_r1": 1 / 3,
        "t2i_chance_r1": 1 / 2,
    })


def test_tie_with_the_true_text_is_not_a_hit():
    image_features = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # Text 0 and text 1 are the same vector: image 0 ties between its true text 0 and text 1.
    text_features = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    metrics = retrieval_metrics(image_features, text_features, [0, 2], ks=(1, 2))
    assert metrics["i2t_r1"] == pytest.approx(1 / 2)
    assert metrics["i2t_r2"] == 1.0


def test_constant_model_scores_zero_not_one():
    num_images, num_texts = 7, 5
    features = normalize(torch.ones(1, 4))
    caption_index = torch.tensor([0, 1, 2, 3, 4, 0, 0])
    metrics = retrieval_metrics(features.expand(num_images, 4), features.expand(num_texts, 4), caption_index, ks=(1, 3))
    assert metrics["i2t_r1"] == 0.0
    assert metrics["i2t_r3"] == 0.0
    assert metrics["t2i_r1"] == 0.0
    # Every image ties: text 0's first image comes after the 4 images of other texts, so it is
    # found within the top 5 but not the top 3; texts 1..4 have 6 wrong images ahead.
    assert metrics["t2i_r3"] == 0.0
    metrics = retrieval_metrics(features.expand(num_images, 4), features.expand(num_texts, 4), caption_index, ks=(5,))
    assert metrics["t2i_r5"] == pytest.approx(1 / 5)


@pytest.mark.parametrize("block_rows", [1, 5, None])
@pytest.mark.parametrize("num_images,num_texts,dim", [(1, 1, 3), (37, 23, 7), (64, 64, 16)])
def test_matches_float64_sorting_reference_on_random_features(block_rows, num_images, num_texts, dim):
    generator = torch.Generator().manual_seed(num_images * 1000 + num_texts)
    image_features = normalize(torch.randn(num_images, dim, generator=generator))
    text_features = normalize(torch.randn(num_texts, dim, generator=generator))
    # Every text used at least once when possible, plus random repeats.
    caption_index = torch.randint(0, num_texts, (num_images,), generator=generator)
    caption_index[: min(num_images, num_texts)] = torch.randperm(num_texts, generator=generator)[:num_images]
    # Pull images towards their text so recall is neither 0 nor 1.
    image_features = normalize(image_features + 0.5 * text_features[caption_index])
    ks = (1, 5, 10)
    metrics = retrieval_metrics(image_features, text_features, caption_index, ks=ks, block_rows=block_rows)
    expected = reference_retrieval(image_features, text_features, caption_index, ks)
    for name, value in expected.items():
        assert metrics[name] == pytest.approx(value, abs=1e-12), name
    if num_images > 1:
        assert 0.0 < expected["i2t_r1"] < 1.0 and 0.0 < expected["t2i_r1"] < 1.0
    assert metrics["chance_r1"] == pytest.approx(1 / num_texts)
    counts = torch.bincount(caption_index, minlength=num_texts)
    counts = counts[counts > 0].double()
    assert metrics["t2i_chance_r1"] == pytest.approx((counts / num_images).mean().item())


def test_half_precision_inputs_are_scored_in_float32():
    generator = torch.Generator().manual_seed(3)
    features = normalize(torch.randn(10, 8, generator=generator))
    metrics = retrieval_metrics(features.half(), features.half(), torch.arange(10))
    assert metrics["i2t_r1"] == 1.0 and metrics["t2i_r1"] == 1.0


@pytest.mark.parametrize(
    "image_shape,text_shape,caption_index,message",
    [
        ((4, 8), (3, 6), [0, 1, 2, 0], r"\(4, 8\).*\(3, 6\)"),
        ((4, 8), (3, 8), [0, 1, 2], r"caption_index must have shape \[N\] = \(4,\).*got \(3,\)"),
        ((4, 8), (3, 8), [0, 1, 2, 3], r"\[0, 3\).*\[0, 3\]"),
        ((4, 8), (3, 8), [-1, 1, 2, 0], r"\[0, 3\).*\[-1, 2\]"),
        ((4, 8), (3, 8), [0.0, 1.0, 2.0, 0.0], "integers"),
        ((4,), (3, 8), [0, 1, 2, 0], r"image_features must be 2-D.*\(4,\)"),
        ((0, 8), (3, 8), [], "no rows"),
    ],
)
def test_retrieval_shape_errors_name_the_shapes(image_shape, text_shape, caption_index, message):
    with pytest.raises(ValueError, match=message):
        retrieval_metrics(torch.ones(image_shape), torch.ones(text_shape), torch.tensor(caption_index))


def test_retrieval_rejects_bad_ks_and_nan():
    features = torch.eye(3)
    with pytest.raises(ValueError, match="ks"):
        retrieval_metrics(features, features, [0, 1, 2], ks=(0,))
    with pytest.raises(ValueError, match="NaN"):
        retrieval_metrics(features * float("nan"), features, [0, 1, 2])


# --- compositional_accuracy ------------------------------------------------------------------------


def test_compositional_accuracy_known_count():
    dim = 8
    image_features = torch.zeros(6, dim)
    image_features[:, 0] = 1.0
    positive_cosines = [0.9, 0.5, 0.1, 0.3, 0.2, 0.7]
    negative_cosines = [0.1, 0.4, -0.2, 0.3, 0.6, 0.8]  # wins, wins, wins, tie, loses, loses
    positive_features = torch.stack([unit_with_cosine(c, 1, dim) for c in positive_cosines])
    negative_features = torch.stack([unit_with_cosine(c, 2, dim) for c in negative_cosines])
    assert compositional_accuracy(image_features, positive_features, negative_features) == pytest.approx(3 / 6)
    # Identical positive and negative is a tie on every row: accuracy 0, not 1.
    assert compositional_accuracy(image_features, positive_features, positive_features.clone()) == 0.0


def test_compositional_accuracy_matches_float64_reference():
    generator = torch.Generator().manual_seed(11)
    image_features, positive_features, negative_features = (
        normalize(torch.randn(53, 9, generator=generator)) for _ in range(3)
    )
    expected = (
        ((image_features.double() * positive_features.double()).sum(1)
         > (image_features.double() * negative_features.double()).sum(1))
        .double()
        .mean()
        .item()
    )
    assert 0.0 < expected < 1.0
    assert compositional_accuracy(image_features, positive_features, negative_features) == pytest.approx(expected)


def test_compositional_accuracy_shape_error():
    with pytest.raises(ValueError, match=r"\(4, 8\), \(4, 8\), \(4, 7\)"):
        compositional_accuracy(torch.ones(4, 8), torch.ones(4, 8), torch.ones(4, 7))


# --- unique_captions -------------------------------------------------------------------------------


def test_unique_captions_first_seen_order():
    captions = ["a red cube", "a blue ball", "a red cube", "x", "a blue ball", "a red cube"]
    unique, caption_index = unique_captions(captions)
    assert unique == ["a red cube", "a blue ball", "x"]
    assert caption_index == [0, 1, 0, 2, 1, 0]
    assert [unique[i] for i in caption_index] == captions
    assert unique_captions([]) == ([], [])


# --- SugarCrepe loading ----------------------------------------------------------------------------


def item(filename="000000000139.jpg", caption="a red cube left of a ball", negative_caption="a ball left of a red cube"):
    return {"filename": filename, "caption": caption, "negative_caption": negative_caption}


def write_json(path, data):
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def test_load_sugarcrepe_categories_and_numeric_order(tmp_path):
    write_json(
        tmp_path / "swap_att.json",
        {str(i): item(filename=f"{i:05d}.jpg", caption=f"caption {i}", negative_caption=f"negative {i}") for i in (10, 2, 0, 1)},
    )
    write_json(tmp_path / "replace_rel.json", {"0": item(filename="val2017/000000000285.jpg") | {"source": "ignored"}})
    (tmp_path / "notes.txt").write_text("not a category")
    categories = load_sugarcrepe(tmp_path)
    assert list(categories) == ["replace_rel", "swap_att"]
    swap = categories["swap_att"]
    assert [entry["id"] for entry in swap] == ["0", "1", "2", "10"]
    assert [entry["key"] for entry in swap] == ["00000", "00001", "00002", "00010"]
    assert swap[3] == {
        "id": "10",
        "filename": "00010.jpg",
        "key": "00010",
        "caption": "caption 10",
        "negative_caption": "negative 10",
    }
    assert categories["replace_rel"][0]["key"] == "000000000285"


def test_load_sugarcrepe_missing_or_empty_folder(tmp_path):
    with pytest.raises(SugarCrepeError, match="does not exist"):
        load_sugarcrepe(tmp_path / "absent")
    with pytest.raises(SugarCrepeError, match=r"no \*\.json"):
        load_sugarcrepe(tmp_path)


@pytest.mark.parametrize(
    "content,message",
    [
        ('{"0": {"filename": "a.jpg",', "cannot read as JSON"),
        (json.dumps([item()]), "top level must be an object.*list"),
        (json.dumps({}), "has no items"),
        (json.dumps({"0": item(), "7": "a string"}), "item '7' must be an object"),
        (json.dumps({"0": item(), "3": {"filename": "a.jpg", "caption": "c"}}), "item '3' has no 'negative_caption'"),
        (json.dumps({"4": item(caption="  ")}), "item '4' field 'caption' is empty"),
        (json.dumps({"5": item(negative_caption="")}), "item '5' field 'negative_caption' is empty"),
        (json.dumps({"6": item(caption=None)}), "item '6' field 'caption' must be a string"),
        (json.dumps({"first": item()}), "item id 'first' is not an integer"),
        ('{"1": ' + json.dumps(item()) + ', "1": ' + json.dumps(item()) + "}", "duplicate key '1'"),
        (json.dumps({"1": item(), "01": item()}), "'1' and '01' are the same number"),
    ],
)
def test_load_sugarcrepe_errors_name_file_and_item(tmp_path, content, message):
    write_json(tmp_path / "replace_att.json", {"0": item()})
    (tmp_path / "swap_obj.json").write_text(content, encoding="utf-8")
    with pytest.raises(SugarCrepeError, match=message) as error:
        load_sugarcrepe(tmp_path)
    assert "swap_obj.json" in str(error.value)
    assert isinstance(error.value, ValueError)
