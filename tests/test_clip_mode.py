"""The CLIP baseline in the trainer (model.text_tower=transformer): the text tower trained jointly on the
loader's token ids, its loss falling, exact resume after SIGTERM, its optimiser groups, the FLOPs it
logs, and eval embedding text with the trained tower."""

from __future__ import annotations

import json
import math
import os
import signal

import pytest
import torch
from safetensors.torch import load_file
from two_ranks import fork_ranks

from lift_fast.config import ConfigError, load_config
from lift_fast.data.dali import dali_available
from lift_fast.data.loader import build_loader
from lift_fast.models.flops import train_flops_per_sample
from lift_fast.models.text_tower import text_spec
from lift_fast.models.tokenizer import build_tokenizer
from lift_fast.models.vit import vit_spec
from lift_fast.train import loop as loop_module
from lift_fast.train.loop import TrainingInterrupted, train
from lift_fast.train.optim import parameter_groups

CLIP = ["model.text_tower=transformer", "model.text_width=64", "model.text_layers=1", "model.text_heads=2",
        "model.text_context=24", "data.image_size=32", "model.depth=1", "train.batch_size=16", "train.lr=3e-4",
        "train.warmup_steps=3", "train.log_every=1", "data.num_workers=0", "data.shuffle_window=4",
        "data.backend=pil", "train.checkpoint_every=0"]


def clip_config(*extra: str):
    return load_config(overrides=CLIP + list(extra))


def read_metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def clip_run(synth_data, stores, tmp_path_factory):
    """A 40-step CLIP-mode run."""
    run = tmp_path_factory.mktemp("clip") / "run"
    result = train(clip_config("train.steps=40"), synth_data / "train", stores / "train", run, progress=False)
    return run, result


def test_clip_mode_trains_both_towers_and_its_loss_falls(clip_run):
    run, result = clip_run
    losses = [record["loss"] for record in read_metrics(run)]
    assert len(losses) == 40 and all(math.isfinite(loss) for loss in losses)
    assert sum(losses[-8:]) / 8 < sum(losses[:8]) / 8 - 0.3  # from ln(16) = 2.77 well down
    trained = load_file(str(run / "checkpoints" / "step_000040" / "model.safetensors"))
    assert "text.token_embedding.weight" in trained and "head.fc2.weight" in trained
    # the initial weights, built as the run built them (seed, image tower, then the text tower)
    from lift_fast.models.text_tower import build_text_tower
    from lift_fast.models.vit import build_model

    cfg = clip_config()
    dim = trained["head.fc2.weight"].shape[0]
    torch.manual_seed(cfg.train.seed)
    build_model(cfg.model, cfg.data.image_size, dim, cfg.train.logit_scale_init)
    initial = build_text_tower(cfg.model, dim)[0].state_dict()
    for name in ("projection.weight", "blocks.0.attn.qkv.weight", "token_embedding.weight"):
        assert initial[name].shape == trained[f"text.{name}"].shape
        assert not torch.allclose(initial[name], trained[f"text.{name}"])  # trained jointly, not frozen


def test_clip_mode_logs_the_flops_module_count(clip_run, stores):
    run, _ = clip_run
    cfg = clip_config()
    dim = json.loads((stores / "train" / "manifest.json").read_text())["dim"]
    spec = vit_spec(cfg.model.name, patch_size=cfg.model.patch_size, depth=cfg.model.depth)
    expected = train_flops_per_sample(spec, cfg.data.image_size, dim, cfg.train.batch_size,
                                      head_hidden=cfg.model.head_hidden, pooling=cfg.model.pooling,
                                      text=text_spec(cfg.model, build_tokenizer(cfg.model).vocab_size))
    without_text = train_flops_per_sample(spec, cfg.data.image_size, dim, cfg.train.batch_size,
                                          head_hidden=cfg.model.head_hidden, pooling=cfg.model.pooling)
    records = read_metrics(run)
    assert records[0]["flops_per_sample"] == expected > without_text
    assert records[5]["tflops"] == pytest.approx(records[5]["samples_per_second"] * expected / 1e12)


