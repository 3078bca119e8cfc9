"""Decode an `Entry` (folder of frames or video file) into frames, a bounded batch at a time.

    with open_reader(entry) as r:                 # r.num_frames, r.size == (h, w), r.notes
        clip = r.read(range(10, 58, 3))           # uint8 (16, h, w, 3), RGB
    for batch in iter_frame_batches(entry, 32, 256):   # float32 (<=32, 3, 256, 256) in [-1, 1]
        ...

Peak memory is one batch, whatever the video length: frames are read by index, and decord's
`get_batch` decodes only the requested indices (contiguous ranges decode sequentially, no re-seek).
Every problem with one entry is an `EntryError` whose message names the frame and the cause, so the
caller can record a `failed` row and go on. Readers hold no global state, so an iterator may run in a
background thread to overlap decoding with the VAE. decord and PIL's decoders release the GIL, but
PIL parses JPEG headers in Python, so a main thread busy in Python code slows JPEG reading down.

Pixel formats are normalised to 8-bit RGB, never failed: grayscale is replicated, alpha is dropped,
palette images are expanded, 16-bit grayscale is rounded to `v / 257` (65535 → 255, not clipped).
16-bit RGB PNGs come out of Pillow already reduced to their high byte (`v >> 8`, at most one level
from `v / 257`), since Pillow has no 48-bit mode.
"""
import contextlib
import os
import re
import sys
import tempfile
import threading

import numpy as np
from PIL import Image, UnidentifiedImageError

from ingest.sources import EntryError
from ingest.transforms import transform_frames
from models.config import first_line

# Importing decord first makes a later `import mindspore` abort the process ("random_device could
# not be read"); the other order works, and every user of these readers needs MindSpore anyway.
import mindspore  # noqa: E402,F401  (must precede decord)

try:
    import decord

    # ffmpeg's own messages ("moov atom not found") would interleave with progress output; the reason
    # reaches the manifest through EntryError instead.
    decord.logging.set_level(decord.logging.QUIET)
except ImportError:  # frames-only use works without decord; opening a video says what is missing
    decord = None

# decord's C++ side logs "[12:00:00] /.../video_reader.cc:83: ERROR opening: <path>, <why>" straight to
# file descriptor 2, whatever the level set above; the same reason reaches the user as the entry's
# EntryError, so those lines are dropped (see _without_decord_logs).
_DECORD_LOG = re.compile(rb"^\[[0-9:]+\] \S+\.cc:\d+: ")
_FD2_LOCK = threading.Lock()


@contextlib.contextmanager
def _without_decord_logs():
    """Run the body with fd 2 captured, then pass on every captured line except decord's log lines.
    Other threads' output written meanwhile (progress bars) comes out a moment late, not lost."""
    with _FD2_LOCK:
        try:
            sys.stderr.flush()
        except (AttributeError, ValueError):
            pass
        saved = os.dup(2)
        with tempfile.TemporaryFile() as captured:
            os.dup2(captured.fileno(), 2)
            try:
                yield
            finally:
                try:
                    sys.stderr.flush()
                except (AttributeError, ValueError):
                    pass
                os.dup2(saved, 2)
                os.close(saved)
                captured.seek(0)
                kept = [line for line in captured.read().splitlines(keepends=True)
                        if not _DECORD_LOG.match(line)]
                if kept:
                    os.write(2, b"".join(kept))

_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


