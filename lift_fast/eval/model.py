"""The model side of evaluation: a run's image tower on the eval device, and its frozen text encoder.

    model = load_run_model(run_dir, cfg)              # newest checkpoint, eval device, eval precision
    features = model.encode_images(image_refs)        # [N, D] L2-normalised, on model.device
    encoder = model.text_encoder(max_length=0)        # the run's embed settings (the store's)

A CLIP-mode run (model.text_tower=transformer) embeds class names and captions with its own trained
text tower instead (`TowerTextEncoder`, the same encode() interface), cut at model.text_context tokens.

On CUDA the tower runs under bf16 autocast (eval.precision=auto) with the run's attention backend:
a run trained with model.attention=flash evaluates with flash where it can run (CUDA, bf16/fp16) and
with torch SDPA elsewhere (a CPU, or eval.precision=fp32), so a flash-trained run evaluates anywhere.
Images are cut and scaled as the eval loader does (centre square, bicubic to data.image_size,
CLIP's mean/std), so an image folder and the same images in shards give the same features.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image
from safetensors import safe_open
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from lift_fast.config import Config, ConfigError
from lift_fast.data.augment import center_box, crop_resize, open_image, to_tensor
from lift_fast.data.loader import worker_count
from lift_fast.data.shards import ShardError
from lift_fast.eval.formats import DatasetError, ImageRef
from lift_fast.models.vit import build_model
from lift_fast.train import RunFolderError
from lift_fast.train.checkpoint import latest_checkpoint, load_weights

log = logging.getLogger(__name__)

HEAD_OUT = "head.fc2.weight"  # [text_dim, hidden]: the width of the features, read without loading the weights


def eval_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def eval_autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """eval.precision on `device`: bf16 (autocast) or None (fp32). auto: bf16 on a CUDA GPU with bf16, else fp32.
    Raises ConfigError naming eval.precision for bf16 on a GPU without it or an unknown value."""
    if precision == "fp32":
        return None
    cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    if precision == "auto":
        return torch.bfloat16 if cuda_bf16 else None
    if precision == "bf16":
        if device.type == "cuda" and not cuda_bf16:
            raise ConfigError("eval.precision=bf16: this GPU has no bfloat16 support; use eval.precision=fp32 or auto")
        return torch.bfloat16
    raise ConfigError(f"eval.precision={precision!r} is not one of auto, bf16, fp32")


def preprocess(image: Image.Image, image_size: int, where: str = "image") -> torch.Tensor:
    """PIL image -> [3, S, S] float32: the eval loader's view (centre square, bicubic, CLIP mean/std).
    Raises ShardError naming `where` when the image cannot be decoded."""
    return to_tensor(crop_resize(image, center_box(*image.size), image_size, False, where))


class _ImageFiles(Dataset):
    """Decoded, preprocessed images of a list of ImageRefs; a bad one yields its error message instead."""

    def __init__(self, refs: Sequence[ImageRef], image_size: int):
        self.refs, self.image_size = refs, image_size

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, index: int):
        ref = self.refs[index]
        try:
            return preprocess(open_image(ref.read(), ref.where), self.image_size, ref.where)
        except (DatasetError, ShardError) as err:
            return str(err)  # raised in the main process, whole, not as a worker's traceback


def _collate(items: list) -> torch.Tensor:
    bad = next((item for item in items if isinstance(item, str)), None)
    if bad is not None:
        raise DatasetError(bad)
    return torch.stack(items)


@dataclasses.dataclass
class EvalModel:
    """A run's image tower ready for evaluation, and what it needs to embed text like its store."""

    model: torch.nn.Module
    cfg: Config
    checkpoint: Path
    device: torch.device
    autocast_dtype: torch.dtype | None
    text_dim: int
    _encoder: object = None

    @property
    def image_size(self) -> int:
        return self.cfg.data.image_size

    @property
    def clip_mode(self) -> bool:
        """Whether the run trained its own text tower (model.text_tower=transformer)."""
        return self.cfg.model.text_tower == "transformer"

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    @torch.inference_mode()
    def encode_batch(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, S, S] -> L2-normalised float32 features [B, D] on self.device."""
        with self.autocast():
            features = self.model(images.to(self.device, non_blocking=True))
        return torch.nn.functional.normalize(features.float(), dim=-1)

    def encode_images(self, refs: Sequence[ImageRef], *, progress: bool = False, desc: str = "images") -> torch.Tensor:
        """Features [N, D] (float32, on self.device) of the images at `refs`, in order, batches of
        eval.batch_size decoded in data.num_workers processes. Raises DatasetError naming a bad image."""
        loader = DataLoader(_ImageFiles(refs, self.image_size), batch_size=self.cfg.eval.batch_size,
                            num_workers=worker_count(self.cfg.data.num_workers, dali=False), collate_fn=_collate)
        features = [self.encode_batch(batch) for batch in tqdm(loader, desc=desc, unit="batch", disable=not progress)]
        return torch.cat(features)

    def text_encoder(self, max_length: int = 0):
        """The run's frozen text encoder with its store settings (embed.*), on self.device; with
        max_length > 0 the same encoder cutting captions at max_length tokens instead (long-caption
        retrieval). Raises ConfigError when max_length exceeds the model's positions, or when the
        encoder's width is not the tower's. A CLIP-mode run: its trained text tower (TowerTextEncoder),
        whose cut is model.text_context whatever max_length asks."""
        if self.clip_mode:
            if self._encoder is None:
                from lift_fast.models.tokenizer import build_tokenizer

                self._encoder = TowerTextEncoder(self.model.text, build_tokenizer(self.cfg.model), self)
            if max_length and max_length != self.cfg.model.text_context:
                log.warning("max_length=%d: a CLIP-mode run's text tower reads model.text_context=%d tokens; "
                            "captions are cut there", max_length, self.cfg.model.text_context)
            return self._encoder
        if self._encoder is None:
            from lift_fast.embed import load_encoder

            self._encoder = load_encoder(self.cfg.embed, device=str(self.device))
            if self._encoder.dim != self.text_dim:
                raise ConfigError(f"the run's embed settings (embed.model={self.cfg.embed.model!r}, embed.dim="
                                  f"{self.cfg.embed.dim}) give {self._encoder.dim}-d text embeddings, but the head of "
                                  f"{self.checkpoint} outputs {self.text_dim}-d features")
        if not max_length or max_length == self.cfg.embed.max_length:
            return self._encoder
        limit = getattr(getattr(self._encoder.model, "config", None), "max_position_embeddings", None)
        if limit is not None and max_length > limit:
            raise ConfigError(f"max_length={max_length} exceeds the {limit} positions of the text encoder "
                              f"{self.cfg.embed.model!r}")
        # The same weights; only the cut differs (TextEncoder reads cfg.max_length when tokenizing and batching).
        longer = copy.copy(self._encoder)
        longer.cfg = dataclasses.replace(self.cfg.embed, max_length=max_length)
        longer._identity = None
        return longer

    def max_text_length(self) -> int:
        """The most tokens the text side reads (what a task's max_length=max asks for): the frozen
        encoder's positions (its config's max_position_embeddings, else the tokenizer's
        model_max_length, else embed.max_length), or a CLIP-mode run's model.text_context."""
        if self.clip_mode:
            return self.cfg.model.text_context
        encoder = self.text_encoder()
        limit = getattr(getattr(encoder.model, "config", None), "max_position_embeddings", None)
        if not isinstance(limit, int):
            limit = getattr(getattr(encoder, "tokenizer", None), "model_max_length", None)
        # a tokenizer without a known limit reports a huge sentinel (1e30)
        return limit if isinstance(limit, int) and 0 < limit < 1_000_000 else self.cfg.embed.max_length


