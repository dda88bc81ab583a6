"""Read one sample of the stream by offset and join it with its caption embedding by key.

The pairing is by key, never by position: the reader looks the sample's key up in the store's
rows of the same shard, so a gap or a different order on either side can never shift it. The
caption read for the sample must also hash to the caption hash the store recorded for that row:
two data folders can share shard names and keys, and a store made from the other one is an error
naming shard and key (or a counted skip), not a silent wrong pairing.

In a store of several caption sources a sample's rows follow each other, one per source: the
sample takes the row of the source its SampleRef drew. The hash check reads KEY.txt and checks the
key's "txt" row, which was written with the key's other rows and so vouches for all of them; a store
without a "txt" source is checked on the drawn source's own text, read from KEY.json (whose place in
the tar is found by one scan of the shard's members when the shard is opened).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lift_fast.data.captions import TXT, caption_from
from lift_fast.data.index import NO_MEMBER, ShardIndex, read_index, scan_members
from lift_fast.data.shards import ShardError, split_member_name
from lift_fast.data.stream import SampleRef
from lift_fast.store import EmbeddingStore, caption_hash

OPEN_SHARDS = 64  # indexes and file handles kept per process: a mixing window's worth of shards


@dataclass
class RawSample:
    """A sample as read: its key, encoded image bytes, embedding row ([D] in the store's dtype, float32 for
    an int8 store), and where it is from."""

    key: str
    image: bytes
    embedding: np.ndarray
    where: str  # "SHARD: sample 'KEY'", for error messages
    caption: str = ""  # the caption text (stripped): what the CLIP baseline's loader tokenises


class SampleReader:
    """Reads samples of `shards` by (shard number, row) and pairs each with its store row.

    Picklable (workers get a copy); indexes, row maps and file handles are opened lazily per process.
    """

    def __init__(self, shards: list[Path], store: EmbeddingStore):
        missing = [s.name for s in shards if s.stem not in store.shard_names]
        if missing:
            raise ShardError(f"embedding store {store.path} has no rows for shard(s) {', '.join(missing[:5])}; "
                             "run `lift-fast embed` on this data folder")
        self.shards, self.store = shards, store
        self._open: OrderedDict[int, tuple[ShardIndex, np.ndarray, int, dict]] = OrderedDict()
        self._pid = os.getpid()

    def __getstate__(self) -> dict:
        return {"shards": self.shards, "store": self.store}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["shards"], state["store"])

    def _shard(self, number: int) -> tuple[ShardIndex, np.ndarray, int, dict]:
        """(index, store row of each index row (its first source's) or -1, file descriptor, and for a
        store without a "txt" source key -> (offset, size) of KEY.json, else {}) of shard `number`."""
        if self._pid != os.getpid():  # forked: descriptors are shared with the parent; open our own
            self._open.clear()
            self._pid = os.getpid()
        if number in self._open:
            self._open.move_to_end(number)
            return self._open[number]
        shard = self.shards[number]
        index = read_index(shard)
        rows_by_key = self.store.row_index(shard.stem)
        rows = np.array([rows_by_key.get(key, -1) for key in index.keys], dtype=np.int64)
        json_members = ({} if TXT in self.store.sources else
                        {split_member_name(name)[0]: (offset, size) for name, offset, size in scan_members(shard)
                         if split_member_name(name)[1] == "json"})
        entry = (index, rows, os.open(shard, os.O_RDONLY), json_members)
        self._open[number] = entry
        if len(self._open) > OPEN_SHARDS:
            os.close(self._open.popitem(last=False)[1][2])
        return entry

    def key(self, ref: SampleRef) -> str:
        return self._shard(ref.shard)[0].keys[ref.row]

    def read(self, ref: SampleRef) -> RawSample:
        """The sample `ref`: key, image bytes and its embedding row.

        Raises ShardError naming shard and key when the sample has no image, no row in the store,
        a caption other than the one its row was embedded from, or bytes cut off (the shard was
        truncated after it was indexed); naming the shard when it cannot be opened (truncated or
        corrupt, a stale index) or holds fewer samples than when the stream counted them.
        """
        index, rows, fd, json_members = self._shard(ref.shard)
        if ref.row >= len(index):  # reopened (another process, or evicted) after it was replaced or cut
            raise ShardError(f"{index.shard} holds {len(index)} samples now, fewer than when this run counted them "
                             f"(sample {ref.row + 1} was asked for): the shard changed during the run")
        key, shard = index.keys[ref.row], index.shard
        where = f"{shard}: sample {key!r}"
        if index.image_offset[ref.row] == NO_MEMBER:
            raise ShardError(f"{where} has no image (.jpg/.png/.webp)")
        first = int(rows[ref.row])
        if first < 0:
            raise ShardError(f"{where} has no row in the embedding store {self.store.path} (shard {shard.stem})")
        row = first + ref.source
        if TXT in self.store.sources:
            checked = first + self.store.sources.index(TXT)
            caption = self._pread(fd, index.caption_offset[ref.row], index.caption_size[ref.row], where)
            try:
                text = caption.decode("utf-8").strip()
            except UnicodeDecodeError:
                text = None
        else:
            checked, text = row, self._json_caption(fd, json_members, key, ref.source, index.shard, where)
        same = text is not None and caption_hash(text) == int(self.store.caption_hashes(shard.stem)[checked])
        if not same:
            raise ShardError(f"{where}: its caption is not the one its row in {self.store.path} (shard {shard.stem}) "
                             "was embedded from: the embedding store was made from other captions (another data "
                             "folder, or shards changed since); embed this data folder into its own store")
        image = self._pread(fd, index.image_offset[ref.row], index.image_size[ref.row], where)
        embedding = np.array(self.store.embeddings(shard.stem)[row])  # a copy, in the store's dtype
        return RawSample(key, image, embedding, where, text)

    def _json_caption(self, fd: int, json_members: dict, key: str, source: int, shard: Path, where: str) -> str | None:
        """The caption of store source `source` from the sample's KEY.json, None when it has none."""
        offset, size = json_members.get(key, (NO_MEMBER, 0))
        try:
            return caption_from({"json": self._pread(fd, offset, size, where)} if offset != NO_MEMBER else {},
                                self.store.sources[source], shard, key)
        except ShardError:
            return None

    @staticmethod
    def _pread(fd: int, offset: int, size: int, where: str) -> bytes:
        if offset == NO_MEMBER:
            return b""
        data = os.pread(fd, int(size), int(offset))
        if len(data) != size:
            raise ShardError(f"{where}: only {len(data)} of {size} bytes at offset {offset}; the shard was truncated "
                             "after it was indexed")
        return data

    def close(self) -> None:
        for _, _, fd, _ in self._open.values():
            os.close(fd)
        self._open.clear()
