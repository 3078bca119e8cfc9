"""Pick the matmul for Latte's Linear layers on this machine: MindSpore's MatMul or oneDNN's sgemm.

On an AVX-512 host, one intra-op thread, oneDNN's sgemm (inside MindSpore's own libdnnl) ran
Latte-S/2's block matmuls 1.1-1.3x faster than MindSpore's MatMul (bench/bench_train.py
--block_matmuls). The sgemm kernels (dense_* in models/cpu_kernels.cc) run on the calling thread, so
with more intra-op threads MindSpore's threaded MatMul may win, and another CPU may rank them the other
way: so, like models/conv_select.py, both are timed once on this machine at Latte-S/2's block shapes
(forward, input and weight gradient; CPU-seconds at one intra-op thread, wall seconds at more, see
`_criterion`), and the faster one is kept in a JSON file keyed by
`models.cpu_features.isa_key()` and the thread count, under $LATTE_KERNEL_DIR (default
~/.cache/latte/kernels). Later runs read the choice back and measure nothing.

`LATTE_DENSE=sgemm|mindspore` forces one path (for benches and bisecting); `auto` (default) measures.
The sgemm path is never used where the fused kernels are off or libdnnl's sgemm is not found.
"""
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from models import conv_select
from models import cpu_kernels as kernels

CANDIDATES = ("sgemm", "mindspore")
# Latte-S/2's Linear layers, (rows, in, out): qkv, proj, fc1, fc2 over 16 frames x 256 tokens. Smaller
# layers (adaLN, embedders) are a few % of the step and follow the same choice.
SHAPES = [(4096, 384, 1152), (4096, 384, 384), (4096, 384, 1536), (4096, 1536, 384)]
TOLERANCE = 1e-5  # max |y_sgemm - y_matmul| / max |y_matmul|: both are float32 sums of the same products
_REPS = 3


def cache_path():
    return conv_select.cache_path().with_name(conv_select.cache_path().name.replace("conv_select", "dense_select"))


def cache_key():
    return f"dense@t{conv_select._threads()}"


def _load():
    import json
    try:
        return json.loads(cache_path().read_text())
    except (OSError, ValueError):
        return {}


def _save(choices):
    conv_select.save_choices(cache_path(), choices, "the matmul choice")


def choose():
    """"sgemm" or "mindspore" for this machine and thread count: forced by LATTE_DENSE, "mindspore"
    where the sgemm kernels cannot run, else read from the cache or measured now (in a child)."""
    forced = os.environ.get("LATTE_DENSE", "auto")
    if forced not in CANDIDATES + ("auto",):
        raise ValueError(f"LATTE_DENSE={forced!r} is not one of auto, {', '.join(CANDIDATES)}")
    if not kernels.sgemm_found():
        return "mindspore"
    if forced != "auto":
        return forced
    key = cache_key()
    if key not in _load():
        _measure_in_child()
    return _load().get(key, "mindspore")


def _measure_in_child():
    """A fresh PyNative process (as conv_select's: the caller may be inside a graph compile). It saves."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                      os.environ.get("PYTHONPATH", "")]))
    run = subprocess.run([sys.executable, "-m", "models.dense_select", str(conv_select._threads())],
                         capture_output=True, text=True, env=env)
    for line in run.stderr.splitlines():
        if line.startswith(("dense_select:", "note:")):
            print(line, file=sys.stderr)
    if run.returncode:
        last = (run.stderr.strip().splitlines() or ["(no output)"])[-1]
        print(f"note: dense_select could not measure ({last}); using MindSpore's MatMul", file=sys.stderr)


def _criterion():
    """What a choice minimises. One intra-op thread budgets one core: CPU-seconds (measured: at one
    thread MindSpore's MatMul still keeps a second core busy, 1.8 cores in a quiet sampling step, so on
    an idle 2-core host it wins by wall time while doing more work; the sgemm kernels use the calling
    thread only), which is also what load does not move. More threads budget more cores: wall seconds."""
    return "cpu" if conv_select._threads() == 1 else "wall"


def _best(fn):
    """Best seconds (by `_criterion`) of _REPS runs after one warm-up, and the warm-up's output."""
    clock = time.process_time if _criterion() == "cpu" else time.perf_counter
    out = fn().asnumpy()
    best = float("inf")
    for _ in range(_REPS):
        t = clock()
        fn().asnumpy()
        best = min(best, clock() - t)
    return best, out


def measure(shapes=SHAPES):
    """{candidate: (seconds (CPU or wall, see _criterion) for all shapes' forward + dx + dW, worst
    relative deviation from MatMul)}."""
    import mindspore as ms
    from mindspore import ops
    ms_ops = (ops.MatMul(transpose_b=True), ops.MatMul(), ops.MatMul(transpose_a=True))
    sg_ops = kernels._sgemm_ops()
    rng = np.random.default_rng(0)
    total = {"sgemm": 0.0, "mindspore": 0.0}
    dev = 0.0
    for m, k, n in shapes:
        x, w, dy = (ms.Tensor(rng.standard_normal(s).astype(np.float32)) for s in ((m, k), (n, k), (m, n)))
        for i, args in enumerate(((x, w), (dy, w), (dy, x))):
            t_ms, want = _best(lambda: ms_ops[i](*args))
            t_sg, got = _best(lambda: sg_ops[i](*args))
            total["mindspore"] += t_ms
            total["sgemm"] += t_sg
            dev = max(dev, float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30)))
    return {"sgemm": (total["sgemm"], dev), "mindspore": (total["mindspore"], 0.0)}


def _measure_and_save():
    timings = measure()
    ok = {k: v[0] for k, v in timings.items() if v[1] <= TOLERANCE}
    choices = _load()  # as the file is now: other processes may have added thread counts meanwhile
    choices[cache_key()] = min(ok, key=ok.get)
    print(f"dense_select: {cache_key()}: " + ", ".join(f"{k} {v[0] * 1e3:.1f} {_criterion()} ms (dev {v[1]:.1e})"
                                                      for k, v in timings.items())
          + f" -> {choices[cache_key()]}", file=sys.stderr)
    _save(choices)
    return choices[cache_key()]


if __name__ == "__main__":
    from models.runtime import setup_device
    threads_ = int(sys.argv[1])
    setup_device("CPU", "pynative", cpu_threads=threads_)
    _measure_and_save()
