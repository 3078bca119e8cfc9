"""The store: settings that define the latents, a reader for clips, and a crash-safe writer.

The writer's ordering is the whole crash-safety argument (backend details in zarr_backend.py and
mindrecord_backend.py):

1. Latents of completed entries go to files that no committed manifest row can be hurt by
   (zarr: whole-shard atomic rewrites that keep committed rows; mindrecord: fresh files).
2. At a commit the backend makes them durable (fsync), THEN the writer's manifest part is replaced
   atomically (temp file, fsync, rename). So every `ok` row any reader can see points at bytes
   already on disk, and a SIGKILL at any instant leaves the previous part or the new one.
3. Work after the last commit is invisible: the next run of the same writer starts at the
   committed tail, overwriting (zarr) or deleting (mindrecord) what was half written.
4. Each writer (shard) has its own latents and its own manifest part, and an flock stops two live
   processes from using the same shard, so concurrent writers never touch the same file.

At a URL (s3://bucket/prefix, see fs.py) the same argument holds with object-store primitives, no
renames: (1) is unchanged (a shard object is replaced by one PUT, and each version holds every
committed row's bytes at the same offsets); in (2) the latents' PUTs have returned before the
manifest part is PUT, a single PUT is atomic and S3 reads are strongly consistent, so a reader that
sees a row sees its bytes; (3) is unchanged; in (4) the flock becomes a lease object created with a
conditional PUT (If-None-Match), released at close and taken over when its process (same host) died.
"""
import fcntl
import json
import os
import time
from pathlib import Path

import numpy as np
import zarr
from zarr.storage import LocalStore

from . import fs as storage
from . import manifest
from .manifest import CorruptEntryError, checksum_text, new_checksum
from .mindrecord_backend import SEGMENT_CHECKSUM, MindRecordReader, MindRecordWriter
from .zarr_backend import ZarrReader, ZarrWriter

FORMATS = ("zarr", "mindrecord")
FORMAT_VERSION = 1
DTYPES = ("float16", "float32")
ZARR_META = "zarr.json"        # zarr format: the root group, settings in its attributes
MINDRECORD_META = "cache.json"  # mindrecord format: the same meta as plain JSON
ATTR = "latte_cache"


# ----------------------------------------------------------------------------------------------
# Settings and store metadata
# ----------------------------------------------------------------------------------------------

def _jsonable(x):
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"setting value {x!r} is not JSON-serialisable")


def normalize_settings(settings):
    """Settings as stored: JSON types, `dtype` defaulting to float16, `latent_shape` [C, h, w]."""
    s = json.loads(json.dumps(dict(settings), sort_keys=True, default=_jsonable))
    s.setdefault("dtype", "float16")
    if s["dtype"] not in DTYPES:
        raise ValueError(f"settings dtype {s['dtype']!r} is not supported; use float16 or float32")
    if "latent_shape" not in s:
        if "image_size" not in s:
            raise ValueError("settings need latent_shape [C, h, w] (or image_size, giving "
                             "[4, image_size/8, image_size/8] for the SD VAE)")
        size = s["image_size"]
        h, w = (size, size) if isinstance(size, int) else size
        s["latent_shape"] = [4, h // 8, w // 8]
    shape = s["latent_shape"]
    if not (isinstance(shape, list) and len(shape) == 3 and all(isinstance(v, int) and v > 0 for v in shape)):
        raise ValueError(f"settings latent_shape {shape!r} must be three positive ints [C, h, w]")
    return s


def _settings_diff(stored, requested):
    keys = sorted(set(stored) | set(requested))
    return [f"{k}: stored {stored.get(k, '<unset>')!r}, requested {requested.get(k, '<unset>')!r}"
            for k in keys if stored.get(k, "<unset>") != requested.get(k, "<unset>")]


def _read_meta_remote(loc):
    loc.check()  # bucket, credentials and endpoint: one clear line now rather than mid-run
    try:
        root = json.loads(loc.cat(ZARR_META))
    except FileNotFoundError:
        if loc.exists(MINDRECORD_META):
            raise ValueError(f"{loc.url}: a MindRecord cache at a URL; MindRecord caches are local only") from None
        raise ValueError(f"{loc.url}: no latent cache there (no {ZARR_META}); check the URL or create it "
                         f"with `latte ingest`") from None
    except ValueError as e:
        if isinstance(e, storage.StorageError):
            raise
        raise ValueError(f"{loc.display(ZARR_META)}: unreadable zarr root ({e}); is this a latent cache?") from e
    meta = root.get("attributes", {}).get(ATTR) if isinstance(root, dict) else None
    if meta is None:
        raise ValueError(f"{loc.url}: a zarr group but not a latent cache (no '{ATTR}' attribute)")
    return meta


def _check_version(path, meta):
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"{path}: cache format version {meta.get('format_version')} is newer than "
                         f"this code reads ({FORMAT_VERSION}); upgrade latte-ms")
    return meta


