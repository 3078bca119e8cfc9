"""The Parquet manifest: one row per entry, one part file per writer, replaced atomically.

Why one part per writer: K writer processes (on one or many machines) never write the same file, so
they need no coordination. Readers merge the parts; when an id appears in several parts (an entry
that failed in one run and succeeded in a later one with a different sharding), the row with the
latest `encoded_at` wins.

Why rewrite the whole part at each commit instead of appending: Parquet files cannot be appended,
and a journal plus compaction is a second file format to get right. A commit rewrites the writer's
own rows only, and commits are batched (every `commit_every` entries or `commit_seconds`), so for
20k entries per writer and batches of 64 the total is ~300 rewrites of <=20k small rows: seconds
over a multi-hour ingest. The price of batching is that a crash redoes at most one batch.
"""
import datetime
import hashlib
import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from .fs import resolve

STATUSES = ("ok", "failed", "skipped")

SCHEMA = pa.schema([
    ("id", pa.string()),
    ("source", pa.string()),             # the frame folder or video file it came from
    ("kind", pa.string()),               # "frames" or "video"
    ("num_frames", pa.int64()),          # latent frames stored (ok), source frames if known (failed)
    ("source_bytes", pa.int64()),        # size of the source on disk
    ("status", pa.string()),             # one of STATUSES
    ("reason", pa.string()),             # human-readable, empty for ok rows
    ("location", pa.string()),           # store-relative path of the latents (zarr array / mindrecord file)
    ("row_start", pa.int64()),           # first frame row (zarr) or first segment record (mindrecord)
    ("checksum", pa.string()),           # "sha256:<hex>" of the stored bytes, see store.checksum
    ("encode_seconds", pa.float64()),    # wall time spent on this entry
    ("encoded_at", pa.timestamp("us", tz="UTC")),
    ("writer", pa.string()),             # the writer (shard) that wrote the row
    ("extra", pa.string()),              # JSON of any other meta the ingest passed
    ("label", pa.int64()),               # class index (settings["class_names"]); null when unlabelled
])
COLUMNS = SCHEMA.names
# Meta keys the writer maps to columns; anything else goes into `extra`. (`num_frames` is resolved
# by the writer: the frames actually stored for ok rows.)
META_COLUMNS = ("source", "kind", "num_frames", "source_bytes", "encode_seconds", "label")

MANIFEST_DIR = "manifest"


def now_utc():
    return datetime.datetime.now(datetime.timezone.utc)


def make_row(entry_id, status, writer, meta=None, reason="", location="", row_start=-1,
             num_frames=-1, checksum="", encode_seconds=0.0):
    """A complete manifest row. `meta` keys outside META_COLUMNS are kept as JSON in `extra`."""
    meta = dict(meta or {})
    extra = {k: meta.pop(k) for k in list(meta) if k not in META_COLUMNS}
    row = {
        "id": entry_id, "source": str(meta.get("source", "")), "kind": str(meta.get("kind", "")),
        "num_frames": int(num_frames),
        "source_bytes": int(meta.get("source_bytes", -1)), "status": status, "reason": str(reason),
        "location": location, "row_start": int(row_start), "checksum": checksum,
        "encode_seconds": float(meta.get("encode_seconds", encode_seconds)),
        "encoded_at": now_utc(), "writer": writer,
        "extra": json.dumps(extra, sort_keys=True, default=str) if extra else "",
        # parts written before the column existed read back as null (pq.read_table with SCHEMA)
        "label": None if meta.get("label") is None else int(meta["label"]),
    }
    assert set(row) == set(COLUMNS)
    return row


def part_path(root, writer):
    """The part's path (local) or URL (remote store)."""
    loc = resolve(root)
    if not loc.local:
        return loc.display(part_key(writer))
    return Path(loc.path) / MANIFEST_DIR / f"part-{writer}.parquet"


def part_key(writer):
    return f"{MANIFEST_DIR}/part-{writer}.parquet"


def rows_to_table(rows):
    """Rows (dicts) -> a table sorted by id, so the same entries always give the same table."""
    rows = sorted(rows, key=lambda r: r["id"])
    return pa.Table.from_pylist(rows, schema=SCHEMA)


