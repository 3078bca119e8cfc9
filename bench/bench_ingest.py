"""Benchmark of `latte ingest` on synthetic Sky Timelapse data (640x360 JPEG frames / mp4, like the
real set), all figures from one run:

(a) VAE-only encode frames/s: frames decoded and transformed beforehand, only `vae.encode` timed;
(b) `latte ingest` end to end on the same frames (discover, decode, crop+resize, VAE, write, commit)
    and the ratio b/a (target >= 0.9: the reader thread hides decoding and resizing behind the VAE);
(c) peak RSS of ingesting a 2,000-frame video vs a 200-frame one, each in a fresh subprocess
    (VmHWM; target ratio <= 1.2: memory does not grow with video length);
(d) 16- and 128-frame clip reads per second from the store with one reader, against the same reads
    from one .npy file per frame (MindONE's numpy cache layout); target: faster than that layout;
(e) the same clip reads from a MindRecord store, with its per-record crc32c checked (as every read
    does) and unchecked, alternating in one run: what detecting corruption costs.

    python bench/bench_ingest.py                       # (a)/(b) with sd-vae-ft-mse's shape at 256 px
    python bench/bench_ingest.py --vae small --frames 64   # a small VAE: reading is a larger share
    python bench/bench_ingest.py --skip abc            # only (d) and (e)

The VAE weights are random (`allow_random_vae`): speed does not depend on their values. On a CPU the
sd-vae-ft-mse encoder takes seconds per 256 px frame, so (a)/(b) use a few dozen frames by default.
"""
import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("GLOG_v", "3")

VAES = {  # name -> (block_out_channels, layers_per_block, norm_num_groups)
    "sd": ([128, 256, 512, 512], 2, 32),     # sd-vae-ft-mse
    "small": ([16, 32, 32, 32], 1, 8),       # the demo's tiny VAE shape
    "rss": ([8, 16, 16, 16], 1, 4),          # for (c): memory, not speed, is measured
}


def ingest_config(data, cache, vae, image_size=256, micro_batch=8, **more):
    from ingest.config import IngestConfig

    channels, layers, groups = VAES[vae]
    return IngestConfig(data_folder=str(data), cache_folder=str(cache), vae_weights=None, allow_random_vae=True,
                        vae_block_out_channels=channels, vae_layers_per_block=layers, vae_norm_num_groups=groups,
                        image_size=image_size, micro_batch=micro_batch, progress=False, **more)


# ----------------------------------------------------------------------------------------------
# (a) and (b)
# ----------------------------------------------------------------------------------------------

