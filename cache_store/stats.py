"""Latent statistics of a cache, streamed in bounded memory, and recorded in the store's attributes.

    stats = compute_stats(store)           # one pass over every ok entry, `chunk_frames` at a time
    record_stats(store.path, stats)        # summary into the store's metadata (key "stats")
    plot_histograms(stats, "stats.png")    # matplotlib, Agg backend

Per latent channel it accumulates count, sum and sum of squares (float64) of the posterior mean and
of posterior samples `mean + std * eps` (eps seeded per entry, so the numbers do not depend on the
reading order), and a fixed-bin histogram of each: memory is one chunk plus the bins, whatever the
cache size. The scale factor is `1 / std` of all sample values pooled over channels: what Stable
Diffusion did to get 0.18215 (the std of sd-vae-ft-mse's posterior samples on its training images
is ~5.49), so that the diffusion model sees latents of unit variance. `latte train --scale_factor
auto` reads it from here.

This module is part of the bottom layer: numpy (and matplotlib, imported only to plot), no models.
"""
import json
import math
import os
from pathlib import Path

import numpy as np

STATS_KEY = "stats"
# Fixed histogram bins: latents of the SD VAE stay well inside +-64; values outside land in the end
# bins and are counted separately, so nothing is lost silently.
HIST_RANGE = 64.0
HIST_BINS = 2048


class _Moments:
    """Per-channel count, sum, sum of squares (float64) and a fixed-bin histogram."""

    def __init__(self, channels):
        self.n = np.zeros(channels, np.int64)
        self.s = np.zeros(channels, np.float64)
        self.ss = np.zeros(channels, np.float64)
        self.hist = np.zeros((channels, HIST_BINS), np.int64)
        self.outside = 0
        self.edges = np.linspace(-HIST_RANGE, HIST_RANGE, HIST_BINS + 1)

    def add(self, x):
        """x: float32 (F, C, h, w)."""
        per_channel = np.moveaxis(x, 1, 0).reshape(x.shape[1], -1).astype(np.float64)
        self.n += per_channel.shape[1]
        self.s += per_channel.sum(axis=1)
        self.ss += np.square(per_channel).sum(axis=1)
        self.outside += int((np.abs(per_channel) > HIST_RANGE).sum())
        idx = np.clip(((per_channel + HIST_RANGE) * (HIST_BINS / (2 * HIST_RANGE))).astype(np.int64), 0, HIST_BINS - 1)
        for c in range(per_channel.shape[0]):
            self.hist[c] += np.bincount(idx[c], minlength=HIST_BINS)

    def summary(self):
        mean = self.s / np.maximum(self.n, 1)
        var = np.maximum(self.ss / np.maximum(self.n, 1) - mean ** 2, 0.0)
        n, s, ss = self.n.sum(), self.s.sum(), self.ss.sum()
        pooled_mean = s / max(n, 1)
        pooled_std = math.sqrt(max(ss / max(n, 1) - pooled_mean ** 2, 0.0))
        return {"mean": mean.tolist(), "std": np.sqrt(var).tolist(), "pooled_mean": float(pooled_mean),
                "pooled_std": float(pooled_std), "values": int(n), "outside_histogram": self.outside}


def compute_stats(store, chunk_frames=64, seed=0, progress=False):
    """Statistics of every ok entry of `store` (a cache_store.Store). Returns a dict: `summary` (what
    record_stats stores: JSON types) and `histograms` (numpy, for plotting)."""
    from tqdm import tqdm

    rows = sorted((r for r in store.rows().values() if r["status"] == "ok"), key=lambda r: r["id"])
    if not rows:
        raise ValueError(f"{store.path}: no ok entries to compute statistics of; ingest some first "
                         f"(`latte cache info {store.path}` lists what is there)")
    channels = store.latent_shape[0]
    posterior_mean, sample = _Moments(channels), _Moments(channels)
    frame_counts = []
    bar = tqdm(total=sum(r["num_frames"] for r in rows), desc="stats", unit="frame", disable=not progress,
               dynamic_ncols=True)
    for k, row in enumerate(rows):
        n = row["num_frames"]
        frame_counts.append(n)
        rng = np.random.default_rng([seed, k])  # per entry: independent of chunking
        for start in range(0, n, chunk_frames):
            mean, std = store.read_clip(row["id"], start, min(chunk_frames, n - start))
            posterior_mean.add(mean)
            sample.add(mean + std * rng.standard_normal(mean.shape, dtype=np.float32))
            bar.update(len(mean))
    bar.close()
    counts = np.asarray(frame_counts)
    sample_summary = sample.summary()
    summary = {
        "entries": len(rows), "frames": int(counts.sum()),
        "posterior_mean": posterior_mean.summary(), "sample": sample_summary,
        "frame_counts": {"min": int(counts.min()), "max": int(counts.max()), "mean": float(counts.mean()),
                         "median": float(np.median(counts)),
                         "p10": float(np.percentile(counts, 10)), "p90": float(np.percentile(counts, 90))},
        # 1 / std of the posterior samples, pooled over channels (Stable Diffusion's recipe)
        "scale_factor": 1.0 / sample_summary["pooled_std"] if sample_summary["pooled_std"] > 0 else 1.0,
        "recorded_scale_factor": store.settings.get("scale_factor"),
        "seed": seed,
    }
    return {"summary": summary, "frame_counts": counts, "edges": posterior_mean.edges,
            "hist_mean": posterior_mean.hist, "hist_sample": sample.hist}


