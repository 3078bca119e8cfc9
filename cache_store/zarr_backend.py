"""Zarr v3 backend: one append-only, sharded array per writer; an entry is a range of its rows.

    OUT/zarr.json                        root group; attributes["latte_cache"] = the store meta
    OUT/latents/<writer>/zarr.json       array (rows, 2, C, h, w); axis 1 is [mean, std]
    OUT/latents/<writer>/c/<s>/0/0/0/0   shard file s: rows [s*shard_frames, (s+1)*shard_frames)
    OUT/latents/<writer>.<k>/...         generation k of the writer's array, made after damage

Why this layout:
- File count is bounded by total frames / shard_frames (1024 rows, 16 MiB at 256 px in float16),
  not by frames or by entries: tens of thousands of videos make a few thousand files.
- Inside a shard, rows are stored in chunks of `chunk_frames` (16) with a crc32c each, so any 16
  consecutive frames touch at most two chunks and a reader fetches only those byte ranges.
- mean and std of a frame sit side by side, so one clip is one read, not two.
- Each writer (shard of an ingest run) appends to its own array: concurrent writers share no file.

Crash safety: zarr's LocalStore writes every file to a temp name and renames it over the old one,
so a shard file is always either its old or its new version. The writer keeps the shard it is
filling in memory (committed rows included) and only ever rewrites whole shards, so both versions
hold every committed row unchanged. Shards are fsynced before the manifest that points at them is
replaced (see store.Writer). Rows past the last committed entry are garbage that the next run of
the same writer overwrites: that is how a half-written entry gets redone.

Damage (bytes changed after they were committed): a reopened writer reads the committed rows of its
last shard back through the strict reader below (crc32c of index and chunks, missing chunks are
errors), because rewriting that shard would either fail or give damaged bytes a fresh valid crc32c.
If that read or the array metadata fails, the writer leaves the array exactly as it is (rows still
pointing at it keep failing their checks until `latte cache verify --mark_failed` retires them) and
goes on in a new generation `latents/<writer>.<k+1>`, always the highest one on disk. So the repair,
`verify --mark_failed` then `ingest --retry_failed`, works whatever file the damage is in.

At a URL (fs.py) the store is zarr's FsspecStore: a shard object is replaced by one PUT, which S3
makes atomic, so the same argument holds without renames or fsyncs; `read` fetches the shard index
and the chunks with ranged GETs.

Reads: `read` parses the shard index and chunks directly (the sharding format is four fields), about
4x faster than going through zarr's async machinery for a 16-frame clip; it is used only when the
array metadata is exactly the layout written here. `read_reference` reads through zarr and is what
`verify` uses, so the two paths check each other.
"""
import json
import re
import sys
from pathlib import Path

import google_crc32c  # zarr's own crc32c dependency
import numpy as np
import zarr
from zarr.codecs import BytesCodec, Crc32cCodec
from zarr.storage import LocalStore

from .fs import StorageError, is_transport_error, resolve
from .manifest import CorruptEntryError, fsync_dir, fsync_file

LATENTS_DIR = "latents"
_MISSING = 2**64 - 1  # shard index entry of a chunk that was never written


def _shard_key(s):
    return f"c/{s}/0/0/0/0"  # default chunk key encoding, rank 5, shard s along rows


def _location(name, k):
    """The array of writer `name`, generation k: `latents/<name>`, then `latents/<name>.<k>`."""
    return f"{LATENTS_DIR}/{name}" + (f".{k}" if k else "")


def _generations(loc, name):
    """The generations of writer `name`'s array that exist in the store, sorted."""
    pattern = re.compile(re.escape(name) + r"(?:\.(\d+))?")
    names = ([p.name for p in (loc.path / LATENTS_DIR).glob(f"{name}*")] if loc.local
             else loc.ls(LATENTS_DIR))
    return sorted(int(m.group(1) or 0) for n in names if (m := pattern.fullmatch(n)))


