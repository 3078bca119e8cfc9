"""`latte ingest`: frame folders and videos -> VAE posterior (mean, std) of every frame -> a latent cache.

    latte ingest -c configs/ingest/sky.yaml --data_folder sky_train --cache_folder sky_cache \
        [--format zarr|mindrecord] [--resume_index N] [--retry_failed] [--num_shards K --shard_index I]
    msrun --worker_num 8 --local_worker_num 8 latte_cli.py ingest -c ...    (shards from msrun's rank)

A run, in order:
1. Everything a user can get wrong is checked before any work, each a one-line error: the config, the
   data folder (discovery lists it, decoding nothing), the VAE weights (present, a VAE, loading
   strictly), the cache folder (writable) and, for an existing cache, that it was made with the same
   settings (weights sha256, image size, crop, dtype, ...).
2. Entry i of the sorted order belongs to shard i % K. Entries already `ok` in the manifest are skipped,
   `failed` ones too unless --retry_failed, so rerunning the same command resumes.
3. A reader thread decodes, crops and resizes the frames of one entry after another into fixed-size
   micro-batches in a bounded queue; the main thread runs the VAE on one batch while the reader
   prepares the next, and streams the latents into the store. Memory is a few batches, whatever the
   video length.
4. An entry that fails part-way is aborted (the next entry overwrites its frames) and recorded `failed`
   with the reader's reason. The store makes only whole entries visible, so a crash never leaves a
   half-written `ok` entry, and a rerun redoes what was not committed.
"""
import contextlib
import dataclasses
import hashlib
import json
import os
import queue
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

import models.runtime  # noqa: F401, I001 - MindSpore before decord (ingest.readers): the other order aborts
import cache_store
from cache_store.fs import is_url
from cache_store.manifest import part_path
from cache_store.store import is_cache
from ingest.config import IngestConfig
from ingest.readers import iter_frame_batches, open_reader, probe
from ingest.sources import EntryError, discover_entries
from ingest.transforms import transform_frames
from models.config import parse_config

VIDEO_CHUNK_FRAMES = 64  # frames of a video read per VideoReader (see Prefetcher._batches)


# ----------------------------------------------------------------------------------------------
# Shards: explicit, or the rank msrun gives each worker
# ----------------------------------------------------------------------------------------------

def resolve_shards(cfg, environ=None):
    """(num_shards, shard_index, where they came from). --num_shards/--shard_index win; else msrun's
    environment: it exports RANK_ID/RANK_SIZE (and MS_NODE_ID/MS_WORKER_NUM) to every worker."""
    environ = os.environ if environ is None else environ
    if cfg.num_shards:
        return cfg.num_shards, cfg.shard_index, "--num_shards/--shard_index"
    for size_key, rank_key in (("RANK_SIZE", "RANK_ID"), ("MS_WORKER_NUM", "MS_NODE_ID")):
        size, rank = environ.get(size_key), environ.get(rank_key)
        if size is None or rank is None:
            continue
        try:
            k, i = int(size), int(rank)
        except ValueError:
            raise ValueError(f"environment {rank_key}={rank!r} {size_key}={size!r} are not integers: "
                             f"fix them or pass --num_shards K --shard_index I") from None
        if not 0 <= i < k:
            raise ValueError(f"environment {rank_key}={i} is outside 0..{size_key}-1={k - 1}: fix them or "
                             f"pass --num_shards K --shard_index I")
        return k, i, f"{rank_key}/{size_key}"
    if environ.get("MS_WORKER_NUM"):
        raise ValueError("msrun started this worker without a rank (several nodes and no --node_rank): pass "
                         "--node_rank to msrun, or --num_shards K --shard_index I")
    return 1, 0, "single process"


# ----------------------------------------------------------------------------------------------
# The VAE: described (config, weights id) cheaply, then built once per process
# ----------------------------------------------------------------------------------------------

def sha256_file(path, block=8 << 20):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(block), b""):
            h.update(chunk)
    return h.hexdigest()


def describe_vae(cfg):
    """(AutoencoderKL kwargs, weights id) without building anything. The id is the weights file's
    sha256, or "random-seed-<n>" for the random test VAE. The shape comes from the weights file's own
    metadata (`latte convert` stores it), else from the vae_* keys."""
    from_keys = {"in_channels": 3, "out_channels": 3, "block_out_channels": list(cfg.vae_block_out_channels),
                 "layers_per_block": cfg.vae_layers_per_block, "latent_channels": cfg.vae_latent_channels,
                 "norm_num_groups": cfg.vae_norm_num_groups}
    path = cfg.vae_weights
    if not path:
        assert cfg.allow_random_vae, "IngestConfig.validate lets no weights through without allow_random_vae"
        return from_keys, f"random-seed-{cfg.random_vae_seed}"
    from models.vae import vae_config
    return vae_config(path, "vae_weights", default=from_keys), sha256_file(path)


