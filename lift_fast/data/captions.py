"""Caption sources: which text of a sample a store row is embedded from, and the per-sample draw of one.

A source is "txt" (the sample's KEY.txt) or "json:FIELD" (a string field of KEY.json, as Recap-DataComp's
`re_caption`). The embed stage writes one store row per (key, source); training draws one source per
sample per step with configurable probabilities:

    sources = parse_sources("txt,json:re_caption")                     # ("txt", "json:re_caption")
    probabilities = parse_weights("txt=0.2,json:re_caption=0.8", sources)
    drawn = draw_sources(seed, epoch, positions, probabilities)         # [n] source numbers

The draw is counter-based like the crop draws (lift_fast.data.augment.sample_uniforms): a hash of
seed, epoch and stream position, salted so it is independent of the crop's draws. So it does not
depend on batch, rank, worker or backend, and a resumed run draws what an uninterrupted one would.
"""

from __future__ import annotations

import json

import numpy as np

from lift_fast.config import ConfigError
from lift_fast.data.augment import _splitmix64
from lift_fast.data.shards import ShardError

TXT = "txt"
JSON_PREFIX = "json:"
# Salt of the source draw's counter: keeps it apart from sample_uniforms' counters of the same position.
_SOURCE_SALT = 0x5EED_CA97_10A5_0001


def parse_sources(spec: str | tuple | list, setting: str = "embed.captions") -> tuple[str, ...]:
    """"txt,json:re_caption" (or a list of names) -> ("txt", "json:re_caption").

    Raises ConfigError naming `setting` for an empty list, a repeated source, or a name that is neither
    "txt" nor "json:FIELD".
    """
    names = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec)]
    names = [n for n in names if n]
    if not names:
        raise ConfigError(f"{setting}: no caption source given; use e.g. txt or txt,json:re_caption")
    for name in names:
        if name != TXT and not (name.startswith(JSON_PREFIX) and len(name) > len(JSON_PREFIX)):
            raise ConfigError(f"{setting}: caption source {name!r} is neither 'txt' (KEY.txt) nor 'json:FIELD' "
                              "(a string field of KEY.json, e.g. json:re_caption)")
    if len(set(names)) != len(names):
        raise ConfigError(f"{setting}: caption sources repeat: {', '.join(names)}")
    return tuple(names)


def members_of(sources: tuple[str, ...]) -> tuple[str, ...]:
    """The sample members ("txt", "json") the sources are read from, in a fixed order."""
    return tuple(m for m in (TXT, "json") if any(s == m or s.startswith(m + ":") for s in sources))


def caption_from(files: dict[str, bytes], source: str, shard, key: str) -> str:
    """The caption of one sample from `source` (stripped), given its members' bytes by extension.

    Raises ShardError naming shard, key and source when the member or field is missing, not UTF-8,
    not valid JSON, not a string, or empty.
    """
    where = f"{shard}: sample {key!r}, caption source {source!r}"
    member = TXT if source == TXT else "json"
    if member not in files:
        raise ShardError(f"{where}: no caption ({key}.{member} is missing)")
    try:
        text = files[member].decode("utf-8")
    except UnicodeDecodeError as err:
        raise ShardError(f"{where}: {key}.{member} is not UTF-8 ({err.reason} at byte {err.start})") from None
    if source != TXT:
        field = source[len(JSON_PREFIX):]
        try:
            record = json.loads(text)
        except json.JSONDecodeError as err:
            raise ShardError(f"{where}: {key}.json is not valid JSON ({err.msg})") from None
        if not isinstance(record, dict) or field not in record:
            raise ShardError(f"{where}: {key}.json has no field {field!r}")
        text = record[field]
        if not isinstance(text, str):
            raise ShardError(f"{where}: field {field!r} of {key}.json is a {type(text).__name__}, not a string")
    text = text.strip()
    if not text:
        raise ShardError(f"{where}: the caption is empty ({key}.{member}{'' if source == TXT else ' field ' + repr(field)})")
    return text


def parse_weights(spec: str, sources: tuple[str, ...], setting: str = "data.caption_weights") -> np.ndarray:
    """The probability of drawing each of `sources` ([len(sources)] float64, summing to 1).

    spec: "" (each source equally likely) or "SOURCE=WEIGHT,..." naming sources of the store; a source
    left out is never drawn. Raises ConfigError naming `setting` for a source the store lacks, a weight
    that is not a finite number >= 0, or weights that are all zero.
    """
    if not spec.strip():
        return np.full(len(sources), 1.0 / len(sources))
    weights = np.zeros(len(sources))
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, equals, value = part.rpartition("=")
        if not equals or name.strip() not in sources:
            raise ConfigError(f"{setting}: {part!r} does not name one of the store's caption sources "
                              f"({', '.join(sources)}) as SOURCE=WEIGHT")
        try:
            weight = float(value)
        except ValueError:
            weight = -1.0
        if not np.isfinite(weight) or weight < 0:
            raise ConfigError(f"{setting}: weight {value!r} of {name.strip()!r} is not a number >= 0")
        weights[sources.index(name.strip())] = weight
    if weights.sum() <= 0:
        raise ConfigError(f"{setting}: every weight is 0; give at least one source a positive weight")
    return weights / weights.sum()


def draw_sources(seed: int, epoch: int, positions: np.ndarray, probabilities: np.ndarray) -> np.ndarray:
    """[n] int64: the caption source drawn for the samples at `positions` of `epoch`'s stream.

    One uniform per (seed, epoch, position), compared with the cumulative probabilities; a single
    source draws nothing (always 0).
    """
    positions = np.asarray(positions, dtype=np.uint64)
    if len(probabilities) == 1:
        return np.zeros(len(positions), dtype=np.int64)
    with np.errstate(over="ignore"):
        key = _splitmix64(np.array([seed], dtype=np.uint64) ^ np.uint64(_SOURCE_SALT))
        key = _splitmix64(key ^ _splitmix64(np.array([epoch], dtype=np.uint64)))
        bits = _splitmix64(_splitmix64(positions ^ key))
    uniforms = (bits >> np.uint64(11)).astype(np.float64) * 2.0**-53
    cumulative = np.cumsum(probabilities)
    # Rounding never pushes a draw past the last source that may be drawn; a source of probability 0
    # shares its cumulative edge with the one before, and side="right" never lands on it.
    cumulative[int(np.flatnonzero(np.asarray(probabilities) > 0)[-1]):] = np.inf
    return np.searchsorted(cumulative, uniforms, side="right").astype(np.int64)


def caption_choice(sources: tuple[str, ...], weights: str, eval_source: str,
                   eval_setting: str = "eval.caption_source") -> tuple[np.ndarray, int]:
    """(the training draw's probabilities over `sources`, the eval source's place in `sources`).

    weights: data.caption_weights (see parse_weights); eval_source: a source name, "" for the first.
    Raises ConfigError naming the setting when either names a source the store lacks.
    """
    if eval_source and eval_source not in sources:
        raise ConfigError(f"{eval_setting}={eval_source!r} is not one of the store's caption sources "
                          f"({', '.join(sources)})")
    return parse_weights(weights, sources), sources.index(eval_source) if eval_source else 0
