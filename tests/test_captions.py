"""Several captions per image: the store's rows per (key, caption source), their pairing, and the draw."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lift_fast.config import ConfigError, EmbedConfig
from lift_fast.data.captions import draw_sources, parse_sources, parse_weights
from lift_fast.data.dali import dali_available
from lift_fast.data.loader import build_loader
from lift_fast.data.shards import ShardError, ShardWriter, iter_samples
from lift_fast.data.stream import SampleStream
from lift_fast.embed import StoreMismatchError, embed_shards, load_store, open_store
from lift_fast.embed.manifest import caption_sources

SOURCES = "txt,json:re_caption"


@pytest.fixture(scope="module")
def two_sources(synth_data, text_encoder, tmp_path_factory) -> Path:
    """The store of synth_data/train with the rows of KEY.txt and of KEY.json's re_caption."""
    out = tmp_path_factory.mktemp("two_sources") / "store"
    embed_shards(synth_data / "train", out, EmbedConfig(captions=SOURCES), progress=False, encoder=text_encoder)
    return out


def texts_by_key(data_dir: Path) -> dict[str, tuple[str, str]]:
    """key -> (KEY.txt, KEY.json's re_caption), read straight from the tars."""
    out = {}
    for shard in sorted(data_dir.glob("*.tar")):
        for sample in iter_samples(shard):
            out[sample.key] = (sample.files["txt"].decode().strip(), json.loads(sample.files["json"])["re_caption"])
    return out


def test_two_sources_have_twice_the_rows_each_paired_with_its_source(two_sources, stores, synth_data, text_encoder):
    keys, rows, manifest = load_store(two_sources)
    one_keys, _, _ = load_store(stores / "train")
    assert len(keys) == 2 * len(one_keys) == rows.shape[0]
    assert manifest["captions"] == ["txt", "json:re_caption"] and manifest["version"] == 5
    assert keys[0::2] == keys[1::2] == one_keys  # a key's rows together, in the order of the sources
    texts = texts_by_key(synth_data / "train")
    assert all(texts[k][0] != texts[k][1] for k in one_keys)  # distinct texts, so a swap would show
    # Against the encoder directly, on a fresh pick of keys: each row is its own source's embedding.
    pick = np.random.default_rng().choice(len(one_keys), size=12, replace=False)
    for source in (0, 1):
        expected = text_encoder.encode([texts[one_keys[i]][source] for i in pick]).float().numpy()
        other = text_encoder.encode([texts[one_keys[i]][1 - source] for i in pick]).float().numpy()
        found = rows[2 * pick + source].astype(np.float32)
        np.testing.assert_allclose(found, expected, atol=2e-3)  # float16 storage
        assert np.abs(found - other).max() > 0.05


def test_older_stores_read_as_one_txt_source(stores):
    manifest = json.loads((stores / "train" / "manifest.json").read_text())
    assert caption_sources(manifest) == ("txt",)
    del manifest["captions"]
    assert caption_sources({**manifest, "version": 4}) == ("txt",)
    assert open_store(stores / "train").sources == ("txt",)


def test_a_store_of_other_sources_is_not_added_to(two_sources, synth_data, text_encoder):
    with pytest.raises(StoreMismatchError, match=r"caption sources txt, json:re_caption, not embed.captions=txt"):
        embed_shards(synth_data / "train", two_sources, EmbedConfig(), progress=False, encoder=text_encoder)


def write_shard(folder: Path, json_of: dict[str, dict]) -> Path:
    from io import BytesIO

    from PIL import Image

    buffer = BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(buffer, format="JPEG")
    with ShardWriter(folder, samples_per_shard=100) as writer:
        for key, record in json_of.items():
            writer.write(key, {"jpg": buffer.getvalue(), "txt": f"caption of {key}", "json": json.dumps(record)})
    return folder


def test_a_missing_source_follows_on_error(tmp_path, text_encoder):
    data = write_shard(tmp_path / "data", {"k0": {"re_caption": "a long caption of k0"}, "k1": {"other": 1},
                                            "k2": {"re_caption": "a long caption of k2"}, "k3": {"re_caption": ""}})
    cfg = EmbedConfig(captions=SOURCES)
    with pytest.raises(ShardError, match=r"00000\.tar: sample 'k1', caption source 'json:re_caption': k1\.json has "
                                         r"no field 're_caption' \(set embed.on_error=skip"):
        embed_shards(data, tmp_path / "refused", cfg, progress=False, encoder=text_encoder)
    cfg.on_error = "skip"
    summary = embed_shards(data, tmp_path / "store", cfg, progress=False, encoder=text_encoder)
    keys, rows, manifest = load_store(tmp_path / "store")
    assert keys == ["k0", "k0", "k2", "k2"] and summary["skipped"] == 2 and summary["rows"] == 4
    entry = manifest["shards"]["00000"]
    assert entry["skipped"] == 2 and [s["key"] for s in entry["skipped_samples"]] == ["k1", "k3"]
    assert "caption source 'json:re_caption'" in entry["skipped_samples"][1]["reason"]
    assert "empty" in entry["skipped_samples"][1]["reason"]


