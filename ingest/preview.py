"""`latte cache preview CACHE`: decode cached latents back to video with the VAE that made them.

    latte cache preview outputs/demo/cache --vae_weights demo/sky_vae.safetensors --num 4
    latte cache preview CACHE --vae_weights vae.ckpt --entries clip_a,clip_b --output_folder preview

For each chosen entry (`--entries ID,ID,...`, or `--num N` spread evenly over the ok entries, in a seeded
order) its posterior mean (or a posterior sample, `--latent sample`) goes through the VAE decoder in
micro-batches and is written as `<name>.gif`, `<name>.mp4`, plus `grid.png` (a row per entry, with its
source frames in the row above where they are found; columns: frames spread over the clip). Where the entry's source frames are still at the path the manifest
recorded, they are read through the ingest's own crop and resize, the reconstruction PSNR (dB, on
[0, 1] pixels) is printed per entry and overall, and `<name>_source_vs_decoded.gif` shows them side
by side. A VAE whose sha256 differs from the store's `vae_sha256` is refused: other weights would
decode someone else's latent space into plausible-looking garbage.

Lives in ingest/ because it needs both the store and the VAE; the writers are models.video_io.
"""
import json
import math
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import List

import numpy as np

from ingest.cache_stats import with_positional
from models.config import ConfigError, parse_config


@dataclass
class PreviewConfig:
    cache_folder: str = field(default="", metadata={"help": "the latent cache (also the first positional argument)"})
    vae_weights: str = field(default="", metadata={
        "help": "the VAE the cache was made with (its sha256 must equal the store's vae_sha256)"})
    entries: List[str] = field(default_factory=list, metadata={"help": "entry ids to decode (default: --num of them)"})
    num: int = field(default=4, metadata={"help": "entries to decode when --entries is not given, spread over the store"})
    seed: int = field(default=0, metadata={"help": "seed of the entry choice and of --latent sample's noise"})
    max_frames: int = field(default=16, metadata={
        "help": "first frames of each entry decoded (0: all; a decoded clip is held in memory for its GIF)"})
    latent: str = field(default="mean", metadata={
        "choices": ("mean", "sample"), "help": "decode the posterior mean, or a sample mean + std * eps"})
    micro_batch: int = field(default=8, metadata={"help": "frames per VAE decoder call (bounds memory)"})
    output_folder: str = field(default="cache_preview", metadata={"help": "where the GIF/MP4/PNG files go"})
    grid_frames: int = field(default=8, metadata={"help": "frames per entry in grid.png"})
    compare_source: bool = field(default=True, metadata={
        "help": "PSNR and a source | decoded GIF where the source frames are still at the recorded path"})
    fps: int = 8
    save_gif: bool = True
    save_mp4: bool = field(default=True, metadata={"help": "needs PyAV; skipped with a note without it"})
    progress: bool = field(default=True, metadata={"help": "tqdm bar over decoded frames"})
    device_target: str = field(default="CPU", metadata={"choices": ("CPU", "GPU", "Ascend")})
    mode: str = field(default="pynative", metadata={"choices": ("graph", "pynative")})
    cpu_threads: int = field(default=1, metadata={"help": "MindSpore CPU threads (0: MindSpore's choice)"})

    def validate(self):
        if not self.cache_folder:
            raise ConfigError("no cache given: pass `latte cache preview CACHE --vae_weights VAE`")
        if not self.vae_weights:
            raise ConfigError("'vae_weights' is not set: pass --vae_weights with the VAE the cache was made with "
                              "(`latte cache info CACHE` shows its vae_sha256)")
        for key in ("num", "micro_batch", "fps", "grid_frames"):
            if getattr(self, key) < 1:
                raise ConfigError(f"'{key}' must be >= 1, got {getattr(self, key)}")
        if self.max_frames < 0 or self.cpu_threads < 0:
            raise ConfigError("'max_frames' and 'cpu_threads' must be >= 0")


