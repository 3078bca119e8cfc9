"""Where the VAE's peak memory goes: resident set (VmRSS) sampled over one run, by phase.

    GLOG_v=3 .venv/bin/python bench/vae_memory.py --stage decode --batch 1
    GLOG_v=3 .venv/bin/python bench/vae_memory.py --stage encode --batch 4 --micro_batch 1

One process, sd-vae-ft-mse's architecture (random weights), 256 px. A thread reads /proc/self/status
every `--every_ms` while the main thread goes through the phases: MindSpore + our modules imported,
model built, first call (graph compile + run), then `--reps` timed calls. Printed per phase: RSS at
its start and end and the highest sample in it, so "what sets the peak" reads as which phase
raised VmHWM and by how much over the model's own RSS (the working set of a call). `--timeline`
also prints the steady call's samples (ms, MB) for finding which part of the network peaks.
"""
import argparse
import os
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import peer  # noqa: E402  bench/peer.py: the /proc/self/status reader every bench uses


def _status(key):
    return peer.proc_status_mb((key,)).get(key, float("nan"))


class Sampler(threading.Thread):
    def __init__(self, every_s):
        super().__init__(daemon=True)
        self.every_s, self.samples, self.stop = every_s, [], False

    def run(self):
        while not self.stop:
            self.samples.append((time.perf_counter(), _status("VmRSS")))
            time.sleep(self.every_s)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stage", choices=("encode", "decode"), default="encode")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--micro_batch", type=int, default=None)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--reps", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--every_ms", type=float, default=5.0)
    p.add_argument("--timeline", action="store_true")
    args = p.parse_args()

    sampler = Sampler(args.every_ms / 1e3)
    sampler.start()
    marks = [("start", time.perf_counter())]
    from models.runtime import setup_device
    setup_device("CPU", "graph", cpu_threads=args.threads)
    import numpy as np
    import mindspore as ms
    from models.vae import AutoencoderKL
    marks.append(("imports", time.perf_counter()))
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                        norm_num_groups=32)
    marks.append(("model built", time.perf_counter()))
    rng = np.random.default_rng(1)
    if args.stage == "encode":
        x = ms.Tensor(rng.uniform(-1, 1, (args.batch, 3, args.size, args.size)).astype(np.float32))
        fn = lambda: vae.encode_moments(x, args.micro_batch).asnumpy()  # noqa: E731
    else:
        z = ms.Tensor(rng.standard_normal((args.batch, 4, args.size // 8, args.size // 8)).astype(np.float32))
        fn = lambda: vae.decode(z, args.micro_batch).asnumpy()  # noqa: E731
    fn()
    marks.append(("first call", time.perf_counter()))
    cpu = time.process_time()
    for _ in range(args.reps):
        fn()
    cpu = (time.process_time() - cpu) / args.reps / args.batch
    marks.append(("steady call(s)", time.perf_counter()))
    time.sleep(2 * args.every_ms / 1e3)
    sampler.stop = True
    sampler.join()

    load = " ".join(f"{v:.2f}" for v in os.getloadavg())
    print(f"{args.stage} b{args.batch} micro_batch {args.micro_batch}, {args.size} px, {args.threads} thread(s); "
          f"load average {load}; VmHWM {_status('VmHWM'):.0f} MB; {cpu:.2f} CPU-s/frame (steady)")
    s = sampler.samples
    base = None
    for (_, t0), (name, t1) in zip(marks, marks[1:]):
        inside = [mb for t, mb in s if t0 <= t <= t1] or [float("nan")]
        before = [mb for t, mb in s if t <= t0] or [inside[0]]
        print(f"  {name:15s} {t1 - t0:7.2f} s  RSS {before[-1]:6.0f} -> {inside[-1]:6.0f} MB, peak {max(inside):6.0f} MB"
              + (f" (+{max(inside) - base:.0f} over the model)" if base is not None else ""))
        if name == "model built":
            base = inside[-1]
    if args.timeline:  # the first and the steady calls: each sample where RSS moved by 8 MB or more
        for (_, t0), (name, t1) in list(zip(marks, marks[1:]))[-2:]:
            print(f"  timeline of {name} (ms from its start, MB):")
            last = None
            for t, mb in s:
                if t0 <= t <= t1 and (last is None or abs(mb - last) >= 8):
                    print(f"    {1e3 * (t - t0):8.0f} {mb:7.0f}")
                    last = mb

if __name__ == "__main__":
    main()
