"""`lift-fast demo`: synth -> embed -> train -> eval on this machine, then a report.

    out/data/{train,eval}/          synthetic shards (+ eval/sugarcrepe/ negatives)
    out/data/{zeroshot,retrieval}/  the zero-shot (24 colour-shape classes) and 3-caption retrieval sets
    out/data/lift/                  miniatures of Urban-1k, DOCCI, DCI, ShareGPT4V, SugarCrepe(++) in their layouts
    out/embeddings/{train,eval}/    caption embedding stores (all-MiniLM-L6-v2 by default)
    out/run/                        config.yaml, metrics.jsonl, checkpoints/, eval.json
    out/loss_curve.png, out/demo_metrics.json

Stages whose output is already complete are reused, so an interrupted demo continues where it
stopped. The settings below were chosen to learn relations within ~10 minutes on 2 CPU cores
(docs/demo.md has the calibration runs); dotted overrides on the command line replace them.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from lift_fast.config import Config, load_config

# What the demo changes from the library defaults, and why (docs/demo.md has the runs behind these).
DEMO_SETTINGS = [
    "model.name=vit_tiny_patch16",
    "model.depth=6",  # half the blocks: twice the steps in the same minutes, which relations need more
    "data.image_size=64",
    "train.steps=1200",
    "train.batch_size=128",
    "train.warmup_steps=100",
    "train.lr=1e-3",
    "train.log_every=20",
    "data.num_workers=1",
    "eval.long_max_length=256",  # long-caption retrieval at 77 and at 256 tokens (MiniLM's trained length)
]
DEMO_DATA = {"num_train": 12000, "num_eval": 1000, "num_zeroshot": 480, "num_retrieval": 200, "num_lift": 100}

QUICK_SETTINGS = ["model.depth=1", "data.image_size=32", "train.steps=30", "train.batch_size=32",
                  "train.warmup_steps=5", "train.log_every=5", "data.num_workers=0", "data.shuffle_window=4"]
QUICK_DATA = {"num_train": 400, "num_eval": 96, "num_zeroshot": 48, "num_retrieval": 24, "num_lift": 12}


def demo_config(config_path: str | Path | None, overrides: list[str], quick: bool) -> Config:
    """The demo's settings, then the user's file, then the user's overrides."""
    return load_config(config_path, overrides, preset=DEMO_SETTINGS + (QUICK_SETTINGS if quick else []))


def plot_loss(records: list[dict], out_path: Path) -> None:
    """loss and logit scale against step, from the metrics.jsonl records, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records]
    fig, loss_ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    loss_ax.plot(steps, [r["loss"] for r in records], color="tab:blue", label="loss")
    loss_ax.set_xlabel("step")
    loss_ax.set_ylabel("InfoNCE loss", color="tab:blue")
    scale_ax = loss_ax.twinx()
    scale_ax.plot(steps, [r["logit_scale"] for r in records], color="tab:orange", label="logit scale")
    scale_ax.set_ylabel("logit scale", color="tab:orange")
    loss_ax.set_title("lift-fast demo: training loss")
    fig.tight_layout()
    fig.savefig(out_path)
    plt.close(fig)


def report_table(results: dict, timings: dict) -> str:
    """The final table: retrieval against chance, zero-shot top-1, compositional accuracy per category,
    stage times."""
    lines = ["", "lift-fast demo results", "-" * 44]
    for name in ("i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5"):
        lines.append(f"{name:<28}{results[name] * 100:>8.1f} %")
    lines.append(f"{'chance_r1 (i2t)':<28}{results['chance_r1'] * 100:>8.2f} %")
    if "zeroshot/zeroshot/top1" in results:
        classes = results["zeroshot/zeroshot/num_classes"]
        lines.append(f"{'zeroshot top1':<28}{results['zeroshot/zeroshot/top1'] * 100:>8.1f} %   "
                     f"(chance {100 / classes:.1f} %, {classes} classes)")
    if "retrieval/retrieval/i2t_r1" in results:
        lines.append(f"{'3-caption i2t_r1 / t2i_r1':<28}{results['retrieval/retrieval/i2t_r1'] * 100:>8.1f} % / "
                     f"{results['retrieval/retrieval/t2i_r1'] * 100:.1f} %")
    for name, value in sorted(results.items()):
        if name.startswith("compositional/") and name.count("/") == 1:  # the eval shards' own negatives
            lines.append(f"{name:<28}{value * 100:>8.1f} %   (chance 50 %)")
    lines += long_caption_lines(results)
    lines.append("-" * 44)
    for stage, seconds in timings.items():
        lines.append(f"{'time ' + stage:<28}{seconds:>8.1f} s")
    return "\n".join(lines)


def long_caption_lines(results: dict) -> list[str]:
    """Long-caption retrieval at both lengths, and SugarCrepe++ ITT/TOT, from the lift suite's names."""
    from lift_fast.eval.suite import LONG_SETS

    lines = []
    for name in LONG_SETS:
        short, long = f"retrieval/{name}", f"retrieval/{name}_long"
        if f"{long}/i2t_r1" not in results:
            continue
        lengths = f"{results[f'{short}/max_length']}/{results[f'{long}/max_length']} tok"
        lines.append(f"{name + ' i2t R@1 ' + lengths:<28}{results[f'{short}/i2t_r1'] * 100:>8.1f} % -> "
                     f"{results[f'{long}/i2t_r1'] * 100:.1f} %   (t2i {results[f'{short}/t2i_r1'] * 100:.1f} -> "
                     f"{results[f'{long}/t2i_r1'] * 100:.1f} %; chance {results[f'{long}/chance_r1'] * 100:.1f} %)")
    prefix = "compositional_pp/sugarcrepe_pp/"
    for category in sorted({k[len(prefix):].rsplit("/", 1)[0] for k in results if k.startswith(prefix)
                            and k.endswith("/itt")}):
        lines.append(f"{'scpp ' + category + ' ITT/TOT':<28}{results[f'{prefix}{category}/itt'] * 100:>8.1f} % / "
                     f"{results[f'{prefix}{category}/tot'] * 100:.1f} %   (chance 33.3 %)")
    return lines