class ZarrWriter:
    """Appends the entries of one writer to `latents/<name>[.<k>]`; see the module docstring."""

    def __init__(self, root, meta, name, committed_rows):
        self.loc = resolve(root)
        self.root = self.loc.path if self.loc.local else None
        self.meta = meta
        self.S = meta["layout"]["shard_frames"]
        self.frame_shape = (2, *meta["settings"]["latent_shape"])
        self.dtype = np.dtype(meta["settings"]["dtype"])
        generations = _generations(self.loc, name)
        k = generations[-1] if generations else 0
        self.location = _location(name, k)
        self.tail = max((r["row_start"] + r["num_frames"] for r in committed_rows.values()
                         if r["status"] == "ok" and r["location"] == self.location), default=0)
        try:
            self._open_checked()
        except CorruptEntryError as damage:
            # Never append into damaged files: rewriting the shard would give its damaged bytes a
            # fresh valid checksum (or fail, as zarr's own read does). The damaged array stays as
            # it is, for the rows still pointing at it; this writer goes on in a new one.
            self.location, self.tail = _location(name, k + 1), 0
            print(f"latte cache: note: {damage}; left as it is, writing on in "
                  f"{self.loc.display(self.location)} (`latte cache verify {self.loc} --mark_failed` "
                  f"then `latte ingest ... --retry_failed` repairs damaged entries)", file=sys.stderr)
            self._open_checked()

    def _open_checked(self):
        """Open (or create) the array at self.location and load its last shard, reading the
        committed rows back strictly; any damage on the way is a CorruptEntryError."""
        meta_key = f"{self.location}/zarr.json"
        if self.loc.local:
            for p in (self.root / self.location).rglob("*.partial"):  # temp files of a killed write
                p.unlink(missing_ok=True)
            exists, zstore = (self.root / meta_key).exists(), LocalStore(self.root)
        else:
            exists, zstore = self.loc.exists(meta_key), self.loc.zarr_store()
        if exists:
            try:
                self.array = self.loc.call(self.location, zarr.open_array, zstore, path=self.location, mode="r+")
                ok = (self.array.shape[1:] == self.frame_shape and self.array.dtype == self.dtype
                      and self.array.shards == (self.S, *self.frame_shape)
                      and self.array.chunks == (self.meta["layout"]["chunk_frames"], *self.frame_shape))
            except StorageError:
                raise  # the store is unreachable: not damage
            except Exception as e:  # noqa: BLE001 - zarr raises many kinds on a damaged zarr.json
                raise CorruptEntryError(f"{self.loc.display(meta_key)}: array metadata unreadable "
                                        f"({type(e).__name__})") from e
            if not ok:
                raise CorruptEntryError(f"{self.loc.display(meta_key)}: array metadata differs from the "
                                        f"store's layout")
        else:
            fs, cf = self.frame_shape, self.meta["layout"]["chunk_frames"]
            self.array = self.loc.call(
                self.location, zarr.create_array,
                zstore, name=self.location, shape=(0, *fs), dtype=self.dtype,
                chunks=(cf, *fs), shards=(self.S, *fs), serializer=BytesCodec(),
                compressors=[Crc32cCodec()],  # latents barely compress; a checksum is worth more
                fill_value=0, config={"write_empty_chunks": True})
        self._load(self.tail // self.S)

    def _load(self, shard):
        """Make `shard` the in-memory one: its committed rows from disk, zeros after the tail."""
        self.shard = shard
        self.buf = np.zeros((self.S, *self.frame_shape), self.dtype)
        n = self.tail - shard * self.S
        if n > 0:
            # The same strict reader as read_clip: crc32c of the index and of every chunk, and a
            # missing file or chunk is an error (zarr itself would hand back zeros for those).
            self.buf[:n] = ZarrReader(self.loc, self.meta).read(self.location,
                                                                 np.arange(shard * self.S, self.tail))
        self.dirty = False

    def _write_shard(self):
        if not self.loc.local:  # one PUT per object, atomic; returns once S3 has it (no fsync there)
            s0 = self.shard * self.S
            if self.array.shape[0] < s0 + self.S:
                self.loc.call(self.location, self.array.resize, (s0 + self.S, *self.frame_shape))
            self.loc.call(f"{self.location}/{_shard_key(self.shard)}", self.array.__setitem__,
                          slice(s0, s0 + self.S), self.buf)
            self.dirty = False
            return
        s0 = self.shard * self.S
        if self.array.shape[0] < s0 + self.S:
            self.array.resize((s0 + self.S, *self.frame_shape))
            fsync_file(self.root / self.location / "zarr.json")
        path = self.root / self.location / _shard_key(self.shard)
        new = not path.exists()
        # A whole, aligned shard: zarr writes it in one go, without reading the old file back.
        self.array[s0: s0 + self.S] = self.buf
        fsync_file(path)
        # The rename lives in the leaf dir; a new shard also made dirs c/<s>/0/0/0 to persist.
        for d in list(path.parents)[: 5 if new else 1]:
            fsync_dir(d)
        self.dirty = False

    def begin(self, entry_id):
        return self.location, self.tail

    def append(self, block):
        i = 0
        while i < len(block):
            pos = self.tail - self.shard * self.S
            take = min(self.S - pos, len(block) - i)
            self.buf[pos: pos + take] = block[i: i + take]
            self.tail += take
            i += take
            self.dirty = True
            if pos + take == self.S:  # shard full: write it once and move on
                self._write_shard()
                self._load(self.shard + 1)

    def end(self):
        pass

    def abort(self, row_start):
        """Forget rows from `row_start` on (an entry that failed half way)."""
        self.tail = row_start
        if row_start // self.S != self.shard:
            self._load(row_start // self.S)
        self.buf[row_start - self.shard * self.S:] = 0
        self.dirty = True

    def flush(self):
        if self.dirty:
            self._write_shard()

    def close(self):
        pass


class _RangeFile:
    """The seek/read subset `_read_index` and `_read_chunk` use, as ranged GETs of one object."""

    def __init__(self, loc, rel):
        self.loc, self.rel, self.pos = loc, rel, 0

    def seek(self, offset, whence=0):
        self.pos = offset if whence == 0 else ("end", offset)

    def read(self, n):
        if isinstance(self.pos, tuple):
            return self.loc.cat_range(self.rel, self.pos[1])  # suffix range: the last -offset bytes
        return self.loc.cat_range(self.rel, self.pos, self.pos + n)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass


class ZarrReader:
    def __init__(self, root, meta):
        self.loc = resolve(root)
        self.root = self.loc.path if self.loc.local else None
        self.frame_shape = (2, *meta["settings"]["latent_shape"])
        self.dtype = np.dtype(meta["settings"]["dtype"])
        self._fast = {}  # location -> (shard_frames, chunk_frames), or None to go through zarr
        self._arrays = {}  # location -> zarr array, for the zarr path
        self.use_fast_path = True

    def __getstate__(self):  # stores go to data-loader worker processes; zarr handles stay behind
        return {**self.__dict__, "_arrays": {}}

    def _fast_layout(self, location):
        if location not in self._fast:
            self._fast[location] = None
            try:
                m = json.loads((self.root / location / "zarr.json").read_text() if self.loc.local
                               else self.loc.cat(f"{location}/zarr.json"))
            except (OSError, ValueError) as e:
                self._remote_failure(e, location)
                raise CorruptEntryError(f"{self.loc.display(location)}: array metadata unreadable ({e})")
            fs = list(self.frame_shape)
            little = {"name": "bytes", "configuration": {"endian": "little"}}
            codecs = m.get("codecs", [{}])
            cfg = codecs[0].get("configuration", {})
            shard = m.get("chunk_grid", {}).get("configuration", {}).get("chunk_shape", [0])
            inner = cfg.get("chunk_shape", [0])
            if (m.get("shape", [])[1:] == fs and m.get("data_type") == self.dtype.name
                    and m.get("chunk_key_encoding") == {"name": "default",
                                                        "configuration": {"separator": "/"}}
                    and len(codecs) == 1 and codecs[0].get("name") == "sharding_indexed"
                    and shard[1:] == fs and inner[1:] == fs and shard[0] % inner[0] == 0
                    and cfg.get("codecs") == [little, {"name": "crc32c"}]
                    and cfg.get("index_codecs") == [little, {"name": "crc32c"}]
                    and cfg.get("index_location") == "end"):
                self._fast[location] = (shard[0], inner[0])
        return self._fast[location]

    def read(self, location, rows):
        """Rows `rows` (sorted absolute row numbers) of `location` -> (n, 2, C, h, w), stored dtype."""
        layout = self._fast_layout(location) if self.use_fast_path else None
        if layout is None:
            a = self._open(location, int(rows[-1]) + 1)
            try:
                return a.get_orthogonal_selection((np.asarray(rows),))
            except Exception as e:  # noqa: BLE001 - zarr raises many kinds on damaged files
                self._remote_failure(e, location)
                raise CorruptEntryError(f"{self.loc.display(location)}: {_zarr_error(e)}") from e
        S, cf = layout
        per_shard = S // cf
        out = np.empty((len(rows), *self.frame_shape), self.dtype)
        chunk_of = rows // cf
        for s in np.unique(rows // S):
            path = self.loc.display(f"{location}/{_shard_key(int(s))}")
            if not self.loc.local:  # ranged GETs; a missing object shows up at the first one
                f = _RangeFile(self.loc, f"{location}/{_shard_key(int(s))}")
            else:
                try:
                    f = open(path, "rb")
                except OSError as e:
                    raise CorruptEntryError(f"{path}: shard file missing ({e.strerror})") from e
            with f:
                try:
                    index = _read_index(f, per_shard, path)
                except FileNotFoundError as e:  # remote: the object is gone
                    raise CorruptEntryError(f"{path}: shard file missing") from e
                for k in np.unique(chunk_of[rows // S == s]):
                    off, nbytes = index[k - s * per_shard]
                    if off == _MISSING:
                        raise CorruptEntryError(f"{path}: chunk {k} was never written")
                    chunk = _read_chunk(f, int(off), int(nbytes), path)
                    chunk = np.frombuffer(chunk, self.dtype).reshape(cf, *self.frame_shape)
                    sel = chunk_of == k
                    out[sel] = chunk[rows[sel] - k * cf]
        return out

    def _remote_failure(self, err, location):
        """An unreachable or refusing object store is not a damaged entry: say which it is."""
        if not self.loc.local and is_transport_error(err):
            self._fast.pop(location, None)  # look at the layout again once the store is back
            raise err if isinstance(err, StorageError) else StorageError(self.loc.explain(err, location)) from None

    def _open(self, location, rows=0):
        """The zarr array, reopened when a writer has grown it past the rows we need."""
        a = self._arrays.get(location)
        if a is None or a.shape[0] < rows:
            try:
                zstore = LocalStore(self.root, read_only=True) if self.loc.local else self.loc.zarr_store(True)
                a = zarr.open_array(zstore, path=location, mode="r")
            except Exception as e:  # noqa: BLE001
                self._remote_failure(e, location)
                raise CorruptEntryError(f"{self.loc.display(location)}: cannot open array ({e})") from e
            self._arrays[location] = a
        return a

    def read_reference(self, location, r0, r1):
        """Rows [r0, r1) through zarr itself (used by verify), one shard file at a time so that a
        failure names the file."""
        a = self._open(location, r1)
        per_file = (a.shards or a.chunks)[0]
        if r1 > a.shape[0]:
            raise CorruptEntryError(f"{self.loc.display(location)}: rows {r0}..{r1} are past the array "
                                    f"end {a.shape[0]}")
        parts = []
        for s in range(r0 // per_file, (r1 - 1) // per_file + 1):
            key = f"{location}/{_shard_key(s)}"
            path = self.loc.display(key)
            if not ((self.root / key).exists() if self.loc.local else self.loc.exists(key)):  # zarr: zeros
                raise CorruptEntryError(f"{path}: shard file missing")
            lo, hi = max(r0, s * per_file), min(r1, (s + 1) * per_file)
            try:
                parts.append(a[lo:hi])
            except Exception as e:  # noqa: BLE001 - zarr raises many kinds on damaged files
                self._remote_failure(e, location)
                raise CorruptEntryError(f"{path}: rows {lo}..{hi - 1} unreadable ({_zarr_error(e)})") from e
        return np.concatenate(parts)


def _zarr_error(e):
    """What a zarr exception says, without the raw checksum bytes of its crc32c message."""
    if "checksum" in str(e):
        return "a chunk or the shard index fails its crc32c"
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"


def _read_index(f, per_shard, path):
    size = per_shard * 16 + 4
    f.seek(-size, 2)
    raw = f.read(size)
    if len(raw) != size or google_crc32c.value(raw[:-4]) != int.from_bytes(raw[-4:], "little"):
        raise CorruptEntryError(f"{path}: shard index checksum mismatch")
    return np.frombuffer(raw[:-4], "<u8").reshape(per_shard, 2)


def _read_chunk(f, offset, nbytes, path):
    """One chunk's bytes (crc checked). A function of its own so tests can count chunk reads."""
    f.seek(offset)
    raw = f.read(nbytes)
    if len(raw) != nbytes or google_crc32c.value(raw[:-4]) != int.from_bytes(raw[-4:], "little"):
        raise CorruptEntryError(f"{path}: chunk at byte {offset} fails its crc32c")
    return raw[:-4]
