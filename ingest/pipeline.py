"""The ingest job: check everything, then stream the reader thread's batches through the VAE into a cache.

    job = prepare(cfg)          # every user-caused problem is a one-line ValueError here
    result = job.run()          # or run_ingest(cfg); the `latte ingest` command is ingest/cli.py

A run, in order:
1. Everything a user can get wrong is checked before any work, each a one-line error: the config, the
   data folder (discovery lists it, decoding nothing), the VAE weights (present, a VAE, loading
   strictly; ingest/vae_setup.py), the cache folder (writable) and, for an existing cache, that it was
   made with the same settings (weights sha256, image size, crop, dtype, ...).
2. Entry i of the sorted order belongs to shard i % K (ingest/shards.py). Entries already `ok` in the
   manifest are skipped, `failed` ones too unless --retry_failed, so rerunning the same command resumes.
3. A reader thread (ingest/reader_thread.py) decodes, crops and resizes the frames of one entry after
   another into fixed-size micro-batches in a bounded queue; the main thread runs the VAE on one batch
   while the reader prepares the next, and streams the latents into the store. Memory is a few
   batches, whatever the video length.
4. An entry that fails part-way is aborted (the next entry overwrites its frames) and recorded `failed`
   with the reader's reason. The store makes only whole entries visible, so a crash never leaves a
   half-written `ok` entry, and a rerun redoes what was not committed.
"""
import os
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

import models.runtime  # noqa: F401, I001 - MindSpore before decord (ingest.readers): the other order aborts
import cache_store
from cache_store.fs import is_url
from cache_store.manifest import part_path
from cache_store.store import is_cache
from ingest.reader_thread import Batch, Begin, End, Fail, Prefetcher, Row
from ingest.shards import resolve_shards
from ingest.sources import discover_entries
from ingest.vae_setup import build_vae, describe_vae, encode, warm_up
from models.config import first_line

__all__ = ["IngestJob", "IngestResult", "prepare", "run_ingest", "status_lines", "resolve_shards",
           "describe_vae", "build_vae", "warm_up", "encode", "Prefetcher"]


# ----------------------------------------------------------------------------------------------
# Status lines (the seed's, so scripts that grep them keep working)
# ----------------------------------------------------------------------------------------------

@dataclass
class IngestResult:
    cache_folder: str
    manifest: str
    num_shards: int
    shard_index: int
    start_index: int       # --resume_index
    next_index: int        # the entry this shard would go on with; every entry once finished
    total_entries: int
    saved: int = 0         # ok rows written by this run
    failed: int = 0        # failed rows written by this run
    skipped: int = 0       # skipped rows written by this run (nothing to encode)
    already_ok: int = 0    # ok rows found in the cache, not redone
    kept_failed: int = 0   # failed rows found and kept (no --retry_failed)
    kept_skipped: int = 0
    frames: int = 0        # frames encoded and stored
    seconds: float = 0.0
    interrupted: bool = False


def status_lines(r):
    fps = r.frames / r.seconds if r.seconds > 0 else 0.0
    lines = []
    if r.interrupted:
        lines.append(f"Interrupted: finished entries are committed; rerun the same command to go on from "
                     f"entry {r.next_index} (nothing committed is redone).")
    lines += [
        f"Start Video Index: {r.start_index}.",
        f"Saving Attempts: {r.next_index}: save {r.saved} videos, failed {r.failed} videos.",
        f"Skipped {r.skipped} entries with nothing to encode; found in the cache and not redone: "
        f"{r.already_ok} ok, {r.kept_failed} failed (--retry_failed redoes them), {r.kept_skipped} skipped.",
        f"Encoded {r.frames} frames in {r.seconds:.1f}s ({fps:.1f} frames/s), shard {r.shard_index} of {r.num_shards}.",
        f"Manifest: {r.manifest} (every shard: `latte cache info {r.cache_folder}`)",
    ]
    return lines


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------

def _check_cache_folder(path):
    """A one-line error now if the cache folder cannot be written; creates nothing."""
    p = Path(path)
    if p.exists():
        if not p.is_dir():
            raise ValueError(f"cache_folder {path} is a file: pick a folder for the latent cache")
        if not os.access(p, os.W_OK | os.X_OK):
            raise ValueError(f"cache_folder {path} is not writable: pick a folder you can write to")
        return
    parent = p.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"cache_folder {path} cannot be created: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"cache_folder {path} cannot be created: {parent} is not writable")


