"""Pick the fastest 3x3 stride-1 convolution for this machine and shape, by measuring it once.

The winner differs by CPU: on an AVX-512 host MindSpore's own conv (oneDNN) measured ~40x slower than
im2col + matmul, on an AVX2 host (AMD Zen 3) it was faster. So, like cuDNN's benchmark mode, the
first time a shape is seen each candidate runs on random data of that shape and the fastest one that
is accurate enough is kept, in a JSON file keyed by `models.cpu_features.isa_key()` (ISA flags,
-march=native, compiler), the kernels' source digest and the thread count, under $LATTE_KERNEL_DIR (default ~/.cache/latte/kernels).
Later runs, and other processes on the same kind of machine, read the choice back and measure nothing.

Candidates (all float32, "same" padding, stride 1, weights (O, C, 3, 3)):
- "im2col": the fused C++ im2col + matmul (models/cpu_kernels.cc, a band of output rows at a time);
- "winograd2" / "winograd4": Winograd F(2x2,3x3) / F(4x4,3x3) (models/cpu_kernels.cc): input
  transform, (m+2)^2 GEMMs and output transform of a band of ~256 tiles at a time in one kernel,
  2.25x / 4x fewer multiplications, no full-size transform buffer;
- "native": MindSpore's ops.conv2d.
A candidate whose output deviates from im2col's by more than `TOLERANCE` (relative to the output's
largest magnitude) is never chosen, whatever its speed.

`LATTE_CONV=im2col|winograd2|winograd4|native` forces one path everywhere (for benches and bisecting);
`LATTE_CONV=auto` (default) measures.
"""
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import mindspore as ms
from mindspore import nn, ops
from mindspore.ops import constexpr

from models import cpu_kernels as kernels
from models.cpu_features import isa_key

CANDIDATES = ("im2col", "winograd2", "winograd4", "native")
# max |y - y_im2col| / max |y_im2col|. Measured on the VAE's ten 3x3 shapes: F(2x2) 6e-7..2e-6, F(4x4)
# 4.1e-6..5.7e-6 with the points 0, +-1, 1/2, -2 (1.0e-5..1.6e-5 with Lavin & Gray's 0, +-1, +-2)
TOLERANCE = 5e-6
_REPS = 3
MIN_MACS = 5e8  # below this (a few ms) the choice is not worth a measurement: im2col

_choices = None  # the cache file's contents, loaded once per process


def _threads():
    """The intra-op thread count given to runtime.setup_device (MindSpore has no getter for it);
    0 = MindSpore's own default."""
    from models import runtime
    return int(runtime._configured[2] or 0) if runtime._configured else 0


def cache_path():
    folder = Path(os.environ.get("LATTE_KERNEL_DIR") or Path.home() / ".cache" / "latte" / "kernels")
    # keyed by the kernels' source too: a choice measured against other kernel code (whole-batch
    # transforms, one thread) says nothing about these
    return folder / f"conv_select_{isa_key()}_{kernels.source_digest()}.json"


def shape_key(c, h, w, o):
    """Per frame: a micro-batch and the full batch take the same path (and so the same rounding)."""
    return f"{c}x{h}x{w}->{o}@t{_threads()}"


def _load():
    global _choices
    if _choices is None:
        try:
            _choices = json.loads(cache_path().read_text())
        except (OSError, ValueError):
            _choices = {}
    return _choices