def _read_meta(path):
    loc = storage.resolve(path)
    if not loc.local:
        return _check_version(loc.url, _read_meta_remote(loc))
    path = loc.path
    if not path.is_dir():
        raise ValueError(f"{path}: no such latent cache; check the path or create it with `latte ingest`")
    if (path / ZARR_META).exists():
        try:
            attrs = zarr.open_group(LocalStore(path, read_only=True), mode="r").attrs.asdict()
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"{path}: unreadable zarr root ({e}); is this a latent cache?") from e
        if ATTR not in attrs:
            raise ValueError(f"{path}: a zarr group but not a latent cache (no '{ATTR}' attribute)")
        meta = attrs[ATTR]
    elif (path / MINDRECORD_META).exists():
        meta = json.loads((path / MINDRECORD_META).read_text())
    else:
        raise ValueError(f"{path}: not a latent cache (no {ZARR_META} or {MINDRECORD_META}); "
                         f"check the path or create it with `latte ingest`")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"{path}: cache format version {meta.get('format_version')} is newer than "
                         f"this code reads ({FORMAT_VERSION}); upgrade latte-ms")
    return meta


def open_store(path, endpoint_url=None):
    """Open an existing store (exported as `cache_store.open`): a folder, or a URL such as
    s3://bucket/prefix (`endpoint_url`, else AWS_ENDPOINT_URL, for S3-compatible services)."""
    loc = storage.resolve(path, endpoint_url)
    return Store(loc, _read_meta(loc))


def is_cache(path, endpoint_url=None):
    """Whether a store already exists at `path` (folder or URL)."""
    loc = storage.resolve(path, endpoint_url)
    if loc.local:
        return (loc.path / ZARR_META).exists() or (loc.path / MINDRECORD_META).exists()
    return loc.check().exists(ZARR_META)


def create_or_open(path, settings, format="zarr", *, chunk_frames=16, shard_frames=1024,  # noqa: A002
                   segment_frames=16, page_bytes=8 << 20, endpoint_url=None):
    """Create a store, or open an existing one after checking it was made with equal settings.

    Layout arguments only matter when the store is created: zarr rows per chunk (a clip of up to
    `chunk_frames` frames touches at most two chunks) and per shard file; MindRecord frames per
    segment record and the target page size."""
    if format not in FORMATS:
        raise ValueError(f"format {format!r} is not one of {', '.join(FORMATS)}")
    settings = normalize_settings(settings)
    loc = storage.resolve(path, endpoint_url)
    if not loc.local:
        return _create_or_open_remote(loc, settings, format, chunk_frames, shard_frames)
    path = loc.path
    if path.exists() and not path.is_dir():
        raise ValueError(f"{path}: exists and is a file; pick a folder for the latent cache")
    if not ((path / ZARR_META).exists() or (path / MINDRECORD_META).exists()):
        others = [p.name for p in path.iterdir() if not p.name.startswith(".")] if path.is_dir() else []
        if others:
            raise ValueError(f"{path}: exists, is not empty and is not a latent cache; pick a new "
                             f"or empty folder")
        if chunk_frames < 1 or shard_frames % chunk_frames or segment_frames < 1:
            raise ValueError(f"layout chunk_frames={chunk_frames} shard_frames={shard_frames} "
                             f"segment_frames={segment_frames}: need shard_frames a multiple of "
                             f"chunk_frames, all positive")
        layout = ({"chunk_frames": chunk_frames, "shard_frames": shard_frames} if format == "zarr"
                  else {"segment_frames": segment_frames, "page_bytes": page_bytes,
                        "segment_checksum": SEGMENT_CHECKSUM})
        meta = {"format": format, "format_version": FORMAT_VERSION, "settings": settings,
                "layout": layout}
        if format == "mindrecord":
            from .mindrecord_backend import page_layout
            page_layout(meta)  # fail now, not at the first write, if a segment cannot fit a page
            data, name = json.dumps(meta, indent=2), MINDRECORD_META
        else:
            data = json.dumps({"zarr_format": 3, "node_type": "group", "attributes": {ATTR: meta}},
                              indent=2)
            name = ZARR_META
        manifest.create_exclusive(path / name, data.encode())  # loses quietly to a racing twin
    store = open_store(path)
    if store.format != format:
        raise ValueError(f"{path}: holds a {store.format} cache, requested {format}; use "
                         f"--format {store.format} or a new folder")
    diff = _settings_diff(store.settings, settings)
    if diff:
        raise ValueError(f"{path}: cache was made with different settings ({'; '.join(diff)}); "
                         f"use a new output folder or the stored settings")
    return store


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------

