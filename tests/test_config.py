"""Config: defaults, file and dotted-override layering, type checks, and errors that name the key."""

from __future__ import annotations

import dataclasses

import pytest

from lift_fast.config import (
    Config,
    ConfigError,
    check_changes,
    config_changes,
    load_config,
    load_run_config,
    parse_overrides,
    save_config,
)


def test_defaults():
    cfg = load_config()
    assert cfg == Config()
    assert cfg.model.name == "vit_tiny_patch16"
    assert cfg.data.backend == "auto"
    assert cfg.data.crop_scale == (0.9, 1.0)
    assert cfg.embed.model == "all-minilm-l6-v2"
    assert cfg.embed.max_length == 77
    assert cfg.train.loss == "clip"
    assert cfg.train.lr == 1e-3
    assert cfg.train.betas == (0.9, 0.98)
    assert cfg.train.checkpoint_every == 500  # an interrupted default run loses at most 500 steps
    # LIFT's temperature init: 1/0.07
    assert cfg.train.logit_scale_init == pytest.approx(1 / 0.07, rel=1e-6)


def test_yaml_file_then_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  steps: 50\n  lr: 1e-3\n  batch_size: 64\nmodel:\n  name: vit_b16\n"
                    "data:\n  hflip: true\n  crop_scale: [0.5, 1]\n", encoding="utf-8")
    cfg = load_config(path, ["train.steps=200", "data.image_size=96"])
    assert cfg.train.steps == 200  # the command line beats the file
    assert cfg.train.batch_size == 64  # the file beats the defaults
    assert cfg.model.name == "vit_b16"
    assert cfg.data.image_size == 96
    assert cfg.data.hflip is True
    assert cfg.data.crop_scale == (0.5, 1.0)
    assert all(isinstance(v, float) for v in cfg.data.crop_scale)
    # PyYAML reads 1e-3 (no dot) as a string; the float field must still get a float
    assert cfg.train.lr == 1e-3 and isinstance(cfg.train.lr, float)
    assert cfg.train.warmup_steps == Config().train.warmup_steps  # untouched fields keep defaults