def _meta_file(path):
    path = Path(path)
    for name in ("zarr.json", "cache.json"):
        if (path / name).exists():
            return path / name
    raise ValueError(f"{path}: not a latent cache (no zarr.json or cache.json)")


def record_stats(path, summary):
    """Put `summary` under meta["stats"] of the store at `path`, atomically (temp file, fsync, rename):
    a reader sees the old metadata or the new, never a torn file. Settings are left untouched."""
    from .manifest import fsync_dir, fsync_file

    meta_file = _meta_file(path)
    doc = json.loads(meta_file.read_text())
    meta = doc["attributes"]["latte_cache"] if meta_file.name == "zarr.json" else doc
    meta[STATS_KEY] = summary
    tmp = meta_file.with_name(f".{meta_file.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(doc, indent=2))
    fsync_file(tmp)
    os.replace(tmp, meta_file)
    fsync_dir(meta_file.parent)


def recorded_stats(store):
    """The summary `record_stats` stored, or None."""
    return store.meta.get(STATS_KEY)


def _shown_range(edges, hist, mass=0.999):
    """The bin range holding the central `mass` of all channels' values, so the plot is not mostly empty."""
    total = hist.sum(axis=0)
    cdf = np.cumsum(total) / max(total.sum(), 1)
    lo = int(np.searchsorted(cdf, (1 - mass) / 2))
    hi = int(np.searchsorted(cdf, 1 - (1 - mass) / 2)) + 1
    return max(lo - 2, 0), min(hi + 2, len(edges) - 1)


def plot_histograms(stats, path, title="latent statistics"):
    """A PNG: per-channel histograms of the posterior mean and of samples, and the frame-count
    distribution. Uses matplotlib's Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = stats["summary"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, key, name in ((axes[0], "hist_mean", "posterior mean"), (axes[1], "hist_sample", "posterior sample")):
        edges, hist = stats["edges"], stats[key]
        lo, hi = _shown_range(edges, hist)
        merge = max(1, (hi - lo) // 100)  # ~100 bars across the shown range, whatever the data's spread
        hi = lo + (hi - lo) // merge * merge
        coarse = hist[:, lo:hi].reshape(hist.shape[0], -1, merge).sum(axis=2)
        width = (edges[1] - edges[0]) * merge
        centres = edges[lo:hi:merge] + width / 2
        moments = s["posterior_mean" if key == "hist_mean" else "sample"]
        for c in range(hist.shape[0]):
            density = coarse[c] / max(hist[c].sum(), 1) / width
            ax.plot(centres, density, lw=1.2,
                    label=f"ch {c}: mean {moments['mean'][c]:.2f}, std {moments['std'][c]:.2f}")
        ax.set_title(f"{name} (unscaled)")
        ax.set_xlabel("value")
        ax.legend(fontsize=7)
    counts = stats["frame_counts"]
    values, freq = np.unique(counts, return_counts=True)
    if len(values) <= 30:
        axes[2].bar(values, freq, width=0.8 if len(values) == 1 else 0.8 * np.diff(values).min(), color="tab:gray")
        axes[2].set_xticks(values if len(values) <= 8 else values[:: -(-len(values) // 8)])
    else:
        axes[2].hist(counts, bins=30, color="tab:gray")
    axes[2].set_title(f"frames per entry ({s['entries']} entries)")
    axes[2].set_xlabel("frames")
    fig.suptitle(f"{title}: scale factor for unit variance {s['scale_factor']:.5f} "
                 f"(recorded {s['recorded_scale_factor']})", fontsize=10)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=72)
    plt.close(fig)
    return path