def _check_layout(where, chunk_frames, shard_frames, segment_frames):
    if chunk_frames < 1 or shard_frames % chunk_frames or segment_frames < 1:
        raise ValueError(f"layout chunk_frames={chunk_frames} shard_frames={shard_frames} "
                         f"segment_frames={segment_frames}: need shard_frames a multiple of "
                         f"chunk_frames, all positive")


def _create_or_open_remote(loc, settings, format, chunk_frames, shard_frames):  # noqa: A002
    if format != "zarr":
        raise ValueError(f"{loc.url}: MindRecord caches are local only (MindSpore writes and reads them as "
                         f"named local files); use --format zarr for a URL")
    loc.check()
    if not loc.exists(ZARR_META):
        if loc.ls("") and not loc.exists(ZARR_META):  # (a racing twin's root may have landed meanwhile)
            raise ValueError(f"{loc.url}: holds objects but is not a latent cache; pick a new or empty prefix")
        _check_layout(loc.url, chunk_frames, shard_frames, 1)
        meta = {"format": format, "format_version": FORMAT_VERSION, "settings": settings,
                "layout": {"chunk_frames": chunk_frames, "shard_frames": shard_frames}}
        data = json.dumps({"zarr_format": 3, "node_type": "group", "attributes": {ATTR: meta}}, indent=2)
        loc.create_exclusive(ZARR_META, data.encode())  # conditional PUT: loses quietly to a racing twin
    store = open_store(loc)
    diff = _settings_diff(store.settings, settings)
    if diff:
        raise ValueError(f"{loc.url}: cache was made with different settings ({'; '.join(diff)}); "
                         f"use a new output prefix or the stored settings")
    return store