def test_toml_file(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('[train]\nsteps = 7\nlr = 0.003\nloss = "siglip"\n\n[data]\nbackend = "pil"\n'
                    "crop_scale = [0.8, 1.0]\n", encoding="utf-8")
    cfg = load_config(path)
    assert (cfg.train.steps, cfg.train.lr, cfg.train.loss) == (7, 0.003, "siglip")
    assert cfg.data.backend == "pil"
    assert cfg.data.crop_scale == (0.8, 1.0)


def test_preset_layer_sits_under_file_and_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  steps: 50\n", encoding="utf-8")
    preset = ["train.steps=10", "train.batch_size=32", "model.depth=6", "train.seed=3"]
    cfg = load_config(path, ["model.depth=2"], preset=preset)
    assert cfg.train.steps == 50  # file over preset
    assert cfg.model.depth == 2  # override over preset
    assert cfg.train.batch_size == 32 and cfg.train.seed == 3  # preset over defaults
    assert load_config(preset=preset).train.steps == 10


@pytest.mark.parametrize("item, field, expected", [
    ("data.crop_scale=0.5,1", ("data", "crop_scale"), (0.5, 1.0)),
    ("data.crop_scale=[0.25, 0.75]", ("data", "crop_scale"), (0.25, 0.75)),
    ("train.betas=0.8,0.95", ("train", "betas"), (0.8, 0.95)),
    ("data.hflip=true", ("data", "hflip"), True),
    ("data.hflip=False", ("data", "hflip"), False),
    ("data.hflip=1", ("data", "hflip"), True),
    ("embed.normalize=no", ("embed", "normalize"), False),
    ("train.lr=1e-3", ("train", "lr"), 1e-3),
    ("train.lr=3", ("train", "lr"), 3.0),
    ("train.steps=12", ("train", "steps"), 12),
    ("embed.prompt=", ("embed", "prompt"), ""),
    ("embed.prompt=Instruct: a=b", ("embed", "prompt"), "Instruct: a=b"),  # only the first '=' splits
])
def test_override_values(item, field, expected):
    value = getattr(getattr(load_config(overrides=[item]), field[0]), field[1])
    assert value == expected
    assert type(value) is type(expected)


def test_overrides_as_dict():
    cfg = load_config(overrides={"train.steps": 5, "data.crop_scale": [0.1, 0.2]})
    assert cfg.train.steps == 5 and cfg.data.crop_scale == (0.1, 0.2)


@pytest.mark.parametrize("item, named", [
    ("optim.lr=1", "optim.lr"),  # unknown section
    ("train.learning_rate=1", "train.learning_rate"),  # unknown field
    ("steps=5", "steps"),  # no section
    ("train.steps=ten", "train.steps"),  # bad int
    ("train.steps=2.5", "train.steps"),
    ("train.lr=fast", "train.lr"),  # bad float
    ("data.hflip=maybe", "data.hflip"),  # bad bool
    ("data.backend=opencv", "data.backend"),  # bad choice
    ("train.loss=triplet", "train.loss"),
    ("train.steps=0", "train.steps"),  # below minimum
    ("train.lr=-1", "train.lr"),
    ("data.image_size=4", "data.image_size"),
    ("data.crop_scale=0.5", "data.crop_scale"),  # wrong tuple length
    ("data.crop_scale=0.5,1,2", "data.crop_scale"),
    ("train.lr=nan", "train.lr"),  # not a finite number
    ("train.grad_clip=inf", "train.grad_clip"),
    ("train.logit_scale_max=Infinity", "train.logit_scale_max"),
    ("train.eps=-inf", "train.eps"),
    ("data.crop_scale=0.5,nan", "data.crop_scale"),
])
def test_bad_override_names_key(item, named):
    with pytest.raises(ConfigError) as err:
        load_config(overrides=[item])
    assert named in str(err.value)


@pytest.mark.parametrize("text", ["train:\n  lr: .nan\n", "train:\n  lr: .inf\n", "train:\n  lr: -.inf\n"])
def test_non_finite_file_value_names_key(tmp_path, text):
    path = tmp_path / "bad.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError, match=r"train\.lr.*finite") as err:
        load_config(path)
    assert str(path) in str(err.value)


def test_bad_choice_lists_choices():
    with pytest.raises(ConfigError, match="auto, dali, pil"):
        load_config(overrides=["data.backend=opencv"])


def test_below_minimum_names_minimum():
    with pytest.raises(ConfigError, match=r"train\.steps.*minimum 1"):
        load_config(overrides=["train.steps=0"])


def test_unknown_field_lists_section_fields():
    with pytest.raises(ConfigError) as err:
        load_config(overrides=["train.learning_rate=1"])
    assert "'train.learning_rate'" in str(err.value) and "lr" in str(err.value)


@pytest.mark.parametrize("item", ["train.steps", "=5", " =5"])
def test_malformed_override(item):
    with pytest.raises(ConfigError, match="section.field=value") as err:
        parse_overrides([item])
    assert repr(item) in str(err.value)
    with pytest.raises(ConfigError):
        load_config(overrides=[item])


@pytest.mark.parametrize("text, named", [
    ("train:\n  stepz: 5\n", "train.stepz"),
    ("trainer:\n  steps: 5\n", "trainer.steps"),
    ("train:\n  steps: many\n", "train.steps"),
    ("train:\n  steps: 2.5\n", "train.steps"),  # a float is not an int
    ("train:\n  steps: true\n", "train.steps"),  # nor is a bool
    ("data:\n  hflip: 3\n", "data.hflip"),
    ("train:\n  loss: hinge\n", "train.loss"),
    ("embed:\n  prompt: null\n", "embed.prompt"),
])
def test_bad_file_value_names_file_and_key(tmp_path, text, named):
    path = tmp_path / "bad.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert named in str(err.value)
    assert str(path) in str(err.value)


@pytest.mark.parametrize("text", ["- 1\n- 2\n", "just a string\n", "42\n"])
def test_non_dict_file(tmp_path, text):
    path = tmp_path / "list.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError, match="top level") as err:
        load_config(path)
    assert str(path) in str(err.value)


def test_invalid_yaml_names_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("train: [1, 2\n  steps: :\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="(?i)not valid YAML") as err:
        load_config(path)
    assert str(path) in str(err.value)


def test_invalid_toml_names_file(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text("[train\nsteps = \n", encoding="utf-8")
    with pytest.raises(ConfigError, match="(?i)not valid TOML") as err:
        load_config(path)
    assert str(path) in str(err.value)


def test_non_utf8_file_names_file(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("embed:\n  prompt: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="not UTF-8") as err:
        load_config(path)
    assert str(path) in str(err.value)


def test_missing_file_names_it(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="does not exist") as err:
        load_config(path)
    assert str(path) in str(err.value)


def test_empty_file_keeps_defaults(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("", encoding="utf-8")
    assert load_config(path) == Config()


def test_save_then_load_round_trip(tmp_path):
    cfg = load_config(overrides=["train.steps=123", "train.lr=3e-4", "data.crop_scale=0.5,1", "data.hflip=true",
                                 "embed.prompt=Represent: ", "train.eps=1e-8", "model.name=vit_b16",
                                 "train.loss=siglip", "train.betas=0.9,0.95"])
    path = tmp_path / "config.yaml"
    save_config(cfg, path)
    assert not list(tmp_path.glob("*.tmp"))
    again = load_config(path)
    assert again == cfg
    # every field survives, including tuples and trailing spaces in strings
    for section in dataclasses.fields(Config):
        assert getattr(again, section.name) == getattr(cfg, section.name)
    assert again.embed.prompt == "Represent: "
    assert isinstance(again.data.crop_scale, tuple)


def test_run_config_layers_saved_file_then_overrides(tmp_path):
    saved = tmp_path / "config.yaml"
    save_config(load_config(overrides=["train.steps=30", "model.depth=1", "data.image_size=32"]), saved)
    extra = tmp_path / "more.yaml"
    extra.write_text("train:\n  steps: 40\n  log_every: 5\n", encoding="utf-8")
    cfg = load_run_config(saved, extra, ["train.steps=50"], allowed=("train.steps", "train.log_every"))
    assert (cfg.train.steps, cfg.train.log_every) == (50, 5)  # overrides over the file over the saved config
    assert cfg.model.depth == 1 and cfg.data.image_size == 32  # the saved config, not the defaults
    assert load_run_config(saved) == load_config(saved)  # nothing asked: the saved config as it is


def test_run_config_refuses_other_changes_naming_each(tmp_path):
    saved = tmp_path / "config.yaml"
    save_config(load_config(overrides=["model.depth=1"]), saved)
    with pytest.raises(ConfigError) as err:
        load_run_config(saved, None, ["model.depth=2", "train.lr=0.5", "train.steps=9"], allowed=("train.steps",),
                        action="resuming a run")
    message = str(err.value)
    assert "model.depth: saved 1, asked 2" in message and "train.lr: saved 0.001, asked 0.5" in message
    assert "train.steps: saved" not in message and str(saved) in message and "resuming a run" in message
    # a whole section may be allowed with section.*
    cfg = load_run_config(saved, None, ["eval.batch_size=3", "eval.compositional=false"], allowed=("eval.*",))
    assert cfg.eval.batch_size == 3
    with pytest.raises(ConfigError, match="data.image_size"):
        check_changes(load_config(saved), load_config(saved, ["data.image_size=96"]), ("eval.*",), source=saved,
                      action="evaluating a run")


def test_config_changes_lists_differing_fields():
    before, after = Config(), load_config(overrides=["train.steps=3", "data.crop_scale=0.5,1"])
    assert config_changes(before, after) == [("data.crop_scale", [0.9, 1.0], [0.5, 1.0]), ("train.steps", 2000, 3)]
    assert config_changes(after, after) == []
