"""`make demo`: the whole product end to end on a built-in synthetic Sky Timelapse, on a CPU.

    .venv/bin/python demo/run_demo.py                  # what `make demo` runs (~4 min on 2 cores)
    .venv/bin/python demo/run_demo.py --quick          # a smaller run (the test's, ~2 min)
    .venv/bin/python demo/run_demo.py --out DIR --seed 1

1. writes a synthetic Sky-Timelapse-like dataset (drifting procedural clouds over sky gradients that
   brighten or darken over time, ingest/synthetic.py) in the real nested layout;
2. `latte ingest` encodes every frame with the shipped sky autoencoder (demo/sky_vae.safetensors,
   trained by demo/train_vae.py) into a latent cache;
3. `latte train` trains a tiny Latte (demo/train.yaml) on the cache: checkpoints, log, loss curve;
4. `latte sample` writes GIF/MP4 videos and a PNG grid from the trained checkpoint;
5. `latte cache stats` and `latte cache preview` look inside the cache: latent statistics, and a few
   entries decoded back through the autoencoder with their reconstruction PSNR against the frames;
then compares simple statistics of the samples with the data's (and with noise's) and prints where
every output is. Each step is the real command, run as a subprocess and printed as you would type it.
"""
import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
MARKER = ".latte_demo"  # only a folder holding this is ever cleared by a rerun

# Full demo (`make demo`) and the reduced one the test runs.
SETTINGS = {
    "full": dict(videos=16, clips_per_video=3, frames_per_clip=32, train_steps=2000, num_samples=8,
                 sampling_steps=50),
    "quick": dict(videos=8, clips_per_video=2, frames_per_clip=24, train_steps=800, num_samples=8,
                  sampling_steps=50),
}
SOURCE_SIZE = (64, 96)  # (H, W) of the synthetic frames; ingest centre-crops them to 64 x 64


def latte(*args, capture=False):
    """Run `latte <args>` in a subprocess (the repo's latte_cli.py with this Python); print the command."""
    shown = " ".join(str(a) for a in args)
    print(f"\n$ latte {shown}", flush=True)
    cmd = [sys.executable, str(ROOT / "latte_cli.py"), *map(str, args)]
    env = {**os.environ, "GLOG_v": os.environ.get("GLOG_v", "3")}
    result = subprocess.run(cmd, cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE if capture else None)
    if capture and result.stdout:
        print(result.stdout, end="", flush=True)
    if result.returncode:
        raise SystemExit(f"demo: `latte {args[0]}` failed (exit {result.returncode}); see its message above")
    return result.stdout if capture else ""


# ------------------------------------------------------------------------------------------------
# statistics that say "sky" (also used by tests/test_demo.py)
# ------------------------------------------------------------------------------------------------

def video_stats(videos):
    """Simple statistics of uint8 videos (N, F, H, W, 3), in [0, 1] units: the per-channel colour
    means; the vertical brightness gradient (least-squares slope of the mean brightness of each row
    against height, over the upper three quarters, the sky: positive when it brightens towards the
    horizon; in brightness per frame height); and the mean absolute frame-to-frame change."""
    x = np.asarray(videos, np.float32) / 255.0
    rows = x.mean(axis=(0, 1, 3, 4))  # mean brightness of each row, top to bottom
    sky = rows[: 3 * len(rows) // 4]
    height = np.arange(len(sky)) / len(rows)
    return {
        "colour_means": x.mean(axis=(0, 1, 2, 3)),
        "vertical_gradient": np.array([np.polyfit(height, sky, 1)[0]]),
        "frame_change": np.array([np.abs(np.diff(x, axis=1)).mean()]),
    }


def stats_distance(a, b):
    """Per statistic, the largest absolute difference between two `video_stats`."""
    return {k: float(np.abs(a[k] - b[k]).max()) for k in a}


def data_clips(data_folder, num_frames, stride, image_size=64, limit=64):
    """uint8 clips (N, F, S, S, 3) of the dataset's JPEG frames through ingest's crop and resize, taken
    like the trainer takes them (num_frames frames, every stride-th)."""
    from PIL import Image

    from ingest.transforms import transform_frames

    clips = []
    for folder in sorted(p for p in Path(data_folder).rglob("*") if p.is_dir() and any(p.glob("*.jpg"))):
        frames = sorted(folder.glob("*.jpg"), key=lambda p: int(p.stem.rsplit("_", 1)[1]))
        span = (num_frames - 1) * stride + 1
        for start in range(0, len(frames) - span + 1, span):
            pick = frames[start:start + span:stride]
            raw = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in pick])
            x = transform_frames(raw, image_size)  # [-1, 1], (F, 3, S, S)
            clips.append(np.clip((x * 0.5 + 0.5) * 255 + 0.5, 0, 255).astype(np.uint8).transpose(0, 2, 3, 1))
    return np.stack(clips[:limit])


