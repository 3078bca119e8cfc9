"""A crash-safe store of VAE latents (posterior mean and std per frame) with a Parquet manifest.

Reading (trainer, users)::

    store = cache_store.open(path)        # a folder, or a URL: cache_store.open("s3://bucket/prefix")
    store.entries()                       # pyarrow Table, one row per entry (see manifest.SCHEMA)
    mean, std = store.read_clip(entry_id, start, num_frames, stride=1)   # float32 (F, C, h, w)
    mean, std = store.read_entry(entry_id)
    store.settings                        # what defines the latents (vae_sha256, scale_factor, ...)

The latents are the raw posterior (not scaled): a training sample is
`(mean + std * eps) * settings["scale_factor"]`.

Writing (ingest)::

    store = cache_store.create_or_open(path, settings, format="zarr")   # or "mindrecord"
    done = {r["id"] for r in store.entries().to_pylist() if r["status"] == "ok"}   # resume: skip
    with store.writer(shard_index=I, num_shards=K) as w:
        w.write_entry(entry_id, mean, std, meta)     # whole entry, mean/std (F, C, h, w)
        # or streamed, so a long video never sits in memory:
        w.begin_entry(entry_id); w.append(mean_chunk, std_chunk); ...; w.commit_entry(meta)
        w.record_failure(entry_id, "failed", reason, meta)     # or "skipped"

`settings` is a dict recorded at creation and compared on every later `create_or_open` (any
difference is a ValueError naming the keys). Needed: `latent_shape` [C, h, w] (or `image_size`,
giving [4, size/8, size/8]) and `dtype` (float16 default, or float32); the ingest also records
`vae_sha256`, `scale_factor`, `image_size`, `crop`. `meta` keys `source`, `kind`, `source_bytes`,
`encode_seconds` (measured if absent) fill manifest columns; other keys are kept as JSON in `extra`.

Entries become visible (and safe) at commits: every `commit_every` entries (64), every
`commit_seconds` (300) and when the writer closes, also on an exception. A crash loses at most the
uncommitted batch; a rerun redoes it. K writers (`shard_index` 0..K-1, any machines sharing the
folder) write one store concurrently; how entries are split among them is the caller's choice.

On disk: `zarr.json` (zarr root group, settings in attribute "latte_cache") or `cache.json`,
`latents/<writer>[.<k>]/` (zarr) or `mindrecord/<writer>-<n>.mindrecord` files, and
`manifest/part-<writer>.parquet`. At an fsspec URL (zarr only) the same objects sit under the prefix
and fs.py gives the primitives (whole-object PUTs, conditional creates, leases instead of flocks).
See store.py for the crash-safety argument, zarr_backend.py and mindrecord_backend.py for the layouts.
Reads check a crc32c per zarr chunk / MindRecord record and raise CorruptEntryError naming the entry
and file; `verify` checks each ok entry's sha256. `cache_store.cli.main(argv)` is `latte cache info|verify`.
"""
from .fs import StorageError
from .manifest import SCHEMA, STATUSES, CorruptEntryError
from .store import FORMATS, Store, Writer, create_or_open, normalize_settings
from .store import open_store as open  # noqa: A001 - the documented `cache_store.open(path)`

__all__ = ["open", "create_or_open", "Store", "Writer", "CorruptEntryError", "FORMATS", "SCHEMA",
           "STATUSES", "StorageError", "normalize_settings"]
