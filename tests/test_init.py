"""model.init: a tower started from a timm or open_clip checkpoint, checked against the real timm and
open_clip packages (tiny random-weight models at 32 px): names, the class token, position-embedding
resampling, the trainer's wiring (config.yaml, resume ignores it) and the errors that name keys."""

from __future__ import annotations

import pickle

import open_clip
import pytest
import timm
import torch
from safetensors.torch import load_file, save_file
from timm.layers import resample_abs_pos_embed, resample_patch_embed

from lift_fast import cli
from lift_fast.config import ConfigError, load_config
from lift_fast.models.pretrained import init_tower, read_state_dict, resample_pos_embed
from lift_fast.models.timm_names import timm_kwargs
from lift_fast.models.vit import build_model
from lift_fast.train.checkpoint import latest_checkpoint
from lift_fast.train.loop import run_config, train

TRAIN = ["data.image_size=32", "model.depth=2", "train.batch_size=16", "train.warmup_steps=0", "train.log_every=1",
         "data.num_workers=0", "data.shuffle_window=4", "data.backend=pil", "train.tensorboard=false"]


def lift_model(*overrides: str, image_size: int = 32, text_dim: int = 24):
    cfg = load_config(overrides=["model.depth=2", *overrides])
    return build_model(cfg.model, image_size, text_dim).eval()


def random_timm(name: str = "vit_tiny_patch16_224", seed: int = 0, **kwargs) -> torch.nn.Module:
    """A timm ViT whose every tensor is random (norms and biases too, so that a misplaced one shows)."""
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, **kwargs).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, 0.05)
    return model


def save_timm(model: torch.nn.Module, path) -> str:
    save_file({name: tensor.contiguous() for name, tensor in model.state_dict().items()}, str(path))
    return str(path)