class TowerTextEncoder:
    """A CLIP-mode run's trained text tower behind the frozen encoder's interface (encode, cfg.max_length,
    identity), so retrieval, zero-shot and compositional eval embed text with it unchanged.

    tower: the run's TextTransformer (model.text, on the eval device); tokenizer: its CaptionTokenizer;
    model: the EvalModel (device, autocast, eval.batch_size).
    """

    def __init__(self, tower: torch.nn.Module, tokenizer, model: EvalModel):
        self.tower, self.tokenizer, self.model = tower, tokenizer, model
        self.cfg = dataclasses.replace(model.cfg.embed, max_length=tokenizer.context_length)
        self.dim = tower.embed_dim
        self.identity = {"text_tower": "transformer", "checkpoint": str(model.checkpoint)}

    @torch.inference_mode()
    def encode(self, texts: Sequence[str], return_truncated: bool = False, on_batch=None):
        """texts -> L2-normalised float32 features [N, D] on the eval device; with return_truncated also a
        bool [N]: the caption filled the whole context (it was cut, or fits exactly). on_batch(captions,
        tokens) is called after each batch of eval.batch_size captions, as the frozen encoder does."""
        rows, filled, batch_size = [], [], self.model.cfg.eval.batch_size
        for start in range(0, len(texts), batch_size):
            tokens = self.tokenizer(list(texts[start:start + batch_size]))
            filled.append(tokens[:, -1] != self.tokenizer.pad_token_id)
            with self.model.autocast():
                features = self.tower(tokens.to(self.model.device)).float()
            rows.append(features)
            if on_batch is not None:
                on_batch(len(tokens), int((tokens != self.tokenizer.pad_token_id).sum()))
        out = torch.cat(rows) if rows else torch.empty(0, self.dim, device=self.model.device)
        if return_truncated:
            return out, (torch.cat(filled) if filled else torch.zeros(0, dtype=torch.bool))
        return out


