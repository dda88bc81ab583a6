"""Caption embedding: lift_fast's encoder against sentence-transformers' `encode`, all-MiniLM-L6-v2 on
the CPU, the same 5,000 varied-length captions and the same batch size (128), in one run.

Sides:
  baseline        SentenceTransformer(path).encode(captions, batch_size=128, normalize_embeddings=True),
                  max_seq_length 77
  lift_fast       load_encoder(EmbedConfig(max_length=77)).encode(captions, batch_size=128): fp32, at most
                  128 captions and 1,024 padded tokens per pass (the CPU default of embed.max_tokens)
  lift_fast_bf16_mixed  the same with embed.precision=bf16-mixed: fp32 weights, bf16 matmuls under
                  autocast (fast on CPUs with AVX512-BF16 or AMX, slow on others)
  lift_fast_bf16  the same with embed.precision=bf16: bf16 weights and activations
  lift_fast_packed  fp32, embed.packing=packed: captions end to end in packs of 1,024 tokens, no padding
                  (sdpa attends through a block-diagonal T x T mask on the CPU)
  lift_fast_bucketed  fp32, embed.packing=off with length_step=16: the padded plan a compiled encoder
                  ran before packing (lengths rounded up to 16, 32, 48, 64, 77), run uncompiled here

`lift_fast` itself runs embed.packing=auto, which on a CPU (sdpa) is exact-length batches with at most
5 % padding. Each side also records padded_token_ratio: tokens run through the model (padding
included) per real token; for the baseline, what sentence-transformers pads (it sorts by length and
pads each batch of 128 to its longest caption).

Each side records captions_per_second and tokens_per_second (real tokens, [CLS]/[SEP] included) of its
best round, the mean and minimum cosine of its rows to the baseline's (fp32 and bf16-mixed must reach
0.9999 per caption), and interleaved_best_s: its best time over rounds that run every side in turn
(baseline, lift_fast, ...), so that load from other jobs on a shared machine hits every side alike.
Its ratio (interleaved_best_s baseline / candidate) is the speedup to read on a busy machine.
"""

from __future__ import annotations

import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lift_fast.config import EmbedConfig
from lift_fast.embed import load_encoder

NUM_CAPTIONS, BATCH_SIZE, MAX_LENGTH = 5000, 128, 77
ROUNDS = 2  # pytest-benchmark rounds per side, after one warm-up
INTERLEAVED_ROUNDS = 3
SIDES = ("baseline", "lift_fast", "lift_fast_bf16_mixed", "lift_fast_bf16", "lift_fast_packed", "lift_fast_bucketed")
SIDE_SETTINGS = {"lift_fast": {}, "lift_fast_bf16_mixed": {"precision": "bf16-mixed"},
                 "lift_fast_bf16": {"precision": "bf16"}, "lift_fast_packed": {"packing": "packed"},
                 "lift_fast_bucketed": {"packing": "off", "length_step": 16}}
WORDS = [
    "a", "an", "the", "two", "three", "several", "small", "large", "tiny", "old", "young", "red",
    "green", "blue", "yellow", "black", "white", "brown", "wooden", "metal", "glass", "dog", "dogs",
    "cat", "cats", "horse", "bird", "man", "woman", "child", "children", "people", "car", "bus",
    "bicycle", "train", "boat", "table", "chair", "street", "road", "river", "mountain", "beach",
    "field", "kitchen", "window", "door", "tree", "flowers", "grass", "snow", "sky", "sitting",
    "standing", "running", "walking", "riding", "holding", "eating", "playing", "looking", "parked",
    "next", "to", "near", "under", "above", "behind", "in", "on", "at", "with", "of", "and", "while",
    "during", "sunny", "cloudy", "bright", "dark", "busy", "quiet", "photo", "picture", "view",
    "close-up", "of", "colourful", "crowded", "city", "park", "evening", "morning", "night",
]


def make_captions(n: int = NUM_CAPTIONS, seed: int = 0) -> list[str]:
    """n distinct captions of 1 to 120 words (log-normal, median ~12 words; for n=5000, 86,944 tokens
    and 12 captions cut at 77), the same for a seed on every machine."""
    rng = np.random.default_rng(seed)
    captions: dict[str, None] = {}
    while len(captions) < n:
        words = int(np.clip(rng.lognormal(2.5, 0.6), 1, 120))
        text = " ".join(rng.choice(WORDS, size=words))
        captions.setdefault(text[0].upper() + text[1:] + ".", None)
    return list(captions)


@pytest.fixture(scope="module")
def captions() -> list[str]:
    return make_captions()


@pytest.fixture(scope="module")
def reference(captions) -> torch.Tensor:
    """The baseline's rows, for the fidelity figures of the other sides."""
    return torch.from_numpy(sentence_transformer().encode(captions, batch_size=BATCH_SIZE,
                                                         normalize_embeddings=True))


