"""The ingest VAE: described (config, weights id) cheaply, then built once per process.

`describe_vae` reads only the weights file's metadata and hash, so a bad file is a one-line error
before anything is built; `build_vae` then loads it strictly and keeps it for in-process callers.
"""
import hashlib
import json

import numpy as np


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
