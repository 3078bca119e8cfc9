"""MindRecord backend: entries as bounded frame-segment records, in files that are never appended.

    OUT/cache.json                                    the store meta (format, settings, layout)
    OUT/mindrecord/<writer>-<seq>.mindrecord (+.db)   one file per writer per commit batch

One record is one segment of one entry: `entry_id`, `segment` (0, 1, ... within the entry),
`start` (its first frame within the entry), `frames` (<= segment_frames), `mean`, `std` (the bytes
of (frames, C, h, w) arrays in the store dtype) and `crc32c` (of all the other fields, see
`segment_crc`). Any video length fits: it is just more segments, and a record is sized so pages
hold whole records with no slack.

Why a checksum per record: MindRecord stores no checksum of its own, so a flipped bit would read
back as other latents. The manifest's sha256 covers a whole entry, which a clip read does not
read; the record's crc32c covers exactly what a read touches, and every read checks it, as the
zarr chunks' crc32c are. Stores made before it (no "segment_checksum" in their layout) read
unchecked; `latte cache verify` still checks their sha256.

Why a new file per commit batch: a committed MindRecord file can only be appended in place
(`FileWriter.open_for_append`), which a crash could tear, and its name cannot change after writing
(the header refers to it), so the temp-and-rename trick is out too. Instead each batch goes to a
fresh file under its final name; the manifest part that references it is replaced only after
`FileWriter.commit()` and an fsync. A file that no committed row references is the leftover of a
crash: the same writer deletes it when it next starts. File count: two per batch (64 entries or
5 minutes by default), and a writer also rolls to a new file once one holds ~1000 pages.

Random access: MindRecord has no "read record i" call, but `MindDataset` with a `SubsetSampler`
reads just the listed record numbers of one file, and the manifest keeps, for each entry, its file
and the record number of its first segment. Each read sets up a small dataset pipeline, so this
backend's `read_clip` costs milliseconds; it is there for parity, and MindDataset pipelines over
the files are its natural use (filter records by `entry_id` against the manifest's ok rows: an
entry that failed half way leaves orphan segments in its batch file).
"""
from pathlib import Path

import google_crc32c
import numpy as np

from .manifest import CorruptEntryError, fsync_dir, fsync_file

MINDRECORD_DIR = "mindrecord"
SCHEMA = {"entry_id": {"type": "string"}, "segment": {"type": "int32"}, "start": {"type": "int64"},
          "frames": {"type": "int32"}, "mean": {"type": "bytes"}, "std": {"type": "bytes"}}
SCHEMA_CRC = {**SCHEMA, "crc32c": {"type": "int64"}}
COLUMNS = list(SCHEMA)
COLUMNS_CRC = list(SCHEMA_CRC)
SEGMENT_CHECKSUM = "crc32c"  # layout["segment_checksum"] of stores whose records carry one
HEADER_BYTES = 1 << 20        # holds the page table: ~250 bytes a page, so ~4000 pages
SOFT_PAGES, HARD_PAGES = 1000, 2500
MIN_PAGE, MAX_PAGE = 32 << 10, 256 << 20


def segment_crc(entry_id, segment, start, frames, mean, std):
    """crc32c of one record's fields: its place (entry, segment, first frame, frames) and bytes."""
    crc = google_crc32c.value(f"{entry_id}\0{segment}\0{start}\0{frames}\0".encode())
    return google_crc32c.extend(google_crc32c.extend(crc, mean), std)


