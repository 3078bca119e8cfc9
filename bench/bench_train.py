"""Training-step benchmark: our Latte against the original PyTorch Latte (and MindONE's), side by side.

    GLOG_v=3 python bench/bench_train.py --peer_python /work/torchenv/bin/python   # ours vs torch
    pip install --no-deps --target /tmp/mindone mindone==0.5.0     # only its model code is used
    GLOG_v=3 python bench/bench_train.py --mindone_path /tmp/mindone               # + MindONE

The torch peer is bench/torch_latte.py (the original Latte written from the reference and checked
against its oracle outputs by bench/check_torch_latte.py, which this bench runs first) with the
original recipe's step (DiT loss, AdamW, clipping, EMA): `torch_latte.TrainStep`. Sides alternate in
fresh processes, `--rounds` times, same thread count; medians, peak RSS (VmHWM), ratios, the CPU/ISA
and load average are printed, and "SKIPPED" when a peer is not available.

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
measured fp32 matmul peak of this machine (same thread count). `--block_matmuls` also times, in each
child after its steps, the matmuls every block does (forward, input and weight gradient of qkv, proj,
fc1, fc2) in CPU-seconds: matmuls are most of the step, so this shows how much of the ratio is the
matmul library (MindSpore's vs torch's) rather than the network code.
"""
import argparse
import os
import sys
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
import peer  # noqa: E402
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


def matmul_peak(n=2048, repeats=7):
    """Best of `repeats` (a noisy single timing can exceed the real peak's time either way; the
    bench takes the best over every round too, so the % of peak cannot pass 100 % by noise), at the
    step's thread count, and the CPU-seconds per wall second of the timings: the threads that really
    computed (1.9 at cpu_threads=1 before setup_device pinned MindSpore to one computing thread)."""
    import mindspore as ms
    from mindspore import ops

    a = ms.Tensor(np.random.default_rng(0).standard_normal((n, n)).astype(np.float32))
    def matmul(x, y):
        return ops.matmul(x, y)

    mm = ms.jit(matmul)
    mm(a, a).asnumpy()
    times, cpu = [], 0.0
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        mm(a, a).asnumpy()
        times.append(time.perf_counter() - t0)
        cpu += time.process_time() - c0
    return 2 * n ** 3 / min(times) / 1e9, cpu / sum(times)


# The block's Linear layers at Latte-S/2's shape: (rows, in, out) for qkv, proj, fc1, fc2.
BLOCK_MATMULS = [(4096, 384, 1152), (4096, 384, 384), (4096, 384, 1536), (4096, 1536, 384)]


def block_matmul_flops(case):
    """FLOPs of one of time_block_matmuls' products, from its name ("in->out fwd|dx|dW"): every one
    is 2 * rows * in * out."""
    k, n = (int(v) for v in case.split()[0].split("->"))
    return 2 * BLOCK_MATMULS[0][0] * k * n


def time_block_matmuls(matmul_fns, repeats=5):
    """{"in->out fwd|dx|dW": best CPU ms} for the block's matmuls, forward (x @ w.T), input gradient
    (dy @ w) and weight gradient (dy.T @ x). `matmul_fns(m, k, n)` returns {case: zero-arg callable}.
    CPU-seconds, best of `repeats`: the question is how fast each library multiplies, not the load."""
    out = {}
    for m, k, n in BLOCK_MATMULS:
        for case, fn in matmul_fns(m, k, n).items():
            fn()
            best = float("inf")
            for _ in range(repeats):
                c0 = time.process_time()
                fn()
                best = min(best, time.process_time() - c0)
            out[f"{k}->{n} {case}"] = 1e3 * best
    return out


def ms_matmul_fns(m, k, n):
    import mindspore as ms
    from mindspore import ops

    rng = np.random.default_rng(0)
    x, w, dy = (ms.Tensor(rng.standard_normal(s).astype(np.float32)) for s in ((m, k), (n, k), (m, n)))
    nt, nn_, tn = ops.MatMul(transpose_b=True), ops.MatMul(), ops.MatMul(transpose_a=True)

    def fwd(a, b):
        return nt(a, b)

    def dx(a, b):
        return nn_(a, b)

    def dw(a, b):
        return tn(a, b)

    fwd, dx, dw = ms.jit(fwd), ms.jit(dx), ms.jit(dw)
    return {"fwd": lambda: fwd(x, w).asnumpy(), "dx": lambda: dx(dy, w).asnumpy(), "dW": lambda: dw(dy, x).asnumpy()}


