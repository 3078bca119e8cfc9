"""Clip reads per second from a latent cache at an s3:// URL vs the same cache on local disk, through
the trainer's own prefetching (`trainer.data.ClipSource` + `make_loader`: `num_workers` reader threads
in a MindSpore GeneratorDataset), against what Latte-S/2 training consumes.

    python bench/bench_s3.py                          # measures a Latte-S/2 step too (bench_train's method)
    python bench/bench_s3.py --step_seconds 1.82      # or take a step time measured before

The S3 server is moto's (`moto_server`, the test extra), started here on 127.0.0.1 in its own process
so that it does not share this process's GIL with the readers. It is a Python server on the same
machine: per-request latency is far below a real region's (~10-30 ms to S3), so the S3 figure is an
upper bound; the "clips/s per worker at 20 ms a GET" line gives the cost model for a real endpoint
(a 16-frame clip is 2-3 ranged GETs: the shard index and one or two chunks).

Both caches hold the same synthetic float16 latents at Latte-S/2's training shape (4x32x32, 256 px)
in the default layout (16-frame chunks, 1024-frame shard objects).
"""
import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("GLOG_v", "3")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_moto():
    port = free_port()
    exe = Path(sys.executable).parent / "moto_server"
    proc = subprocess.Popen([str(exe), "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    t0 = time.monotonic()
    while socket.socket().connect_ex(("127.0.0.1", port)) != 0:
        if proc.poll() is not None or time.monotonic() - t0 > 60:
            sys.exit("bench_s3: moto_server did not start (pip install 'latte-ms[test]')")
        time.sleep(0.05)
    return proc, f"http://127.0.0.1:{port}"


def fill(where, entries, frames, size, seed=0):
    import cache_store

    store = cache_store.create_or_open(where, {"latent_shape": [4, size, size], "dtype": "float16",
                                               "scale_factor": 0.18215})
    rng = np.random.default_rng(seed)
    with store.writer() as w:
        for i in range(entries):
            mean = rng.standard_normal((frames, 4, size, size), dtype=np.float32)
            w.write_entry(f"clip_{i:04d}", mean, np.abs(mean) * 0.1 + 0.1)
    return cache_store.open(where)


def clips_per_second(store, num_frames, batch, workers, draws):
    from trainer.data import ClipSource, DrawOrder, cache_reader, make_loader, plan_items

    train, _, _ = plan_items(store.entries().to_pylist(), num_frames, 1)
    order = DrawOrder(len(train), seed=0)
    source = ClipSource(train, order, cache_reader(store, num_frames, 1), num_frames, 1,
                        (num_frames, *store.latent_shape), ("sample", 0.18215))
    warm = batch * 4
    it = make_loader(source, range(warm + draws), batch, workers)
    for _ in range(warm // batch):  # pipeline start-up and first connections
        next(it)
    t0 = time.perf_counter()
    for _ in range(draws // batch):
        _, _, bad = next(it)
        assert (bad < 0).all(), source.errors
    return draws / (time.perf_counter() - t0)


def step_seconds(cpu_threads):
    """Latte-S/2, 16x4x32x32, batch 1, fp32, graph mode: bench_train.py's own measurement."""
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_train.py"), "--only", "ours", "--steps", "3",
                          "--warmup", "1", "--no_peak", "--cpu_threads", str(cpu_threads)],
                         capture_output=True, text=True, timeout=1800)
    line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
    if not line:
        sys.exit(f"bench_s3: bench_train.py failed:\n{out.stderr[-2000:]}")
    return json.loads(line[0][len("RESULT "):])["s_per_step"]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--entries", type=int, default=24)
    p.add_argument("--frames", type=int, default=64, help="frames per entry")
    p.add_argument("--num_frames", type=int, default=16, help="frames per clip (Latte-S/2 trains on 16)")
    p.add_argument("--batch_size", type=int, default=1)
    p.add_argument("--num_workers", type=int, default=2, help="reader threads (TrainConfig's default)")
    p.add_argument("--draws", type=int, default=300, help="clips timed per store")
    p.add_argument("--step_seconds", type=float, default=0.0, help="Latte-S/2 step time; 0: measure it")
    p.add_argument("--cpu_threads", type=int, default=1)
    args = p.parse_args()

    print(f"CPU: {os.cpu_count()} cores, avx512f: "
          f"{'yes' if 'avx512f' in Path('/proc/cpuinfo').read_text() else 'no'}; load {os.getloadavg()[0]:.1f}")
    proc, endpoint = start_moto()
    os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                      AWS_DEFAULT_REGION="us-east-1")
    try:
        import boto3

        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="bench")
        with tempfile.TemporaryDirectory() as tmp:
            local = fill(str(Path(tmp) / "cache"), args.entries, args.frames, 32)
            remote = fill("s3://bench/cache", args.entries, args.frames, 32)
            rates = {}
            for name, store in (("local disk", local), ("s3 (moto, 127.0.0.1)", remote)):
                rates[name] = clips_per_second(store, args.num_frames, args.batch_size, args.num_workers, args.draws)
            # one reader, no prefetch: the latency of one clip read from S3
            t0 = time.perf_counter()
            n = 50
            for i in range(n):
                remote.read_clip(f"clip_{i % args.entries:04d}", (7 * i) % (args.frames - args.num_frames),
                                 args.num_frames)
            per_clip = (time.perf_counter() - t0) / n
    finally:
        proc.kill()
        proc.wait()

    sps = args.step_seconds or step_seconds(args.cpu_threads)
    need = args.batch_size / sps
    print(f"clips of {args.num_frames}x4x32x32 float16, batch {args.batch_size}, {args.num_workers} reader threads:")
    for name, rate in rates.items():
        print(f"  {name:22s} {rate:8.1f} clips/s = {rate / need:8.0f}x what training consumes")
    print(f"  one S3 clip read without prefetch: {per_clip * 1e3:.1f} ms; at 20 ms a GET (real endpoint, 3 GETs a "
          f"clip) one worker reads ~{1 / 0.06:.0f} clips/s")
    print(f"Latte-S/2 training step (16x4x32x32, batch {args.batch_size}): {sps:.2f} s -> consumes {need:.2f} clips/s; "
          f"{'no starvation' if min(rates.values()) > need else 'STARVES'}")


if __name__ == "__main__":
    main()
