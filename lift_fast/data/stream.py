"""Which samples make up every batch: a pure function of (seed, step), so a run can resume exactly.

The training stream of one epoch is every sample of every shard, shuffled in two levels: the shard
order is permuted, consecutive groups of `window` shards are mixed together (a permutation of all
their samples), and the groups follow each other. The global batch of step s is the next
`batch_size` samples of that stream; rank r of a job takes its own consecutive slice of it, so N
ranks see exactly the batches one process would. An epoch is `samples // batch_size` steps on
every rank (the remainder, different samples each epoch, waits for the next one).

Because step s's batch depends on nothing but the seed, the step and the shard sizes, the loader
position saved in a checkpoint is the step itself: a resumed run neither repeats nor skips a
sample, whatever batches were in flight when it stopped. Every sample also gets its own
augmentation seed from (seed, epoch, position), so the crops do not depend on rank or worker, and
so does the caption source it is trained against when the store holds several (SampleRef.source,
drawn by lift_fast.data.captions.draw_sources with the stream's `caption_probabilities`).

Memory holds one permutation per mixing window (window * samples per shard integers), so the
stream scales to billions of samples; `window` trades shuffle quality for that memory and for
read locality (a window's shards are read together).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from lift_fast.data.captions import draw_sources


@dataclass(frozen=True)
class SampleRef:
    """One sample of the stream: shard (its place in the stream's shard list), row (its place in the
    shard's index), epoch and position (its place in that epoch's stream; with the seed, they key
    its augmentation draws, lift_fast.data.augment.sample_uniforms); source: the caption source
    (its place in the store's `captions`) whose row the sample is paired with."""

    shard: int
    row: int
    epoch: int
    position: int
    source: int = 0


class SampleStream:
    """The order in which a run reads its samples.

    counts: samples per shard, in the shards' sorted order. batch_size: the global batch (all
    ranks). shuffle: False walks the shards in order (eval). window: shards mixed together.
    caption_probabilities: the probability of each caption source of the store (training draws one
    per sample per step); eval_source: the source of every sample of in_order (eval).
    """

    def __init__(self, counts: list[int], *, batch_size: int, seed: int = 0, shuffle: bool = True, window: int = 32,
                 caption_probabilities: tuple[float, ...] = (1.0,), eval_source: int = 0):
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if window < 1:
            raise ValueError(f"window must be at least one shard, got {window}")
        self.counts = [int(c) for c in counts]
        self.samples = sum(self.counts)
        self.batch_size, self.seed, self.shuffle, self.window = batch_size, seed, shuffle, window
        self.caption_probabilities = tuple(float(p) for p in caption_probabilities)
        if not 0 <= eval_source < len(self.caption_probabilities):
            raise ValueError(f"eval_source {eval_source} is not one of the {len(self.caption_probabilities)} caption sources")
        self.eval_source = eval_source
        self.steps_per_epoch = self.samples // batch_size
        self._windows = lru_cache(maxsize=2)(self._epoch_windows)
        self._perms = lru_cache(maxsize=4)(self._window_permutation)

    def _epoch_windows(self, epoch: int) -> tuple[list[list[int]], list[int]]:
        """This epoch's mixing windows (lists of shard numbers) and the stream position each starts at."""
        order = list(range(len(self.counts)))
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(order)).tolist()
        groups = [order[i:i + self.window] for i in range(0, len(order), self.window)]
        starts = np.cumsum([0] + [sum(self.counts[s] for s in g) for g in groups]).tolist()
        return groups, starts

    def _window_permutation(self, epoch: int, window: int) -> np.ndarray | None:
        if not self.shuffle:
            return None
        starts = self._windows(epoch)[1]
        size = starts[window + 1] - starts[window]
        return np.random.default_rng([self.seed, epoch, window, 1]).permutation(size)

    def settings(self) -> dict:
        """The keyword arguments that rebuild this stream with SampleStream(self.counts, **settings)."""
        return {"batch_size": self.batch_size, "seed": self.seed, "shuffle": self.shuffle, "window": self.window,
                "caption_probabilities": self.caption_probabilities, "eval_source": self.eval_source}

    def sources(self, epoch: int, positions) -> np.ndarray:
        """[n] the caption source drawn for the samples at `positions` of `epoch`'s stream."""
        return draw_sources(self.seed, epoch, np.asarray(positions), np.array(self.caption_probabilities))

    def sample(self, epoch: int, position: int, source: int | None = None) -> SampleRef:
        """The sample at `position` (0 <= position < samples) of the stream of `epoch`, with its drawn
        caption source (or `source`, when the caller drew it already)."""
        groups, starts = self._windows(epoch)
        window = bisect.bisect_right(starts, position) - 1
        offset = position - starts[window]
        perm = self._perms(epoch, window)
        if perm is not None:
            offset = int(perm[offset])
        if source is None:
            source = int(self.sources(epoch, [position])[0])
        for shard in groups[window]:
            if offset < self.counts[shard]:
                return SampleRef(shard, offset, epoch, position, source)
            offset -= self.counts[shard]
        raise AssertionError("position past its window")  # starts/counts are consistent by construction

    def batch(self, step: int, rank: int = 0, world_size: int = 1) -> list[SampleRef]:
        """Rank `rank`'s share of step `step`'s global batch (batch_size // world_size samples)."""
        if self.steps_per_epoch == 0:
            raise ValueError(f"a batch of {self.batch_size} is more than the {self.samples} samples")
        if self.batch_size % world_size:
            raise ValueError(f"batch_size {self.batch_size} does not split over {world_size} ranks")
        epoch, step_in_epoch = divmod(step, self.steps_per_epoch)
        local = self.batch_size // world_size
        first = step_in_epoch * self.batch_size + rank * local
        positions = range(first, first + local)
        return [self.sample(epoch, p, int(s)) for p, s in zip(positions, self.sources(epoch, positions))]

    def replacement(self, ref: SampleRef, attempt: int) -> SampleRef:
        """The sample that stands in for `ref` when it cannot be used (attempt 1, 2, ...): one from a
        later step's batch of the same epoch, so the batch stays full and the stream deterministic."""
        position = (ref.position + attempt * self.batch_size + attempt) % self.samples
        return self.sample(ref.epoch, position)

    def in_order(self, rank: int = 0, world_size: int = 1) -> list[list[SampleRef]]:
        """One pass over every sample in shard order (no shuffle, none dropped), in batches of
        batch_size; rank r takes every world_size-th batch."""
        # position: the sample's place in the unshuffled stream of epoch 0 (where stream.sample finds it)
        starts = np.cumsum([0] + self.counts).tolist()
        refs = [SampleRef(shard, row, 0, starts[shard] + row, self.eval_source) for shard, count in enumerate(self.counts)
                for row in range(count)]
        batches = [refs[i:i + self.batch_size] for i in range(0, len(refs), self.batch_size)]
        return batches[rank::world_size]

    def state(self, step: int) -> dict:
        """The loader position to save with checkpoint `step`, with what it is only valid for."""
        state = {"step": step, "seed": self.seed, "samples": self.samples, "shards": len(self.counts),
                "batch_size": self.batch_size, "window": self.window}
        if len(self.caption_probabilities) > 1:  # a one-source stream's state is what it was before sources
            state["caption_probabilities"] = list(self.caption_probabilities)
        return state