def test_clip_mode_sigterm_then_resume_gives_the_exact_run(synth_data, stores, tmp_path, monkeypatch):
    """Stopped by SIGTERM at step 4 and resumed, a CLIP-mode run logs the very losses and ends with the
    very weights (both towers) of an uninterrupted one."""
    cfg = clip_config("train.steps=9", "data.num_workers=1", "data.hflip=true")
    whole = tmp_path / "whole"
    train(cfg, synth_data / "train", stores / "train", whole, progress=False)
    run, calls, loss = tmp_path / "run", [], loop_module.contrastive_loss

    def wrapped(*args):
        calls.append(1)
        if len(calls) == 4:
            os.kill(os.getpid(), signal.SIGTERM)
        return loss(*args)

    monkeypatch.setattr(loop_module, "contrastive_loss", wrapped)
    with pytest.raises(TrainingInterrupted) as err:
        train(cfg, synth_data / "train", stores / "train", run, progress=False)
    assert err.value.step == 4
    monkeypatch.undo()
    train(cfg, synth_data / "train", stores / "train", run, resume="auto", progress=False)
    assert [r["loss"] for r in read_metrics(run)] == [r["loss"] for r in read_metrics(whole)]
    final = load_file(str(run / "checkpoints" / "step_000009" / "model.safetensors"))
    expected = load_file(str(whole / "checkpoints" / "step_000009" / "model.safetensors"))
    assert any(name.startswith("text.") for name in expected)
    assert final.keys() == expected.keys() and all(torch.equal(final[name], expected[name]) for name in expected)


def test_clip_mode_evaluates_with_its_trained_text_tower(clip_run, synth_data, stores):
    from lift_fast.eval.model import TowerTextEncoder, load_run_model
    from lift_fast.eval.run import eval_config, evaluate
    from lift_fast.eval.tasks import parse_task

    run, _ = clip_run
    task = parse_task(f"kind=zeroshot,format=wds,path={synth_data / 'zeroshot'}")
    results = evaluate(run, synth_data / "eval", stores / "eval", tasks=[task], progress=False)
    saved = json.loads((run / "eval.json").read_text())
    assert saved == results and saved["checkpoint_step"] == 40
    for name in ("i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5", "chance_r1", "zeroshot/zeroshot/top1"):
        assert 0 <= saved[name] <= 1
    assert any(name.startswith("compositional/") for name in saved)
    # the captions are embedded by the run's own tower: its features, not the frozen encoder's
    model = load_run_model(run, eval_config(run))
    encoder = model.text_encoder()
    assert isinstance(encoder, TowerTextEncoder)
    captions = ["a red circle", "two blue squares left of a green triangle, and more words than that " * 3]
    features, filled = encoder.encode(captions, return_truncated=True)
    tokens = build_tokenizer(model.cfg.model)(captions)
    with torch.no_grad():
        direct = model.model.text(tokens.to(model.device))
    torch.testing.assert_close(features, direct, rtol=1e-5, atol=1e-6)
    assert filled.tolist() == [False, True] and features.shape == (2, model.text_dim)


def _rank_train(rank: int, overrides: list[str], data, store, run) -> None:
    train(load_config(overrides=overrides), data, store, run, progress=False)


def test_clip_mode_on_two_ddp_ranks_matches_one_process(synth_data, stores, tmp_path):
    """Two gloo ranks of a CLIP-mode run follow one process on the same global batches: each rank's
    loss is its part of the global-batch loss with text gradients gathered, and the text tower's own
    DDP (train/distributed.py wrap_towers) all-reduces its gradients."""
    overrides = CLIP + ["train.steps=4", "train.batch_size=8", "data.hflip=true", "data.shuffle_window=2"]
    single = tmp_path / "single" / "run"
    train(load_config(overrides=overrides), synth_data / "train", stores / "train", single, progress=False)
    run = tmp_path / "ddp" / "run"
    fork_ranks(_rank_train, overrides, synth_data / "train", stores / "train", run)
    assert [r["loss"] for r in read_metrics(run)] == pytest.approx([r["loss"] for r in read_metrics(single)], rel=1e-5)
    assert [r["grad_norm"] for r in read_metrics(run)] == pytest.approx(
        [r["grad_norm"] for r in read_metrics(single)], rel=1e-4)
    final = load_file(str(run / "checkpoints" / "step_000004" / "model.safetensors"))
    reference = load_file(str(single / "checkpoints" / "step_000004" / "model.safetensors"))
    for name in ("text.projection.weight", "text.blocks.0.mlp.fc1.weight", "head.fc2.weight"):
        torch.testing.assert_close(final[name], reference[name], rtol=0, atol=1e-3 * 3e-4 * 4, msg=name)