def checkpoint_text_dim(checkpoint: Path) -> int:
    """The feature width of a checkpoint's head, from the safetensors header."""
    path = checkpoint / "model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: not a complete checkpoint")
    with safe_open(str(path), framework="pt") as weights:
        if HEAD_OUT not in weights.keys():
            raise RunFolderError(f"{path} has no {HEAD_OUT} tensor: not a lift-fast image tower with its head")
        return int(weights.get_slice(HEAD_OUT).get_shape()[0])


def load_run_model(run_dir: str | Path, cfg: Config, checkpoint: str | Path | None = None,
                   device: torch.device | None = None) -> EvalModel:
    """The run's tower (newest complete checkpoint, or `checkpoint`) on `device` (default: CUDA when
    there is one), in eval mode, with eval.precision and the run's attention backend (flash where it
    can run, else SDPA). Raises FileNotFoundError for a run without a checkpoint, ConfigError for
    bad settings, RunFolderError for weights that do not fit the config."""
    run_dir = Path(run_dir)
    checkpoint = Path(checkpoint) if checkpoint else latest_checkpoint(run_dir)
    if checkpoint is None:
        raise FileNotFoundError(f"run folder {run_dir} has no complete checkpoint to evaluate")
    device = device or eval_device()
    autocast_dtype = eval_autocast_dtype(cfg.eval.precision, device)
    model_cfg = cfg.model
    if model_cfg.attention == "flash":
        # flash only runs on CUDA in half precision: eval takes it there and falls back to SDPA elsewhere
        log.info("model.attention=flash: evaluating with attention=auto (flash where it can run, else sdpa)")
        model_cfg = dataclasses.replace(model_cfg, attention="auto")
    text_dim = checkpoint_text_dim(checkpoint)
    model = build_model(model_cfg, cfg.data.image_size, text_dim)
    if model_cfg.text_tower == "transformer":  # CLIP mode: the trained text tower is part of the checkpoint
        from lift_fast.models.text_tower import build_text_tower

        model.text = build_text_tower(model_cfg, text_dim)[0]
    if cfg.train.loss == "siglip":
        model.register_parameter("logit_bias", torch.nn.Parameter(torch.zeros(())))
    load_weights(model, checkpoint)
    model.to(device).eval()
    return EvalModel(model, cfg, checkpoint, device, autocast_dtype, text_dim)
