"""`latte`: the one command-line entry. Each subcommand lives in the package that does the work;
this file only dispatches, importing a package when its subcommand runs (MindSpore is slow to import).

    latte convert --kind latte --source Latte-XL-2-sky.pt --target latte_sky.ckpt
    latte ingest -c configs/ingest/sky.yaml --data_folder DIR --cache_folder OUT
    latte cache info OUT
    latte cache stats OUT
    latte cache preview OUT --vae_weights demo/sky_vae.safetensors
    latte train -c configs/training/sky_cache.yaml
    latte sample -c configs/inference/sky.yaml --checkpoint PATH
"""
import importlib
import os
import sys

os.environ.setdefault("GLOG_v", "3")  # before MindSpore is imported anywhere
# Without it MindSpore's main thread busy-waits on its op queue and takes a whole core of two
# (measured: ~4.3 instead of 6-7 CPU-s per Latte-S/2 training step).
os.environ.setdefault("MS_DEV_HOST_BLOCKING_RUN", "1")

from models.config import ConfigError  # noqa: E402  (light: yaml only)

# name -> (module with main(argv) -> exit code, one-line summary)
SUBCOMMANDS = {
    "convert": ("models.convert", "convert PyTorch Latte / VAE weights (.pt, .bin, .safetensors) to MindSpore"),
    "ingest": ("ingest.cli", "encode frame folders / videos with the SD VAE into a resumable latent cache"),
    "cache": ("cache_store.cli", "inspect (info, stats, preview) or check (verify) a latent cache"),
    "train": ("trainer.train", "train Latte on a latent cache or raw videos (resumable, data parallel)"),
    "sample": ("sampler.sample", "sample videos from a trained Latte: GIF, MP4 and a PNG grid of first frames"),
}
# `latte cache <sub>` commands that need more than cache_store (the VAE, or models.config's -c/--key
# parsing): dispatched here so that cache_store, a bottom layer, never imports upward.
CACHE_SUBCOMMANDS = {"stats": "ingest.cache_stats", "preview": "ingest.preview"}


def _usage():
    width = max(map(len, SUBCOMMANDS))
    lines = [f"  {name:<{width}}  {summary}" for name, (_, summary) in SUBCOMMANDS.items()]
    return "usage: latte <command> [options]   (latte <command> --help for its options)\n\ncommands:\n" + "\n".join(lines)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"latte: unknown command '{name}'; choose one of: {', '.join(SUBCOMMANDS)}", file=sys.stderr)
        return 2
    target = SUBCOMMANDS[name][0]
    if name == "cache" and rest and rest[0] in CACHE_SUBCOMMANDS:
        target, rest = CACHE_SUBCOMMANDS[rest[0]], rest[1:]
        name = f"cache {argv[1]}"
    module = importlib.import_module(target)
    try:
        return module.main(rest) or 0
    except ConfigError as err:  # a bad config key or value: one line, no traceback
        print(f"latte {name}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"latte {name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