def read_part(path):
    try:
        return pq.read_table(path, schema=SCHEMA)
    except (OSError, pa.ArrowInvalid) as e:
        # Parts are only ever replaced atomically, so this is outside damage, not a crash.
        raise ValueError(f"{path}: unreadable manifest part ({e}); restore it or delete it and "
                         f"re-ingest that shard") from e


def _remote_parts(loc, writer):
    """The parts of a remote store as tables: one GET each, parsed by pyarrow."""
    names = ([f"part-{writer}.parquet"] if writer is not None
             else [n for n in loc.ls(MANIFEST_DIR) if n.startswith("part-") and n.endswith(".parquet")])
    for name in names:
        try:
            data = loc.cat(f"{MANIFEST_DIR}/{name}")
        except FileNotFoundError:
            continue
        try:
            yield pq.read_table(pa.BufferReader(data), schema=SCHEMA)
        except (OSError, pa.ArrowInvalid) as e:
            raise ValueError(f"{loc.display(MANIFEST_DIR + '/' + name)}: unreadable manifest part ({e}); "
                             f"restore it or delete it and re-ingest that shard") from e


def read_rows(root, writer=None):
    """All rows of all parts (or of one writer's part), merged: the latest `encoded_at` per id wins."""
    loc = resolve(root)
    if not loc.local:
        return _merge(_remote_parts(loc, writer))
    root = loc.path
    folder = Path(root) / MANIFEST_DIR
    if writer is not None:
        paths = [part_path(root, writer)]
    else:
        paths = sorted(folder.glob("part-*.parquet")) if folder.is_dir() else []
    return _merge(read_part(p) for p in paths if p.exists())


def _merge(tables):
    latest = {}
    for table in tables:
        for row in table.to_pylist():
            old = latest.get(row["id"])
            if old is None or row["encoded_at"] >= old["encoded_at"]:
                latest[row["id"]] = row
    return latest


def write_part(root, writer, rows):
    """Atomically replace one writer's part. Callers flush the latents first (see store.Writer)."""
    loc = resolve(root)
    if not loc.local:  # one PUT of the whole part: atomic, and strongly consistent once it returns
        sink = pa.BufferOutputStream()
        pq.write_table(rows_to_table(rows), sink)
        loc.pipe(part_key(writer), sink.getvalue().to_pybytes())
        return
    path = part_path(loc.path, writer)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    pq.write_table(rows_to_table(rows), tmp)
    fsync_file(tmp)
    os.replace(tmp, path)   # readers see the old part or the new one, never a torn file
    fsync_dir(path.parent)  # make the rename itself survive a power cut


def remove_stale_temps(root, writer):
    loc = resolve(root)
    if not loc.local:
        return  # a remote part is one PUT: there are no temp objects
    folder = Path(loc.path) / MANIFEST_DIR
    for p in folder.glob(f".part-{writer}.parquet.*.tmp"):
        p.unlink(missing_ok=True)


class CorruptEntryError(ValueError):
    """Stored latents that do not read back as written (bad checksum, missing file, wrong shape)."""


def new_checksum():
    """sha256 over the stored bytes, frame by frame: mean[f] then std[f], in the store's dtype.

    That is exactly the C-order bytes of the (F, 2, C, h, w) block both backends store, so the
    checksum does not depend on how the entry was chunked, segmented or sharded."""
    return hashlib.sha256()


def checksum_text(h):
    return "sha256:" + h.hexdigest()


# ----------------------------------------------------------------------------------------------
# Durability helpers (shared with the backends)
# ----------------------------------------------------------------------------------------------

def fsync_file(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path):
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return  # some filesystems cannot open directories; the rename is still atomic there
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def create_exclusive(path, data: bytes):
    """Write `path` only if it does not exist, atomically (temp file + hard link).

    Returns True if this call created it. Two processes creating the same store race here, and
    exactly one wins; the other then compares settings with what the winner wrote."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    fsync_file(tmp)
    try:
        os.link(tmp, path)
        created = True
    except FileExistsError:
        created = False
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)
    return created