def save_choices(path, choices, what):
    """Atomic write (temp file + rename): concurrent processes never read half a file. Also
    dense_select's. A read-only home only prints a note: measure again next run, never fail."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".json.tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(choices, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError as exc:
        print(f"note: cannot save {what} to {path} ({exc}); set LATTE_KERNEL_DIR", file=sys.stderr)


def _save():
    save_choices(cache_path(), _choices, "convolution choices")


def _clock():
    """What a choice minimises, as dense_select: at one intra-op thread CPU-seconds (one core budgeted,
    and what a loaded host does not move: at load 11 wall-clock best-of-3 ranked F(4x4) slower than
    F(2x2) on a shape where it takes 0.8x the CPU time), at more threads wall seconds."""
    return time.process_time if _threads() == 1 else time.perf_counter


def _timed(fn, budget):
    """Best of _REPS runs after one warm-up (seconds by `_clock`); stops early once a run exceeds
    `budget` seconds."""
    clock = _clock()
    t = clock()
    out = fn().asnumpy()
    first = clock() - t
    best = first
    if first > budget:
        return best, out
    for _ in range(_REPS):
        t = clock()
        fn().asnumpy()
        best = min(best, clock() - t)
    return best, out


def _probe_native(c, h, w, o):
    """Seconds of MindSpore's conv on a quarter-size image, scaled by area: on some CPUs it runs at
    ~1 GFLOP/s (45 s for one 128-channel 128x128 conv), too slow to time at full size."""
    ph, pw = max(h // 4, 4), max(w // 4, 4)
    rng = np.random.default_rng(1)
    x = ms.Tensor(rng.standard_normal((1, c, ph, pw), np.float32))
    wt = ms.Tensor(rng.standard_normal((o, c, 3, 3), np.float32))
    fn = NativeConv()
    fn(x, wt, ms.Tensor(np.zeros(o, np.float32))).asnumpy()  # warm-up
    clock = _clock()
    t = clock()
    fn(x, wt, ms.Tensor(np.zeros(o, np.float32))).asnumpy()
    return (clock() - t) * (h * w) / (ph * pw)


def measure(n, c, h, w, o, candidates=CANDIDATES):
    """{candidate: (seconds by `_clock`, relative deviation from im2col)} on random data of this shape. A
    candidate slower than 3x the best so far is cut short after its first (warm-up) run; the native
    conv is first timed on a quarter-size image and skipped (deviation inf) when that alone
    predicts 3x the best."""
    rng = np.random.default_rng(0)
    x = ms.Tensor(rng.standard_normal((n, c, h, w), np.float32))
    wt = ms.Tensor(rng.uniform(-1, 1, (o, c, 3, 3)).astype(np.float32) / np.sqrt(9 * c))
    b = ms.Tensor(rng.uniform(-0.1, 0.1, (o,)).astype(np.float32))
    result, ref, best = {}, None, float("inf")
    for name in ("im2col",) + tuple(k for k in candidates if k != "im2col"):
        if name == "native" and h * w >= 1024:
            estimate = _probe_native(c, h, w, o)
            if estimate > 3 * best:
                result[name] = (estimate, float("inf"))
                continue
        fn = CONVS[name]()
        seconds, out = _timed(lambda: fn(x, wt, b), 3 * best)
        if ref is None:
            ref = out
        dev = float(np.abs(out - ref).max() / max(np.abs(ref).max(), 1e-30))
        result[name] = (seconds, dev)
        if dev <= TOLERANCE:
            best = min(best, seconds)
    return result


# (c, h, w, o, choice) of every `choose` in this process, in order: models.runtime's compile cache
# records which choices a graph was compiled with, and reloads it only while they still hold.
resolved = []


def choose(c, h, w, o, measure_missing=True):
    """The convolution to use for frames (c, h, w) -> (o, h, w): forced by LATTE_CONV, im2col for
    shapes too small to matter, else read from the on-disk cache or measured now (and saved).
    `measure_missing=False`: None instead of measuring a shape the cache lacks."""
    forced = os.environ.get("LATTE_CONV", "auto")
    if forced != "auto":
        if forced not in CANDIDATES:
            raise ValueError(f"LATTE_CONV={forced!r} is not one of auto, {', '.join(CANDIDATES)}")
        choice = forced
    elif 9 * c * o * h * w < MIN_MACS:
        choice = "im2col"
    else:
        key = shape_key(c, h, w, o)
        if key not in _load():
            if not measure_missing:
                return None
            _measure_in_child(c, h, w, o)
        choice = _load().get(key, "im2col")
    if measure_missing:
        resolved.append((c, h, w, o, choice))
    return choice


def _measure_in_child(c, h, w, o):
    """Measure in a fresh PyNative process: this runs while MindSpore compiles a graph, and running
    other ops from inside the compiler crashes it (SIGSEGV, measured). The child writes the cache."""
    global _choices
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                      os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "models.conv_select", str(c), str(h), str(w), str(o), str(_threads())]
    run = subprocess.run(cmd, capture_output=True, text=True, env=env)
    for line in run.stderr.splitlines():
        if line.startswith(("conv_select:", "note:")):
            print(line, file=sys.stderr)
    if run.returncode:
        last = (run.stderr.strip().splitlines() or ["(no output)"])[-1]
        print(f"note: conv_select could not measure {shape_key(c, h, w, o)} ({last}); using im2col",
              file=sys.stderr)
    _choices = None  # re-read what the child saved


def _measure_and_save(c, h, w, o):
    global _choices
    timings = measure(1, c, h, w, o)
    ok = {k: v[0] for k, v in timings.items() if v[1] <= TOLERANCE}
    _choices = None
    choices = _load()  # the file as it is now: other processes may have added shapes meanwhile
    key = shape_key(c, h, w, o)
    choices[key] = min(ok, key=ok.get)
    print(f"conv_select: {key}: " + ", ".join(f"{k} {v[0] * 1e3:.1f} ms (dev {v[1]:.1e})"
                                               for k, v in timings.items()) + f" -> {choices[key]}",
          file=sys.stderr)
    _save()
    return choices[key]


@constexpr
def _choose_const(x_shape, o):
    # runs in Python while the graph is compiled (the shape is static there), so the choice is a
    # constant and the graph keeps only the chosen branch
    return choose(x_shape[1], x_shape[2], x_shape[3], o)


class Im2ColConv(nn.Cell):
    """The fused im2col + one matmul (what layers.Conv2d does on CPU), as a candidate: one kernel
    that builds the im2col matrix of a band of output rows and multiplies it (kernels.BandConv)."""

    def __init__(self):
        super().__init__()
        self.band_conv = kernels.BandConv(3, down=False)

    def construct(self, x, w, b):
        return self.band_conv(x, w, b)


class WinogradConv(nn.Cell):
    """3x3 "same" stride-1 convolution by Winograd F(m x m, 3x3), m = 2 or 4 (see cpu_kernels.cc).
    The backward is exact and direct: dx is the same convolution of dy with the flipped, transposed
    weights (itself by Winograd), dw and db one matmul of dy with x's im2col."""

    def __init__(self, m):
        super().__init__()
        if m not in (2, 4):
            raise ValueError(f"Winograd tile m={m} is not supported: use 2 or 4")
        a2 = (m + 2) ** 2
        self.m = m
        self.weight_t = kernels._op(f"winograd{m}_weight", lambda w: [a2, w[0], w[1]], lambda w: w)
        self.input_t = kernels._op(
            f"winograd{m}_input",
            lambda x: [a2, x[1], x[0] * ((x[2] + m - 1) // m) * ((x[3] + m - 1) // m)], lambda x: x)
        self.output_t = kernels._op(f"winograd{m}_output", lambda mm, b, x: [x[0], b[0], x[2], x[3]],
                                    lambda mm, b, x: mm)
        # the forward in one kernel, a band of tiles at a time: no (A2, C, N*T) / (A2, O, N*T) buffers
        self.fused = kernels._op(f"winograd{m}_fused", lambda x, w, b: [x[0], w[0], x[2], x[3]],
                                 lambda x, w, b: x)
        self.im2col = kernels.Im2Col(3, down=False).fwd
        self.bmm = ops.BatchMatMul()
        self.bmm_tb = ops.BatchMatMul(transpose_b=True)

    def forward(self, x, w, b):
        return self.fused(x, w, b)

    def unfused(self, x, w, b):
        """The same transforms with whole-batch buffers and MindSpore's BatchMatMul (the kernel
        before the banded one; kept as the reference for its tests)."""
        return self.output_t(self.bmm(self.weight_t(w), self.input_t(x)), b, x)

    def construct(self, x, w, b):
        return self.forward(x, w, b)

    def bprop(self, x, w, b, out, dout):
        c, o = x.shape[1], w.shape[0]
        w_t = ops.reverse(w, [2, 3]).transpose(1, 0, 2, 3)  # (C, O, 3, 3), flipped
        dx = self.forward(dout, w_t, ops.zeros((c,), ms.float32))
        n, _, h, wd = x.shape
        cols = self.im2col(x).reshape(n, 9 * c + 1, h * wd)
        g = self.bmm_tb(dout.reshape(n, o, h * wd), cols).sum(0)  # (O, 9C + 1)
        dw = ops.narrow(g, 1, 0, 9 * c).reshape(o, 3, 3, c).transpose(0, 3, 1, 2)
        return dx, dw, ops.narrow(g, 1, 9 * c, 1).reshape(o)


class NativeConv(nn.Cell):
    def construct(self, x, w, b):
        return ops.bias_add(ops.conv2d(x, w, None, 1, "pad", 1), b)


CONVS = {"im2col": Im2ColConv, "winograd2": lambda: WinogradConv(2), "winograd4": lambda: WinogradConv(4),
         "native": NativeConv}


class SelectedConv(nn.Cell):
    """3x3 "same" stride-1 float32 convolution through whichever candidate `choose` picks for the
    input's shape (decided while the graph compiles, so each shape pays the measurement once)."""

    def __init__(self):
        super().__init__()
        self.im2col = Im2ColConv()
        self.winograd2 = WinogradConv(2)
        self.winograd4 = WinogradConv(4)
        self.native = NativeConv()

    def construct(self, x, w, b):
        choice = _choose_const(x.shape, w.shape[0])
        if choice == "winograd2":
            return self.winograd2(x, w, b)
        if choice == "winograd4":
            return self.winograd4(x, w, b)
        if choice == "native":
            return self.native(x, w, b)
        return self.im2col(x, w, b)


def applies(kernel_size, stride, padding, fused):
    """Whether layers.Conv2d should route through SelectedConv: a 3x3 "same" stride-1 conv on the
    fused CPU path (the candidates all need the C++ kernels)."""
    return fused and kernel_size == 3 and stride == 1 and padding == 1


if __name__ == "__main__":  # the measuring child: python -m models.conv_select C H W O THREADS
    from models.runtime import setup_device

    c_, h_, w_, o_, threads_ = (int(a) for a in sys.argv[1:6])
    setup_device("CPU", "pynative", cpu_threads=threads_)
    if not kernels.available():
        sys.exit("conv_select: the fused CPU kernels cannot be built")
    _measure_and_save(c_, h_, w_, o_)