def randomize_vae(vae, seed):
    """Deterministic random weights from numpy, the same on every machine and MindSpore version:
    LeCun-normal convs and linears, identity GroupNorms, zero biases. For tests and the demo only."""
    import mindspore as ms

    rng = np.random.default_rng(seed)
    for name, param in sorted(vae.parameters_and_names()):
        shape = tuple(param.shape)
        if len(shape) >= 2:
            value = rng.standard_normal(shape, dtype=np.float32) / np.sqrt(np.prod(shape[1:]))
        else:
            value = np.full(shape, 1.0 if name.endswith("weight") else 0.0, np.float32)
        param.set_data(ms.Tensor(value).astype(param.dtype))


_VAE_CACHE = {}  # building and compiling a VAE costs seconds: in-process callers reuse the last one
_WARM = set()    # (id(vae), batch, size) already compiled


def build_vae(cfg, config, weights_id):
    """The AutoencoderKL of `describe_vae`, weights loaded strictly (a mismatch is a ValueError)."""
    from models.runtime import device_target
    from models.vae import AutoencoderKL, load_vae

    key = (weights_id, json.dumps(config, sort_keys=True), cfg.vae_dtype, device_target())
    if key not in _VAE_CACHE:
        if cfg.vae_weights:
            vae = load_vae(cfg.vae_weights, cfg.vae_dtype, config)
        else:
            vae = AutoencoderKL(**config, dtype=cfg.vae_dtype)
            randomize_vae(vae, cfg.random_vae_seed)
        _VAE_CACHE.clear()  # only once the new one loaded: a bad weights file evicts nothing
        _WARM.clear()
        _VAE_CACHE[key] = vae
    return _VAE_CACHE[key]


def warm_up(vae, batch_size, image_size):
    """Compile the encoder for the one batch shape now: a broken device setup fails before any entry
    is read, and the progress bars and timings start with the real work."""
    key = (id(vae), batch_size, image_size)
    if key not in _WARM:
        encode(vae, np.zeros((batch_size, 3, image_size, image_size), np.float32))
        _WARM.add(key)


def encode(vae, x):
    """float32 (B, 3, S, S) in [-1, 1] -> (mean, std) float32 numpy, each (B, C, S/8, S/8)."""
    import mindspore as ms

    mean, std = vae.encode(ms.Tensor(x))
    return mean.asnumpy(), std.asnumpy()


# ----------------------------------------------------------------------------------------------
# The reader thread
# ----------------------------------------------------------------------------------------------

