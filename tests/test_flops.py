"""FLOP formulas of both modes (models/flops.py) against torch.utils.flop_counter.FlopCounterMode, and
`lift-fast flops` with its measured peak memory."""

from __future__ import annotations

import importlib
import json
import math

import pytest
import torch
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

from lift_fast.cli import main
from lift_fast.config import load_config
from lift_fast.flops import _cpu_peak_bytes, flops_rows, frozen_encoder, peak_step_memory
from lift_fast.models.flops import (
    encoder_flops_per_caption,
    loss_flops_per_sample,
    step_flops_per_sample,
    text_tower_flops_per_caption,
    train_flops_per_sample,
    vit_flops_per_image,
)
from lift_fast.models.text_tower import TextSpec, TextTransformer
from lift_fast.models.vit import vit_spec

TINY = ["model.name=vit_tiny_patch16", "model.depth=2", "data.image_size=32", "model.text_width=32",
        "model.text_layers=2", "model.text_heads=4", "model.text_context=20", "train.batch_size=8"]


# FlopCounterMode knows addmm but not its in-place form, which the loss's CPU path uses to accumulate the
# text gradient (chunking.accumulate_matmul): count it with addmm's own formula
IN_PLACE = {torch.ops.aten.addmm_: flop_counter.addmm_flop.__wrapped__}  # the shape formula, unwrapped


def counted(function) -> int:
    with FlopCounterMode(display=False, custom_mapping=IN_PLACE) as counter:
        function()
    return counter.get_total_flops()


def text_tokens(batch: int, length: int, vocab: int, generator: torch.Generator) -> torch.Tensor:
    tokens = torch.randint(1, vocab - 1, (batch, length), generator=generator)
    tokens[:, -1] = vocab - 1
    return tokens


@pytest.mark.parametrize("spec,embed_dim,batch,length", [
    (TextSpec(32, 2, 4, 20, 100), 24, 3, 20),
    (TextSpec(40, 3, 5, 33, 100), 17, 5, 11),  # odd sizes; a batch trimmed below the context
    (TextSpec(48, 1, 2, 9, 50, mlp_ratio=2.5), 7, 1, 9),
])
def test_text_tower_formula_matches_flop_counter(spec, embed_dim, batch, length):
    tower = TextTransformer(spec, embed_dim, eot_token_id=spec.vocab_size - 1).set_math_attention()
    tokens = text_tokens(batch, length, spec.vocab_size, torch.Generator().manual_seed(batch))
    expected = text_tower_flops_per_caption(spec, embed_dim, length)
    assert expected["forward"] == sum(expected[k] for k in ("attention_projections", "attention_matmuls", "mlp", "projection"))
    with torch.no_grad():
        assert counted(lambda: tower(tokens)) == batch * expected["forward"]
    # the token embedding is a lookup, so every counted matmul has both backward products: exactly 3x
    assert counted(lambda: tower(tokens).sum().backward()) == batch * expected["train"] == 3 * batch * expected["forward"]


def test_clip_b16_text_tower_formula_matches_flop_counter_at_full_size():
    spec = TextSpec()  # 512 wide, 12 layers, 8 heads, 77 tokens
    torch.manual_seed(0)
    tower = TextTransformer(spec, 512, eot_token_id=spec.vocab_size - 1).set_math_attention()
    flops = text_tower_flops_per_caption(spec, 512)
    assert flops["forward"] == 5_959_540_736  # ~2.98 G multiply-adds, CLIP ViT-B/16's text side
    with torch.no_grad():
        assert counted(lambda: tower(text_tokens(1, 77, spec.vocab_size, torch.Generator().manual_seed(0)))) == flops["forward"]
    with pytest.raises(ValueError, match="context of 77"):
        text_tower_flops_per_caption(spec, 512, 78)


@pytest.mark.parametrize("text_gradients", [False, True])
@pytest.mark.parametrize("batch,dim", [(7, 13), (40, 5)])
def test_loss_formula_matches_flop_counter_on_the_kernels_cpu_path(text_gradients, batch, dim):
    """The loss ops are torch.library custom ops, opaque to FlopCounterMode: count their implementations
    (the torch path the CPU runs) directly, forward and backward as autograd calls them."""
    ops = importlib.import_module("lift_fast.kernels.clip_loss")  # the module (the package exports a function of that name)
    generator = torch.Generator().manual_seed(batch)
    image = torch.nn.functional.normalize(torch.randn(batch, dim, generator=generator), dim=-1)
    text = torch.nn.functional.normalize(torch.randn(batch, dim, generator=generator), dim=-1)
    scale = torch.tensor(14.0)

    def forward_and_backward():
        _, row_stats, col_stats, gathered = ops.clip_forward._init_fn(image, text, scale, 0, 1, False)
        grad_image, grad_text, _ = ops.clip_backward._init_fn(torch.ones(()), image, text, gathered, scale, row_stats,
                                                              col_stats, 0, 1, text_gradients, False)
        assert grad_text.numel() == (text.numel() if text_gradients else 0)

    assert counted(forward_and_backward) == batch * loss_flops_per_sample(batch, dim, text_gradients)
    assert counted(lambda: ops.clip_forward._init_fn(image, text, scale, 0, 1, False)) == 2 * batch * batch * dim


