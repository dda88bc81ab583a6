"""`lift-fast export` and `lift_fast.load_image_encoder`, checked with the real timm and open_clip packages:
timm loads the tower strictly (local-dir and pretrained_cfg_overlay) with the same features, open_clip's
CLIP gives the LIFT features, a lift export round-trips, and every export records where it came from.
Runs are tiny (depth 2, 32 px) and their weights random, norms and biases included, so a misplaced
tensor shows."""

from __future__ import annotations

import json

import open_clip
import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

import lift_fast
from lift_fast import cli
from lift_fast.config import ConfigError, config_to_dict, load_config, save_config
from lift_fast.data.augment import CLIP_MEAN, CLIP_STD, open_image
from lift_fast.data.loader import build_loader
from lift_fast.data.shards import iter_samples, list_shards
from lift_fast.embed.store import read_manifest
from lift_fast.export import EvalTransform, export_config, export_run, timm_config
from lift_fast.models.pretrained import init_tower
from lift_fast.models.timm_names import timm_kwargs
from lift_fast.models.vit import build_model
from lift_fast.train.checkpoint import save_checkpoint
from lift_fast.train.loop import train

RUN = ["data.image_size=32", "model.depth=2", "train.batch_size=16", "train.warmup_steps=0", "data.num_workers=0",
       "data.shuffle_window=4", "data.backend=pil", "train.tensorboard=false"]
TEXT_DIM = 384  # the bundled encoder's, as the stores of conftest


def make_run(folder, *overrides: str, step: int = 7, seed: int = 0, saved_attention: str = ""):
    """A run folder (config.yaml, one checkpoint) whose model has random weights; returns (folder, model).
    saved_attention: the model.attention config.yaml says (flash, which cannot run here)."""
    cfg = load_config(overrides=RUN + list(overrides))
    torch.manual_seed(seed)
    model = build_model(cfg.model, cfg.data.image_size, TEXT_DIM).eval()
    if cfg.train.loss == "siglip":
        model.register_parameter("logit_bias", torch.nn.Parameter(torch.tensor(-3.5)))
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, 0.05)
    folder.mkdir(parents=True)
    cfg.model.attention = saved_attention or cfg.model.attention
    save_config(cfg, folder / "config.yaml")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    save_checkpoint(folder, step, model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0))
    return folder, model


