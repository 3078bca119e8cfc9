"""The banded VAE convolutions (winograd2_fused, conv_band_same) at 1, 2 and 3 worker threads
(cpu_kernels.set_threads): CPU-s, wall s, and the share of the CPU time done by threads that no longer
exist after the calls (the kernels' workers). That share shows the split even on a host too busy for a
wall-clock gain. Usage: python bench/bench_conv_threads.py [--reps 8]"""
import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from models.runtime import setup_device  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def thread_cpu_seconds():
    """CPU seconds (user + system) of each live thread of this process, by thread id."""
    out = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            fields = open(f"/proc/self/task/{tid}/stat").read().rsplit(")", 1)[1].split()
        except OSError:
            continue  # ended meanwhile
        out[tid] = (int(fields[11]) + int(fields[12])) / TICK
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=8)
    args = p.parse_args()
    setup_device("CPU", "pynative", cpu_threads=2)
    from mindspore import Tensor
    from models import conv_select, cpu_kernels

    rng = np.random.default_rng(0)
    cases = [("winograd2 256x128x128->256", conv_select.WinogradConv(2), (256, 128, 256)),
             ("winograd2 512x32x32->512 (one band)", conv_select.WinogradConv(2), (512, 32, 512)),
             ("im2col 128x128x128->128", conv_select.Im2ColConv(), (128, 128, 128))]
    for name, cell, (c, size, o) in cases:
        x = Tensor(rng.standard_normal((1, c, size, size)).astype(np.float32))
        w = Tensor((rng.standard_normal((o, c, 3, 3)) * 0.02).astype(np.float32))
        b = Tensor(np.zeros(o, np.float32))
        cell(x, w, b).asnumpy()  # warm-up
        for threads in (1, 2, 3):
            cpu_kernels.set_threads(threads)
            before, cpu0, wall0 = thread_cpu_seconds(), time.process_time(), time.perf_counter()
            for _ in range(args.reps):
                cell(x, w, b).asnumpy()
            after, cpu, wall = thread_cpu_seconds(), time.process_time() - cpu0, time.perf_counter() - wall0
            lasting = sum(after[t] - before[t] for t in after if t in before)
            print(f"{name} threads {threads}: cpu {cpu:.2f} s, wall {wall:.2f} s, share on the kernels' worker "
                  f"threads {max(0.0, cpu - lasting) / cpu:.0%}, load {os.getloadavg()[0]:.2f}", flush=True)


if __name__ == "__main__":
    main()