@pytest.mark.parametrize("backend", ["pil", "dali"])
def test_loader_tokenises_each_batchs_captions(synth_data, stores, backend):
    """With a tokenizer both backends add batch["tokens"]: the token ids of exactly these samples' captions."""
    if backend == "dali" and not dali_available()[0]:
        pytest.skip("DALI is not usable here")
    from lift_fast.data.shards import iter_samples, list_shards

    tokenizer = build_tokenizer(clip_config().model)
    loader = build_loader(synth_data / "train", stores / "train", split="train", batch_size=8, image_size=32,
                          backend=backend, num_workers=1, shuffle_window=4, tokenizer=tokenizer, prefetch=0)
    batch = next(iter(loader))
    captions = {s.key: s.caption() for shard in list_shards(synth_data / "train") for s in iter_samples(shard)}
    assert batch["tokens"].dtype == torch.int64 and batch["tokens"].shape == (8, 24)
    assert torch.equal(batch["tokens"], tokenizer([captions[key] for key in batch["keys"]]))
    plain = next(iter(build_loader(synth_data / "train", stores / "train", split="train", batch_size=8,
                                   image_size=32, backend=backend, num_workers=1, shuffle_window=4, prefetch=0)))
    assert "tokens" not in plain and plain["keys"] == batch["keys"]