def test_the_draw_follows_the_probabilities_and_skips_zero_weights():
    positions = np.arange(40_000)
    for probabilities in ([0.2, 0.8], [0.5, 0.0, 0.25, 0.25], [0.0, 1.0]):
        drawn = draw_sources(7, 3, positions, np.array(probabilities))
        counts = np.bincount(drawn, minlength=len(probabilities))
        expected = np.array(probabilities) * len(positions)
        sigma = np.sqrt(len(positions) * np.array(probabilities) * (1 - np.array(probabilities)))
        assert np.all(np.abs(counts - expected) <= 5 * sigma + 1e-9), (probabilities, counts)
    # A function of (seed, epoch, position): other seeds and epochs draw otherwise, the same ones the same.
    base = draw_sources(7, 3, positions[:512], np.array([0.5, 0.5]))
    assert np.array_equal(base, draw_sources(7, 3, positions[:512], np.array([0.5, 0.5])))
    assert not np.array_equal(base, draw_sources(8, 3, positions[:512], np.array([0.5, 0.5])))
    assert not np.array_equal(base, draw_sources(7, 4, positions[:512], np.array([0.5, 0.5])))


def test_the_draw_is_the_same_over_ranks_and_per_sample():
    stream = SampleStream([16, 9, 23], batch_size=8, seed=5, caption_probabilities=(0.3, 0.7))
    # What a forkserver/spawn worker rebuilds the stream from (ImageTextBatches.__getstate__).
    assert SampleStream(stream.counts, **stream.settings()).batch(4) == stream.batch(4)
    for step in (0, 3, 11):
        whole = stream.batch(step)
        split = stream.batch(step, 0, 2) + stream.batch(step, 1, 2)
        assert whole == split
        assert [ref.source for ref in whole] == [stream.sample(r.epoch, r.position).source for r in whole]
    sources = [ref.source for step in range(6) for ref in stream.batch(step)]
    assert 0 < sum(sources) < len(sources)


def test_weights_and_sources_are_checked():
    sources = parse_sources(SOURCES)
    assert sources == ("txt", "json:re_caption")
    np.testing.assert_allclose(parse_weights("", sources), [0.5, 0.5])
    np.testing.assert_allclose(parse_weights("json:re_caption=3, txt=1", sources), [0.25, 0.75])
    for bad, message in (("txt=1,caption=2", "does not name one of the store's caption sources"),
                         ("txt=-1", "not a number >= 0"), ("txt=0", "every weight is 0")):
        with pytest.raises(ConfigError, match=f"data.caption_weights: .*{message}"):
            parse_weights(bad, sources)
    for bad in ("", "txt,txt", "json:", "caption"):
        with pytest.raises(ConfigError, match="embed.captions"):
            parse_sources(bad)


def store_rows_by_key(store: Path) -> dict[str, np.ndarray]:
    keys, rows, _ = load_store(store)
    out: dict[str, list] = {}
    for key, row in zip(keys, rows):
        out.setdefault(key, []).append(row.astype(np.float32))
    return {key: np.stack(r) for key, r in out.items()}


def train_batches(data: Path, store: Path, steps: int, start_step: int = 0, backend: str = "pil",
                  workers: int = 0) -> list[dict]:
    loader = build_loader(data, store, split="train", batch_size=8, image_size=32, backend=backend, seed=3,
                          num_workers=workers if backend == "pil" else 1, start_step=start_step,
                          caption_weights="txt=0.4,json:re_caption=0.6", prefetch=0)
    batches = []
    for batch in loader:
        batches.append(batch)
        if len(batches) == steps:
            break
    return batches


def test_training_rows_are_the_drawn_sources_and_resume_draws_the_same(two_sources, synth_data):
    data = synth_data / "train"
    rows = store_rows_by_key(two_sources)
    batches = train_batches(data, two_sources, 4)
    stream = SampleStream([16] * 4, batch_size=8, seed=3, caption_probabilities=(0.4, 0.6))
    drawn = []
    for step, batch in enumerate(batches):
        refs = stream.batch(step)
        for key, embedding, ref in zip(batch["keys"], batch["text_embeddings"].numpy(), refs):
            np.testing.assert_array_equal(embedding, rows[key][ref.source])
            drawn.append(ref.source)
    assert 0 < sum(drawn) < len(drawn)  # both sources occur in these 32 samples
    resumed = train_batches(data, two_sources, 2, start_step=2, workers=1)  # in a worker process
    for before, after in zip(batches[2:], resumed):
        assert before["keys"] == after["keys"]
        assert torch.equal(before["text_embeddings"], after["text_embeddings"])