def images(size: int = 32, count: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.randn(count, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("settings", [["model.pooling=mean"], ["model.pooling=cls"], ["model.pre_norm=true"]])
def test_timm_export_loads_strictly_with_the_same_features(tmp_path, settings):
    run, model = make_run(tmp_path / "run", *settings)
    record = export_run(run, tmp_path / "timm", "timm")
    assert sorted(record["files"]) == ["config.json", "model.safetensors"]
    with torch.no_grad():
        expected = model.visual(images())
        from_dir = timm.create_model(f"local-dir:{tmp_path / 'timm'}", pretrained=True).eval()  # strict load
        torch.testing.assert_close(from_dir(images()), expected, rtol=0, atol=1e-5)
        torch.testing.assert_close(from_dir.forward_head(from_dir.forward_features(images()), pre_logits=True),
                                   expected, rtol=0, atol=1e-5)
        # the form: a registered architecture, the file as an overlay, timm_kwargs
        architecture = json.loads((tmp_path / "timm" / "config.json").read_text())["architecture"]
        by_name = timm.create_model(architecture, pretrained=True, **timm_kwargs(model),
                                    pretrained_cfg_overlay=dict(file=str(tmp_path / "timm" / "model.safetensors"))).eval()
        torch.testing.assert_close(by_name(images()), expected, rtol=0, atol=1e-5)
    data = timm.data.resolve_data_config({}, model=from_dir)
    assert data["input_size"] == (3, 32, 32) and data["interpolation"] == "bicubic" and data["crop_pct"] == 1.0
    assert data["mean"] == pytest.approx(CLIP_MEAN) and data["std"] == pytest.approx(CLIP_STD)
    # strict: one tensor too many and timm refuses the folder
    weights = load_file(str(tmp_path / "timm" / "model.safetensors"))
    save_file({**weights, "fc_norm.weight": torch.ones(192)}, str(tmp_path / "timm" / "model.safetensors"))
    with pytest.raises(RuntimeError, match="fc_norm.weight"):
        timm.create_model(f"local-dir:{tmp_path / 'timm'}", pretrained=True)


def test_timm_config_names_a_registered_architecture(tmp_path):
    for name, patch in (("vit_b16", 16), ("vit_base_patch32", 32), ("vit_large_patch14", 14), ("vit_tiny_patch16", 8)):
        cfg = load_config(overrides=[f"model.name={name}", "model.depth=1", f"model.patch_size={patch}"])
        config = timm_config(build_model(cfg.model, 8 * patch, 16))
        assert timm.is_model(config["architecture"]), config["architecture"]
        assert config["model_args"]["patch_size"] == patch and config["model_args"]["depth"] == 1


@pytest.mark.parametrize("settings", [["model.pooling=mean"], ["model.pooling=cls", "model.pre_norm=true"]])
def test_open_clip_export_gives_the_lift_features(tmp_path, settings):
    run, model = make_run(tmp_path / "run", *settings)
    export_run(run, tmp_path / "oc", "open_clip")
    clip = open_clip.create_model(f"local-dir:{tmp_path / 'oc'}")
    clip.visual.load_state_dict(load_file(str(tmp_path / "oc" / "visual" / "open_clip_visual.safetensors")))  # strict
    clip.eval()
    with torch.no_grad():
        torch.testing.assert_close(clip.encode_image(images(), normalize=True), model(images()), rtol=0, atol=1e-5)
    _, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'oc'}")
    normalize = preprocess.transforms[-1]
    assert tuple(normalize.mean) == pytest.approx(CLIP_MEAN) and tuple(normalize.std) == pytest.approx(CLIP_STD)
    # the export is also a model.init: its trunk is the tower (a pre-norm tower's patch bias comes back
    # inside the position embedding, equal up to float rounding)
    tower = build_model(export_config(run).model, 32, TEXT_DIM).eval()
    init_tower(tower, tmp_path / "oc" / "visual" / "open_clip_visual.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(tower.visual(images()), model.visual(images()), rtol=0, atol=1e-6)
    # a head wider than open_clip's 2 x embed_dim hidden units has no place there
    wide, _ = make_run(tmp_path / "wide", f"model.head_hidden={2 * TEXT_DIM + 1}")
    with pytest.raises(ConfigError, match=r"model.head_hidden=769 is wider"):
        export_run(wide, tmp_path / "oc_wide", "open_clip")
    assert not (tmp_path / "oc_wide").exists() and not (tmp_path / ".tmp_oc_wide").exists()


def test_lift_export_round_trip(tmp_path):
    # trained with flash-attn on a GPU, loaded on a CPU: the same weights run with SDPA
    run, model = make_run(tmp_path / "run", "train.loss=siglip", step=12, saved_attention="flash")
    record = export_run(run, tmp_path / "lift", "lift")
    assert record["checkpoint_step"] == 12 and record["files"] == ["model.safetensors"]
    for path in (tmp_path / "lift", run, run / "checkpoints" / "step_000012"):  # an export, the run, a checkpoint
        loaded, preprocess = lift_fast.load_image_encoder(path)
        assert not loaded.training and isinstance(preprocess, EvalTransform) and preprocess.image_size == 32
        with torch.no_grad():
            torch.testing.assert_close(loaded(images()), model(images()), rtol=0, atol=0)
        assert loaded.logit_scale.item() == model.logit_scale.item()
        assert loaded.logit_bias.item() == model.logit_bias.item()
        assert path.name.startswith("step_") or export_config(path) == load_config(run / "config.yaml")
    with pytest.raises(FileNotFoundError, match="neither a lift export"):
        lift_fast.load_image_encoder(tmp_path)
    export_run(run, tmp_path / "as_timm", "timm")
    with pytest.raises(ValueError, match="a 'timm' export"):
        lift_fast.load_image_encoder(tmp_path / "as_timm")


def test_preprocess_is_the_eval_loaders_view(synth_data, stores):
    # 24 px out of the 32 px synthetic images: the resize is a real one
    loader = build_loader(synth_data / "eval", stores / "eval", split="eval", batch_size=8, image_size=24,
                          backend="pil", num_workers=0)
    batch = next(iter(loader))
    encoded = {sample.key: sample.image_bytes() for shard in list_shards(synth_data / "eval")
               for sample in iter_samples(shard)}
    preprocess = EvalTransform(24)
    ours = torch.stack([preprocess(open_image(encoded[key], key)) for key in batch["keys"]])
    torch.testing.assert_close(ours, batch["images"], rtol=0, atol=1e-6)


def test_export_command_records_the_run(synth_data, stores, tmp_path, capsys):
    run = tmp_path / "run"
    train(load_config(overrides=RUN + ["train.steps=2", "train.checkpoint_every=0"]), synth_data / "train",
          stores / "train", run, progress=False)
    out = tmp_path / "exported"
    assert cli.main(["export", "--run", str(run), "--out", str(out), "--format", "lift",
                     "--embeddings", str(stores / "train")]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["format"] == "lift" and printed["checkpoint_step"] == 2
    record = json.loads((out / "lift_export.json").read_text())
    assert record["checkpoint_step"] == 2 and record["checkpoint"].endswith("step_000002")
    assert record["config"] == config_to_dict(load_config(run / "config.yaml"))
    assert record["store_manifest"] == read_manifest(stores / "train")
    assert record["encoder"]["weights_sha256"] == read_manifest(stores / "train")["encoder"]["weights_sha256"]
    assert record["preprocess"]["image_size"] == 32 and record["text_dim"] == TEXT_DIM
    # without --embeddings, the manifest training left in the run folder is the one recorded
    assert json.loads((run / "store_manifest.json").read_text()) == read_manifest(stores / "train")
    assert cli.main(["export", "--run", str(run), "--out", str(tmp_path / "from_run"), "--format", "timm"]) == 0
    from_run = json.loads((tmp_path / "from_run" / "lift_export.json").read_text())
    assert from_run["store_manifest"] == read_manifest(stores / "train")
    # without either, the run's embed settings are the identity recorded
    (run / "store_manifest.json").unlink()
    assert cli.main(["export", "--run", str(run), "--out", str(tmp_path / "bare"), "--format", "timm"]) == 0
    bare = json.loads((tmp_path / "bare" / "lift_export.json").read_text())
    assert bare["store_manifest"] is None and bare["encoder"]["model"] == load_config(run / "config.yaml").embed.model
    capsys.readouterr()
    # refusals: a folder already written, a checkpoint that is not one
    assert cli.main(["export", "--run", str(run), "--out", str(out), "--format", "timm"]) == 2
    assert "exists and is not an empty folder" in capsys.readouterr().err
    assert cli.main(["export", "--run", str(run), "--out", str(tmp_path / "x"), "--format", "timm",
                     "--checkpoint", str(tmp_path)]) == 2
    assert "not a checkpoint folder" in capsys.readouterr().err
