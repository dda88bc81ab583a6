"""`lift-fast eval --run R --suite lift --root DIR`: LIFT's evaluation sets, found under one folder.

Each set is looked for in its downloaded layout at the paths below (relative to the root; the first
that exists wins). A set whose key file is absent is skipped with one line; a set that is present
but malformed stops the suite before the model loads, naming the file (as any task does).

    imagenet      wds_imagenet1k/test/nshards.txt                        CLIP_benchmark wds (zero-shot)
    coco          wds_mscoco_captions/test/nshards.txt | coco/dataset_coco.json (Karpathy, images coco/)
    flickr30k     wds_flickr30k/test/nshards.txt | flickr30k/dataset_flickr30k.json (images flickr30k/flickr30k-images/)
    sugarcrepe    sugar-crepe/data/*.json over coco/val2017/
    sugarcrepe_pp scpp/data/*.json | sugarcrepe_pp/*.json over coco/val2017/
    urban1k       Urban1k/caption/, Urban1k/image/
    docci         docci/docci_descriptions.jsonlines, docci/images/
    dci           densely_captioned_images/annotations/, photos/
    sharegpt4v    sharegpt4v/share-captioner_coco_lcs_sam_1246k_1107.json | sharegpt4v/data/... (images beside it)

The long-caption sets (urban1k, docci, dci, sharegpt4v) run twice: at 77 tokens (as `<set>`, what a
CLIP text tower reads) and at eval.long_max_length (as `<set>_long`; 0: the text encoder's position
limit). Results go to eval.json like any task's; `suite_table` prints them as one table.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from lift_fast.eval.long_captions import DCI_FOLDER, DOCCI_FILE, SHAREGPT4V_FILE
from lift_fast.eval.tasks import ENCODER_LIMIT, TaskSpec

SHORT_LENGTH = 77  # the CLIP text tower's context, the field's reference cut
LONG_SETS = ("urban1k", "docci", "dci", "sharegpt4v")


def _wds(kind: str, folder: str) -> Callable[[Path], dict | None]:
    return lambda root: ({"kind": kind, "format": "wds", "path": root / folder}
                         if (root / folder / "test" / "nshards.txt").is_file() else None)


def _karpathy(folder: str, annotations: str, images: str) -> Callable[[Path], dict | None]:
    return lambda root: ({"kind": "retrieval", "format": "karpathy", "path": root / folder / annotations,
                          "images": root / folder / images} if (root / folder / annotations).is_file() else None)


def _json_folder(kind: str, folder: str) -> Callable[[Path], dict | None]:
    return lambda root: ({"kind": kind, "format": "image_folder", "path": root / folder,
                          "images": root / "coco" / "val2017"} if any((root / folder).glob("*.json")) else None)


def _present(kind: str, fmt: str, key: str, path: str = "", **extra) -> Callable[[Path], dict | None]:
    """The set at root/(path or key) when root/key exists."""
    return lambda root: ({"kind": kind, "format": fmt, "path": root / (path or key),
                          **{k: root / v for k, v in extra.items()}} if (root / key).exists() else None)


# set name -> (what it is, its candidate layouts in order, what is looked for, for the skip line)
LIFT_SETS: dict[str, tuple[str, list[Callable[[Path], dict | None]], str]] = {
    "imagenet": ("ImageNet-1k zero-shot", [_wds("zeroshot", "wds_imagenet1k")], "wds_imagenet1k/test/nshards.txt"),
    "coco": ("COCO 5k retrieval", [_wds("retrieval", "wds_mscoco_captions"),
                                   _karpathy("coco", "dataset_coco.json", ".")],
             "wds_mscoco_captions/test/nshards.txt or coco/dataset_coco.json"),
    "flickr30k": ("Flickr30k 1k retrieval", [_wds("retrieval", "wds_flickr30k"),
                                            _karpathy("flickr30k", "dataset_flickr30k.json", "flickr30k-images")],
                  "wds_flickr30k/test/nshards.txt or flickr30k/dataset_flickr30k.json"),
    "sugarcrepe": ("SugarCrepe", [_json_folder("sugarcrepe", "sugar-crepe/data")], "sugar-crepe/data/*.json"),
    "sugarcrepe_pp": ("SugarCrepe++", [_json_folder("sugarcrepe_pp", "scpp/data"),
                                       _json_folder("sugarcrepe_pp", "sugarcrepe_pp")],
                      "scpp/data/*.json or sugarcrepe_pp/*.json"),
    "urban1k": ("Urban-1k", [_present("retrieval", "urban1k", "Urban1k/caption", "Urban1k")], "Urban1k/caption/"),
    "docci": ("DOCCI test", [_present("retrieval", "docci", f"docci/{DOCCI_FILE}", "docci")], f"docci/{DOCCI_FILE}"),
    "dci": ("DCI", [_present("retrieval", "dci", f"{DCI_FOLDER}/annotations", DCI_FOLDER)],
            f"{DCI_FOLDER}/annotations/"),
    "sharegpt4v": ("ShareGPT4V-1k", [_present("retrieval", "sharegpt4v", f"sharegpt4v/{SHAREGPT4V_FILE}",
                                              images="sharegpt4v"),
                                     _present("retrieval", "sharegpt4v", f"sharegpt4v/data/{SHAREGPT4V_FILE}",
                                              images="sharegpt4v/data")],
                   f"sharegpt4v/{SHAREGPT4V_FILE} or sharegpt4v/data/{SHAREGPT4V_FILE}"),
}


def lift_suite(root: str | Path, long_max_length: int = 0) -> tuple[list[TaskSpec], list[str]]:
    """The tasks of the sets present under `root` and one line per absent set.

    long_max_length: the long-caption sets' second length (0: the encoder's limit, max_length=max).
    Returns (tasks in LIFT_SETS order, skip lines). Nothing is read beyond the existence of each
    set's key file; read_tasks checks the sets.
    """
    root = Path(root)
    tasks, skipped = [], []
    for name, (title, layouts, looked_for) in LIFT_SETS.items():
        found = next((fields for fields in (layout(root) for layout in layouts) if fields), None)
        if found is None:
            skipped.append(f"skip {name} ({title}): no " + " nor ".join(str(root / part)
                                                                     for part in looked_for.split(" or ")))
            continue
        fields = {key: str(value) for key, value in found.items()}
        if name in LONG_SETS:
            tasks.append(TaskSpec(**fields, name=name, max_length=SHORT_LENGTH))
            tasks.append(TaskSpec(**fields, name=f"{name}_long", max_length=long_max_length or ENCODER_LIMIT))
        else:
            tasks.append(TaskSpec(**fields, name=name))
    return tasks, skipped


def _pct(value: float) -> str:
    return f"{value * 100:5.1f}"


def suite_rows(tasks: list[TaskSpec], results: dict[str, float]) -> list[tuple[str, str, str, str]]:
    """(set, measure, tokens, figures) per task, from eval.json's flat names."""
    rows = []
    for spec in tasks:
        if spec.kind == "zeroshot":
            prefix = f"zeroshot/{spec.name}"
            figures = f"top1 {_pct(results[f'{prefix}/top1'])}"
            if f"{prefix}/top5" in results:
                figures += f"  top5 {_pct(results[f'{prefix}/top5'])}"
            figures += f"  (chance {100 / results[f'{prefix}/num_classes']:.1f})"
            rows.append((spec.name, "zero-shot %", str(results[f"{prefix}/max_length"]), figures))
        elif spec.kind == "retrieval":
            prefix = f"retrieval/{spec.name}"
            figures = (f"i2t R@1 {_pct(results[f'{prefix}/i2t_r1'])}  R@5 {_pct(results[f'{prefix}/i2t_r5'])}  "
                       f"t2i R@1 {_pct(results[f'{prefix}/t2i_r1'])}  R@5 {_pct(results[f'{prefix}/t2i_r5'])}  "
                       f"(chance {results[f'{prefix}/chance_r1'] * 100:.2f}; "
                       f"{results[f'{prefix}/captions_truncated']} of {results[f'{prefix}/num_captions']} cut)")
            rows.append((spec.name, "retrieval %", str(results[f"{prefix}/max_length"]), figures))
        elif spec.kind == "sugarcrepe":
            prefix = f"compositional/{spec.name}/"
            accuracies = {k[len(prefix):]: v for k, v in results.items() if k.startswith(prefix)
                          and k[len(prefix):] not in ("num_images", "max_length", "captions_truncated")}
            figures = "  ".join(f"{k} {_pct(v)}" for k, v in sorted(accuracies.items())) + "  (chance 50)"
            rows.append((spec.name, "accuracy %", str(results[f"{prefix}max_length"]), figures))
        else:
            prefix = f"compositional_pp/{spec.name}/"
            categories = sorted({k[len(prefix):].rsplit("/", 1)[0] for k in results
                                 if k.startswith(prefix) and k.endswith("/itt")})
            for measure in ("itt", "tot"):
                figures = "  ".join(f"{c} {_pct(results[f'{prefix}{c}/{measure}'])}" for c in categories)
                rows.append((spec.name, f"{measure.upper()} %", str(results[f"{prefix}max_length"]),
                             figures + "  (chance 33.3)"))
    return rows