@pytest.mark.skipif(not dali_available()[0], reason="DALI is not usable here")
def test_the_dali_backend_draws_the_same_sources(two_sources, synth_data):
    pil = train_batches(synth_data / "train", two_sources, 2)
    dali = train_batches(synth_data / "train", two_sources, 2, backend="dali")
    for a, b in zip(pil, dali):
        assert a["keys"] == b["keys"]
        assert torch.equal(a["text_embeddings"], b["text_embeddings"])


def test_eval_takes_the_source_it_names(two_sources, synth_data):
    rows = store_rows_by_key(two_sources)
    for name, source in (("", 0), ("txt", 0), ("json:re_caption", 1)):
        loader = build_loader(synth_data / "train", two_sources, split="eval", batch_size=16, image_size=32,
                              backend="pil", num_workers=0, caption_source=name)
        batch = next(iter(loader))
        for key, embedding in zip(batch["keys"], batch["text_embeddings"].numpy()):
            np.testing.assert_array_equal(embedding, rows[key][source])
    with pytest.raises(ConfigError, match=r"eval.caption_source='json:other' is not one of the store's caption "
                                          r"sources \(txt, json:re_caption\)"):
        build_loader(synth_data / "train", two_sources, split="eval", batch_size=16, image_size=32, backend="pil",
                     caption_source="json:other")


def test_a_store_without_txt_is_checked_on_the_json_text(synth_data, text_encoder, tmp_path):
    data = synth_data / "eval"
    store = tmp_path / "store"
    embed_shards(data, store, EmbedConfig(captions="json:re_caption"), progress=False, encoder=text_encoder)
    loader = build_loader(data, store, split="eval", batch_size=32, image_size=32, backend="pil", num_workers=0)
    batch = next(iter(loader))
    texts = texts_by_key(data)
    expected = text_encoder.encode([texts[k][1] for k in batch["keys"]]).float().numpy()
    np.testing.assert_allclose(batch["text_embeddings"].numpy(), expected, atol=2e-3)
    # The store of one folder read with another folder's shards of the same names: refused, naming the key.
    other = write_shard(tmp_path / "other", {k: {"re_caption": f"another caption of {k}"} for k in batch["keys"][:4]})
    with pytest.raises(ShardError, match=r"its caption is not the one its row .* was embedded from"):
        next(iter(build_loader(other, store, split="eval", batch_size=4, image_size=32, backend="pil", num_workers=0)))


def test_a_run_trains_on_two_sources_and_eval_names_its_source(two_sources, synth_data, text_encoder, tmp_path):
    from lift_fast.config import load_config
    from lift_fast.eval import run as eval_run
    from lift_fast.train.loop import train

    eval_store = tmp_path / "eval_store"
    embed_shards(synth_data / "eval", eval_store, EmbedConfig(captions=SOURCES), progress=False, encoder=text_encoder)
    cfg = load_config(overrides=["data.image_size=32", "model.depth=1", "train.steps=2", "train.batch_size=16",
                                 "train.warmup_steps=1", "train.log_every=1", "data.num_workers=0", "data.backend=pil",
                                 "train.checkpoint_every=2", "data.caption_weights=txt=0.5,json:re_caption=0.5"])
    run = tmp_path / "run"
    train(cfg, synth_data / "train", two_sources, run, progress=False)
    results = eval_run.evaluate(run, synth_data / "eval", eval_store, overrides=["eval.caption_source=json:re_caption"],
                                progress=False)
    assert results["caption_source/json:re_caption"] == 1 and "caption_source/txt" not in results
    assert results["num_images"] == 32 and 0 <= results["i2t_r1"] <= 1
    assert all(isinstance(v, (int, float)) for v in results.values())


def test_a_long_caption_of_one_source_leaves_its_whole_sample_out(tmp_path, text_encoder):
    long = " ".join(["word"] * 120)  # past embed.max_length=77 tokens
    data = write_shard(tmp_path / "data", {"k0": {"re_caption": "short"}, "k1": {"re_caption": long},
                                            "k2": {"re_caption": "also short"}})
    with pytest.raises(ShardError, match=r"caption k1\.json field 're_caption' \(caption source 'json:re_caption'\) is "
                                         r"longer than embed.max_length=77"):
        embed_shards(data, tmp_path / "refused", EmbedConfig(captions=SOURCES, on_long="error"), progress=False,
                     encoder=text_encoder)
    embed_shards(data, tmp_path / "store", EmbedConfig(captions=SOURCES, on_long="skip"), progress=False,
                 encoder=text_encoder)
    keys, rows, manifest = load_store(tmp_path / "store")
    assert keys == ["k0", "k0", "k2", "k2"] and manifest["shards"]["00000"]["skipped_samples"][0]["key"] == "k1"
    expected = text_encoder.encode(["caption of k0", "short", "caption of k2", "also short"]).float().numpy()
    np.testing.assert_allclose(rows.astype(np.float32), expected, atol=2e-3)