def read_gifs(folder):
    """uint8 videos (N, F, H, W, 3) of the sample_*.gif files in a folder."""
    from PIL import Image, ImageSequence

    videos = []
    for path in sorted(Path(folder).glob("sample_*.gif")):
        videos.append(np.stack([np.asarray(f.convert("RGB")) for f in ImageSequence.Iterator(Image.open(path))]))
    return np.stack(videos)


def compare(data, samples, seed=0):
    """(table text, distances of the samples, distances of uniform noise) to the data's statistics."""
    noise = np.random.default_rng(seed).integers(0, 256, samples.shape, dtype=np.uint8)
    ref, got, rnd = video_stats(data), video_stats(samples), video_stats(noise)
    fmt = lambda v: " ".join(f"{x:6.3f}" for x in v)  # noqa: E731
    lines = [f"  {'':14} {'colour means (RGB)':>20}   {'vertical gradient':>17}   {'frame change':>12}"]
    for name, s in (("data", ref), ("samples", got), ("uniform noise", rnd)):
        lines.append(f"  {name:14} {fmt(s['colour_means']):>20}   {fmt(s['vertical_gradient']):>17}   "
                     f"{fmt(s['frame_change']):>12}")
    return "\n".join(lines), stats_distance(got, ref), stats_distance(rnd, ref)


# ------------------------------------------------------------------------------------------------
# the run
# ------------------------------------------------------------------------------------------------

def prepare_out(out):
    if out.exists() and any(out.iterdir()) and not (out / MARKER).exists():
        raise SystemExit(f"demo: {out} exists and is not a demo folder; pass another --out")
    for name in ("data", "cache", "train", "samples", "preview"):
        shutil.rmtree(out / name, ignore_errors=True)  # a rerun starts afresh (train refuses old checkpoints)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("written by demo/run_demo.py; rerunning the demo clears this folder\n")


def run(out, quick=False, seed=0, vae=None, cpu_threads=1):
    """The four steps; returns a dict of where everything is (and the statistics)."""
    from ingest.synthetic import make_sky_dataset

    s = SETTINGS["quick" if quick else "full"]
    out = Path(out).resolve()
    vae = Path(vae or ROOT / "demo" / "sky_vae.safetensors").resolve()
    prepare_out(out)
    start = time.time()

    data = out / "data" / "sky_train"
    print(f"[1/5] synthetic Sky Timelapse: {s['videos']} videos x {s['clips_per_video']} clips x "
          f"{s['frames_per_clip']} frames of {SOURCE_SIZE[1]}x{SOURCE_SIZE[0]} px -> {data}", flush=True)
    entries = make_sky_dataset(data, num_videos=s["videos"], clips_per_video=s["clips_per_video"],
                               frames_per_clip=s["frames_per_clip"], size=SOURCE_SIZE, layout="nested", seed=seed)
    example = sorted(entries)[0]
    print(f"      {len(entries)} clip folders, {sum(entries.values())} JPEG frames, e.g. {example}/", flush=True)

    cache = out / "cache"
    print("[2/5] ingest: every frame through the sky autoencoder into a latent cache", flush=True)
    latte("ingest", "-c", ROOT / "demo" / "ingest.yaml", "--data_folder", data, "--cache_folder", cache,
          "--vae_weights", vae, "--cpu_threads", cpu_threads)

    train = out / "train"
    print("\n[3/5] train a tiny Latte on the cache", flush=True)
    latte("train", "-c", ROOT / "demo" / "train.yaml", "--cache_folder", cache, "--output_folder", train,
          "--train_steps", s["train_steps"], "--ckpt_every", s["train_steps"] // 2, "--seed", seed,
          "--cpu_threads", cpu_threads)

    print("\n[4/5] sample videos from the trained checkpoint", flush=True)
    text = latte("sample", "-c", ROOT / "configs" / "inference" / "tiny.yaml", "--checkpoint", train, "--vae", vae,
                 "--output_folder", out / "samples", "--num_samples", s["num_samples"],
                 "--sampling_steps", s["sampling_steps"], "--seed", seed, "--cpu_threads", cpu_threads, capture=True)
    samples = Path([line for line in text.splitlines() if line.startswith("samples: ")][-1][len("samples: "):])

    print("\n[5/5] look inside the cache: latent statistics, and entries decoded back next to their frames",
          flush=True)
    latte("cache", "stats", cache, "--progress", "false")
    preview = out / "preview"
    text = latte("cache", "preview", cache, "--vae_weights", vae, "--num", 4, "--max_frames", 16,
                 "--output_folder", preview, "--seed", seed, "--cpu_threads", cpu_threads, capture=True)
    psnr = float([line for line in text.splitlines() if line.startswith("overall reconstruction PSNR: ")][-1]
                 .split(": ")[1].split(" dB")[0])

    import yaml
    train_cfg = yaml.safe_load((ROOT / "demo" / "train.yaml").read_text())
    table, got, rnd = compare(data_clips(data, train_cfg["num_frames"], train_cfg["sample_stride"]),
                              read_gifs(samples), seed)
    checkpoints = sorted((train / "checkpoints").glob("step_*.safetensors"))
    result = {"seconds": time.time() - start, "dataset": data, "cache": cache, "manifest": cache / "manifest",
              "checkpoint": checkpoints[-1], "loss_png": train / "loss.png", "log": train / "log.jsonl",
              "samples": samples, "preview": preview, "preview_psnr": psnr, "stats_png": cache / "stats.png",
              "distance_samples": got, "distance_noise": rnd, "table": table}
    return result