def bench_throughput(work, vae_name, frames, micro_batch, image_size, repeat=1):
    from ingest import pipeline
    from ingest.readers import read_frames
    from ingest.sources import discover_entries
    from ingest.synthetic import make_sky_dataset

    data = work / f"frames_{vae_name}"
    clips = max(1, frames // 16)
    make_sky_dataset(data, num_videos=clips, clips_per_video=1, frames_per_clip=16, size=(360, 640), seed=7)
    total = clips * 16

    cfg = ingest_config(data, work / f"cache_{vae_name}", vae_name, image_size, micro_batch)
    vae = pipeline.build_vae(cfg, *pipeline.describe_vae(cfg))
    pipeline.warm_up(vae, micro_batch, image_size)  # compile once, outside both timings

    # (a): the frames the pipeline would feed, in memory, then the VAE alone
    batches = []
    for entry in discover_entries(data):
        x = read_frames(entry, range(entry.num_files), image_size)
        for i in range(0, len(x), micro_batch):
            b = x[i:i + micro_batch]
            if len(b) < micro_batch:  # padded like the pipeline's last batch of an entry
                b = np.concatenate([b, np.repeat(b[-1:], micro_batch - len(b), 0)])
            batches.append(b)
    # (b): the whole `latte ingest` on the same files, VAE already compiled. (a) and (b) alternate and
    # the best of `repeat` is kept: on a shared machine, other processes only ever slow a pass down.
    vae_fps, e2e_fps = [], []
    for k in range(repeat):
        t = time.perf_counter()
        for b in batches:
            pipeline.encode(vae, b)
        vae_fps.append(total / (time.perf_counter() - t))
        cfg.cache_folder = str(work / f"cache_{vae_name}_{k}")
        t = time.perf_counter()
        result = pipeline.run_ingest(cfg, environ={})
        e2e_fps.append(total / (time.perf_counter() - t))
        assert result.saved == clips and result.frames == total, result
    return {"vae": vae_name, "frames": total, "image_size": image_size, "micro_batch": micro_batch,
            "vae_only_fps": max(vae_fps), "ingest_fps": max(e2e_fps), "ratio": max(e2e_fps) / max(vae_fps),
            "passes": {"vae_only": vae_fps, "ingest": e2e_fps}}


# ----------------------------------------------------------------------------------------------
# (c) peak memory vs video length
# ----------------------------------------------------------------------------------------------

def write_long_mp4(path, frames, size=(360, 640), chunk=50):
    """An H.264 mp4 of `frames` synthetic sky frames, rendered a chunk at a time (bounded memory)."""
    import av

    from ingest.synthetic import render_sky_video

    rng = np.random.default_rng(frames)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = size[1], size[0], "yuv420p"
        for start in range(0, frames, chunk):
            for frame in render_sky_video(rng, min(chunk, frames - start), size):
                container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


def peak_rss_mib():
    """This process's peak resident set (VmHWM). Not ru_maxrss: Linux carries that across fork and
    exec, so a child started by a parent that was at 7 GB reports 7 GB whatever it used itself."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def rss_child(data, cache):
    """Run in a fresh process: ingest `data` and print the peak RSS in MiB."""
    from models.runtime import setup_device

    setup_device("CPU", "graph", cpu_threads=1)
    from ingest import pipeline

    t = time.perf_counter()
    result = pipeline.run_ingest(ingest_config(data, cache, "rss", 256, 8), environ={})
    seconds = time.perf_counter() - t
    peak = peak_rss_mib()
    print(json.dumps({"frames": result.frames, "peak_rss_mib": peak, "seconds": seconds}))


def bench_rss(work, lengths=(200, 2000)):
    out = {}
    for n in lengths:
        data = work / f"video_{n}"
        data.mkdir()
        write_long_mp4(data / f"sky_{n}.mp4", n)
        proc = subprocess.run([sys.executable, __file__, "--rss_child", str(data), str(work / f"cache_video_{n}")],
                              capture_output=True, text=True, cwd=work)
        if proc.returncode:
            raise RuntimeError(f"rss child failed: {proc.stderr[-2000:]}")
        out[n] = json.loads(proc.stdout.strip().splitlines()[-1])
        assert out[n]["frames"] == n, out[n]
    return out


# ----------------------------------------------------------------------------------------------
# (d) clip reads: the store vs one .npy per frame
# ----------------------------------------------------------------------------------------------

def bench_reads(work, entries=24, frames=320, latent=(4, 32, 32), seconds=3.0):
    import cache_store

    rng = np.random.default_rng(0)
    store = cache_store.create_or_open(work / "read_cache", {"latent_shape": list(latent), "dtype": "float16"})
    npy = work / "npy_cache"
    with store.writer() as w:
        for e in range(entries):
            block = rng.standard_normal((frames, 2, *latent)).astype(np.float16)
            w.write_entry(f"video_{e}", block[:, 0], block[:, 1])
            folder = npy / f"video_{e}"
            folder.mkdir(parents=True)
            for f in range(frames):  # MindONE: <cache>/<video>/video_latent-<frame>.npy, one file per frame
                np.save(folder / f"video_latent-{f:05d}.npy", block[f])
    store = cache_store.open(work / "read_cache")

    def from_npy(e, start, n):
        block = np.stack([np.load(npy / f"video_{e}" / f"video_latent-{f:05d}.npy") for f in range(start, start + n)])
        return block[:, 0].astype(np.float32), block[:, 1].astype(np.float32)

    def from_store(e, start, n):
        return store.read_clip(f"video_{e}", start, n)

    e0 = 3
    np.testing.assert_array_equal(from_npy(e0, 5, 16)[0], from_store(e0, 5, 16)[0])
    out = {}
    for n in (16, 128):
        for name, read in (("store", from_store), ("npy_per_frame", from_npy)):
            pick = np.random.default_rng(n)
            count, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < seconds:
                read(int(pick.integers(entries)), int(pick.integers(frames - n)), n)
                count += 1
            out[f"{name}_{n}"] = count / (time.perf_counter() - t0)
    return out


def bench_mindrecord_reads(work, entries=24, frames=320, latent=(4, 32, 32), seconds=2.0, rounds=5):
    """(e): MindRecord clip reads with the per-record crc32c checked and not (its column not even
    read: what reads cost before records had one), in alternating rounds so that both see the same
    machine load; the best round of each is reported."""
    import cache_store

    rng = np.random.default_rng(0)
    store = cache_store.create_or_open(work / "read_cache_mr", {"latent_shape": list(latent), "dtype": "float16"},
                                       format="mindrecord")
    with store.writer() as w:
        for e in range(entries):
            block = rng.standard_normal((frames, 2, *latent)).astype(np.float16)
            w.write_entry(f"video_{e}", block[:, 0], block[:, 1])
    store = cache_store.open(work / "read_cache_mr")
    out = {"rounds": rounds}
    for n in (16, 128):
        for _ in range(rounds):
            for name, check in (("checked", True), ("unchecked", False)):
                store._reader.check_crc = check
                pick = np.random.default_rng(n)
                count, t0 = 0, time.perf_counter()
                while time.perf_counter() - t0 < seconds:
                    store.read_clip(f"video_{int(pick.integers(entries))}", int(pick.integers(frames - n)), n)
                    count += 1
                key = f"{name}_{n}"
                out[key] = max(out.get(key, 0.0), count / (time.perf_counter() - t0))
    store._reader.check_crc = True
    # The check alone, without the dataset pipeline around it: a steadier figure on a busy machine.
    from cache_store.mindrecord_backend import segment_crc

    seg = store.layout["segment_frames"]
    record = rng.standard_normal((seg, *latent)).astype(np.float16).tobytes()
    count, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        segment_crc("video_0", 0, 0, seg, record, record)
        count += 1
    out["crc_gbps"] = count * 2 * len(record) / (time.perf_counter() - t0) / 1e9
    out["segment_bytes"] = 2 * len(record)
    return out


# ----------------------------------------------------------------------------------------------

def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vae", choices=("sd", "small"), default="sd", help="VAE shape for (a)/(b)")
    p.add_argument("--frames", type=int, default=32, help="frames for (a)/(b) (16-frame clips)")
    p.add_argument("--micro_batch", type=int, default=8)
    p.add_argument("--image_size", type=int, default=256)
    p.add_argument("--repeat", type=int, default=1, help="(a)/(b) passes, alternating; the best is reported")
    p.add_argument("--skip", default="", help="letters of sections to skip, e.g. 'ab' or 'c'")
    p.add_argument("--keep", default="", help="keep the work folder here (default: a deleted temp folder)")
    p.add_argument("--rss_child", nargs=2, metavar=("DATA", "CACHE"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.rss_child:
        return rss_child(*args.rss_child)

    from models.runtime import setup_device

    setup_device("CPU", "graph", cpu_threads=1)  # one MindSpore thread; the reader thread gets the other core
    work = Path(args.keep or tempfile.mkdtemp(prefix="bench_ingest_"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"# bench_ingest: CPU, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}; work folder {work}")
    try:
        if "a" not in args.skip and "b" not in args.skip:
            r = bench_throughput(work, args.vae, args.frames, args.micro_batch, args.image_size, args.repeat)
            shape = VAES[r["vae"]][0]
            print(f"(a) VAE-only encode ({r['vae']} VAE {shape}, {r['image_size']} px, micro_batch {r['micro_batch']}, "
                  f"{r['frames']} frames): {r['vae_only_fps']:.3f} frames/s")
            print(f"(b) latte ingest end to end, same frames (640x360 JPEG): {r['ingest_fps']:.3f} frames/s; "
                  f"ratio b/a = {r['ratio']:.3f} (target >= 0.9); best of {args.repeat}: "
                  f"{json.dumps({k: [round(v, 3) for v in vs] for k, vs in r['passes'].items()})}")
        if "c" not in args.skip:
            r = bench_rss(work)
            ratio = r[2000]["peak_rss_mib"] / r[200]["peak_rss_mib"]
            print(f"(c) peak RSS, 640x360 mp4 -> 256 px, VAE {VAES['rss'][0]}: "
                  f"200 frames {r[200]['peak_rss_mib']:.0f} MiB ({r[200]['seconds']:.0f}s), "
                  f"2000 frames {r[2000]['peak_rss_mib']:.0f} MiB ({r[2000]['seconds']:.0f}s); "
                  f"ratio {ratio:.3f} (target <= 1.2)")
        if "d" not in args.skip:
            r = bench_reads(work)
            for n in (16, 128):
                print(f"(d) {n}-frame clip reads/s, one reader, float16 (2,4,32,32) per frame, warm page cache: "
                      f"store {r[f'store_{n}']:.1f}, one .npy per frame {r[f'npy_per_frame_{n}']:.1f} "
                      f"({r[f'store_{n}'] / r[f'npy_per_frame_{n}']:.1f}x)")
        if "e" not in args.skip:
            r = bench_mindrecord_reads(work)
            for n in (16, 128):
                checked, unchecked = r[f"checked_{n}"], r[f"unchecked_{n}"]
                print(f"(e) {n}-frame MindRecord clip reads/s, same entries as (d), best of {r['rounds']} "
                      f"alternating rounds: crc32c checked {checked:.1f}, unchecked {unchecked:.1f} "
                      f"(checking costs {100 * (1 - checked / unchecked):.1f}%)")
            print(f"(e) crc32c alone: {r['crc_gbps']:.2f} GB/s, {r['segment_bytes'] / r['crc_gbps'] / 1e3:.1f} us "
                  f"per {r['segment_bytes'] >> 10} KiB segment record")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