def _settings(cfg, config, weights_id):
    """What defines the latents; a cache made with other settings refuses this run."""
    down = 2 ** (len(config["block_out_channels"]) - 1)
    if cfg.image_size % down:
        raise ValueError(f"image_size {cfg.image_size} is not a multiple of the VAE's downsampling factor {down}: "
                         f"use e.g. {cfg.image_size // down * down or down}")
    return {"vae_sha256": weights_id, "vae_config": config, "vae_dtype": cfg.vae_dtype,
            "scale_factor": cfg.scale_factor, "image_size": cfg.image_size, "crop": "center",
            "resize": "bilinear", "frame_stride": cfg.frame_stride, "dtype": cfg.dtype,
            "latent_shape": [config["latent_channels"], cfg.image_size // down, cfg.image_size // down]}


class IngestJob:
    """A checked, ready run: `prepare(cfg)` makes it (raising one-line ValueErrors), `run()` does it."""

    def __init__(self, cfg, entries, store, vae, shards, todo, result):
        self.cfg, self.entries, self.store, self.vae = cfg, entries, store, vae
        (self.num_shards, self.shard_index, self.shard_source) = shards
        self.todo, self.result = todo, result
        self.position = {e.id: i for i, e in enumerate(entries)}

    # -- the loop -------------------------------------------------------------------------------
    def run(self):
        cfg, r = self.cfg, self.result
        print(self._summary(), flush=True)
        known = sum(-(-e.num_files // cfg.frame_stride) for e in self.todo if e.status == "ok" and e.kind == "frames")
        bar_entries = tqdm(total=len(self.todo), desc="entries", unit="entry", position=0, disable=not cfg.progress,
                           dynamic_ncols=True)
        bar_frames = tqdm(total=known, desc="frames", unit="frame", position=1, disable=not cfg.progress,
                          dynamic_ncols=True, smoothing=0.1)
        reader = Prefetcher(self.todo, cfg.micro_batch, cfg.image_size, cfg.frame_stride, cfg.min_frames,
                            cfg.prefetch_batches)
        t0 = time.monotonic()
        try:
            # The writer commits on our schedule (see _maybe_commit), not after every entry.
            with self.store.writer(self.shard_index, self.num_shards, commit_every=1 << 62,
                                   commit_seconds=float("inf")) as writer:
                try:
                    self._loop(writer, reader, bar_entries, bar_frames)
                finally:
                    reader.close()
            r.next_index = len(self.entries)
        except KeyboardInterrupt:
            r.interrupted = True
            raise
        finally:
            r.seconds = time.monotonic() - t0
            bar_frames.close()
            bar_entries.close()
            for line in status_lines(r):
                print(line, flush=True)
        return r

    def _loop(self, writer, reader, bar_entries, bar_frames):
        r = self.result
        opened, done, dead = None, 0, None  # the open entry's Begin event, its frames stored, an abandoned id
        for event in reader:
            e = event.entry
            if e.id == dead:
                continue
            r.next_index = self.position[e.id]
            match event:
                case Begin():
                    if e.kind != "frames":  # video lengths are known once opened
                        bar_frames.total += event.frames
                        bar_frames.refresh()
                    writer.begin_entry(e.id)
                    opened, done = event, 0
                case Batch(x=x, n=n):
                    mean, std = encode(self.vae, x)
                    try:
                        writer.append(mean[:n], std[:n])
                    except ValueError as err:  # latents not finite (or beyond float16): this entry fails
                        self._finish(writer, e, "failed", first_line(err), opened.source_frames, bar_entries,
                                     bar_frames, opened.frames - done)
                        opened, dead = None, e.id
                        continue
                    done += n
                    r.frames += n
                    bar_frames.update(n)
                case End():
                    h, w = opened.size
                    meta = self._meta(e, opened.source_frames, num_frames=opened.frames, source_size=f"{w}x{h}")
                    writer.commit_entry(meta, reason="; ".join(opened.notes))  # e.g. "upscaled from 160x120"
                    r.saved += 1
                    r.next_index += 1
                    opened = None
                    bar_entries.update(1)
                    self._maybe_commit(writer)
                case Fail():
                    left = opened.frames - done if opened is not None else 0
                    self._finish(writer, e, "failed", event.reason, event.source_frames, bar_entries, bar_frames,
                                 left)
                    opened = None
                case Row():
                    self._finish(writer, e, event.status, event.reason, event.source_frames, bar_entries,
                                 bar_frames, 0)
                case _:
                    raise AssertionError(f"unknown reader event {event!r}")

    def _finish(self, writer, e, status, reason, source_frames, bar_entries, bar_frames, frames_left):
        """Record an entry without latents; an open entry of that id is aborted first."""
        writer.record_failure(e.id, status, reason, self._meta(e, source_frames, num_frames=source_frames))
        if status == "failed":
            self.result.failed += 1
        else:
            self.result.skipped += 1
        self.result.next_index += 1
        if frames_left:
            bar_frames.total -= frames_left
            bar_frames.refresh()
        bar_entries.update(1)
        self._maybe_commit(writer)

    def _maybe_commit(self, writer):
        if (writer.pending >= self.cfg.commit_every
                or time.monotonic() - writer.last_commit >= self.cfg.commit_seconds):
            writer.flush()

    def _meta(self, e, source_frames, **more):
        meta = {"source": e.path, "kind": e.kind, "source_bytes": e.source_size, **more}
        class_names = self.store.settings.get("class_names")  # --labels: the manifest's label column
        if e.label and class_names and e.label in class_names:
            meta["label"] = class_names.index(e.label)
        if source_frames >= 0:
            meta["source_frames"] = source_frames
        return meta

    def _summary(self):
        r, cfg = self.result, self.cfg
        bad = sum(e.status != "ok" for e in self.entries)
        shard = f"shard {self.shard_index} of {self.num_shards} ({self.shard_source})"
        return (f"latte ingest: {len(self.entries)} entries in {cfg.data_folder} ({bad} unreadable or empty); "
                f"{shard}: {len(self.todo)} to do from index {cfg.resume_index}, {r.already_ok} already ok, "
                f"{r.kept_failed} failed kept -> {self.store.format} cache {cfg.cache_folder} "
                f"(VAE {self.store.settings['vae_sha256'][:16]}, {cfg.image_size} px, {cfg.dtype}, "
                f"micro_batch {cfg.micro_batch})")


def prepare(cfg, setup_device=False, environ=None):
    """Check everything, build the VAE, open (or create) the store and plan this shard's entries.
    Every user-caused problem is a one-line ValueError raised before any entry is read."""
    environ = os.environ if environ is None else environ
    cfg.validate()  # parse_config already did; an IngestConfig built in code gets the same checks
    shards = resolve_shards(cfg, environ)
    num_shards, shard_index, _ = shards
    remote = is_url(cfg.cache_folder)
    cache = cfg.cache_folder if remote else Path(cfg.cache_folder)  # Path() would fold s3:// to s3:/
    endpoint = cfg.s3_endpoint_url or None
    entries = discover_entries(cfg.data_folder, exclude=[] if remote else [cache])  # a cache inside the data is not data
    if cfg.resume_index >= len(entries):
        raise ValueError(f"resume_index {cfg.resume_index} is past the last of the {len(entries)} entries in "
                         f"{cfg.data_folder}: use 0..{len(entries) - 1}")
    config, weights_id = describe_vae(cfg)
    settings = _settings(cfg, config, weights_id)
    if cfg.labels:  # class index <-> name map in the store's settings; unlabelled entries are skipped
        from ingest.sources import apply_labels
        entries, settings["class_names"] = apply_labels(entries, cfg.labels)
    if not remote:
        _check_cache_folder(cache)
    elif cfg.format != "zarr":
        raise ValueError(f"cache_folder {cache}: MindRecord caches are local only (MindSpore writes and reads them "
                         f"as named local files); use --format zarr for a URL")
    layout = {"chunk_frames": cfg.chunk_frames, "shard_frames": cfg.shard_frames, "segment_frames": cfg.segment_frames,
              "endpoint_url": endpoint}
    if is_cache(cache, endpoint):  # (remote: also checks bucket, credentials and endpoint, in one line)
        existing = cache_store.create_or_open(cache, settings, format=cfg.format, **layout)  # settings match?
        existing.check_writer_free(shard_index, num_shards)  # another live process on this shard?
    if setup_device:
        from models.runtime import setup_device as setup

        setup(cfg.device_target, cfg.mode, cfg.cpu_threads)
    vae = build_vae(cfg, config, weights_id)
    warm_up(vae, cfg.micro_batch, cfg.image_size)
    try:
        store = cache_store.create_or_open(cache, settings, format=cfg.format, **layout)
    except OSError as err:
        raise ValueError(f"cache_folder {cache}: cannot create the cache ({err.strerror or err})") from None

    rows = store.rows()
    result = IngestResult(cache_folder=str(cache), manifest="", num_shards=num_shards, shard_index=shard_index,
                          start_index=cfg.resume_index, next_index=cfg.resume_index, total_entries=len(entries))
    result.manifest = str(part_path(store.loc, f"{shard_index:05d}-of-{num_shards:05d}"))
    todo = []
    for i, e in enumerate(entries):
        if i < cfg.resume_index or i % num_shards != shard_index:
            continue
        status = rows[e.id]["status"] if e.id in rows else None
        if status == "ok":
            result.already_ok += 1
        elif status == "skipped":
            result.kept_skipped += 1
        elif status == "failed" and not cfg.retry_failed:
            result.kept_failed += 1
        else:
            todo.append(e)
    return IngestJob(cfg, entries, store, vae, shards, todo, result)


def run_ingest(cfg, environ=None):
    """Ingest with a parsed `IngestConfig` in this process (device as already set up). Returns the
    IngestResult; fatal problems raise ValueError before any work."""
    return prepare(cfg, environ=environ).run()
