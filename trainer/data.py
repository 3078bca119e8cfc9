"""Training clips: which entries qualify and how a clip is read.

Which sample each rank reads, and every sample's random generators, are trainer/draws.py (the
global sample order, `DrawOrder`, `BatchLayout`); they are imported here too, as before the split.

A clip is `num_frames` frames `sample_stride` apart from a random window of an entry; its latent is
`(mean + std*eps) * scale_factor` drawn anew each time (the original samples the VAE posterior for
every step), or `mean * scale_factor` with `latent_sample: mean`.

`TrainData` puts it together for the trainer: the cache (or raw videos plus the VAE that encodes
them on the fly), the split into training and held-out entries, the source and the error report.
"""
import json
from dataclasses import dataclass

import numpy as np

from models.config import ConfigError, first_line
# The draw order's names stay importable from here (trainer.train, tests and benches import them so).
from trainer.draws import (  # noqa: F401
    DATA_STREAM, DIFFUSION_STREAM, POSTERIOR_STREAM, BatchLayout, DrawOrder, RankDraws, sample_rng)


class DataError(RuntimeError):
    """Data that cannot be trained on (damaged cache entry, nothing long enough). One-line message."""


@dataclass(frozen=True)
class Item:
    id: str
    num_frames: int
    label: int = 0


def clip_span(num_frames, stride):
    """Source frames covered by a clip of `num_frames` frames taken every `stride`-th."""
    return (num_frames - 1) * stride + 1


def plan_items(rows, num_frames, stride, val_entries=0, seed=0, num_classes=0):
    """Split manifest rows (dicts with id, status, num_frames[, label]) into training and validation
    items. Returns (train, val, too_short): `too_short` lists the ok entries with fewer frames than
    one clip needs, which the caller reports (they are never dropped silently)."""
    span = clip_span(num_frames, stride)
    ok = sorted((r for r in rows if r["status"] == "ok"), key=lambda r: r["id"])
    too_short = [(r["id"], int(r["num_frames"])) for r in ok if int(r["num_frames"]) < span]
    items = [Item(r["id"], int(r["num_frames"]), _label(r, num_classes)) for r in ok if int(r["num_frames"]) >= span]
    if not items:
        raise DataError(_no_usable_entry(rows, ok, num_frames, stride))
    if val_entries >= len(items):
        raise DataError(f"val_entries={val_entries} leaves no training entries ({len(items)} usable entries of "
                        f"{span}+ frames): lower --val_entries")
    # Held-out entries: a seeded choice independent of the training order and of the rank.
    pick = set(np.random.default_rng([seed, 7]).permutation(len(items))[:val_entries].tolist())
    train = [it for i, it in enumerate(items) if i not in pick]
    val = [it for i, it in enumerate(items) if i in pick]
    return train, val, too_short


def _no_usable_entry(rows, ok, num_frames, stride):
    """Why not one entry can give a clip, and the fix: the cause decides the advice."""
    if not rows:
        return "it holds no entries: ingest some first (`latte ingest ... --cache_folder`)"
    if not ok:
        bad = rows[0]
        reason = (str(bad.get("reason") or "").strip().splitlines() or [bad["status"]])[0]
        return (f"no entry is ok ({len(rows)} entries, all failed or skipped, e.g. {bad['id']}: {reason}): fix or "
                f"replace the source data (for a cache, `latte cache info` shows every reason, then re-run "
                f"`latte ingest ... --retry_failed`)")
    longest = max(int(r["num_frames"]) for r in ok)
    fits = (longest - 1) // stride + 1  # the most frames a clip of the longest entry can have at this stride
    return (f"no entry has the {clip_span(num_frames, stride)} frames a clip needs (num_frames {num_frames} x "
            f"sample_stride {stride}); the longest of the {len(ok)} ok entries has {longest}: lower --num_frames "
            f"to {fits} or less, or --sample_stride")