def sentence_transformer():
    from sentence_transformers import SentenceTransformer

    from lift_fast.embed.encoder import resolve_model

    model = SentenceTransformer(str(resolve_model("all-minilm-l6-v2")[0]), device="cpu")
    model.max_seq_length = MAX_LENGTH
    return model


def encode_function(side: str):
    """What one side runs: captions -> rows [N, 384] float32, L2-normalised."""
    if side == "baseline":
        model = sentence_transformer()
        return lambda texts: torch.from_numpy(model.encode(texts, batch_size=BATCH_SIZE, normalize_embeddings=True))
    encoder = side_encoder(side)
    return lambda texts: encoder.encode(texts, batch_size=BATCH_SIZE)


def side_encoder(side: str):
    return load_encoder(EmbedConfig(max_length=MAX_LENGTH, **{"precision": "fp32", **SIDE_SETTINGS[side]}))


def padded_token_ratio(side: str, captions: list[str]) -> float:
    """Tokens run through the model per real token when `side` embeds `captions`."""
    encoder = side_encoder("lift_fast")
    lengths = [len(ids) for ids in encoder.tokenize(captions).ids]
    if side == "baseline":  # sentence-transformers: longest first, batches of BATCH_SIZE padded to their longest
        ordered = sorted(lengths, reverse=True)
        padded = sum(len(chunk) * chunk[0] for chunk in (ordered[i:i + BATCH_SIZE] for i in range(0, len(ordered), BATCH_SIZE)))
    else:
        plan = side_encoder(side).plan(lengths, BATCH_SIZE, encoder.max_tokens)
        padded = sum(batch.length if side == "lift_fast_packed" else len(batch.rows) * batch.length for batch in plan)
    return padded / sum(lengths)


def interleaved_rounds(captions: list[str], rounds: int, log=None) -> dict[str, list[float]]:
    """Seconds per side for each of `rounds` rounds, each running every side once, in turn."""
    functions = {side: encode_function(side) for side in SIDES}
    for function in functions.values():
        function(captions[:500])  # warm-up
    seconds: dict[str, list[float]] = {side: [] for side in SIDES}
    for round_index in range(rounds):
        for side, function in functions.items():
            started = time.perf_counter()
            function(captions)
            seconds[side].append(time.perf_counter() - started)
        if log is not None:
            log(f"round {round_index + 1}: " + ", ".join(f"{side} {seconds[side][-1]:.2f} s" for side in SIDES))
    return seconds


@pytest.fixture(scope="module")
def interleaved(captions) -> dict[str, float]:
    """Best seconds per side over INTERLEAVED_ROUNDS interleaved rounds."""
    return {side: min(times) for side, times in interleaved_rounds(captions, INTERLEAVED_ROUNDS).items()}


@pytest.mark.parametrize("side", SIDES)
def test_embed_minilm_cpu(paired_benchmark, side, captions, reference, interleaved):
    encode = encode_function(side)
    rows = paired_benchmark("embed all-MiniLM-L6-v2 cpu, 5000 captions, batch 128", encode, captions,
                            rounds=ROUNDS, warmup_rounds=1)
    cosine = F.cosine_similarity(rows.double(), reference.double(), dim=-1)
    stats = paired_benchmark.benchmark.stats
    tokens = sum(min(len(ids), MAX_LENGTH) for ids in load_encoder(EmbedConfig()).tokenizer(captions)["input_ids"])
    if stats is not None:
        paired_benchmark.record(captions_per_second=NUM_CAPTIONS / stats.stats.min,
                                tokens_per_second=tokens / stats.stats.min,
                                cosine_mean=float(cosine.mean()), cosine_min=float(cosine.min()),
                                interleaved_best_s=interleaved[side],
                                padded_token_ratio=padded_token_ratio(side, captions))
    if side != "lift_fast_bf16":
        assert cosine.min() >= 0.9999, f"{side}: a row's cosine to sentence-transformers' is {cosine.min():.6f}"


if __name__ == "__main__":  # python bench/bench_embed.py [ROUNDS]: only the interleaved rounds, as a table
    import sys

    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 4
    texts = make_captions()
    seconds = interleaved_rounds(texts, rounds, log=print)
    best = {side: min(times) for side, times in seconds.items()}
    print("| side | captions/s (best round) | vs baseline | per-round ratios | padded tokens / real tokens |")
    print("| --- | --- | --- | --- | --- |")
    for side in SIDES:
        ratios = [b / c for b, c in zip(seconds["baseline"], seconds[side])]
        print(f"| {side} | {NUM_CAPTIONS / best[side]:.0f} | {best['baseline'] / best[side]:.2f}x | "
              f"{min(ratios):.2f}-{max(ratios):.2f}x | {padded_token_ratio(side, texts):.3f} |")