def sgemm_matmul_fns(m, k, n):
    """The same products on the Dense kernels' oneDNN sgemm (models/cpu_kernels.cc dense_*)."""
    import mindspore as ms
    from models import cpu_kernels

    rng = np.random.default_rng(0)
    x, w, dy = (ms.Tensor(rng.standard_normal(s).astype(np.float32)) for s in ((m, k), (n, k), (m, n)))
    nt, nn_, tn = cpu_kernels._sgemm_ops()

    def fwd(a, b):
        return nt(a, b)

    def dx(a, b):
        return nn_(a, b)

    def dw(a, b):
        return tn(a, b)

    fwd, dx, dw = ms.jit(fwd), ms.jit(dx), ms.jit(dw)
    return {"fwd": lambda: fwd(x, w).asnumpy(), "dx": lambda: dx(dy, w).asnumpy(), "dW": lambda: dw(dy, x).asnumpy()}


def torch_matmul_fns(m, k, n):
    import torch

    x, w, dy = torch.randn(m, k), torch.randn(n, k), torch.randn(m, n)
    return {"fwd": lambda: x @ w.t(), "dx": lambda: dy @ w, "dW": lambda: dy.t() @ x}


def process_age_s():
    """Wall seconds since this process started (its exec, before any import): /proc/self/stat's
    start time against /proc/uptime, 10 ms resolution."""
    start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
    return float(Path("/proc/uptime").read_text().split()[0]) - start_ticks / os.sysconf("SC_CLK_TCK")


def cli_startup(args):
    """`latte train -c configs/training/tiny_cache.yaml --train_steps 2`, `--rounds` times in a row
    with one compile cache (fresh unless LATTE_COMPILE_CACHE names one) and the same command line
    (it keys the cache; the output folder is emptied between runs): wall and CPU seconds from the
    launch to the end of step 1 (its log line; CPU read from /proc at that moment, all threads),
    and the whole run's CPU seconds and peak RSS."""
    import shutil
    import subprocess
    import tempfile
    work = Path(tempfile.mkdtemp(prefix="latte_startup_"))
    env = dict(os.environ, LATTE_COMPILE_CACHE=os.environ.get("LATTE_COMPILE_CACHE") or str(work / "compile"),
               PYTHONPATH=str(ROOT), GLOG_v="2")  # GLOG 2: MindSpore says when it loads a cached graph
    cache = args.cache_folder
    if not cache:
        sys.path.insert(0, str(ROOT / "tests"))
        from latent_cache import make_latent_cache  # the test suite's synthetic store (8x8 latents)
        cache = str(work / "latents")
        make_latent_cache(cache, num_entries=10, frames=(6, 12), latent_size=8, seed=0, short_entries=1)
    out = work / "out"
    cmd = [sys.executable, str(ROOT / "latte_cli.py"), "train", "-c", str(ROOT / "configs/training/tiny_cache.yaml"),
           "--train_steps", "2", "--cache_folder", cache, "--output_folder", str(out), "--progress", "False"]
    print(f"{' '.join(cmd[1:])}\ncompile cache: {env['LATTE_COMPILE_CACHE']}")
    tick = os.sysconf("SC_CLK_TCK")
    for r in range(args.rounds):
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        errors = open(work / "stderr", "w+")
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=errors)
        log, step1 = out / "log.jsonl", None
        while step1 is None and os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
            if log.is_file() and '"step": 1, "loss"' in log.read_text():
                fields = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
                step1 = (time.perf_counter() - t0, (int(fields[11]) + int(fields[12])) / tick)
            time.sleep(0.01)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        errors.seek(0)
        stderr = errors.read()
        errors.close()
        if proc.returncode or step1 is None:
            print(f"  run {r + 1} failed (exit {proc.returncode}):\n{stderr[-2000:]}")
            return
        loaded = stderr.count("Use the compilation cache")
        print(f"  run {r + 1}/{args.rounds}: end of step 1 at {step1[0]:.1f} s wall, {step1[1]:.1f} CPU-s; whole run "
              f"{wall:.1f} s, {usage.ru_utime + usage.ru_stime:.1f} CPU-s, peak RSS {usage.ru_maxrss / 1024:.0f} MB; load {os.getloadavg()[0]:.1f}" + (f"; {loaded} graphs from the cache" if loaded else ""),
              flush=True)
    shutil.rmtree(work, ignore_errors=True)


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
    built_mb = peer.vmhwm_mb()  # import + weights + optimizer state: what the step's peak stands on
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
            since_start, cpu_since_start = process_age_s(), time.process_time()
        elif i >= args.warmup:
            times.append(time.perf_counter() - t0)
            cpu_times.append(time.process_time() - c0)
        losses.append(loss)
    out = {"s_per_step": float(np.median(times)), "first_step_s": t_compile,
           "start_to_step1_s": since_start, "start_to_step1_cpu_s": cpu_since_start,
           "cpu_s_per_step": float(np.median(cpu_times)), "built_rss_mb": built_mb,
           "params": int(sum(p.size for p in step.params)), "loss": float(losses[-1]),
           "fused_kernels": int(bool(getattr(net, "fused_kernels", False))),
           "dense_impl": getattr(net, "dense_impl", "mindspore")}
    if which == "ours" and args.peak:
        out["matmul_peak_gflops"], out["matmul_peak_cpu_per_wall"] = matmul_peak()
    if which == "ours" and args.block_matmuls:
        out["block_matmul_ms"] = time_block_matmuls(sgemm_matmul_fns if out["dense_impl"] == "sgemm"
                                                    else ms_matmul_fns)
        from models import cpu_kernels
        out["fma_peak_gflops"] = cpu_kernels.fma_peak_gflops()
    peer.report(out)


