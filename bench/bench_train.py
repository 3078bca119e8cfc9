"""Training-step benchmark: our Latte against MindONE's, side by side, on this CPU.

    pip install --no-deps --target /tmp/mindone mindone==0.5.0     # only its model code is used
    GLOG_v=3 python bench/bench_train.py --mindone_path /tmp/mindone

Both networks are Latte-S/2 on 16x4x32x32 latents, batch 1, fp32, graph mode (`ms.jit`), and both
train through the SAME step: `models.diffusion` loss (MSE + VB), our AdamW (torch semantics), EMA
and gradient clipping (`trainer.step.TrainStep`). So the difference is the network alone. Ours runs
with its fused CPU kernels (`models/cpu_kernels.py`) when g++ can build them; `LATTE_CPU_KERNELS=0`
measures its plain-ops path instead. The output says which one ran.

MindONE 0.5.0 (`mindone.models.latte.Latte`) builds its layers from `mindspore.mint`, whose kernels
(Linear, LayerNorm, GELU, Conv2d, arange, ...) are not registered on CPU. A shim swaps `mint` for
the classic `nn`/`ops` layers while MindONE's modules are imported; the network code itself is
unchanged. MindONE's `mindone/__init__` needs omegaconf, which is stubbed (never called).

Each model runs in its own child process so that its peak memory (max RSS) is its own. Reported:
seconds per step (median after warm-up), the ratio, peak RSS, and our achieved GFLOP/s against the
measured fp32 matmul peak of this machine (same thread count).
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("GLOG_v", "3")

import numpy as np  # noqa: E402

SHAPE = dict(num_frames=16, channels=4, size=32, batch=1)


# ------------------------------------------------------------------------------------------------
# the shim: mindspore.mint -> classic CPU layers, only while MindONE's modules are imported
# ------------------------------------------------------------------------------------------------

def _mint_shim():
    import mindspore as ms
    from mindspore import nn, ops

    class Linear(nn.Dense):
        def __init__(self, in_features, out_features, bias=True, weight_init=None, bias_init=None, dtype=None):
            kwargs = {"has_bias": bias}
            if weight_init is not None:
                kwargs["weight_init"] = weight_init
            if bias_init is not None:
                kwargs["bias_init"] = bias_init
            super().__init__(in_features, out_features, **kwargs)

    class Conv2d(nn.Conv2d):
        def __init__(self, in_channels, out_channels, kernel_size, stride=1, bias=True, **_):
            super().__init__(in_channels, out_channels, kernel_size, stride=stride, pad_mode="valid", has_bias=bias)

    class LayerNorm(nn.Cell):
        def __init__(self, normalized_shape, elementwise_affine=True, eps=1e-5, **_):
            super().__init__()
            shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
            self.norm = ops.LayerNorm(begin_norm_axis=-1, begin_params_axis=-1, epsilon=eps)
            self.gamma = ms.Tensor(np.ones(shape, np.float32))
            self.beta = ms.Tensor(np.zeros(shape, np.float32))

        def construct(self, x):
            return self.norm(x, self.gamma, self.beta)[0]

    class GELU(nn.GELU):
        def __init__(self, approximate="none"):
            super().__init__(approximate=approximate == "tanh")

    class Dropout(nn.Dropout):
        def __init__(self, p=0.5, **_):
            super().__init__(p=p)

    class Embedding(nn.Embedding):
        def __init__(self, num_embeddings, embedding_dim, **_):
            super().__init__(num_embeddings, embedding_dim)

    # named functions, not lambdas: the graph compiler parses their source
    def softmax(x, dim=-1):
        return ops.softmax(x, axis=dim)

    def arange(start=0, end=None, step=1, dtype=None):
        return ops.arange(start, end, step, dtype=dtype)

    def cat(xs, dim=0):
        return ops.cat(xs, axis=dim)

    def unsqueeze(x, dim):
        return ops.unsqueeze(x, dim)

    def split(x, size, dim=0):
        return ops.split(x, size, axis=dim)

    nn_ns = types.SimpleNamespace(Linear=Linear, Conv2d=Conv2d, LayerNorm=LayerNorm, GELU=GELU, SiLU=nn.SiLU,
                                  Dropout=Dropout, Embedding=Embedding,
                                  functional=types.SimpleNamespace(softmax=softmax))
    return types.SimpleNamespace(
        nn=nn_ns, reshape=ops.reshape, permute=ops.transpose, matmul=ops.matmul, exp=ops.exp, arange=arange,
        cat=cat, cos=ops.cos, sin=ops.sin, zeros_like=ops.zeros_like, zeros=ops.zeros, ones=ops.ones,
        where=ops.where, select=ops.select, unsqueeze=unsqueeze, split=split)


def mindone_latte(mindone_path, depth=12, **kwargs):
    import mindspore

    if mindone_path:
        sys.path.insert(0, mindone_path)
    if "omegaconf" not in sys.modules:
        stub = types.ModuleType("omegaconf")
        stub.DictConfig = stub.ListConfig = stub.OmegaConf = object
        sys.modules["omegaconf"] = stub
    real = mindspore.mint
    mindspore.mint = _mint_shim()
    try:
        from mindone.models.latte import Latte
    finally:
        mindspore.mint = real
    return Latte(depth=depth, hidden_size=384, patch_size=2, num_heads=6, **kwargs)  # Latte_S_2 at depth 12


# ------------------------------------------------------------------------------------------------
# measurement
# ------------------------------------------------------------------------------------------------

def latte_train_flops(depth=12, hidden=384, patch=2, frames=16, size=32, channels=4, batch=1, mlp_ratio=4):
    """Matmul FLOPs of one training step (forward + backward = 3x forward) of our Latte."""
    t = (size // patch) ** 2
    rows = batch * frames * t
    d = hidden
    block = 2 * rows * d * (3 * d + d + 2 * mlp_ratio * d)
    attn_spatial = 2 * 2 * batch * frames * t * t * d
    attn_temporal = 2 * 2 * batch * t * frames * frames * d
    ada = 2 * batch * d * 6 * d
    fwd = depth * (block + ada) + depth // 2 * (attn_spatial + attn_temporal)
    fwd += 2 * rows * channels * patch * patch * d + 2 * rows * d * patch * patch * 2 * channels
    fwd += 2 * batch * (256 * d + d * d + 2 * d * d)
    return 3 * fwd


def matmul_peak(n=2048, repeats=5):
    import mindspore as ms
    from mindspore import ops

    a = ms.Tensor(np.random.default_rng(0).standard_normal((n, n)).astype(np.float32))
    def matmul(x, y):
        return ops.matmul(x, y)

    mm = ms.jit(matmul)
    mm(a, a).asnumpy()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        mm(a, a).asnumpy()
        times.append(time.perf_counter() - t0)
    return 2 * n ** 3 / min(times) / 1e9


def run_one(which, args):
    """Child process: build one model, time its training step; print a JSON line."""
    from models.runtime import setup_device
    setup_device("CPU", mode="graph", cpu_threads=args.cpu_threads, seed=0)
    from models.diffusion import create_diffusion
    from trainer.config import TrainConfig
    from trainer.step import TrainStep

    kwargs = dict(input_size=SHAPE["size"], num_frames=SHAPE["num_frames"], learn_sigma=True)
    if which == "ours":
        from models.latte import Latte
        net = Latte(depth=args.depth, hidden_size=384, patch_size=2, num_heads=6, **kwargs)  # Latte-S/2 at 12
    else:
        net = mindone_latte(args.mindone_path, depth=args.depth, **kwargs)
    net.set_train(False)
    cfg = TrainConfig(cache_folder="-", learning_rate=1e-4, clip_max_norm=0.1, start_clip_iter=0)
    step = TrainStep(net, create_diffusion(""), cfg)
    rng = np.random.default_rng(0)
    shape = (SHAPE["batch"], SHAPE["num_frames"], SHAPE["channels"], SHAPE["size"], SHAPE["size"])
    times, cpu_times, losses = [], [], []
    t_compile = time.perf_counter()
    for i in range(args.warmup + args.steps):
        x0 = rng.standard_normal(shape).astype(np.float32)
        noise = rng.standard_normal(shape).astype(np.float32)
        t = rng.integers(0, 1000, SHAPE["batch"]).astype(np.int32)
        t0, c0 = time.perf_counter(), time.process_time()
        loss, *_ = step([(x0, t, noise, np.zeros(SHAPE["batch"], np.int32))], i, 1e-4, 0.1, 0.9999)
        if i == 0:
            t_compile = time.perf_counter() - t_compile
        elif i >= args.warmup:
            times.append(time.perf_counter() - t0)
            cpu_times.append(time.process_time() - c0)
        losses.append(loss)
    out = {"which": which, "s_per_step": float(np.median(times)), "times": times, "first_step_s": t_compile,
           "cpu_s_per_step": float(np.median(cpu_times)), "load_avg": os.getloadavg()[0],
           "params": int(sum(p.size for p in step.params)), "loss": losses[-1],
           "network": "fused CPU kernels" if getattr(net, "fused_kernels", False) else "plain ops",
           "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20}
    if which == "ours" and args.peak:
        out["matmul_peak_gflops"] = matmul_peak()
    print("RESULT " + json.dumps(out), flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mindone_path", default="", help="folder holding the `mindone` package (pip --target)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per model")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps (the first one compiles)")
    p.add_argument("--cpu_threads", type=int, default=1)
    p.add_argument("--depth", type=int, default=12,
                   help="blocks of both networks (12 is Latte-S/2; fewer only where memory is short)")
    p.add_argument("--only", choices=("ours", "mindone"), help=argparse.SUPPRESS)
    p.add_argument("--no_peak", dest="peak", action="store_false", help="skip the matmul peak measurement")
    args = p.parse_args()
    if args.only:
        return run_one(args.only, args)

    results = {}
    for which in ("ours", "mindone"):
        cmd = [sys.executable, __file__, "--only", which, "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--cpu_threads", str(args.cpu_threads), "--mindone_path", args.mindone_path, "--depth", str(args.depth)]
        if not args.peak:
            cmd.append("--no_peak")
        run = subprocess.run(cmd, capture_output=True, text=True)
        lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
        if run.returncode or not lines:
            print(f"{which}: failed\n{run.stderr[-3000:]}", file=sys.stderr)
            continue
        results[which] = json.loads(lines[-1][len("RESULT "):])
        r = results[which]
        print(f"{which:8s} {r['s_per_step']:.3f} s/step (steps {', '.join(f'{t:.2f}' for t in r['times'])}; "
              f"first step incl. compile {r['first_step_s']:.1f} s), {r['cpu_s_per_step']:.2f} CPU-s/step, "
              f"peak RSS {r['peak_rss_gb']:.2f} GB, {r['params'] / 1e6:.2f} M params, "
              f"load average {r['load_avg']:.1f}" + (f", {r['network']}" if which == "ours" else ""), flush=True)

    ours = results.get("ours")
    if ours:
        flops = latte_train_flops(depth=args.depth)
        achieved = flops / ours["s_per_step"] / 1e9
        line = f"ours: {flops / 1e9:.1f} GFLOP per step -> {achieved:.1f} GFLOP/s"
        if "matmul_peak_gflops" in ours:
            line += f" = {100 * achieved / ours['matmul_peak_gflops']:.0f}% of the measured fp32 matmul peak " \
                    f"({ours['matmul_peak_gflops']:.0f} GFLOP/s, {args.cpu_threads} thread(s))"
        print(line)
    if ours and "mindone" in results:
        m = results["mindone"]
        print(f"speed-up: {m['s_per_step'] / ours['s_per_step']:.2f}x MindONE's steps per second; "
              f"peak memory {ours['peak_rss_gb']:.2f} GB vs {m['peak_rss_gb']:.2f} GB")


if __name__ == "__main__":
    main()