@pytest.mark.parametrize("mode", ["lift", "clip"])
def test_a_whole_training_step_counts_what_the_trainer_logs(mode):
    """Image tower + head, the text tower (CLIP), and the loss's implementation, forward and backward, on
    real modules: batch x train_flops_per_sample, less the patch embedding's input gradient, which is
    never computed (images are not trained; see tests/test_models.py)."""
    from lift_fast.models.vit import build_model

    cfg = load_config(overrides=[*TINY, "model.attention=math", "model.head_hidden=40"])
    batch, dim = 6, 24
    spec = vit_spec(cfg.model.name, depth=cfg.model.depth)
    text_spec = TextSpec(32, 2, 4, 20, 100) if mode == "clip" else None
    torch.manual_seed(0)
    model = build_model(cfg.model, 32, dim)
    tower = TextTransformer(text_spec, dim, eot_token_id=99).set_math_attention() if text_spec else None
    images = torch.randn(batch, 3, 32, 32)
    tokens = text_tokens(batch, 20, 100, torch.Generator().manual_seed(0))
    ops = importlib.import_module("lift_fast.kernels.clip_loss")

    def step():
        image = model(images)
        text = tower(tokens) if tower is not None else torch.nn.functional.normalize(torch.randn(batch, dim), dim=-1)
        scale = model.logit_scale.exp().detach()
        _, row_stats, col_stats, gathered = ops.clip_forward._init_fn(image.detach(), text.detach(), scale, 0, 1, False)
        grad_image, grad_text, _ = ops.clip_backward._init_fn(torch.ones(()), image.detach(), text.detach(), gathered,
                                                              scale, row_stats, col_stats, 0, 1, tower is not None, False)
        torch.autograd.backward([image, text] if tower is not None else [image],
                                [grad_image, grad_text] if tower is not None else [grad_image])

    logged = train_flops_per_sample(spec, 32, dim, batch, head_hidden=40, text=text_spec)
    patch_embed = vit_flops_per_image(spec, 32, dim, 40)["patch_embed"]
    assert counted(step) == batch * (logged - patch_embed)


def test_encoder_formula_matches_flop_counter_for_bert_and_qwen3():
    """The bundled MiniLM (BERT: a pooler on one token) and a small random Qwen3 (grouped kv heads, a head
    dim that is not width / heads), eager attention so that FlopCounterMode sees its matmuls."""
    from transformers import AutoModel, Qwen3Config

    from lift_fast.embed.encoder import BUNDLED_MINILM, resolve_model

    minilm = AutoModel.from_pretrained(resolve_model(BUNDLED_MINILM)[0], attn_implementation="eager").eval()
    qwen3 = AutoModel.from_config(Qwen3Config(hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                                              num_key_value_heads=2, head_dim=20, intermediate_size=80,
                                              vocab_size=300), attn_implementation="eager").eval()
    for model, tokens in ((minilm, 9), (minilm, 77), (qwen3, 13)):
        ids = torch.randint(5, 300, (3, tokens))
        with torch.no_grad():
            assert counted(lambda m=model, i=ids: m(input_ids=i)) == 3 * encoder_flops_per_caption(model, tokens), type(model)
    with pytest.raises(ValueError, match="no config"):
        encoder_flops_per_caption(torch.nn.Linear(2, 2), 5)


def test_step_parts_of_both_modes_add_up():
    spec, text = vit_spec("vit_b16"), TextSpec()
    image = vit_flops_per_image(spec, 224, 4096, 4096)
    lift = step_flops_per_sample(spec, 224, 4096, 1024, head_hidden=4096, encoder_flops=10**12, epochs=4)
    clip = step_flops_per_sample(spec, 224, 4096, 1024, head_hidden=4096, text=text)
    assert lift == {"image_tower": 3 * image["tower"], "head": 3 * image["head"], "embedding_pass": 2.5e11,
                    "loss": 6 * 1024 * 4096, "train": 3 * image["forward"] + 2.5e11 + 6 * 1024 * 4096}
    assert clip["text_tower"] == text_tower_flops_per_caption(text, 4096)["train"]
    assert clip["loss"] == 10 * 1024 * 4096 and clip["train"] == sum(v for k, v in clip.items() if k != "train")
    # what the trainer logs: the step alone (no embedding pass), LIFT as before this change
    assert train_flops_per_sample(spec, 224, 4096, 1024, head_hidden=4096) == 3 * image["forward"] + 6 * 1024 * 4096
    assert train_flops_per_sample(spec, 224, 4096, 1024, head_hidden=4096, text=text) == clip["train"]
    with pytest.raises(ValueError, match="epochs"):
        step_flops_per_sample(spec, 224, 4096, 1024, epochs=0)