def run_torch(args):
    """Peer child: the original Latte-S/2 on torch, same shape, batch, threads and step count."""
    import torch
    from torch_latte import Latte as TorchLatte, TrainStep as TorchTrainStep

    torch.set_num_threads(args.cpu_threads)
    torch.manual_seed(0)
    net = TorchLatte(input_size=SHAPE["size"], num_frames=SHAPE["num_frames"], depth=args.depth)
    step = TorchTrainStep(net)
    rng = np.random.default_rng(0)
    shape = (SHAPE["batch"], SHAPE["num_frames"], SHAPE["channels"], SHAPE["size"], SHAPE["size"])
    times, cpu_times = [], []
    t_first = time.perf_counter()
    for i in range(args.warmup + args.steps):
        x0 = torch.from_numpy(rng.standard_normal(shape).astype(np.float32))
        noise = torch.from_numpy(rng.standard_normal(shape).astype(np.float32))
        t = torch.from_numpy(rng.integers(0, 1000, SHAPE["batch"]))
        t0, c0 = time.perf_counter(), time.process_time()
        loss = step(x0, t, noise)
        if i == 0:
            t_first = time.perf_counter() - t_first
        elif i >= args.warmup:
            times.append(time.perf_counter() - t0)
            cpu_times.append(time.process_time() - c0)
    out = {"s_per_step": float(np.median(times)), "first_step_s": t_first,
           "cpu_s_per_step": float(np.median(cpu_times)),
           "params": int(sum(p.numel() for p in net.parameters())), "loss": loss}
    if args.block_matmuls:
        out["block_matmul_ms"] = time_block_matmuls(torch_matmul_fns)
    peer.report(out)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--peer_python", default="", help="interpreter with torch (the `bench` extra)")
    p.add_argument("--mindone_path", default="", help="folder holding the `mindone` package (pip --target)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per child")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps (the first one compiles)")
    p.add_argument("--rounds", type=int, default=2, help="alternations of the sides")
    p.add_argument("--cpu_threads", type=int, default=1)
    p.add_argument("--depth", type=int, default=12,
                   help="blocks of every network (12 is Latte-S/2; fewer only where memory is short)")
    peer.add_max_isa_argument(p)
    p.add_argument("--only", choices=("ours", "mindone", "torch"), help=argparse.SUPPRESS)
    p.add_argument("--no_peak", dest="peak", action="store_false", help="skip the matmul peak measurement")
    p.add_argument("--block_matmuls", action="store_true",
                   help="after the steps, time the block's matmuls (forward, input and weight gradient) in each "
                        "child, CPU-seconds: how much of the ratio is the matmul library")
    p.add_argument("--cli_startup", action="store_true",
                   help="instead: time to step 1 of a repeated tiny `latte train` (start-up, compile cache)")
    p.add_argument("--cache_folder", default="", help="--cli_startup: a latent store (default: a synthetic one)")
    args = p.parse_args()
    peer.cap_isa(args.max_isa)  # into the environment every child inherits
    if args.cli_startup:
        print(peer.machine_line())
        return cli_startup(args)
    if args.only == "torch":
        return run_torch(args)
    if args.only:
        return run_one(args.only, args)

    print(peer.machine_line())
    py = peer.latte_peers(args.peer_python, args.mindone_path)
    common = ["--steps", str(args.steps), "--warmup", str(args.warmup), "--cpu_threads", str(args.cpu_threads),
              "--depth", str(args.depth)] + (["--block_matmuls"] if args.block_matmuls else [])
    sides = {"ours": [sys.executable, __file__, "--only", "ours"] + common + ([] if args.peak else ["--no_peak"]),
             "torch": [py, __file__, "--only", "torch"] + common if py else None,
             "mindone": ([sys.executable, __file__, "--only", "mindone", "--mindone_path", args.mindone_path]
                         + common) if args.mindone_path else None}
    print(f"Latte-S/2 depth {args.depth}, 16x4x32x32 latents, batch 1, fp32, {args.cpu_threads} thread(s), "
          f"{args.rounds} rounds of {args.warmup} warm-up + {args.steps} timed steps per child")
    res = peer.alternate(sides, args.rounds)
    print("== summary (medians over rounds) ==")
    print(peer.machine_line())
    ours = res["ours"]
    for which, rs in res.items():
        if not rs:
            continue
        print(f"{which:8s} {peer.median(rs, 's_per_step'):.3f} s/step, {peer.median(rs, 'cpu_s_per_step'):.2f} "
              f"CPU-s/step, first step (incl. compile) {peer.median(rs, 'first_step_s'):.1f} s, peak RSS "
              f"{peer.median(rs, 'peak_rss_mb') / 1024:.2f} GB, {rs[0]['params'] / 1e6:.2f} M params"
              + (", fused CPU kernels" if which == "ours" and rs[0].get("fused_kernels") else "")
              + (f", Linear matmuls on {rs[0]['dense_impl']}" if which == "ours" else "")
              + (f" (model and optimizer state built: {peer.median(rs, 'built_rss_mb') / 1024:.2f} GB; the rest is "
                 "the step: graph compile, activations, gradients)" if "built_rss_mb" in rs[0] else ""))
    if ours and "start_to_step1_s" in ours[0]:
        print("ours, process start to the end of step 1 (imports, build, compile or cache load, one step): "
              + "; ".join(f"round {i + 1} {r['start_to_step1_s']:.1f} s wall / {r['start_to_step1_cpu_s']:.1f} CPU-s"
                          for i, r in enumerate(ours)) + " (the compile cache fills in round 1 unless it held them)")
    if ours:
        t_ours = peer.median(ours, "s_per_step")
        flops = latte_train_flops(depth=args.depth)
        achieved = flops / t_ours / 1e9
        line = f"ours: {flops / 1e9:.1f} GFLOP per step -> {achieved:.1f} GFLOP/s"
        peaks = [r["matmul_peak_gflops"] for r in ours if "matmul_peak_gflops" in r]
        if peaks:
            line += (f" = {100 * achieved / max(peaks):.0f}% of the fp32 matmul peak ({max(peaks):.0f} GFLOP/s, "
                     f"best of {7 * len(peaks)} timings, {args.cpu_threads} thread(s), "
                     f"{peer.median(ours, 'matmul_peak_cpu_per_wall'):.2f} CPU-s per wall s)")
        print(line)
        for which in ("torch", "mindone"):
            if res.get(which):
                t, m = peer.median(res[which], "s_per_step"), peer.median(res[which], "peak_rss_mb")
                cpu = peer.ratio(peer.median(res[which], "cpu_s_per_step"), peer.median(ours, "cpu_s_per_step"))
                print(f"ours vs {which}: {peer.ratio(t, t_ours)} its steps/s (CPU-s: {cpu}); peak memory "
                      f"{peer.ratio(peer.median(ours, 'peak_rss_mb'), m)} its")
        torch_mm = (res.get("torch") or [{}])[0].get("block_matmul_ms")
        if ours[0].get("block_matmul_ms") and torch_mm:
            peak = max((r.get("fma_peak_gflops") or 0.0) for r in ours) or None
            print(f"block matmuls on {ours[0]['dense_impl']}, best CPU ms (ours / torch), 4096 rows (16 frames x 256 tokens); "
                  "every block does these" + (f"; GFLOP/s per CPU-second and share of this core's fp32 FMA peak "
                                              f"({peak:.0f} GFLOP/s, best register-only FMA run)" if peak else "") + ":")
            for case, ms_ in ours[0]["block_matmul_ms"].items():
                speed = peer.ratio(torch_mm[case], ms_)
                line = f"  {case:14s} {ms_:7.1f} / {torch_mm[case]:7.1f}  ({speed} torch's speed)"
                if peak:
                    gf = [block_matmul_flops(case) / t / 1e6 for t in (ms_, torch_mm[case])]
                    line += f"  {gf[0]:5.1f} / {gf[1]:5.1f} GFLOP/s = {100 * gf[0] / peak:.0f} % / {100 * gf[1] / peak:.0f} % of peak"
                print(line)
            a, b = sum(ours[0]["block_matmul_ms"].values()), sum(torch_mm.values())
            print(f"  all            {a:7.1f} / {b:7.1f}  ({peer.ratio(b, a)} torch's speed); x {args.depth} blocks "
                  f"= {a * args.depth / 1e3:.2f} of our {peer.median(ours, 'cpu_s_per_step'):.2f} CPU-s per step")


if __name__ == "__main__":
    main()