class Store:
    def __init__(self, path, meta):
        self.loc = storage.resolve(path)
        self.path = self.loc.path if self.loc.local else self.loc.url  # what messages name
        self.meta = meta
        self.format = meta["format"]
        self.settings = meta["settings"]
        self.layout = meta["layout"]
        self.latent_shape = tuple(self.settings["latent_shape"])
        self.dtype = np.dtype(self.settings["dtype"])
        root = self.path if self.loc.local else self.loc
        self._reader = (ZarrReader if self.format == "zarr" else MindRecordReader)(root, meta)
        self._rows = None

    def __repr__(self):
        return f"cache_store.Store({str(self.path)!r}, format={self.format!r})"

    def rows(self):
        """The merged manifest as {id: row dict}, re-read from disk."""
        self._rows = manifest.read_rows(self.loc)
        return self._rows

    def entries(self):
        """The manifest as a pyarrow Table, one row per entry id, sorted by id."""
        return manifest.rows_to_table(self.rows().values())

    def refresh(self):
        self.rows()

    def entry(self, entry_id):
        """The manifest row of an `ok` entry; re-reads the manifest once if the id is not known yet."""
        if self._rows is None or entry_id not in self._rows or self._rows[entry_id]["status"] != "ok":
            self.rows()
        row = self._rows.get(entry_id)
        if row is None:
            raise ValueError(f"{self.path}: no entry {entry_id!r}; see `latte cache info {self.path}`")
        if row["status"] != "ok":
            raise ValueError(f"{self.path}: entry {entry_id!r} is {row['status']} "
                             f"({row['reason']}) and has no latents; re-ingest with --retry_failed")
        return row

    def read_clip(self, entry_id, start, num_frames, stride=1):
        """Frames start, start+stride, ... (num_frames of them) -> (mean, std), float32 (F, C, h, w)."""
        row = self.entry(entry_id)
        n = row["num_frames"]
        if not (start >= 0 and num_frames >= 1 and stride >= 1 and start + (num_frames - 1) * stride < n):
            raise ValueError(f"{self.path}: clip start={start} num_frames={num_frames} stride={stride} "
                             f"does not fit entry {entry_id!r} of {n} frames; need "
                             f"start + (num_frames - 1) * stride < {n}")
        block = self._read(row, start + np.arange(num_frames) * stride)
        return block[:, 0].astype(np.float32), block[:, 1].astype(np.float32)

    def read_entry(self, entry_id):
        """All frames of an entry -> (mean, std), float32 (F, C, h, w)."""
        return self.read_clip(entry_id, 0, self.entry(entry_id)["num_frames"])

    def _read(self, row, frames):
        try:
            if self.format == "zarr":
                return self._reader.read(row["location"], row["row_start"] + frames)
            return self._reader.read(row, frames)
        except CorruptEntryError as e:
            raise CorruptEntryError(f"entry {row['id']!r}: {e}; run `latte cache verify {self.path}`") from e

    # ------------------------------------------------------------------------------------------
    # Writing, inspecting, verifying
    # ------------------------------------------------------------------------------------------

    def writer(self, shard_index=0, num_shards=1, *, commit_every=64, commit_seconds=300.0, name=None):
        """A Writer for shard `shard_index` of `num_shards` (use it as a context manager)."""
        return Writer(self, shard_index, num_shards, commit_every, commit_seconds, name)

    def check_writer_free(self, shard_index=0, num_shards=1):
        """Raise the writer's one-line ValueError now if another process is writing that shard, so
        a caller can refuse before expensive set-up (the writer itself still takes the lock)."""
        name = writer_name(shard_index, num_shards)
        if self.loc.local:
            os.close(_lock_writer(self.path, name))
        else:  # take and drop the shard's lease: refused while a live writer holds it
            lease = f"{manifest.MANIFEST_DIR}/lease-{name}.json"
            storage.acquire_lease(self.loc, lease, f"shard {name}")
            self.loc.rm(lease)

    def info(self):
        rows = list(self.rows().values())
        ok = [r for r in rows if r["status"] == "ok"]
        frames = sum(r["num_frames"] for r in ok)
        if self.loc.local:
            stats = [p.stat() for p in self.path.rglob("*") if p.is_file()]
            file_bytes, disk_bytes = sum(st.st_size for st in stats), sum(st.st_blocks * 512 for st in stats)
        else:  # objects have no preallocation: their sizes are what the store takes
            file_bytes = disk_bytes = self.loc.du()
        return {
            "path": str(self.path), "format": self.format, "format_version": self.meta["format_version"],
            "settings": self.settings, "layout": self.layout, "entries": len(rows),
            "by_status": {s: sum(r["status"] == s for r in rows) for s in manifest.STATUSES},
            "frames": frames,
            "latent_bytes": frames * 2 * int(np.prod(self.latent_shape)) * self.dtype.itemsize,
            # MindRecord sizes its files for whole pages up front (sparse where the filesystem
            # allows): the files' sizes can be far above what they take on disk.
            "file_bytes": file_bytes,
            "disk_bytes": disk_bytes,
            "not_ok": sorted((r["id"], r["status"], r["reason"]) for r in rows if r["status"] != "ok"),
        }

    def verify(self, entry_ids=None):
        """Re-read every ok entry through the reference reader; [(entry_id, what is wrong)]."""
        rows = [r for r in self.rows().values() if r["status"] == "ok"]
        if entry_ids is not None:
            wanted = set(entry_ids)
            rows = [r for r in rows if r["id"] in wanted]
        problems = []
        for row in sorted(rows, key=lambda r: r["id"]):
            try:
                got = self._checksum_from_disk(row)
            except CorruptEntryError as e:
                problems.append((row["id"], str(e)))
                continue
            if got != row["checksum"]:
                problems.append((row["id"], f"checksum {got} differs from the manifest's {row['checksum']}"))
        return problems

    def _checksum_from_disk(self, row):
        h, n, want = new_checksum(), row["num_frames"], (2, *self.latent_shape)
        if self.format == "zarr":
            step = self.layout["shard_frames"]
            for f0 in range(0, n, step):
                r0 = row["row_start"] + f0
                block = self._reader.read_reference(row["location"], r0, r0 + min(step, n - f0))
                assert block.shape[1:] == want and block.dtype == self.dtype, block.shape
                h.update(np.ascontiguousarray(block).tobytes())
            return checksum_text(h)
        seg = self.layout["segment_frames"]
        nseg = -(-n // seg)
        for s0 in range(0, nseg, 256):
            segs = range(s0, min(nseg, s0 + 256))
            recs = self._reader.records(row["location"], row["id"], row["row_start"], segs)
            for s in segs:
                expect = min(seg, n - s * seg)
                if len(recs[s]) != expect:
                    raise CorruptEntryError(f"segment {s} has {len(recs[s])} frames, expected {expect}")
                h.update(recs[s].tobytes())
        return checksum_text(h)


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------

def writer_name(shard_index, num_shards):
    return f"{shard_index:05d}-of-{num_shards:05d}"


def _lock_writer(root, name):
    """An fd holding the exclusive lock of writer `name` (the kernel drops it if we die), or a
    ValueError if another process holds it."""
    folder = Path(root) / manifest.MANIFEST_DIR
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / f".lock-{name}", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ValueError(f"{root}: another process is writing shard {name}; wait for it to finish "
                         f"or use another --shard_index") from None
    return fd


class Writer:
    """Writes entries for one shard; see the module docstring for the commit protocol."""

    def __init__(self, store, shard_index, num_shards, commit_every, commit_seconds, name=None):
        if not (isinstance(num_shards, int) and num_shards >= 1 and isinstance(shard_index, int)
                and 0 <= shard_index < num_shards):
            raise ValueError(f"shard_index {shard_index} / num_shards {num_shards}: need "
                             f"0 <= shard_index < num_shards")
        self.store = store
        self.name = name or writer_name(shard_index, num_shards)
        self.commit_every, self.commit_seconds = commit_every, commit_seconds
        self._lock = self._lease = None
        if store.loc.local:
            self._lock = _lock_writer(store.path, self.name)
        else:  # no flock on an object store: a lease object (see fs.acquire_lease)
            self._lease = f"{manifest.MANIFEST_DIR}/lease-{self.name}.json"
            storage.acquire_lease(store.loc, self._lease, f"shard {self.name}")
        try:
            manifest.remove_stale_temps(store.loc, self.name)
            self.rows = manifest.read_rows(store.loc, writer=self.name)  # this writer's part only
        except BaseException:
            self._release()
            raise
        self._backend = None  # created on the first entry, so failure-only writers create nothing
        self.current = None
        self.pending = 0
        self.last_commit = time.monotonic()
        self.closed = False

    @property
    def backend(self):
        if self._backend is None:
            cls = ZarrWriter if self.store.format == "zarr" else MindRecordWriter
            root = self.store.path if self.store.loc.local else self.store.loc
            self._backend = cls(root, self.store.meta, self.name, self.rows)
        return self._backend

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()  # completed entries are whole, so they are committed even on an exception

    def write_entry(self, entry_id, mean, std, meta=None):
        """Write a whole entry: mean and std are (F, C, h, w) arrays. Returns its manifest row."""
        self.begin_entry(entry_id)
        try:
            self.append(mean, std)
        except BaseException:
            self.abort_entry()
            raise
        return self.commit_entry(meta)

    def begin_entry(self, entry_id, meta=None):
        assert self.current is None, f"entry {self.current['id']!r} is still open: commit or abort it"
        assert not self.closed, "writer is closed"
        if not isinstance(entry_id, str) or not entry_id:
            raise ValueError(f"entry id {entry_id!r} must be a non-empty string")
        location, row_start = self.backend.begin(entry_id)
        self.current = {"id": entry_id, "location": location, "row_start": row_start, "frames": 0,
                        "hash": new_checksum(), "meta": dict(meta or {}), "t0": time.monotonic()}

    def append(self, mean, std):
        """Append frames (n, C, h, w) of the open entry; any float dtype, stored as the store's."""
        assert self.current is not None, "begin_entry first"
        mean, std = np.asarray(mean), np.asarray(std)
        want = self.store.latent_shape
        if mean.shape != std.shape or mean.ndim != 4 or mean.shape[1:] != want:
            raise ValueError(f"latents for {self.current['id']!r} have shapes {mean.shape} and "
                             f"{std.shape}; this store holds (frames, {', '.join(map(str, want))})")
        block = np.empty((len(mean), 2, *want), self.store.dtype)
        with np.errstate(over="ignore"):  # overflow to inf is reported just below
            block[:, 0], block[:, 1] = mean, std
        if not np.isfinite(block).all():
            raise ValueError(f"latents for {self.current['id']!r} are not finite in "
                             f"{self.store.dtype} (NaN/inf, or over the float16 range)")
        self.current["hash"].update(block.tobytes())
        self.backend.append(block)
        self.current["frames"] += len(block)

    def commit_entry(self, meta=None, reason=""):
        """Finish the open entry; it becomes an `ok` row at the next commit. `reason` is a note for
        the row (e.g. "upscaled from 160x120"). Returns the row."""
        cur = self.current
        assert cur is not None, "begin_entry first"
        if cur["frames"] == 0:
            raise ValueError(f"entry {cur['id']!r} has no frames; use record_failure for it")
        meta = {**cur["meta"], **(meta or {})}
        if meta.pop("num_frames", cur["frames"]) != cur["frames"]:
            raise ValueError(f"entry {cur['id']!r}: meta num_frames disagrees with the "
                             f"{cur['frames']} frames appended")
        self.backend.end()
        row = manifest.make_row(cur["id"], "ok", self.name, meta, reason=reason, location=cur["location"],
                                row_start=cur["row_start"], num_frames=cur["frames"],
                                checksum=checksum_text(cur["hash"]),
                                encode_seconds=time.monotonic() - cur["t0"])
        self.current = None
        self._add(row)
        return row

    def abort_entry(self):
        """Drop the open entry (its frames become garbage the next entries overwrite)."""
        if self.current is not None:
            self.backend.abort(self.current["row_start"])
            self.current = None

    def record_failure(self, entry_id, status="failed", reason="", meta=None):
        """Record an entry that has no latents: status 'failed' (retried by --retry_failed) or
        'skipped' (deliberately not encoded, e.g. too few frames). Never use it for entries a
        resume skips because they are already ok: the newer row would hide the ok one."""
        if status not in ("failed", "skipped"):
            raise ValueError(f"status {status!r} is not 'failed' or 'skipped'")
        if self.current is not None:
            assert self.current["id"] == entry_id, f"entry {self.current['id']!r} is still open"
            self.abort_entry()
        meta = dict(meta or {})
        row = manifest.make_row(entry_id, status, self.name, meta, reason=reason,
                                num_frames=meta.pop("num_frames", -1))
        self._add(row)
        return row

    def _add(self, row):
        self.rows[row["id"]] = row
        self.pending += 1
        if (self.pending >= self.commit_every or time.monotonic() - self.last_commit >= self.commit_seconds
                or (self._backend is not None and getattr(self._backend, "wants_flush", lambda: False)())):
            self.flush()

    def flush(self):
        """Commit: make the latents durable, then atomically replace this writer's manifest part."""
        assert self.current is None, "cannot commit in the middle of an entry"
        if self.pending:
            if self._backend is not None:
                self._backend.flush()
            manifest.write_part(self.store.loc, self.name, self.rows.values())
        self.pending = 0
        self.last_commit = time.monotonic()

    def close(self):
        if self.closed:
            return
        try:
            self.abort_entry()
            self.flush()
            if self._backend is not None:
                self._backend.close()
        finally:
            self.closed = True
            self._release()

    def _release(self):
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None
        if self._lease is not None:
            lease, self._lease = self._lease, None
            try:
                self.store.loc.rm(lease)
            except OSError:  # unreachable store: the next run on this host takes the dead lease over
                pass