def images(size: int = 32, count: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.randn(count, 3, size, size, generator=torch.Generator().manual_seed(seed))


def timm_features(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model.forward_head(model.forward_features(x), pre_logits=True)


def test_init_from_timm_mean_pooling_reproduces_timm(tmp_path):
    ours = lift_model()
    reference = random_timm(**timm_kwargs(ours))  # no class token, avg pooling, norm before the mean
    summary = init_tower(ours, save_timm(reference, tmp_path / "timm.safetensors"))
    assert summary == {"tensors": len(ours.visual.state_dict()), "from_grid": 2, "grid": 2}
    with torch.no_grad():
        torch.testing.assert_close(ours.visual(images()), timm_features(reference, images()), rtol=0, atol=1e-5)


def test_init_from_timm_class_token(tmp_path):
    # timm's default ViT: a class token whose position is row 0 of pos_embed, and a classifier (dropped)
    reference = random_timm(img_size=32, depth=2, num_classes=10)
    path = save_timm(reference, tmp_path / "timm_cls.safetensors")
    cls_tower = lift_model("model.pooling=cls")
    init_tower(cls_tower, path)
    with torch.no_grad():
        torch.testing.assert_close(cls_tower.visual(images()), timm_features(reference, images()), rtol=0, atol=1e-5)
    mean_tower = lift_model()  # LIFT's mean pooling: the class token is dropped, patches keep their positions
    init_tower(mean_tower, path)
    torch.testing.assert_close(mean_tower.visual.pos_embed.detach(), reference.pos_embed.detach()[:, 1:], rtol=0, atol=0)
    torch.testing.assert_close(mean_tower.visual.blocks[1].mlp.fc2.weight, reference.blocks[1].mlp.fc2.weight, rtol=0,
                               atol=0)


def test_init_resamples_the_position_embedding_as_timm(tmp_path):
    reference = random_timm(**{**timm_kwargs(lift_model()), "img_size": 32})  # grid 2
    path = save_timm(reference, tmp_path / "timm32.safetensors")
    ours = lift_model(image_size=80)  # grid 5
    assert init_tower(ours, path)["from_grid"] == 2
    expected = resample_abs_pos_embed(reference.pos_embed.detach(), [5, 5], num_prefix_tokens=0)
    torch.testing.assert_close(ours.visual.pos_embed.detach(), expected, rtol=0, atol=0)
    # timm's own loader resizes the same way: the 80 px model it builds from the 32 px file is ours
    resized = timm.create_model("vit_tiny_patch16_224", pretrained=True, pretrained_cfg_overlay=dict(file=path),
                                **{**timm_kwargs(lift_model()), "img_size": 80}).eval()
    with torch.no_grad():
        torch.testing.assert_close(ours.visual(images(80)), timm_features(resized, images(80)), rtol=0, atol=1e-5)
    pos = torch.randn(1, 49, 8)
    for grid in (3, 11):  # shrinking and growing, odd sizes
        torch.testing.assert_close(resample_pos_embed(pos, grid), resample_abs_pos_embed(pos, [grid, grid],
                                                                                          num_prefix_tokens=0))


def random_open_clip_visual(**kwargs) -> open_clip.transformer.VisionTransformer:
    torch.manual_seed(3)
    norm = lambda width: torch.nn.LayerNorm(width, eps=1e-6)  # noqa: E731 (lift-fast's eps)
    visual = open_clip.transformer.VisionTransformer(image_size=32, patch_size=16, width=192, layers=2, heads=3,
                                                     mlp_ratio=4.0, output_dim=24, norm_layer=norm, **kwargs).eval()
    with torch.no_grad():
        for param in visual.parameters():
            param.normal_(0, 0.05)
    return visual


def test_init_from_timm_pre_norm(tmp_path):
    ours = lift_model("model.pre_norm=true")
    assert timm_kwargs(ours)["pre_norm"] is True and "pre_norm" not in timm_kwargs(lift_model())
    reference = random_timm(**timm_kwargs(ours))
    init_tower(ours, save_timm(reference, tmp_path / "timm.safetensors"))
    with torch.no_grad():
        torch.testing.assert_close(ours.visual(images()), timm_features(reference, images()), rtol=0, atol=1e-5)
    with pytest.raises(ConfigError, match=r"missing: norm_pre\.weight, norm_pre\.bias\)\. Choose model\.pre_norm=false"):
        init_tower(ours, save_timm(random_timm(**timm_kwargs(lift_model())), tmp_path / "plain.safetensors"))


def test_init_resamples_the_patch_kernel_as_timm(tmp_path):
    # a patch-8 tower at 32 px into a patch-16 tower at 64 px: the same 4 x 4 grid
    reference = random_timm(**{**timm_kwargs(lift_model()), "patch_size": 8})
    path = save_timm(reference, tmp_path / "patch8.safetensors")
    ours = lift_model(image_size=64)
    init_tower(ours, path)
    expected = resample_patch_embed(reference.patch_embed.proj.weight.detach(), [16, 16])
    torch.testing.assert_close(ours.visual.patch_embed.proj.weight.detach(), expected, rtol=0, atol=0)
    resized = timm.create_model("vit_tiny_patch16_224", pretrained=True, pretrained_cfg_overlay=dict(file=path),
                                **{**timm_kwargs(lift_model()), "img_size": 64}).eval()  # timm's own resampling
    with torch.no_grad():
        torch.testing.assert_close(ours.visual(images(64)), timm_features(resized, images(64)), rtol=0, atol=1e-5)


def test_init_keeps_a_fixed_sincos_position_embedding(tmp_path):
    ours = lift_model("model.pos_embed=sincos")
    fixed = ours.visual.pos_embed.clone()
    reference = random_timm(**timm_kwargs(ours))
    init_tower(ours, save_timm(reference, tmp_path / "timm.safetensors"))
    torch.testing.assert_close(ours.visual.pos_embed, fixed, rtol=0, atol=0)  # not learned: not loaded
    torch.testing.assert_close(ours.visual.blocks[0].attn.qkv.weight, reference.blocks[0].attn.qkv.weight, rtol=0, atol=0)


def test_init_from_open_clip_vision_transformer(tmp_path):
    visual = random_open_clip_visual(no_ln_pre=True, pool_type="tok")
    # as the `visual.` part of a whole CLIP checkpoint, with text-tower keys beside it (ignored)
    state = {f"visual.{name}": tensor.contiguous() for name, tensor in visual.state_dict().items()}
    state.update({"logit_scale": torch.tensor(4.6), "token_embedding.weight": torch.zeros(10, 4),
                  "positional_embedding": torch.zeros(77, 4)})
    path = tmp_path / "open_clip.pt"
    torch.save({"state_dict": state, "epoch": 3}, path)  # open_clip's own checkpoint layout
    ours = lift_model("model.pooling=cls")
    assert init_tower(ours, path)["from_grid"] == 2  # the vision tower's grid, not the text's 77 positions
    with torch.no_grad():
        pooled, _ = visual._pool(visual.transformer(visual._embeds(images())))
        torch.testing.assert_close(ours.visual(images()), pooled, rtol=0, atol=1e-5)
    # OpenAI/LAION towers have ln_pre: model.pre_norm=true holds it, a tower without one names it
    with_ln_pre = random_open_clip_visual(pool_type="tok")
    save_file({k: v.contiguous() for k, v in with_ln_pre.state_dict().items()}, str(tmp_path / "ln_pre.safetensors"))
    pre_norm = lift_model("model.pooling=cls", "model.pre_norm=true")
    init_tower(pre_norm, tmp_path / "ln_pre.safetensors")
    with torch.no_grad():
        pooled, _ = with_ln_pre._pool(with_ln_pre.transformer(with_ln_pre._embeds(images())))
        torch.testing.assert_close(pre_norm.visual(images()), pooled, rtol=0, atol=1e-5)
    with pytest.raises(ConfigError, match=r"unexpected: norm_pre\.bias, norm_pre\.weight\)\. Choose model\.pre_norm=true"):
        init_tower(lift_model("model.pooling=cls"), tmp_path / "ln_pre.safetensors")


def test_misfit_checkpoint_names_missing_unexpected_and_misshaped_keys(tmp_path):
    # timm's avg pooling with its default fc_norm: the norm comes after the mean, where this tower has none;
    # an MLP half as wide; two blocks
    reference = random_timm(img_size=32, depth=2, mlp_ratio=2.0, class_token=False, global_pool="avg", num_classes=0)
    save_timm(reference, tmp_path / "misfit.safetensors")
    with pytest.raises(ConfigError) as err:
        init_tower(lift_model("model.depth=3"), tmp_path / "misfit.safetensors")  # mlp_ratio 4, three blocks
    message = str(err.value)
    assert "model.init=" in message and "misfit.safetensors" in message
    assert "missing: blocks.2.norm1.weight" in message and "norm.weight, norm.bias;" in message
    assert "unexpected: fc_norm.bias, fc_norm.weight;" in message
    assert "mis-shaped, file vs model: " in message and "blocks.0.mlp.fc1.weight (384, 192) vs (768, 192)," in message


def test_read_state_dict_kinds_and_refusals(tmp_path):
    weights = {"a": torch.randn(2, 3), "b": torch.randn(4)}
    torch.save({"model": {f"module.{k}": v for k, v in weights.items()}}, tmp_path / "ddp.pth")
    read = read_state_dict(tmp_path / "ddp.pth")
    assert read.keys() == weights.keys() and all(torch.equal(read[k], weights[k]) for k in weights)
    with open(tmp_path / "code.pt", "wb") as file:
        pickle.dump({"a": torch.zeros(1), "run": ConfigError("a pickled object, not a tensor")}, file, protocol=2)
    with pytest.raises(ConfigError, match=r"weights_only=True"):
        read_state_dict(tmp_path / "code.pt")
    (tmp_path / "weights.npz").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"unknown checkpoint kind '\.npz'"):
        read_state_dict(tmp_path / "weights.npz")
    with pytest.raises(ConfigError, match="no such file"):
        read_state_dict(tmp_path / "absent.safetensors")
    save_file({"head.weight": torch.zeros(2, 2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ConfigError, match="neither a timm nor an open_clip"):
        init_tower(lift_model(), tmp_path / "other.safetensors")


def test_train_command_names_a_bad_model_init(synth_data, stores, tmp_path, capsys):
    code = cli.main(["-q", "train", "--data", str(synth_data / "train"), "--embeddings", str(stores / "train"),
                     "--run", str(tmp_path / "run"), *TRAIN, f"model.init={tmp_path / 'absent.safetensors'}"])
    assert code == 2 and not (tmp_path / "run").exists()
    error = capsys.readouterr().err.strip()
    assert error.startswith("lift-fast train: error: model.init=") and "absent.safetensors': no such file" in error


def test_training_starts_from_model_init_and_resume_ignores_it(synth_data, stores, tmp_path):
    reference = random_timm(**timm_kwargs(lift_model()))
    path = save_timm(reference, tmp_path / "init.safetensors")
    run = tmp_path / "run"
    # lr 0: the step-1 checkpoint still holds the weights the run started from (timm's)
    cfg = load_config(overrides=TRAIN + [f"model.init={path}", "train.steps=1", "train.lr=0"])
    train(cfg, synth_data / "train", stores / "train", run, progress=False)
    assert load_config(run / "config.yaml").model.init == path  # recorded
    weights = load_file(str(latest_checkpoint(run) / "model.safetensors"))
    ours = lift_model(text_dim=int(weights["head.fc2.weight"].shape[0]))
    ours.load_state_dict(weights)
    with torch.no_grad():
        torch.testing.assert_close(ours.visual(images()), timm_features(reference, images()), rtol=0, atol=1e-5)
    # resume: the checkpoint wins, the init file is not even read (here it is no checkpoint any more)
    (tmp_path / "init.safetensors").write_bytes(b"not a checkpoint")
    resumed = run_config(run, "auto", overrides=["train.steps=2"])
    assert resumed.model.init == path
    assert train(resumed, synth_data / "train", stores / "train", run, resume="auto", progress=False)["step"] == 2
    # a fresh run would read it, and says which file and why
    with pytest.raises(ConfigError, match=r"model.init=.*init\.safetensors"):
        train(cfg, synth_data / "train", stores / "train", tmp_path / "fresh", progress=False)
    assert not (tmp_path / "fresh").exists()  # refused before the run folder is written