def report(r):
    minutes, seconds = divmod(int(r["seconds"]), 60)
    files = sorted(p.name for p in r["samples"].iterdir())
    gifs = [f for f in files if f.endswith(".gif")]
    mp4s = [f for f in files if f.endswith(".mp4")]
    print(f"\nHow the samples compare with the training clips (and with uniform noise):\n{r['table']}")
    print(f"\nDemo finished in {minutes}m{seconds:02d}s. Outputs:")
    rows = [("dataset", r["dataset"], "synthetic Sky Timelapse, nested <video>/<video>_<k>/<video>_frames_<n>.jpg"),
            ("latent cache", r["cache"], "inspect: latte cache info " + str(r["cache"])),
            ("manifest", r["manifest"], "one Parquet row per clip: status, frames, timings"),
            ("checkpoint", r["checkpoint"], "model + EMA + optimizer; resume with --resume auto"),
            ("loss curve", r["loss_png"], "training loss per step"),
            ("train log", r["log"], "one JSON line per logged step"),
            ("samples", r["samples"], f"{len(gifs)} GIF, {len(mp4s)} MP4, grid.png of first frames, config.yaml"),
            ("cache stats", r["stats_png"], "latent histograms per channel; scale factor in the cache's attributes"),
            ("cache preview", r["preview"], f"cached latents decoded back: reconstruction PSNR "
                                            f"{r['preview_psnr']:.2f} dB; *_source_vs_decoded.gif, grid.png")]
    for name, path, what in rows:
        print(f"  {name:13} {path}\n  {'':13} ({what})")
    print(f"\nSample again: latte sample -c configs/inference/tiny.yaml --checkpoint {r['checkpoint']} "
          f"--vae demo/sky_vae.safetensors --num_samples 8 --seed 1")


def main(argv=None):
    parser = argparse.ArgumentParser(description="Run the Latte demo end to end on synthetic sky videos.")
    parser.add_argument("--out", default=str(ROOT / "outputs" / "demo"), help="output folder (cleared on rerun)")
    parser.add_argument("--quick", action="store_true", help="a smaller dataset and shorter training")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vae", default=None, help="autoencoder weights (default: demo/sky_vae.safetensors)")
    parser.add_argument("--cpu_threads", type=int, default=1, help="MindSpore CPU threads of each step")
    args = parser.parse_args(argv)
    report(run(args.out, args.quick, args.seed, args.vae, args.cpu_threads))
    return 0


if __name__ == "__main__":
    sys.exit(main())
