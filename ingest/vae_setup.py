"""The ingest VAE: described (config, weights id) cheaply, then built once per process.

`describe_vae` reads only the weights file's metadata and hash, so a bad file is a one-line error
before anything is built; `build_vae` then loads it strictly and keeps it for in-process callers.
"""
import hashlib
import json
import os

import numpy as np

TORCH_SUFFIXES = (".bin", ".pt", ".pth")
VAE_KEYS = ("in_channels", "out_channels", "block_out_channels", "layers_per_block", "latent_channels",
            "norm_num_groups")


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
    if path.endswith(TORCH_SUFFIXES):
        raise ValueError(f"vae_weights {path} is a PyTorch file: convert it first with `latte convert --kind vae "
                         f"--source {path} --target sd-vae-ft-mse.ckpt` and pass the .ckpt")
    if not os.path.isfile(path):
        raise ValueError(f"vae_weights {path} not found: pass the converted sd-vae-ft-mse (.ckpt / .safetensors)")
    from models.convert import read_metadata
    meta = read_metadata(path)
    if meta.get("kind", "vae") != "vae":
        raise ValueError(f"vae_weights {path} holds {meta['kind']} weights, not a VAE: pass the converted "
                         f"sd-vae-ft-mse (`latte convert --kind vae`)")
    config = {k: v for k, v in (meta.get("config") or from_keys).items() if k in VAE_KEYS}
    return config, sha256_file(path)


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
    import mindspore as ms

    from models.convert import load_weights
    from models.runtime import device_target
    from models.vae import AutoencoderKL

    key = (weights_id, json.dumps(config, sort_keys=True), cfg.vae_dtype, device_target())
    if key not in _VAE_CACHE:
        dtype = {"fp32": ms.float32, "fp16": ms.float16, "bf16": ms.bfloat16}[cfg.vae_dtype]
        vae = AutoencoderKL(**config, dtype=dtype)
        if cfg.vae_weights:
            load_weights(vae, cfg.vae_weights)
        else:
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