def choose_entries(rows, wanted, num, seed):
    """The ok rows to decode: `wanted` ids in that order (an unknown or not-ok id is an error), else
    `num` rows evenly spaced over a seeded permutation's sorted pick (the same seed, the same rows)."""
    ok = {r["id"]: r for r in rows if r["status"] == "ok"}
    if wanted:
        for entry_id in wanted:
            if entry_id not in ok:
                known = next((r for r in rows if r["id"] == entry_id), None)
                why = f"is {known['status']} ({known['reason']})" if known else "is not in the cache"
                raise ValueError(f"entry {entry_id!r} {why}; see `latte cache info` for the ok ids")
        return [ok[i] for i in wanted]
    if not ok:
        raise ValueError("the cache has no ok entries to preview; ingest some first")
    ids = sorted(ok)
    num = min(num, len(ids))
    # evenly spaced positions, shifted by a seeded offset, so N previews cover the whole store
    offset = np.random.default_rng(seed).random()
    picks = sorted({int((k + offset) * len(ids) / num) % len(ids) for k in range(num)})
    return [ok[ids[p]] for p in picks]


def safe_name(entry_id):
    return re.sub(r"[^A-Za-z0-9._-]+", "_", entry_id).strip("._") or "root"


def psnr(mse):
    return float("inf") if mse <= 0 else 10.0 * math.log10(1.0 / mse)


def source_entry(row, frame_stride):
    """An ingest Entry for the row's recorded source if it is still there (else None, and why)."""
    from ingest.sources import IMAGE_EXTS, Entry, sort_frame_files

    path = row["source"]
    if not path or not os.path.exists(path):
        return None, f"source {path!r} is not at the recorded path"
    if row["kind"] == "video":
        return Entry(row["id"], path, "video"), ""
    names = sort_frame_files([n for n in os.listdir(path) if os.path.splitext(n)[1].lower() in IMAGE_EXTS
                              and not n.startswith(".")])
    if len(range(0, len(names), frame_stride)) < row["num_frames"]:
        return None, f"source {path!r} now has fewer frames than were cached"
    return Entry(row["id"], path, "frames", tuple(os.path.join(path, n) for n in names)), ""


def check_vae(store, path):
    """The VAE config of the store, after checking `path` is the VAE it was made with (one line if not)."""
    from ingest.vae_setup import sha256_file

    if not os.path.isfile(path):
        raise ValueError(f"vae_weights {path} not found: check the path")
    recorded = store.settings.get("vae_sha256", "")
    got = sha256_file(path)
    if got != recorded:
        raise ValueError(f"vae_weights {path} has sha256 {got[:16]}... but {store.path} was made with "
                         f"{recorded[:16] or '<unrecorded>'}...: pass the VAE the cache was ingested with")
    return store.settings.get("vae_config") or {}


