"""The `lift-fast` command: synth, index, embed, train, eval, export, flops, plan and demo.

Every command that reads settings takes `--config FILE` (YAML or TOML) and dotted overrides
(`train.steps=200 model.name=vit_tiny_patch16`) after its options; see `lift-fast config` for
every field with its default.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from pathlib import Path

from lift_fast.config import Config, ConfigError, describe, load_config
from lift_fast.data.shards import ShardError
from lift_fast.data.synth import MINIMUM as SYNTH_MINIMUM
from lift_fast.embed.store import StoreError
from lift_fast.eval.formats import DatasetError
from lift_fast.eval.sugarcrepe import SugarCrepeError
from lift_fast.train import DistributedSetupError, NonFiniteLossError, RunFolderError

# Errors that mean "bad input or settings": printed as one clear line, without a traceback. Each is
# raised on purpose with a message naming the file, key or setting; anything else is a bug and
# keeps its traceback.
USER_ERRORS = (ConfigError, ShardError, StoreError, SugarCrepeError, DatasetError, RunFolderError, NonFiniteLossError,
               DistributedSetupError, FileNotFoundError, FileExistsError)


def _settings(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="YAML or TOML config file (sections data, embed, model, train, eval)")
    parser.add_argument("overrides", nargs="*", metavar="section.field=value", help="dotted config overrides")


def _at_least(minimum: int):
    """An argparse type: an integer >= minimum, else a clear error naming the option."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lift-fast", description=__doc__.split("\n")[0])
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help)
        # also after the command (`lift-fast train -q ...`); SUPPRESS keeps a -q given before it
        p.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress bars")
        return p

    p = command("synth", "write the synthetic compositional image-caption set")
    p.add_argument("--out", type=Path, required=True, help="output folder (gets train/ and eval/)")
    p.add_argument("--num-train", type=_at_least(SYNTH_MINIMUM["num_train"]), default=20000,
                   help="training images (default 20000)")
    p.add_argument("--num-eval", type=_at_least(SYNTH_MINIMUM["num_eval"]), default=1000,
                   help="held-out images (default 1000)")
    p.add_argument("--image-size", type=_at_least(SYNTH_MINIMUM["image_size"]), default=64,
                   help=f"side of the rendered images in pixels, at least {SYNTH_MINIMUM['image_size']} (default 64)")
    p.add_argument("--samples-per-shard", type=_at_least(SYNTH_MINIMUM["samples_per_shard"]), default=2000,
                   help="images per .tar shard (default 2000)")
    p.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives byte-identical shards")
    p.add_argument("--num-zeroshot", type=_at_least(SYNTH_MINIMUM["num_zeroshot"]), default=480,
                   help="images of the zero-shot classification set, CLIP_benchmark's wds layout (default 480)")
    p.add_argument("--num-retrieval", type=_at_least(SYNTH_MINIMUM["num_retrieval"]), default=200,
                   help="images of the multi-caption retrieval set, wds and Karpathy JSON (default 200)")
    p.add_argument("--num-lift", type=_at_least(SYNTH_MINIMUM["num_lift"]), default=100,
                   help="images of each miniature of LIFT's evaluation sets in lift/ (Urban-1k, DOCCI, DCI, "
                   "ShareGPT4V, SugarCrepe++, SugarCrepe layouts; default 100)")

    p = command("index", "write a DALI webdataset index (.idx) beside every shard of a folder")
    p.add_argument("data", type=Path, help="folder of .tar shards")
    p.add_argument("--force", action="store_true", help="rewrite indexes that are up to date too")

    p = command("embed", "embed every caption of a shard folder once with the frozen text encoder "
                "(under torchrun, each rank takes every WORLD_SIZE-th shard)")
    p.add_argument("--data", type=Path, required=True, help="folder of .tar shards")
    p.add_argument("--out", type=Path, required=True, help="embedding store folder")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--estimate", action="store_true",
                   help="embed nothing: tokenize a sample of the captions and print tokens, padded tokens, FLOPs, "
                   "GPU-hours (H100/H200/B200) and store bytes for the whole folder (needs the model's config.json "
                   "and tokenizer only)")
    p.add_argument("--json", type=Path, default=None, metavar="FILE", help="with --estimate: also write it as JSON")
    p.add_argument("--sample", type=_at_least(1), default=10_000, help="with --estimate: captions to tokenize")
    p.add_argument("--mfu", type=float, default=0.40, help="with --estimate: the MFU GPU-hours are stated at")
    _settings(p)

    p = command("train", "train the image tower against a store of caption embeddings")
    p.add_argument("--data", type=Path, required=True, help="folder of training .tar shards")
    p.add_argument("--embeddings", type=Path, required=True, help="embedding store of those shards")
    p.add_argument("--run", type=Path, required=True, help="run folder (config, metrics, checkpoints)")
    p.add_argument("--resume", default=None, help="'auto' (newest complete checkpoint) or a checkpoint folder")
    _settings(p)

    p = command("eval", "retrieval and compositional accuracy of a trained run on its eval shards, and "
                "zero-shot, retrieval and SugarCrepe tasks in the field's formats (docs/evaluation.md)")
    p.add_argument("--run", type=Path, required=True, help="run folder")
    p.add_argument("--data", type=Path, default=None, help="folder of eval .tar shards (with sugarcrepe/ beside)")
    p.add_argument("--embeddings", type=Path, default=None, help="embedding store of the eval shards")
    p.add_argument("--tasks", type=Path, default=None, help="YAML file of tasks (kind, format, path, ...)")
    p.add_argument("--task", action="append", default=[], metavar="kind=K,format=F,path=P[,name=N,...]",
                   help="one task (repeatable), fields as in a tasks file")
    p.add_argument("--checkpoint", type=Path, default=None, help="checkpoint folder (default: the newest)")
    p.add_argument("--suite", choices=("lift",), default=None,
                   help="lift: every set of the LIFT paper found under --root in its downloaded layout (ImageNet, "
                   "COCO, Flickr30k, SugarCrepe(++), Urban-1k, DOCCI, DCI, ShareGPT4V-1k); prints one table")
    p.add_argument("--root", type=Path, default=None, help="the folder holding the --suite's data sets")
    _settings(p)  # on top of the run's config.yaml; only eval.* and data loading settings may differ

    p = command("export", "write a run's image tower for timm, open_clip or lift_fast.load_image_encoder "
                "(with lift_export.json: checkpoint step, config, store manifest)")
    p.add_argument("--run", type=Path, required=True, help="run folder")
    p.add_argument("--out", type=Path, required=True, help="new (or empty) folder for the export")
    p.add_argument("--format", required=True, choices=("timm", "open_clip", "lift"), help="layout of the export")
    p.add_argument("--checkpoint", type=Path, default=None, help="checkpoint folder (default: the newest)")
    p.add_argument("--embeddings", type=Path, default=None,
                   help="the run's training store, whose manifest is recorded as the encoder identity")

    p = command("flops", "FLOPs per sample and per step, LIFT vs CLIP, of a config (and, with --memory-batch, "
                "peak memory per step measured here)")
    p.add_argument("--global-batch", type=_at_least(1), default=None, help="samples per step (default train.batch_size)")
    p.add_argument("--epochs", type=float, default=1.0,
                   help="samples seen / captions, over which LIFT's one-off embedding pass is spread (default 1; "
                   "inf leaves it out)")
    p.add_argument("--memory-batch", type=_at_least(1), default=None,
                   help="also measure peak memory of a training step of each mode at this batch")
    p.add_argument("--device", default=None, help="for --memory-batch: cpu or cuda (default: cuda when available)")
    p.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    _settings(p)

    p = command("plan", "without a GPU: one train step's peak memory on a GPU (measured on fake tensors under CUDA "
                "autocast rules) at each activation-checkpointing policy, the policy auto takes (on all or some blocks), "
                "the largest batch per GPU that fits, FLOPs, step time at an MFU and the images/s the feed must give")
    gpu = p.add_mutually_exclusive_group(required=True)
    gpu.add_argument("--gpu", choices=("h100", "h200", "b200"), help="the GPU to plan for")
    gpu.add_argument("--memory-gib", type=float, help="or: a GPU with this much memory (GiB)")
    p.add_argument("--gpus", type=_at_least(1), default=1, help="GPUs of the job (train.batch_size is split over them)")
    p.add_argument("--mfu", type=float, default=0.4, help="fraction of the dense bf16 peak the step runs at (default 0.4)")
    p.add_argument("--margin", type=float, default=0.1,
                   help="fraction of the GPU's memory kept out of the plan (context, workspaces, fragmentation; default 0.1)")
    p.add_argument("--no-search", action="store_true", help="skip the search for the largest batch that fits")
    p.add_argument("--json", type=Path, default=None, metavar="FILE", help="also write the plan as JSON")
    _settings(p)

    p = command("demo", "synth -> embed -> train -> eval on this machine, with a report")
    p.add_argument("--out", type=Path, required=True, help="folder for data, store, run and report")
    p.add_argument("--quick", action="store_true", help="a tiny version that finishes in well under a minute")
    _settings(p)

    command("config", "print every config field with its default and meaning")
    return parser


