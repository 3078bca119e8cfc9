"""Networks and their weights: Latte (models.latte), the SD VAE (models.vae), the diffusion
(models.diffusion), weight conversion and strict loading (models.convert), checkpoint files
(models.checkpoint_io), config parsing (models.config) and device setup (models.runtime).

The names below are imported on first use, not here: `latte_cli` imports `models.config` (yaml
only) for every command, and importing MindSpore up front would slow `latte --help` by seconds.
"""
import importlib

_EXPORTS = {
    "load_weights": "models.convert",
    "save_weights": "models.convert",
    "read_metadata": "models.convert",
    "infer_latte_config": "models.convert",
    "infer_vae_config": "models.convert",
    "Latte": "models.latte",
    "LATTE_MODELS": "models.latte",
    "AutoencoderKL": "models.vae",
}
__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'models' has no attribute {name!r}")