def page_layout(meta):
    """(page_size, records_per_page): pages hold a whole number of full segment records.

    A record's blob is 8 bytes of total length, then per blob field 8 bytes of length and the data
    (measured from the page offsets MindRecord's index stores)."""
    s = meta["settings"]
    frame_bytes = int(np.prod(s["latent_shape"])) * np.dtype(s["dtype"]).itemsize
    record = 8 + 2 * (8 + meta["layout"]["segment_frames"] * frame_bytes)
    per_page = max(1, meta["layout"]["page_bytes"] // record)
    page = max(MIN_PAGE, per_page * record)
    if page > MAX_PAGE:
        raise ValueError(f"a MindRecord segment of {meta['layout']['segment_frames']} frames is "
                         f"{record} bytes, over the 256 MiB page limit; use fewer segment frames")
    return page, max(per_page, page // record)


class MindRecordWriter:
    def __init__(self, root, meta, name, committed_rows):
        self.root = Path(root)
        self.folder = self.root / MINDRECORD_DIR
        self.folder.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.seg = meta["layout"]["segment_frames"]
        self.page_size, self.per_page = page_layout(meta)
        self.checked = meta["layout"].get("segment_checksum") == SEGMENT_CHECKSUM
        referenced = {r["location"] for r in committed_rows.values() if r["status"] == "ok"}
        seqs = [-1]
        for p in self.folder.glob(f"{name}-*.mindrecord*"):
            base = p.name.removesuffix(".db")
            seqs.append(int(base.removesuffix(".mindrecord").rsplit("-", 1)[1]))
            if f"{MINDRECORD_DIR}/{base}" not in referenced:
                p.unlink(missing_ok=True)  # written by a run that died before committing it
        self.seq = max(seqs) + 1
        self.fw = None
        self.records = 0

    def _open_file(self):
        from mindspore.mindrecord import FileWriter  # imported late: MindSpore takes seconds to load

        self.path = self.folder / f"{self.name}-{self.seq:06d}.mindrecord"
        self.seq += 1
        self.fw = FileWriter(str(self.path), shard_num=1, overwrite=True)
        self.fw.add_schema(SCHEMA_CRC if self.checked else SCHEMA, "latte_latent_segments")
        self.fw.add_index(["entry_id", "segment"])
        self.fw.set_page_size(self.page_size)
        self.fw.set_header_size(HEADER_BYTES)
        self.records = 0

    def begin(self, entry_id):
        if self.fw is None:
            self._open_file()
        self.entry_id, self.segment, self.frame = entry_id, 0, 0
        self.pending = []
        return f"{MINDRECORD_DIR}/{self.path.name}", self.records

    def _emit(self, block):
        if self.records >= HARD_PAGES * self.per_page:
            raise ValueError(f"entry {self.entry_id!r} needs more than {HARD_PAGES} pages in one "
                             f"MindRecord file; raise page_bytes or segment_frames for this store")
        record = {"entry_id": self.entry_id, "segment": self.segment, "start": self.frame,
                  "frames": len(block), "mean": np.ascontiguousarray(block[:, 0]).tobytes(),
                  "std": np.ascontiguousarray(block[:, 1]).tobytes()}
        if self.checked:
            record["crc32c"] = segment_crc(**record)
        self.fw.write_raw_data([record])
        self.records += 1
        self.segment += 1
        self.frame += len(block)

    def append(self, block):
        self.pending.append(block)
        n = sum(len(b) for b in self.pending)
        if n >= self.seg:
            rows = np.concatenate(self.pending)
            full = n - n % self.seg
            for i in range(0, full, self.seg):
                self._emit(rows[i: i + self.seg])
            self.pending = [rows[full:]] if full < n else []

    def end(self):
        if self.pending:
            self._emit(np.concatenate(self.pending))
        self.pending = []

    def abort(self, row_start):
        self.pending = []  # segments already written stay as unreferenced records

    def wants_flush(self):
        return self.fw is not None and self.records >= SOFT_PAGES * self.per_page

    def flush(self):
        if self.fw is None:
            return
        self.fw.commit()
        for p in (self.path, Path(f"{self.path}.db")):
            fsync_file(p)
        fsync_dir(self.folder)
        self.fw = None

    def close(self):
        pass


class MindRecordReader:
    def __init__(self, root, meta):
        self.root = Path(root)
        self.seg = meta["layout"]["segment_frames"]
        self.frame_shape = tuple(meta["settings"]["latent_shape"])
        self.dtype = np.dtype(meta["settings"]["dtype"])
        self.checked = meta["layout"].get("segment_checksum") == SEGMENT_CHECKSUM
        # bench/bench_ingest.py turns it off (the column is then not even read) to measure the cost
        self.check_crc = True

    def records(self, location, entry_id, row_start, segments):
        """The given segments of an entry -> {segment: (frames, 2, C, h, w) array}."""
        import mindspore.dataset as ds  # late: see _open_file

        path = self.root / location
        if not path.exists():
            raise CorruptEntryError(f"{path}: MindRecord file missing")
        try:
            check = self.checked and self.check_crc
            data = ds.MindDataset([str(path)], columns_list=COLUMNS_CRC if check else COLUMNS,
                                  num_parallel_workers=1,
                                  sampler=ds.SubsetSampler([row_start + int(s) for s in segments]))
            rows = list(data.create_dict_iterator(output_numpy=True, num_epochs=1))
        except Exception as e:  # noqa: BLE001 - the dataset engine raises RuntimeError for anything
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CorruptEntryError(f"{path}: MindDataset cannot read it ({msg})") from e
        out = {}
        for r in rows:
            seg, n = int(r["segment"]), int(r["frames"])
            if str(r["entry_id"]) != entry_id or int(r["start"]) != seg * self.seg:
                raise CorruptEntryError(f"{path}: record for {entry_id!r} segment {seg} holds "
                                        f"{str(r['entry_id'])!r} frame {int(r['start'])}")
            # tobytes(), not item(): numpy's bytes scalars drop trailing zero bytes.
            mean, std = r["mean"].tobytes(), r["std"].tobytes()
            if check and segment_crc(
                    str(r["entry_id"]), seg, int(r["start"]), n, mean, std) != int(r["crc32c"]):
                raise CorruptEntryError(f"{path}: record {row_start + seg} (segment {seg} of "
                                        f"{entry_id!r}) fails its crc32c")
            size = n * int(np.prod(self.frame_shape)) * self.dtype.itemsize
            if len(mean) != size or len(std) != size:
                raise CorruptEntryError(f"{path}: segment {seg} of {entry_id!r} has {len(mean)} "
                                        f"bytes, expected {size}")
            shape = (n, *self.frame_shape)
            out[seg] = np.stack([np.frombuffer(mean, self.dtype).reshape(shape),
                                 np.frombuffer(std, self.dtype).reshape(shape)], axis=1)
        missing = set(int(s) for s in segments) - set(out)
        if missing:
            raise CorruptEntryError(f"{path}: segments {sorted(missing)} of {entry_id!r} missing")
        return out

    def read(self, row, frames):
        """Frames `frames` (sorted indices within the entry) of a manifest row -> (n, 2, C, h, w)."""
        segs = np.unique(frames // self.seg)
        recs = self.records(row["location"], row["id"], row["row_start"], segs)
        out = np.empty((len(frames), 2, *self.frame_shape), self.dtype)
        for s in segs:
            sel = frames // self.seg == s
            rec = recs[int(s)]
            idx = frames[sel] - s * self.seg
            if idx.max() >= len(rec):
                raise CorruptEntryError(f"{self.root / row['location']}: segment {s} of "
                                        f"{row['id']!r} is short ({len(rec)} frames)")
            out[sel] = rec[idx]
        return out