def _load(args) -> Config:
    return load_config(args.config, args.overrides)


def run_command(args) -> None:
    progress = not args.quiet
    if args.command == "synth":
        from lift_fast.data.synth import write_synthetic

        summary = write_synthetic(args.out, num_train=args.num_train, num_eval=args.num_eval,
                                  image_size=args.image_size, seed=args.seed,
                                  samples_per_shard=args.samples_per_shard, num_zeroshot=args.num_zeroshot,
                                  num_retrieval=args.num_retrieval, num_lift=args.num_lift, progress=progress)
        print(json.dumps(summary))
    elif args.command == "index":
        from lift_fast.data.index import index_shards

        print(json.dumps(index_shards(args.data, force=args.force, progress=progress)))
    elif args.command == "embed":
        from lift_fast.embed import embed_shards

        cfg = _load(args)
        if args.json is not None and not args.estimate:
            raise ConfigError("--json goes with --estimate (the embed run prints its summary as JSON)")
        if args.estimate:
            from lift_fast.embed.estimate import estimate, format_estimate

            report = estimate(args.data, cfg.embed, sample=args.sample, mfu=args.mfu)
            print(format_estimate(report))
            if args.json is not None:
                args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
            return
        rank, world_size, local_rank = _torchrun_rank()
        device = args.device or ("cuda" if _cuda() else "cpu")
        if device == "cuda" and local_rank is not None:
            device = f"cuda:{local_rank}"  # one GPU per rank of a torchrun job
        print(json.dumps(embed_shards(args.data, args.out, cfg.embed, device=device, progress=progress,
                                      rank=rank, world_size=world_size)))
    elif args.command == "train":
        from lift_fast.train.loop import run_config, train

        cfg = run_config(args.run, args.resume, args.config, args.overrides)  # the saved one when resuming
        print(json.dumps(train(cfg, args.data, args.embeddings, args.run, resume=args.resume, progress=progress)))
    elif args.command == "eval":
        from lift_fast.eval.run import evaluate
        from lift_fast.eval.tasks import load_task_file, parse_task

        tasks = (load_task_file(args.tasks) if args.tasks else []) + [parse_task(text) for text in args.task]
        if (args.suite is None) != (args.root is None):
            raise ConfigError("--suite and --root go together: --suite lift --root DIR")
        if args.suite:
            from lift_fast.eval.suite import run_suite

            print(run_suite(args.run, args.root, tasks=tasks, data_dir=args.data, embeddings_dir=args.embeddings,
                            config_path=args.config, overrides=args.overrides, checkpoint=args.checkpoint,
                            progress=progress)[1])
            return
        print(json.dumps(evaluate(args.run, args.data, args.embeddings, tasks=tasks, config_path=args.config,
                                  overrides=args.overrides, checkpoint=args.checkpoint, progress=progress)))
    elif args.command == "export":
        from lift_fast.export import export_run

        record = export_run(args.run, args.out, args.format, checkpoint=args.checkpoint, embeddings=args.embeddings)
        print(json.dumps({key: record[key] for key in ("format", "checkpoint", "checkpoint_step", "files")}))
    elif args.command == "flops":
        from lift_fast.flops import run_flops

        run_flops(_load(args), global_batch=args.global_batch, epochs=args.epochs, memory_batch=args.memory_batch,
                  device=args.device or ("cuda" if _cuda() else "cpu"), as_json=args.json)
    elif args.command == "plan":
        from lift_fast.plan import run_plan

        run_plan(_load(args), gpu=args.gpu, memory_gib=args.memory_gib, gpus=args.gpus, mfu=args.mfu,
                 margin=args.margin, json_path=args.json, search=not args.no_search)
    elif args.command == "demo":
        from lift_fast.demo import run_demo

        run_demo(args.out, args.config, args.overrides, quick=args.quick, progress=progress)
    elif args.command == "config":
        for name, section in Config.__dataclass_fields__.items():
            print(f"[{name}]")
            for field, default, doc in describe(section.type if isinstance(section.type, type) else
                                                type(getattr(Config(), name))):
                print(f"  {name}.{field} = {default!r}  # {doc}")