def _label(row, num_classes):
    if not num_classes:
        return 0
    label = row.get("label")
    if label is None and row.get("extra"):
        extra = json.loads(row["extra"])
        label = extra.get("label", extra.get("class"))
    if label is None:
        raise DataError(f"num_classes={num_classes} but entry {row['id']!r} has no label (a 'label' column "
                        f"or extra JSON key): set --num_classes 0 for unconditional training")
    label = int(label)
    if not 0 <= label < num_classes:
        raise DataError(f"entry {row['id']!r} has label {label}, outside [0, {num_classes}): check --num_classes")
    return label


class ClipSource:
    """Random-access source for `mindspore.dataset.GeneratorDataset`: index = global sample index.

    `read(item, start)` returns the clip's float32 array: for the cache, the latent (F, 4, h, w)
    (this class draws the posterior sample); for raw video, the frames (F, 3, S, S) that the trainer
    encodes. A read that raises does not escape into the data workers (where MindSpore would wrap or
    hang on it): the row comes back flagged with the item index, and the trainer stops with a clear
    error naming the entry."""

    def __init__(self, items, order, read, num_frames, stride, sample_shape, latent=None):
        self.items, self.order, self._read = items, order, read
        self.num_frames, self.stride = num_frames, stride
        self.sample_shape = tuple(sample_shape)
        self.latent = latent  # None (raw frames), or (mode "sample"/"mean", scale factor)
        self.span = clip_span(num_frames, stride)
        self.errors = {}  # item index -> what went wrong (the readers are threads of this process)

    def __len__(self):
        return 2 ** 62  # draws are unbounded; the sampler decides how many are read

    def pick(self, draw):
        """(item index, window start, generator left at the latent noise) of global sample `draw`."""
        idx = self.order.item(draw)
        rng = self.order.rng(draw)
        return idx, int(rng.integers(0, self.items[idx].num_frames - self.span + 1)), rng

    def __getitem__(self, draw):
        idx, start, rng = self.pick(draw)
        item = self.items[idx]
        try:
            x = self._read(item, start)
            if self.latent is not None:
                mean, std = x
                mode, scale = self.latent
                x = mean if mode == "mean" else mean + std * rng.standard_normal(mean.shape, dtype=np.float32)
                x = (x * np.float32(scale)).astype(np.float32)
            assert x.shape == self.sample_shape, (x.shape, self.sample_shape)
            bad = -1
        except Exception as err:  # noqa: BLE001 - reported by the trainer with the entry's name
            self.errors[idx] = first_line(err)
            x, bad = np.zeros(self.sample_shape, np.float32), idx
        return x, np.int32(item.label), np.int32(bad)


def make_loader(source, draws, batch_size, num_workers=2, chunk_batches=256):
    """Batches (x, label, bad) of numpy arrays for the global indices `draws` (a sequence: a range,
    or `BatchLayout.rank_draws`), in order, read by `num_workers` threads through
    `mindspore.dataset.GeneratorDataset`.

    The pipeline is rebuilt every `chunk_batches` batches because GeneratorDataset materialises
    its whole sampler up front (25M draws of a long run: 1.7 GB and 15 s before the first batch)."""
    import mindspore.dataset as ds

    assert len(draws) % batch_size == 0, (len(draws), batch_size)
    chunk = batch_size * chunk_batches
    for first in range(0, len(draws), chunk):
        dataset = ds.GeneratorDataset(source, column_names=["x", "label", "bad"],
                                      sampler=list(draws[first:first + chunk]),
                                      num_parallel_workers=max(1, num_workers), python_multiprocessing=False)
        yield from dataset.batch(batch_size, drop_remainder=True).create_tuple_iterator(num_epochs=1,
                                                                                        output_numpy=True)


# ------------------------------------------------------------------------------------------------
# the two sources of clips
# ------------------------------------------------------------------------------------------------

def open_cache(folder, endpoint_url=None):
    """(store, manifest rows, scale factor, latent shape (C, h, w)) of a `latte ingest` cache (a folder
    or a URL; `endpoint_url` for S3-compatible services)."""
    import cache_store

    try:
        store = cache_store.open(folder, endpoint_url or None)
        rows = store.entries().to_pylist()
    except (OSError, ValueError) as err:  # incl. cache_store.fs.StorageError (unreachable store)
        raise DataError(f"cannot open the latent cache {folder}: {err}") from None
    scale = float(store.settings.get("scale_factor", 0.18215))
    return store, rows, scale, tuple(int(s) for s in store.latent_shape)