class Prefetcher:
    """Reads the entries in a background thread and yields, in entry order:

        ("begin", entry, frames, source_frames, (h, w), notes)   then per micro-batch
        ("batch", entry, x, n)     x float32 (batch_size, 3, S, S); rows past n repeat the last frame
        ("end", entry)             or, instead of the rest of the entry,
        ("fail", entry, reason, source_frames)
        ("row", entry, status, reason, source_frames)     an entry with nothing to encode

    Every batch has the same shape, so the VAE compiles once, and an entry's latents never depend on
    its neighbours or on sharding (a resumed or sharded run writes the same bytes). The queue holds at
    most `depth` items and a video is read VIDEO_CHUNK_FRAMES at a time (see `_batches`), which
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
            item = self.queue.get()
            if item[0] == "done":
                return
            if item[0] == "error":
                raise item[1]  # a bug in the reader, not a bad entry: surface it here
            yield item

    def close(self):
        self.stop.set()
        self.thread.join(timeout=30)

    def _put(self, item):
        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def _run(self):
        try:
            for entry in self.entries:
                if self.stop.is_set() or not self._entry(entry):
                    return
            self._put(("done",))
        except BaseException as err:  # noqa: BLE001 - handed to the main thread, which re-raises it
            self._put(("error", err))

    def _entry(self, entry):
        if entry.status != "ok":
            return self._put(("row", entry, entry.status, entry.reason, -1))
        source_frames = -1
        try:
            source_frames, size, notes = probe(entry, self.image_size)
            frames = len(range(0, source_frames, self.stride))
            if frames < self.min_frames:
                return self._put(("row", entry, "skipped", f"only {frames} frames (stride {self.stride}), "
                                  f"fewer than min_frames {self.min_frames}", source_frames))
            if not self._put(("begin", entry, frames, source_frames, size, notes)):
                return False
            batches = self._batches(entry, source_frames)
            with contextlib.closing(batches):  # closes the reader at once if we stop early
                for x in batches:
                    n = len(x)
                    if n < self.batch_size:
                        x = np.concatenate([x, np.repeat(x[-1:], self.batch_size - n, axis=0)])
                    if not self._put(("batch", entry, x, n)):
                        return False
            return self._put(("end", entry))
        except EntryError as err:
            return self._put(("fail", entry, str(err), source_frames))

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

def _first_line(err):
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


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
        opened, done, dead = None, 0, None  # the open entry's "begin" item, its frames stored, an abandoned id
        for item in reader:
            kind, e = item[0], item[1]
            if e.id == dead:
                continue
            r.next_index = self.position[e.id]
            if kind == "begin":
                _, _, frames, source_frames, (h, w), notes = item
                if e.kind != "frames":  # video lengths are known once opened
                    bar_frames.total += frames
                    bar_frames.refresh()
                writer.begin_entry(e.id)
                opened, done = item, 0
            elif kind == "batch":
                x, n = item[2], item[3]
                mean, std = encode(self.vae, x)
                try:
                    writer.append(mean[:n], std[:n])
                except ValueError as err:  # latents not finite (or beyond float16): this entry fails
                    self._finish(writer, e, "failed", _first_line(err), opened[3], bar_entries, bar_frames,
                                 opened[2] - done)
                    opened, dead = None, e.id
                    continue
                done += n
                r.frames += n
                bar_frames.update(n)
            elif kind == "end":
                _, _, frames, source_frames, (h, w), notes = opened
                meta = self._meta(e, source_frames, num_frames=frames, source_size=f"{w}x{h}")
                writer.commit_entry(meta, reason="; ".join(notes))  # e.g. "upscaled from 160x120"
                r.saved += 1
                r.next_index += 1
                opened = None
                bar_entries.update(1)
                self._maybe_commit(writer)
            elif kind == "fail":
                left = opened[2] - done if opened is not None else 0
                self._finish(writer, e, "failed", item[2], item[3], bar_entries, bar_frames, left)
                opened = None
            else:
                assert kind == "row", kind
                self._finish(writer, e, item[2], item[3], item[4], bar_entries, bar_frames, 0)

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


def _sigterm_as_interrupt(signum, frame):
    raise KeyboardInterrupt  # a cluster's SIGTERM then commits finished entries like Ctrl-C does


BOOL_KEYS = {f.name for f in dataclasses.fields(IngestConfig) if f.type is bool}


def parse_args(argv):
    """`-c file.yaml --key value ...` -> IngestConfig. A bool key given alone (`--retry_failed`) means
    true, as the documented command line spells it."""
    argv = list(argv)
    expanded = []
    for k, token in enumerate(argv):
        expanded.append(token)
        if token.startswith("--") and token[2:] in BOOL_KEYS and (k + 1 == len(argv) or argv[k + 1].startswith("-")):
            expanded.append("true")
    return parse_config(IngestConfig, expanded, prog="latte ingest",
                        description="Encode frame folders / videos with the SD VAE into a resumable latent cache.")


def main(argv=None):
    cfg = parse_args(sys.argv[1:] if argv is None else argv)
    if os.environ.get("MS_ROLE") == "MS_SCHED":
        print("latte ingest: msrun scheduler process; the workers do the ingest")
        return 0
    try:
        job = prepare(cfg, setup_device=True)
    except (ValueError, OSError) as err:
        print(f"latte ingest: error: {_first_line(err)}", file=sys.stderr)
        return 2
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
    try:
        job.run()
    except cache_store.StorageError as err:  # the object store went away mid-run: commits are kept
        print(f"latte ingest: error: {_first_line(err)}", file=sys.stderr)
        return 1
    except ValueError as err:  # another process took this shard between prepare()'s check and now
        print(f"latte ingest: error: {_first_line(err)}", file=sys.stderr)
        return 2
    except OSError as err:  # e.g. the disk filled up mid-run: finished entries are committed
        print(f"latte ingest: error: {_first_line(err)}; rerun the same command to go on", file=sys.stderr)
        return 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return 0


if __name__ == "__main__":
    sys.exit(main())
