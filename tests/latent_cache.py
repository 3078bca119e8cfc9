"""A small synthetic latent cache for the trainer's tests (nothing in the product uses it).

Each entry is a moving sinusoidal pattern (one spatial frequency and phase per entry, drifting over
frames, shifted per channel) scaled like SD latents (|mean| up to 5, std 0.2): structured enough that
a tiny Latte visibly learns it within a few hundred steps, random enough that it cannot memorise it.
"""
import numpy as np


def make_latent_cache(folder, num_entries=10, frames=(6, 12), latent_size=8, channels=4, seed=0,
                      short_entries=0, labels=None):
    """Write a `cache_store` cache of `num_entries` entries with a random frame count in `frames`
    (plus `short_entries` of 2 frames, too short for most clips). `labels`: optional class count; each
    entry then gets `extra` label `i % labels`. Returns the opened store."""
    import cache_store

    rng = np.random.default_rng(seed)
    store = cache_store.create_or_open(folder, {"latent_shape": [channels, latent_size, latent_size],
                                                "dtype": "float32", "scale_factor": 0.18215})
    yy, xx = np.meshgrid(np.arange(latent_size), np.arange(latent_size), indexing="ij")
    with store.writer() as w:
        for i in range(num_entries + short_entries):
            n = int(rng.integers(frames[0], frames[1] + 1)) if i < num_entries else 2
            ky, kx, phase = int(rng.integers(1, 3)), int(rng.integers(0, 3)), float(rng.uniform(0, 2 * np.pi))
            f = np.arange(n)[:, None, None, None]
            c = np.arange(channels)[None, :, None, None]
            mean = 5.0 * np.sin(2 * np.pi * (ky * yy + kx * xx) / latent_size + phase + 0.3 * f + c)
            std = np.full(mean.shape, 0.2)
            meta = {"kind": "frames"}
            if labels:
                meta["label"] = i % labels
            w.write_entry(f"clip_{i:03d}", mean.astype(np.float32), std.astype(np.float32), meta)
    return store


def clip_source(cache, seed, num_frames=4):
    """The trainer's `ClipSource` over the entries of `cache` long enough for `num_frames` clips at
    stride 1, reading (mean + std * eps) * 0.18215 latents of 4 x 8 x 8 (the tests' cache)."""
    import cache_store
    from trainer.data import ClipSource, DrawOrder, Item, cache_reader

    store = cache_store.open(cache)
    items = [Item(r["id"], r["num_frames"]) for r in store.entries().to_pylist() if r["num_frames"] >= num_frames]
    return ClipSource(items, DrawOrder(len(items), seed), cache_reader(store, num_frames, 1), num_frames, 1,
                      (num_frames, 4, 8, 8), latent=("sample", 0.18215))
