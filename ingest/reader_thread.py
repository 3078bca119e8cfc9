"""The reader thread: decodes, crops and resizes entries into fixed-size micro-batches ahead of the VAE.

It hands the job loop (`pipeline.IngestJob`) one event at a time, in entry order:

    Begin(entry, frames, source_frames, size, notes)   then per micro-batch
    Batch(entry, x, n)         x float32 (batch_size, 3, S, S); rows past n repeat the last frame
    End(entry)                 or, instead of the rest of the entry,
    Fail(entry, reason, source_frames)
    Row(entry, status, reason, source_frames)   an entry with nothing to encode

Named events rather than positional tuples: the loop reads `event.source_frames`, not `item[3]`.
"""
import contextlib
import queue
import threading
from typing import NamedTuple

import numpy as np

from ingest.readers import iter_frame_batches, open_reader, probe
from ingest.sources import Entry, EntryError
from ingest.transforms import transform_frames

VIDEO_CHUNK_FRAMES = 64  # frames of a video read per VideoReader (see Prefetcher._batches)


class Begin(NamedTuple):
    """An entry opens: `frames` will be encoded out of `source_frames`, `size` is the source (h, w),
    `notes` the reader's remarks (e.g. "upscaled from 160x120"), stored as the row's reason."""
    entry: Entry
    frames: int
    source_frames: int
    size: tuple
    notes: list


class Batch(NamedTuple):
    """One micro-batch of the open entry; only the first `n` rows are its frames."""
    entry: Entry
    x: np.ndarray
    n: int


class End(NamedTuple):
    """The open entry's last batch was sent."""
    entry: Entry


class Fail(NamedTuple):
    """The entry could not be read (before or after its Begin): record it `failed` with this reason."""
    entry: Entry
    reason: str
    source_frames: int


class Row(NamedTuple):
    """An entry with nothing to encode (unreadable at discovery, or too short): record it as is."""
    entry: Entry
    status: str
    reason: str
    source_frames: int


class _Done(NamedTuple):
    """The thread read every entry (internal: ends the iteration)."""


class _Crashed(NamedTuple):
    """A bug in the reader, not a bad entry (internal: re-raised in the consuming thread)."""
    error: BaseException


class Prefetcher:
    """Reads the entries in a background thread and yields their events (see the module's docstring)
    in entry order.

    Every batch has the same shape, so the VAE compiles once, and an entry's latents never depend on
    its neighbours or on sharding (a resumed or sharded run writes the same bytes). The queue holds at
    most `depth` events and a video is read VIDEO_CHUNK_FRAMES at a time (see `_batches`), which
    bounds memory whatever the video length."""

    def __init__(self, entries, batch_size, image_size, stride=1, min_frames=1, depth=4):
        self.entries, self.batch_size, self.image_size = entries, batch_size, image_size
        self.stride, self.min_frames = stride, min_frames
        self.queue = queue.Queue(maxsize=depth)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="ingest-reader", daemon=True)

    def __iter__(self):
        self.thread.start()
        while True:
            event = self.queue.get()
            if isinstance(event, _Done):
                return
            if isinstance(event, _Crashed):
                raise event.error  # a bug in the reader, not a bad entry: surface it here
            yield event

    def close(self):
        self.stop.set()
        self.thread.join(timeout=30)

    def _put(self, event):
        while not self.stop.is_set():
            try:
                self.queue.put(event, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def _run(self):
        try:
            for entry in self.entries:
                if self.stop.is_set() or not self._entry(entry):
                    return
            self._put(_Done())
        except BaseException as err:  # noqa: BLE001 - handed to the main thread, which re-raises it
            self._put(_Crashed(err))

    def _entry(self, entry):
        if entry.status != "ok":
            return self._put(Row(entry, entry.status, entry.reason, -1))
        source_frames = -1
        try:
            source_frames, size, notes = probe(entry, self.image_size)
            frames = len(range(0, source_frames, self.stride))
            if frames < self.min_frames:
                return self._put(Row(entry, "skipped", f"only {frames} frames (stride {self.stride}), "
                                                       f"fewer than min_frames {self.min_frames}", source_frames))
            if not self._put(Begin(entry, frames, source_frames, size, notes)):
                return False
            batches = self._batches(entry, source_frames)
            with contextlib.closing(batches):  # closes the reader at once if we stop early
                for x in batches:
                    n = len(x)
                    if n < self.batch_size:
                        x = np.concatenate([x, np.repeat(x[-1:], self.batch_size - n, axis=0)])
                    if not self._put(Batch(entry, x, n)):
                        return False
            return self._put(End(entry))
        except EntryError as err:
            return self._put(Fail(entry, str(err), source_frames))

    def _batches(self, entry, source_frames):
        """The entry's transformed micro-batches, in order (the last one may be short)."""
        if entry.kind != "video":
            yield from iter_frame_batches(entry, self.batch_size, self.image_size, self.stride)
            return
        # decord keeps decoding ahead of a consumer slower than itself, without bound (dmlc/decord#208):
        # a VideoReader held open while the VAE works ends up holding the whole video in memory. So each
        # chunk of a video gets a fresh reader; the price, a seek from the previous keyframe per chunk,
        # is paid in this thread, behind the VAE.
        indices = range(0, source_frames, self.stride)
        chunk = self.batch_size * max(1, VIDEO_CHUNK_FRAMES // self.batch_size)
        for start in range(0, len(indices), chunk):
            with open_reader(entry) as reader:
                raw = reader.read(indices[start:start + chunk])  # uint8: a chunk costs 64 small frames
            for i in range(0, len(raw), self.batch_size):
                yield transform_frames(raw[i:i + self.batch_size], self.image_size)