def test_text_tower_parameter_groups():
    """Biases, norms and the token and position embeddings of the text tower get no weight decay."""
    from lift_fast.models.text_tower import build_text_tower
    from lift_fast.models.vit import build_model

    cfg = clip_config()
    model = build_model(cfg.model, 32, 48)
    model.text = build_text_tower(cfg.model, 48)[0]
    decay, no_decay = parameter_groups(model, 0.1)
    names = {id(p): name for name, p in model.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    decay_names = {names[id(p)] for p in decay["params"]}
    assert {"text.token_embedding.weight", "text.positional_embedding", "text.ln_final.weight",
            "text.blocks.0.attn.qkv.bias"} <= no_decay_names
    assert {"text.blocks.0.attn.qkv.weight", "text.blocks.0.mlp.fc1.weight", "text.projection.weight"} <= decay_names
    assert len(decay_names) + len(no_decay_names) == len(names)


@pytest.mark.parametrize("change, named", [(["model.fuse_projection=true"], "model.fuse_projection")])
def test_clip_mode_refuses_what_it_cannot_run_before_writing_anything(synth_data, stores, tmp_path, change, named):
    with pytest.raises(ConfigError, match=named):
        train(clip_config(*change), synth_data / "train", stores / "train", tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def _fsdp_rank_train(rank: int, overrides: list[str], data, store, run) -> None:
    """_rank_train, recording which text-tower modules shard_model made FSDP groups and the share of the
    text tower's elements this rank holds."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    from lift_fast.train import distributed

    shard_model = distributed.shard_model

    def recording_shards(model, ctx, **kwargs):
        model = shard_model(model, ctx, **kwargs)
        params = list(model.text.parameters())
        groups = [name for name, module in model.text.named_modules() if isinstance(module, FSDPModule)]
        share = sum(p.to_local().numel() for p in params) / sum(p.numel() for p in params)
        run.parent.mkdir(parents=True, exist_ok=True)
        (run.parent / f"sharding.rank{rank}.json").write_text(json.dumps(
            {"groups": groups, "share": share, "all_dtensors": all(isinstance(p, DTensor) for p in params)}))
        return model

    distributed.shard_model = recording_shards  # in the forked child only
    _rank_train(rank, overrides, data, store, run)


def test_clip_mode_on_two_fsdp_ranks_matches_one_process_and_resumes_in_one(synth_data, stores, tmp_path):
    """Two fsdp gloo ranks of a CLIP-mode run (text blocks and the text tower sharded, each gathered by its
    own hooks as the step calls model.text) log one process's losses and end with its weights, both
    towers; the fsdp step-2 checkpoint (full `text.*` tensors) resumes in one process on that curve."""
    overrides = CLIP + ["train.steps=4", "train.batch_size=8", "data.hflip=true", "data.shuffle_window=2",
                        "train.checkpoint_every=2"]
    single = tmp_path / "single" / "run"
    train(load_config(overrides=overrides), synth_data / "train", stores / "train", single, progress=False)
    run = tmp_path / "fsdp" / "run"
    fork_ranks(_fsdp_rank_train, overrides + ["train.parallel=fsdp"], synth_data / "train", stores / "train", run)
    for rank in range(2):  # one group per text block and one for the tower; about half its elements each
        sharding = json.loads((run.parent / f"sharding.rank{rank}.json").read_text())
        assert sharding["groups"] == ["", "blocks.0"] and sharding["all_dtensors"]
        assert 0.45 < sharding["share"] < 0.55
    assert [r["loss"] for r in read_metrics(run)] == pytest.approx([r["loss"] for r in read_metrics(single)], rel=1e-5)
    assert [r["grad_norm"] for r in read_metrics(run)] == pytest.approx(
        [r["grad_norm"] for r in read_metrics(single)], rel=1e-4)
    reference = load_file(str(single / "checkpoints" / "step_000004" / "model.safetensors"))
    final = load_file(str(run / "checkpoints" / "step_000004" / "model.safetensors"))
    assert final.keys() == reference.keys() and any(name.startswith("text.blocks.") for name in final)
    for name, tensor in reference.items():  # the fsdp tests' rule: about 1e-3 of Adam's lr a step
        assert final[name].shape == tensor.shape, name
        torch.testing.assert_close(final[name], tensor, rtol=0, atol=1e-3 * 3e-4 * 4, msg=name)
    resumed = tmp_path / "resumed" / "run"
    train(load_config(overrides=overrides), synth_data / "train", stores / "train", resumed,
          resume=str(run / "checkpoints" / "step_000002"), progress=False)
    assert [r["loss"] for r in read_metrics(resumed)] == pytest.approx(
        [r["loss"] for r in read_metrics(single)][2:], rel=1e-5)
    weights = load_file(str(resumed / "checkpoints" / "step_000004" / "model.safetensors"))
    for name in ("text.projection.weight", "text.token_embedding.weight", "text.blocks.0.attn.qkv.weight"):
        torch.testing.assert_close(weights[name], reference[name], rtol=0, atol=1e-3 * 3e-4 * 4, msg=name)


def test_the_train_command_runs_clip_mode(synth_data, stores, tmp_path, capsys):
    """`lift-fast train model.text_tower=transformer` trains (the refusal it once had is gone)."""
    from lift_fast.cli import main

    run = tmp_path / "run"
    code = main(["-q", "train", "--data", str(synth_data / "train"), "--embeddings", str(stores / "train"),
                 "--run", str(run), *CLIP, "train.steps=2"])
    assert code in (0, None)
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["step"] == 2
    assert load_config(run / "config.yaml").model.text_tower == "transformer"


def test_a_clip_mode_run_exports(clip_run, tmp_path, capsys):
    """The image tower of a CLIP-mode run exports for timm (the text tower stays behind) and whole for
    load_image_encoder (both towers, equal to the checkpoint's)."""
    import timm

    from lift_fast import cli, load_image_encoder

    run, _ = clip_run
    assert cli.main(["export", "--run", str(run), "--out", str(tmp_path / "timm"), "--format", "timm"]) == 0
    assert cli.main(["export", "--run", str(run), "--out", str(tmp_path / "lift"), "--format", "lift"]) == 0
    capsys.readouterr()
    tower = timm.create_model(f"local-dir:{tmp_path / 'timm'}", pretrained=True)
    assert not any(name.startswith("text.") for name in tower.state_dict())
    model, _ = load_image_encoder(tmp_path / "lift")
    saved = load_file(str(run / "checkpoints" / "step_000040" / "model.safetensors"))
    assert any(name.startswith("text.") for name in saved)
    assert all(torch.equal(model.state_dict()[name], tensor) for name, tensor in saved.items())