def resolve_scale_factor(cfg, store, recorded):
    """--scale_factor: '' the cache's recorded one, 'auto' `latte cache stats`' unit-variance one, or a number."""
    if cfg.scale_factor == "":
        return recorded
    if cfg.scale_factor != "auto":
        return float(cfg.scale_factor)
    stats = store.meta.get("stats")
    if not stats or "scale_factor" not in stats:
        raise ConfigError(f"scale_factor auto needs the statistics of {cfg.cache_folder}: run `latte cache stats "
                          f"{cfg.cache_folder}` first (or pass a number)")
    return float(stats["scale_factor"])


def resolve_classes(cfg, store):
    """The class names of a labelled cache (`latte ingest --labels`); sets cfg.num_classes from them
    (0 means 'from the cache'), and an explicit different number is an error. None when unlabelled."""
    names = store.settings.get("class_names")
    if not names:
        return None
    if cfg.num_classes == 0:
        cfg.num_classes = len(names)
    elif cfg.num_classes != len(names):
        raise ConfigError(f"num_classes is {cfg.num_classes} but {cfg.cache_folder} is labelled with "
                          f"{len(names)} classes ({', '.join(names[:5])}{', ...' if len(names) > 5 else ''}): "
                          f"set --num_classes {len(names)} or 0 (from the cache)")
    return list(names)


def cache_reader(store, num_frames, stride):
    def read(item, start):
        mean, std = store.read_clip(item.id, start, num_frames, stride=stride)
        return np.asarray(mean, np.float32), np.asarray(std, np.float32)
    return read


def video_rows(data_folder):
    """Manifest-like rows for raw frame folders / videos (frame counts from a cheap probe), and the
    discovered `ingest` entries by id."""
    from ingest.readers import probe
    from ingest.sources import EntryError, discover_entries

    entries = {e.id: e for e in discover_entries(data_folder)}
    rows = []
    for e in entries.values():
        status, n, reason = e.status, e.num_files, e.reason
        if status == "ok" and e.kind == "video":
            try:
                n = probe(e)[0]
            except EntryError as err:
                status, reason = "failed", str(err)
        rows.append({"id": e.id, "status": status, "num_frames": n, "reason": reason})
    return rows, entries


def video_reader(entries, num_frames, stride, image_size):
    from ingest.readers import read_frames

    def read(item, start):
        return read_frames(entries[item.id], list(range(start, start + clip_span(num_frames, stride), stride)),
                           image_size)
    return read


# ------------------------------------------------------------------------------------------------
# what the trainer reads: the training source, the held-out clips, the VAE (video mode)
# ------------------------------------------------------------------------------------------------