def run_demo(out: str | Path, config_path: str | Path | None = None, overrides: list[str] = (), *,
             quick: bool = False, progress: bool = True) -> dict:
    """Run the four stages into `out` and write the report; returns the demo metrics."""
    from lift_fast.data.synth import write_synthetic
    from lift_fast.embed import embed_shards
    from lift_fast.eval.run import evaluate
    from lift_fast.eval.suite import lift_suite
    from lift_fast.eval.tasks import TaskSpec
    from lift_fast.train.checkpoint import latest_checkpoint
    from lift_fast.train.loop import train

    out = Path(out)
    cfg = demo_config(config_path, list(overrides), quick)
    data, stores, run = out / "data", out / "embeddings", out / "run"
    timings: dict[str, float] = {}

    started = time.perf_counter()
    write_synthetic(data, **(QUICK_DATA if quick else DEMO_DATA), image_size=cfg.data.image_size,
                    seed=cfg.train.seed, progress=progress)  # keeps splits already written
    timings["synth"] = time.perf_counter() - started

    started = time.perf_counter()
    for split in ("train", "eval"):
        embed_shards(data / split, stores / split, cfg.embed, progress=progress)
    timings["embed"] = time.perf_counter() - started

    started = time.perf_counter()
    done = latest_checkpoint(run)
    if done is None or int(done.name.split("_")[-1]) < cfg.train.steps:
        train(cfg, data / "train", stores / "train", run, resume="auto", progress=progress)
    timings["train"] = time.perf_counter() - started

    started = time.perf_counter()
    tasks = [TaskSpec("zeroshot", "wds", str(data / "zeroshot")), TaskSpec("retrieval", "wds", str(data / "retrieval"))]
    # the long-caption sets and SugarCrepe++ (SugarCrepe's own test is the eval shards' compositional one)
    tasks += [task for task in lift_suite(data / "lift", cfg.eval.long_max_length)[0] if task.name != "sugarcrepe"]
    results = evaluate(run, data / "eval", stores / "eval", tasks=tasks, cfg=cfg, progress=progress)
    timings["eval"] = time.perf_counter() - started

    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
               if line.strip()]
    plot_loss(records, out / "loss_curve.png")
    losses = [record["loss"] for record in records]
    metrics = {**results, "first_loss": losses[0], "last_loss": losses[-1],
               **{f"seconds/{stage}": value for stage, value in timings.items()},
               "seconds/total": sum(timings.values())}
    (out / "demo_metrics.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    print(report_table(results, timings))
    print(f"\nloss curve: {out / 'loss_curve.png'}\nmetrics:    {out / 'demo_metrics.json'}")
    return metrics