def to_rgb8(img):
    """A PIL image in any mode → (h, w, 3) uint8 RGB array (see the module docstring)."""
    mode = img.mode
    if mode == "RGB":
        return np.asarray(img)
    if mode in _SIXTEEN_BIT:
        v = np.clip(np.asarray(img).astype(np.int64), 0, 65535)
        g = ((v + 128) // 257).astype(np.uint8)  # round(v / 257): 65535 / 255 == 257 exactly
        return np.repeat(g[:, :, None], 3, axis=2)
    if mode in ("P", "PA"):
        img = img.convert("RGBA")  # palettes with transparency warn when converted straight to RGB
    return np.asarray(img.convert("RGB"))


def _short(err):
    """First line of an exception without decord's '[time] /src/file.cc:61: ' prefix, capped."""
    msg = first_line(err)
    if msg.startswith("[") and "] " in msg:
        msg = msg.split("] ", 1)[1]
        if ".cc:" in msg.split(" ", 1)[0]:
            msg = msg.split(": ", 1)[-1]
    return msg[:200].encode("utf-8", "backslashreplace").decode("utf-8")  # no lone surrogates in rows


class FrameFolderReader:
    """Frames of a folder entry, decoded with PIL. Every frame must have the first frame's size."""

    def __init__(self, entry):
        self.entry = entry
        self.num_frames = len(entry.frame_files)
        with self._open(0) as img:
            self.size = (img.height, img.width)
            self.mode = img.mode
        self.notes = [] if self.mode == "RGB" else [f"frames converted from {self.mode} to RGB"]

    def _open(self, k):
        path = self.entry.frame_files[k]
        try:
            return Image.open(path)
        except UnidentifiedImageError:
            raise EntryError(f"frame {k} ({os.path.basename(path)!r}) is not a readable image "
                             "(corrupt, empty, or not an image file)") from None
        except _DECODE_ERRORS as err:
            raise EntryError(f"frame {k} ({os.path.basename(path)!r}) cannot be opened as an image: "
                             f"{_short(err)}") from None

    def read(self, indices):
        indices = list(indices)
        h, w = self.size
        out = np.empty((len(indices), h, w, 3), np.uint8)
        for j, k in enumerate(indices):
            with self._open(k) as img:
                name = os.path.basename(self.entry.frame_files[k])
                if (img.height, img.width) != (h, w):
                    raise EntryError(f"frame {k} ({name!r}) is {img.width}x{img.height}, "
                                     f"the first frame is {w}x{h}")
                try:
                    out[j] = to_rgb8(img)  # decoding happens here (PIL loads lazily)
                except _DECODE_ERRORS as err:
                    raise EntryError(f"frame {k} ({name!r}) cannot be decoded: {_short(err)}") from None
        return out

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class VideoFileReader:
    """Frames of a video entry, decoded with decord on the CPU. `num_threads=0` lets ffmpeg choose."""

    def __init__(self, entry, num_threads=0):
        if decord is None:
            raise EntryError("cannot read videos: the decord package is not installed (pip install decord)")
        self.entry = entry
        try:
            with _without_decord_logs():
                self._vr = decord.VideoReader(entry.path, ctx=decord.cpu(0), num_threads=num_threads)
            self.num_frames = len(self._vr)
            if self.num_frames == 0:
                raise EntryError("the video has no frames")
            first = self._vr[0]  # decord has no size query: decode frame 0 (get_batch seeks back)
            first = first.asnumpy() if hasattr(first, "asnumpy") else np.asarray(first)
        except EntryError:
            raise
        except Exception as err:  # DECORDError / RuntimeError: truncated file, not a video at all
            msg = _short(err)
            if msg.startswith("Error reading"):  # decord's generic "Error reading <path>..." adds nothing
                msg = "ffmpeg found no readable video stream"
            raise EntryError(f"not a readable video (truncated, or not a video file; {entry.source_size} bytes): "
                             f"{msg}") from None
        self.size = first.shape[:2]
        self.notes = []
        # decord 0.6 bug: for narrow videos (width 16, 24, 48, ...) ffmpeg pads each row and decord
        # reports (h, w, 4 or 6) for one frame and fails get_batch outright. Such frames are still
        # recoverable one at a time by cutting each padded row back to w * 3 bytes.
        self._padded_rows = first.shape[2] != 3

    def _unpad(self, frame):
        frame = frame.asnumpy() if hasattr(frame, "asnumpy") else np.asarray(frame)
        h, w = self.size
        return frame.reshape(h, -1)[:, : w * 3].reshape(h, w, 3)

    def read(self, indices):
        indices = list(indices)
        try:
            if self._padded_rows:
                batch = np.stack([self._unpad(self._vr[i]) for i in indices])
            else:
                batch = self._vr.get_batch(indices)
                batch = batch.asnumpy() if hasattr(batch, "asnumpy") else np.asarray(batch)
        except Exception as err:
            raise EntryError(f"video decoding failed at frames {indices[0]}..{indices[-1]} of "
                             f"{self.num_frames}: {_short(err)}") from None
        if batch.shape != (len(indices), *self.size, 3):
            raise EntryError(f"video frames {indices[0]}..{indices[-1]} decoded to shape {batch.shape}, "
                             f"expected {(len(indices), *self.size, 3)}")
        return batch

    def close(self):
        self._vr = None  # decord frees the demuxer/decoder when the handle is dropped

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def open_reader(entry, num_threads=0):
    """A FrameFolderReader or VideoFileReader for an `ok` entry; raises EntryError if it cannot open."""
    assert entry.status == "ok", (entry.id, entry.status)
    if entry.kind == "frames":
        return FrameFolderReader(entry)
    assert entry.kind == "video", entry.kind
    return VideoFileReader(entry, num_threads=num_threads)


def _notes(reader, image_size):
    notes = list(reader.notes)
    h, w = reader.size
    if image_size and min(h, w) < image_size:
        notes.append(f"upscaled from {w}x{h} (short side {min(h, w)} < image_size {image_size})")
    return notes


def probe(entry, image_size=None):
    """Cheap look at an entry: (num_frames, (h, w), notes). Decodes at most the first frame. Notes
    ("frames converted from L to RGB", "upscaled from 64x48 ...") belong in the row's reason while its
    status stays ok. Raises EntryError when the entry cannot even be opened."""
    with open_reader(entry) as reader:
        return reader.num_frames, tuple(reader.size), _notes(reader, image_size)


def read_frames(entry, indices, image_size):
    """Frames `indices` of one entry, transformed: float32 (len(indices), 3, image_size, image_size)."""
    with open_reader(entry) as reader:
        return transform_frames(reader.read(indices), image_size)


def iter_frame_batches(entry, batch_size, image_size, stride=1, num_threads=0):
    """Yield float32 batches (<= batch_size, 3, image_size, image_size) in [-1, 1] covering frames
    0, stride, 2*stride, ... in order. Stride 1 (the default) lets one cache serve any
    num_frames / frame interval later. Raises EntryError mid-way if a frame turns out to be bad."""
    assert batch_size >= 1 and stride >= 1, (batch_size, stride)
    with open_reader(entry, num_threads=num_threads) as reader:
        indices = range(0, reader.num_frames, stride)
        for start in range(0, len(indices), batch_size):
            yield transform_frames(reader.read(indices[start:start + batch_size]), image_size)