def suite_table(tasks: list[TaskSpec], results: dict[str, float], skipped: list[str], title: str = "") -> str:
    """One table of every task's headline figures (and the skipped sets below it)."""
    rows = [("set", "measure", "tokens", "figures")] + suite_rows(tasks, results)
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = [title] if title else []
    for number, row in enumerate(rows):
        lines.append("  ".join(cell.ljust(width) for cell, width in zip(row[:3], widths)) + "  " + row[3])
        if number == 0:
            lines.append("-" * (sum(widths) + 6 + len(row[3])))
    lines += skipped
    return "\n".join(lines)


def run_suite(run_dir: str | Path, root: str | Path, *, tasks: list[TaskSpec] = (), data_dir=None,
              embeddings_dir=None, config_path: str | Path | None = None, overrides=(), checkpoint=None,
              progress: bool = True) -> tuple[dict[str, float], str]:
    """Evaluate a run on the lift suite's sets under `root` (plus `tasks`, and the eval shards when
    given) in one pass of lift_fast.eval.run.evaluate; returns (eval.json's metrics, the table).
    Raises ConfigError when no set is under root and nothing else is asked, and whatever evaluate
    raises (every set is checked before the model loads)."""
    from lift_fast.config import ConfigError
    from lift_fast.eval.run import eval_config, evaluate

    cfg = eval_config(run_dir, config_path, overrides)
    suite, skipped = lift_suite(root, cfg.eval.long_max_length)
    if not suite and not tasks and data_dir is None:
        raise ConfigError(f"--suite lift: no set of the suite is under {root}:\n" + "\n".join(skipped))
    everything = suite + list(tasks)
    results = evaluate(run_dir, data_dir, embeddings_dir, tasks=everything, cfg=cfg, checkpoint=checkpoint,
                       progress=progress)
    title = f"lift suite: {run_dir} (checkpoint step {results['checkpoint_step']}), sets under {root}"
    return results, suite_table(everything, results, skipped, title)