def preview(cfg):
    """Decode the chosen entries; returns {"folder", "entries": [{id, files, psnr}], "psnr"}."""
    import cache_store
    from tqdm import tqdm

    from models.video_io import mp4_available, side_by_side, to_uint8, write_gif, write_grid, write_mp4

    store = cache_store.open(cfg.cache_folder)
    rows = choose_entries(list(store.rows().values()), cfg.entries, cfg.num, cfg.seed)
    vae_config = check_vae(store, cfg.vae_weights)

    from mindspore import Tensor

    from models import AutoencoderKL, load_weights
    from models.runtime import setup_device

    setup_device(cfg.device_target, cfg.mode, cfg.cpu_threads, seed=cfg.seed)
    vae = AutoencoderKL(**vae_config)
    load_weights(vae, cfg.vae_weights)
    vae.set_train(False)

    out = Path(cfg.output_folder)
    out.mkdir(parents=True, exist_ok=True)
    save_mp4 = cfg.save_mp4 and mp4_available()
    if cfg.save_mp4 and not save_mp4:
        print("note: MP4 skipped: PyAV is not installed (pip install av)", file=sys.stderr)
    lengths = [min(r["num_frames"], cfg.max_frames or r["num_frames"]) for r in rows]
    bar = tqdm(total=sum(lengths), desc="decode", unit="frame", disable=not cfg.progress, dynamic_ncols=True)
    stride = int(store.settings.get("frame_stride", 1))
    image_size = int(store.settings.get("image_size", 8 * store.latent_shape[1]))
    results, grid, total_se, total_n = [], [], 0.0, 0
    for k, (row, n) in enumerate(zip(rows, lengths)):
        mean, std = store.read_clip(row["id"], 0, n)
        if cfg.latent == "sample":
            mean = mean + std * np.random.default_rng([cfg.seed, k]).standard_normal(mean.shape, dtype=np.float32)
        frames = []
        for start in range(0, n, cfg.micro_batch):
            frames.append(vae.decode(Tensor(np.ascontiguousarray(mean[start:start + cfg.micro_batch]))).asnumpy())
            bar.update(len(frames[-1]))
        decoded = np.concatenate(frames)  # float (n, 3, H, W), nominally [-1, 1]
        video = to_uint8(decoded)
        name = safe_name(row["id"])
        files = []
        if cfg.save_gif:
            files.append(out / f"{name}.gif")
            write_gif(files[-1], video, cfg.fps)
        if save_mp4:
            files.append(out / f"{name}.mp4")
            write_mp4(files[-1], video, cfg.fps)
        cols = np.unique(np.linspace(0, n - 1, min(cfg.grid_frames, n)).round().astype(int))
        grid.append((video, cols))
        result = {"id": row["id"], "frames": n, "files": [str(f) for f in files], "psnr": None, "note": ""}
        if cfg.compare_source:
            entry, why = source_entry(row, stride)
            if entry is None:
                result["note"] = why
            else:
                from ingest.readers import read_frames
                from ingest.sources import EntryError

                try:
                    src = read_frames(entry, [i * stride for i in range(n)], image_size)
                except EntryError as err:
                    result["note"] = f"source cannot be read: {err}"
                else:
                    diff = np.clip(decoded * 0.5 + 0.5, 0, 1) - np.clip(src * 0.5 + 0.5, 0, 1)
                    se = float(np.square(diff, dtype=np.float64).sum())
                    total_se, total_n = total_se + se, total_n + diff.size
                    result["psnr"] = psnr(se / diff.size)
                    files.append(out / f"{name}_source_vs_decoded.gif")
                    write_gif(files[-1], side_by_side(to_uint8(src), video), cfg.fps)
                    grid.insert(len(grid) - 1, (to_uint8(src), cols))  # the source row above the decoded one
                    result["files"] = [str(f) for f in files]
        results.append(result)
    bar.close()
    width = max(len(cols) for _, cols in grid)
    cells = []
    for video, cols in grid:
        picked = list(video[cols]) + [np.full_like(video[0], 255)] * (width - len(cols))
        cells.extend(picked)
    write_grid(out / "grid.png", np.stack(cells), columns=width)
    overall = psnr(total_se / total_n) if total_n else None
    summary = {"cache": str(store.path), "latent": cfg.latent, "entries": results, "psnr": overall,
               "grid": str(out / "grid.png")}
    (out / "preview.json").write_text(json.dumps(summary, indent=2))
    summary["folder"] = str(out)
    return summary


def main(argv=None):
    cfg = parse_config(PreviewConfig, with_positional(sys.argv[1:] if argv is None else argv),
                       prog="latte cache preview",
                       description="Decode cached latents back to video (GIF/MP4/PNG grid) and measure the "
                                   "reconstruction PSNR against the source frames.")
    try:
        summary = preview(cfg)
    except (ValueError, OSError) as err:
        print(f"latte cache preview: error: {str(err).strip().splitlines()[0]}", file=sys.stderr)
        return 2
    for r in summary["entries"]:
        score = f"PSNR {r['psnr']:.2f} dB" if r["psnr"] is not None else f"no PSNR ({r['note']})"
        print(f"{r['id']}: {r['frames']} frames decoded, {score}")
    if summary["psnr"] is not None:
        scored = sum(r["psnr"] is not None for r in summary["entries"])
        print(f"overall reconstruction PSNR: {summary['psnr']:.2f} dB over {scored} entries")
    print(f"preview: {summary['folder']} (grid.png, per-entry GIF/MP4, preview.json)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
