"""CLIP_benchmark as a client: a lift-fast run as a CLIP-like model with encode_image / encode_text.

    python -m lift_fast.integrations.clip_benchmark eval --model_type lift_fast --pretrained RUN_DIR \
        --model lift --dataset wds/NAME --dataset_root DIR --task zeroshot_classification --output out.json

takes clip_benchmark's own `eval` (and `build`) arguments: it registers `lift_fast` in
clip_benchmark's model types (TYPE2FUNC, MODEL_TYPES) and then runs clip_benchmark's command line.
`--pretrained` is a run folder (its newest complete checkpoint), one checkpoint folder
(RUN/checkpoints/step_N), or a `lift-fast export --format lift` folder; `--model` is free (it names
the row in `clip_benchmark build`). Where the export (or the run folder's store_manifest.json)
records the store the run was trained on, the text encoder is checked against it first.

In Python, `load_lift_fast(model_name, pretrained, cache_dir, device)` returns what clip_benchmark's
loaders return, `(model, transform, tokenizer)`. The text side is the run's frozen encoder with the
run's embed settings (prompt, pooling, max length, dim, normalisation), so encode_text gives the
rows the embedding store holds (before the store's fp16 rounding); it runs outside any autocast the
caller opened, in the encoder's own precision. The image side runs under the caller's autocast
(clip_benchmark's --no_amp turns it off), with the run's attention backend where it can run.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torch import nn

from lift_fast.config import Config, load_config
from lift_fast.embed import check_manifest
from lift_fast.eval.model import EvalModel, load_run_model
from lift_fast.export import PROVENANCE, EvalTransform, export_config, lift_export_record
from lift_fast.train.checkpoint import PATTERN

MODEL_TYPE = "lift_fast"


class CaptionTokens:
    """What the tokenizer gives clip_benchmark: the encoder's token ids of a list of captions.

    clip_benchmark calls `.to(device)` on it and hands it to `encode_text`; the ids go to the
    encoder's own batching (longest first, length buckets), so nothing is padded here."""

    def __init__(self, tokenized):
        self.tokenized = tokenized

    def to(self, device) -> CaptionTokens:
        return self

    def __len__(self) -> int:
        return len(self.tokenized.ids)


class LiftTokenizer:
    """captions (a string or a list of strings) -> CaptionTokens, with the run's prompt and max length."""

    def __init__(self, encoder):
        self.encoder = encoder

    def __call__(self, texts) -> CaptionTokens:
        return CaptionTokens(self.encoder.tokenize([texts] if isinstance(texts, str) else list(texts)))


class LiftClipModel(nn.Module):
    """A lift-fast image tower and its frozen text encoder behind open_clip's model interface."""

    def __init__(self, eval_model: EvalModel):
        super().__init__()
        self.eval_model = eval_model
        self.visual = eval_model.model
        self.encoder = eval_model.text_encoder()

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.visual.logit_scale

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """images [B, 3, S, S] (the transform's output) -> features [B, D] float32 (L2-normalised:
        LIFT's head output is normalised in the model)."""
        return self.visual(images.to(self.eval_model.device)).float()

    def encode_text(self, tokens: CaptionTokens, normalize: bool = False) -> torch.Tensor:
        """CaptionTokens -> the frozen encoder's embeddings [B, D] float32 on the model's device."""
        with torch.autocast(self.eval_model.device.type, enabled=False):
            rows = self.encoder.encode_tokenized(tokens.tokenized)
        return rows.to(self.eval_model.device)

    def forward(self, images: torch.Tensor, tokens: CaptionTokens):
        return self.encode_image(images), self.encode_text(tokens), self.logit_scale.exp()


def resolve_pretrained(pretrained: str | Path) -> tuple[Path, Config, Path | None, dict | None]:
    """(run or export folder, its config, the checkpoint folder or None for the newest, the store
    manifest it records or None) of a run folder, a checkpoint folder of one, or a lift export.
    Raises FileNotFoundError for anything else, naming what was looked for, and RunFolderError for a timm
    or open_clip export."""
    path = Path(pretrained)
    if (path / PROVENANCE).is_file():
        return path, export_config(path), path, lift_export_record(path).get("store_manifest")
    run_dir, checkpoint = path, None
    if PATTERN.fullmatch(path.name) and path.parent.name == "checkpoints":
        run_dir, checkpoint = path.parent.parent, path
    if not (run_dir / "config.yaml").is_file():
        raise FileNotFoundError(f"--pretrained {path}: not a lift-fast run folder (config.yaml), a checkpoint folder "
                                f"RUN/checkpoints/step_N, nor a lift export ({PROVENANCE})")
    manifest_file = run_dir / "store_manifest.json"
    manifest = json.loads(manifest_file.read_text(encoding="utf-8")) if manifest_file.is_file() else None
    return run_dir, load_config(run_dir / "config.yaml"), checkpoint, manifest


def load_lift_fast(model_name: str = "lift", pretrained: str = "", cache_dir: str | None = None,
                   device: str | torch.device = "cuda"):
    """clip_benchmark's loader for `--model_type lift_fast`: (model, transform, tokenizer).

    pretrained: a run folder, a checkpoint folder of one, or a lift export; model_name and cache_dir
    are not used. transform: PIL image -> [3, S, S] (the eval loader's view); tokenizer: captions ->
    CaptionTokens. Raises FileNotFoundError for a path that is none of these, StoreMismatchError when
    the text encoder is not the one of the recorded store, and what load_run_model raises."""
    folder, cfg, checkpoint, manifest = resolve_pretrained(pretrained)
    eval_model = load_run_model(folder, cfg, checkpoint, device=torch.device(device))
    model = LiftClipModel(eval_model).eval()
    if manifest is not None:
        check_manifest(manifest, model.encoder.identity, Path(pretrained))

    return model, EvalTransform(cfg.data.image_size), LiftTokenizer(model.encoder)


def _topk_accuracy(output: torch.Tensor, target: torch.Tensor, topk=(1,)) -> list[float]:
    """clip_benchmark's zeroshot_classification.accuracy, with its counts read by .sum() into a 0-d
    tensor: clip_benchmark 1.6.2 calls float() on a 1-element array, which NumPy 2.4 refuses."""
    pred = output.topk(max(topk), 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    return [float(correct[:k].reshape(-1).float().sum()) / len(target) for k in topk]


def register() -> None:
    """Add `lift_fast` to clip_benchmark's model types (before its argument parser is built), and
    mend its top-k accuracy where this NumPy breaks it (the same arithmetic, see _topk_accuracy)."""
    from clip_benchmark import models
    from clip_benchmark.metrics import zeroshot_classification

    models.TYPE2FUNC[MODEL_TYPE] = load_lift_fast
    if MODEL_TYPE not in models.MODEL_TYPES:
        models.MODEL_TYPES.append(MODEL_TYPE)  # the list clip_benchmark.cli took its --model_type choices from
    try:
        zeroshot_classification.accuracy(torch.eye(2), torch.arange(2))
    except TypeError:
        zeroshot_classification.accuracy = _topk_accuracy


def main(argv: list[str] | None = None) -> int:
    """clip_benchmark's command line (`eval ...`, `build ...`) with `--model_type lift_fast` available."""
    register()
    from clip_benchmark import cli

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    return cli.main() or 0


if __name__ == "__main__":
    sys.exit(main())