def test_flops_rows_follow_the_config():
    cfg = load_config(overrides=TINY)
    encoder = frozen_encoder(cfg)
    from transformers import AutoModel

    assert encoder.dim == 384  # the meta-device copy counts as the real weights do
    assert encoder.flops_per_caption == encoder_flops_per_caption(AutoModel.from_pretrained(_minilm_folder()), 77)
    lift, clip = flops_rows(cfg, encoder, epochs=2.0)
    assert lift["embedding_pass"] == encoder.flops_per_caption / 2 and clip["embedding_pass"] == 0
    assert clip["text_tower"] == text_tower_flops_per_caption(TextSpec(32, 2, 4, 20, 30522), 384)["train"]
    assert lift["per_step"] == 8 * lift["per_sample"] and lift["global_batch"] == 8
    assert lift["saved_vs_clip"] == pytest.approx(1 - lift["per_sample"] / clip["per_sample"])
    without = flops_rows(cfg, encoder, epochs=math.inf)[0]
    assert without["embedding_pass"] == 0 and without["saved_vs_clip_steps_only"] == lift["saved_vs_clip_steps_only"]


def _minilm_folder():
    from lift_fast.embed.encoder import BUNDLED_MINILM, resolve_model

    return resolve_model(BUNDLED_MINILM)[0]


def test_cpu_peak_counts_what_is_alive_at_once():
    def allocate():
        first = torch.empty(1_000_000, dtype=torch.uint8)
        second = torch.empty(3_000_000, dtype=torch.uint8)
        del first, second
        third = torch.empty(2_000_000, dtype=torch.uint8)
        del third

    assert 4_000_000 <= _cpu_peak_bytes(allocate) < 4_100_000


def test_peak_step_memory_of_clip_is_above_lift_by_at_least_the_text_towers_weights_and_state():
    cfg = load_config(overrides=TINY)
    lift, clip = (peak_step_memory(cfg, mode, 4, 64) for mode in ("lift", "clip"))
    text_params = clip["parameters"] - lift["parameters"]
    assert text_params == sum(p.numel() for p in TextTransformer(TextSpec(32, 2, 4, 20, 30522), 64, 102).parameters())
    # between steps: weights and AdamW's two moments, float32 each (12 bytes a parameter), and the batch
    # (token ids instead of embedding rows: a few hundred bytes either way)
    assert clip["weights_and_state_bytes"] - lift["weights_and_state_bytes"] == pytest.approx(12 * text_params, abs=4096)
    # at the peak, the gradients too: 16 bytes a parameter
    assert clip["peak_bytes"] - lift["peak_bytes"] >= 16 * text_params
    assert lift["peak_bytes"] >= 16 * lift["parameters"]  # weights, state and every gradient at the optimizer step
    with pytest.raises(ValueError, match="mode"):
        peak_step_memory(cfg, "siglip", 4, 64)


def test_flops_command_prints_both_modes(capsys, tmp_path):
    assert main(["flops", *TINY, "--epochs", "inf", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert [row["mode"] for row in result["flops"]] == ["lift", "clip"] and result["memory"] == []
    assert result["encoder"]["dim"] == 384 and result["flops"][0]["embedding_pass"] == 0
    assert main(["flops", *TINY, "--memory-batch", "2"]) == 0
    table = capsys.readouterr().out
    assert "text_tower GFLOPs" in table and "peak GiB (batch 2)" in table and "LIFT saves" in table
    assert main(["flops", *TINY, "--epochs", "0"]) == 2
    assert "--epochs 0" in capsys.readouterr().err

    config = tmp_path / "run.yaml"  # a config file, then overrides on top
    config.write_text("model:\n  name: vit_tiny_patch16\n  depth: 2\n  text_layers: 1\ndata:\n  image_size: 32\n")
    assert main(["flops", "--config", str(config), "train.batch_size=4", "--global-batch", "6", "--json"]) == 0
    lift, clip = json.loads(capsys.readouterr().out)["flops"]
    assert lift["global_batch"] == 6 and lift["per_step"] == 6 * lift["per_sample"]
    assert clip["text_tower"] == text_tower_flops_per_caption(TextSpec(512, 1, 8, 77, 30522), 384)["train"]