def _torchrun_rank() -> tuple[int, int, int | None]:
    """(RANK, WORLD_SIZE, LOCAL_RANK or None) as torchrun sets them; (0, 1, None) outside torchrun.

    `embed` needs no process group: ranks take disjoint shards and share the manifest under a file lock.
    Raises ConfigError naming the variable when one is not a whole number or RANK is not below WORLD_SIZE.
    """
    values = {}
    for name, default in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", None)):
        text = os.environ.get(name, default)
        try:
            values[name] = None if text is None else int(text)
        except ValueError:
            raise ConfigError(f"environment variable {name}={text!r} is not a whole number (torchrun sets it)") from None
    if not 0 <= values["RANK"] < values["WORLD_SIZE"]:
        raise ConfigError(f"environment variables RANK={values['RANK']} and WORLD_SIZE={values['WORLD_SIZE']}: "
                          "RANK must be in 0..WORLD_SIZE-1")
    return values["RANK"], values["WORLD_SIZE"], values["LOCAL_RANK"]


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
        sys.stdout.flush()  # here, not at exit, so that a closed pipe is caught below
    except USER_ERRORS as err:
        print(f"lift-fast {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:
        print(f"lift-fast {args.command}: {_interrupted(args.command, err)}", file=sys.stderr)
        return 128 + getattr(err, "signum", signal.SIGINT)
    except BrokenPipeError:
        # The reader went away (`lift-fast config | head`): stop quietly, and point stdout at devnull
        # so that the interpreter's final flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return 0


def _interrupted(command: str, err: KeyboardInterrupt) -> str:
    """The message for Ctrl-C or SIGTERM: what was kept and how to continue."""
    if command != "train":
        return "interrupted; finished work is kept (rerun to continue)"
    checkpoint = getattr(err, "checkpoint", None)
    kept = (f"step {err.step} is saved in {checkpoint}" if checkpoint is not None
            else "finished checkpoints are kept")
    return f"interrupted; {kept}; rerun the same command with --resume auto to continue"
