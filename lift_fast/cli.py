"""The `lift-fast` command: synth, embed, train, eval and demo.

Every command that reads settings takes `--config FILE` (YAML or TOML) and dotted overrides
(`train.steps=200 model.name=vit_tiny_patch16`) after its options; see `lift-fast config` for
every field with its default.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from lift_fast.config import Config, ConfigError, describe, load_config

# Errors that mean "bad input or settings": printed as one clear line, without a traceback.
USER_ERRORS = (ConfigError, FileNotFoundError, FileExistsError, KeyError, ValueError)


def _settings(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="YAML or TOML config file (sections data, embed, model, train, eval)")
    parser.add_argument("overrides", nargs="*", metavar="section.field=value", help="dotted config overrides")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lift-fast", description=__doc__.split("\n")[0])
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("synth", help="write the synthetic compositional image-caption set")
    p.add_argument("--out", type=Path, required=True, help="output folder (gets train/ and eval/)")
    p.add_argument("--num-train", type=int, default=20000)
    p.add_argument("--num-eval", type=int, default=1000)
    p.add_argument("--image-size", type=int, default=64, help="side of the rendered images in pixels")
    p.add_argument("--samples-per-shard", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("embed", help="embed every caption of a shard folder once with the frozen text encoder")
    p.add_argument("--data", type=Path, required=True, help="folder of .tar shards")
    p.add_argument("--out", type=Path, required=True, help="embedding store folder")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    _settings(p)

    p = sub.add_parser("train", help="train the image tower against a store of caption embeddings")
    p.add_argument("--data", type=Path, required=True, help="folder of training .tar shards")
    p.add_argument("--embeddings", type=Path, required=True, help="embedding store of those shards")
    p.add_argument("--run", type=Path, required=True, help="run folder (config, metrics, checkpoints)")
    p.add_argument("--resume", default=None, help="'auto' (newest complete checkpoint) or a checkpoint folder")
    _settings(p)

    p = sub.add_parser("eval", help="retrieval and compositional accuracy of a trained run")
    p.add_argument("--run", type=Path, required=True, help="run folder")
    p.add_argument("--data", type=Path, required=True, help="folder of eval .tar shards (with sugarcrepe/ beside)")
    p.add_argument("--embeddings", type=Path, required=True, help="embedding store of the eval shards")
    p.add_argument("--checkpoint", type=Path, default=None, help="checkpoint folder (default: the newest)")

    p = sub.add_parser("demo", help="synth -> embed -> train -> eval on this machine, with a report")
    p.add_argument("--out", type=Path, required=True, help="folder for data, store, run and report")
    p.add_argument("--quick", action="store_true", help="a tiny version that finishes in well under a minute")
    _settings(p)

    sub.add_parser("config", help="print every config field with its default and meaning")
    return parser


def _load(args) -> Config:
    return load_config(args.config, args.overrides)


def run_command(args) -> None:
    progress = not args.quiet
    if args.command == "synth":
        from lift_fast.data.synth import write_synthetic

        summary = write_synthetic(args.out, num_train=args.num_train, num_eval=args.num_eval,
                                  image_size=args.image_size, seed=args.seed,
                                  samples_per_shard=args.samples_per_shard, progress=progress)
        print(json.dumps(summary))
    elif args.command == "embed":
        from lift_fast.embed import embed_shards

        cfg = _load(args)
        device = args.device or ("cuda" if _cuda() else "cpu")
        print(json.dumps(embed_shards(args.data, args.out, cfg.embed, device=device, progress=progress)))
    elif args.command == "train":
        from lift_fast.train.loop import train

        print(json.dumps(train(_load(args), args.data, args.embeddings, args.run, resume=args.resume, progress=progress)))
    elif args.command == "eval":
        from lift_fast.eval.run import evaluate

        print(json.dumps(evaluate(args.run, args.data, args.embeddings, checkpoint=args.checkpoint, progress=progress)))
    elif args.command == "demo":
        from lift_fast.demo import run_demo

        run_demo(args.out, args.config, args.overrides, quick=args.quick, progress=progress)
    elif args.command == "config":
        for name, section in Config.__dataclass_fields__.items():
            print(f"[{name}]")
            for field, default, doc in describe(section.type if isinstance(section.type, type) else
                                                type(getattr(Config(), name))):
                print(f"  {name}.{field} = {default!r}  # {doc}")


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=os.environ.get("LIFT_FAST_LOG", "WARNING"), format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the encoder comes from a local folder or the cache
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # one bar per stage is ours; no "Loading weights" bars
    args = build_parser().parse_args(argv)
    try:
        run_command(args)
    except USER_ERRORS as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"lift-fast {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lift-fast {args.command}: interrupted; finished work is kept (rerun to continue)", file=sys.stderr)
        return 130
    return 0