class TrainData:
    """The training source, the held-out clips, and (video mode) the VAE that encodes frames."""

    def __init__(self, cfg, say=print):
        self.cfg = cfg
        self.vae = None
        self.class_names = None
        if cfg.data_source == "cache":
            self.store, rows, self.scale, self.latent_shape = open_cache(cfg.cache_folder,
                                                                        cfg.s3_endpoint_url)
            self.scale = resolve_scale_factor(cfg, self.store, self.scale)
            self.class_names = resolve_classes(cfg, self.store)
            read = cache_reader(self.store, cfg.num_frames, cfg.sample_stride)
            where = cfg.cache_folder
        else:
            rows, entries = video_rows(cfg.data_folder)
            self._load_vae()
            self.scale = self.vae.scaling_factor
            self.latent_shape = (self.vae.latent_channels, cfg.image_size // self.vae.downscale,
                                 cfg.image_size // self.vae.downscale)
            read = video_reader(entries, cfg.num_frames, cfg.sample_stride, cfg.image_size)
            where = cfg.data_folder
        self.read = read
        try:
            self.train, self.val, short = plan_items(rows, cfg.num_frames, cfg.sample_stride, cfg.val_entries,
                                                     cfg.seed, cfg.num_classes)
        except DataError as err:
            raise DataError(f"{where}: {err}") from None
        span = clip_span(cfg.num_frames, cfg.sample_stride)
        not_ok = sum(r["status"] != "ok" for r in rows)
        if short:
            names = ", ".join(f"{i} ({n})" for i, n in short[:5]) + (", ..." if len(short) > 5 else "")
            say(f"note: {len(short)} of {len(rows)} entries have fewer than {span} frames "
                       f"(num_frames {cfg.num_frames} x stride {cfg.sample_stride}) and are not used: {names}")
        self.order = DrawOrder(len(self.train), cfg.seed)
        if cfg.data_source == "cache":
            shape, latent = (cfg.num_frames,) + self.latent_shape, (cfg.latent_sample, self.scale)
        else:
            shape, latent = (cfg.num_frames, 3, cfg.image_size, cfg.image_size), None
        self.source = ClipSource(self.train, self.order, read, cfg.num_frames, cfg.sample_stride, shape, latent)
        say(f"data: {len(self.train)} training entries, {len(self.val)} held out, {not_ok} not ok, "
                   f"{len(short)} too short; {self.order.per_epoch} clips per epoch")

    def _load_vae(self):
        from models.vae import downscale_of, load_vae, vae_config

        try:
            config = vae_config(self.cfg.vae_checkpoint, "vae_checkpoint")
        except ValueError as err:
            raise ConfigError(str(err)) from None
        if self.cfg.image_size % downscale_of(config):
            raise ConfigError(f"image_size {self.cfg.image_size} is not a multiple of the VAE's downsampling "
                              f"factor {downscale_of(config)}")
        self.vae = load_vae(self.cfg.vae_checkpoint, config=config)

    def check(self, bad):
        """Stop with one clear line if a reader flagged an entry it could not read."""
        bad = [int(b) for b in np.asarray(bad).ravel() if b >= 0]
        if bad:
            raise self.unreadable(self.train[bad[0]], self.source.errors.get(bad[0], "read failed"))

    def unreadable(self, item, problem):
        """The one-line error for an entry that cannot be read, training or held out alike."""
        if self.cfg.data_source == "cache" and ("cannot reach the object store" in problem or "access denied" in problem):
            return DataError(f"cache entry {item.id!r} cannot be read: {problem}")  # the store's trouble, not damage
        if self.cfg.data_source == "cache":
            hint = "" if "latte cache verify" in problem else f"; run `latte cache verify {self.cfg.cache_folder}`"
            return DataError(f"cache entry {item.id!r} cannot be read at train time, the cache was damaged after "
                             f"ingest ({problem}){hint} and re-ingest the entries it reports")
        return DataError(f"video entry {item.id!r} cannot be read ({problem}): fix or remove it under "
                         f"{self.cfg.data_folder}")

    def encode(self, frames, indices, mode):
        """(B, F, 3, S, S) frames of global samples `indices` -> (B, F, 4, h, w) scaled latents
        (video mode); each sample's posterior noise is keyed by its index."""
        from mindspore import Tensor

        b, f = frames.shape[:2]
        mean, std = self.vae.encode(Tensor(frames.reshape((b * f,) + frames.shape[2:])),
                                    micro_batch=self.cfg.vae_micro_batch)
        mean, std = mean.asnumpy(), std.asnumpy()
        mean, std = mean.reshape((b, f) + mean.shape[1:]), std.reshape((b, f) + std.shape[1:])
        if mode == "mean":
            z = mean
        else:
            eps = np.stack([sample_rng(self.cfg.seed, POSTERIOR_STREAM, g).standard_normal(mean.shape[1:],
                                                                                         dtype=np.float32)
                            for g in indices])
            z = mean + std * eps
        return (z * np.float32(self.scale)).astype(np.float32)

    def val_clips(self):
        """Held-out clips from their first frame, posterior mean only: a fixed validation set."""
        out = []
        for item in self.val:
            try:
                x = self.read(item, 0)
            except Exception as err:  # noqa: BLE001 - the same one line as a damaged training entry
                raise self.unreadable(item, first_line(err)) from None
            if self.cfg.data_source == "cache":
                x = x[0] * np.float32(self.scale)
            else:
                x = self.encode(x[None], None, "mean")[0]
            out.append((x.astype(np.float32), item.label))
        return out
