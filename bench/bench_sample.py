"""Sampling benchmark: seconds per denoising step of our Latte against MindONE's, and DDIM-50 against
DDPM-250 wall time, on this CPU.

    pip install --no-deps --target /tmp/mindone mindone==0.5.0     # only its model code is used
    GLOG_v=3 python bench/bench_sample.py --mindone_path /tmp/mindone
    GLOG_v=3 python bench/bench_sample.py --skip_full               # per-step figures only

Both networks are Latte-S/2 (depth 12, hidden 384, patch 2, 6 heads) on 16 frames of 32x32x4
latents (256 px videos), batch 1, fp32, graph mode, unconditional, with the SAME weights (ours are
copied into MindONE's network, and the two outputs are compared), and both run through the SAME
sampler (`models.diffusion`, 250 respaced DDPM steps, `clip_denoised=False`). So the difference
is the network alone (ours with its fused CPU kernels when g++ can build them). A denoising step
is the network call plus the sampler's arithmetic and the step's noise draw: what `latte sample`
spends per step.

MindONE 0.5.0 builds its layers from `mindspore.mint`, whose kernels are not registered on CPU;
bench/bench_train.py's shim swaps them for the classic layers while MindONE's modules are imported
(the network code itself is unchanged), so this file reuses it.

Then, with our network only: the wall time of a whole DDIM-50 and a whole DDPM-250 sampling run.
"""
import argparse
import importlib.util
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("GLOG_v", "3")

import numpy as np  # noqa: E402

SIZE = dict(depth=12, hidden_size=384, patch_size=2, num_heads=6)  # Latte-S/2
FRAMES, LATENT = 16, 32


def _bench_train():
    spec = importlib.util.spec_from_file_location("bench_train", ROOT / "bench" / "bench_train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def mindone_latte(mindone_path):
    """MindONE's Latte-S/2 built through bench_train.py's `mint` shim."""
    return _bench_train().mindone_latte(mindone_path, depth=SIZE["depth"], input_size=LATENT, num_frames=FRAMES,
                                        learn_sigma=True)


def copy_weights(ours, theirs):
    """Our parameters into MindONE's network, by name (both use the original PyTorch names); returns
    the names of theirs left untouched (none expected but LayerNorm constants)."""
    import mindspore as ms

    mine = ours.parameters_dict()
    left = []
    for name, p in theirs.parameters_dict().items():
        key = name.replace("embedding_table.embedding_table", "embedding_table.weight")
        if key in mine and tuple(mine[key].shape) == tuple(p.shape):
            p.set_data(ms.Tensor(mine[key].asnumpy()))
        else:
            left.append(name)
    return left


def time_steps(net, steps, seed=0):
    """(wall seconds, CPU seconds) of each of the first `steps` DDPM-250 denoising steps (the first
    compiles). CPU seconds of this process are the fairer figure on a shared machine."""
    from models.diffusion import create_diffusion

    diffusion = create_diffusion("250")
    shape = (1, FRAMES, 4, LATENT, LATENT)
    times, cpu, t0, c0 = [], [], time.perf_counter(), time.process_time()
    loop = diffusion.p_sample_loop_progressive(net, shape, clip_denoised=False, rng=[np.random.default_rng(seed)])
    for _, out in zip(range(steps), loop):
        out["sample"].asnumpy()  # wait for the step to finish
        now, cnow = time.perf_counter(), time.process_time()
        times.append(now - t0)
        cpu.append(cnow - c0)
        t0, c0 = now, cnow
    return times, cpu


def full_run(net, method, steps, seed=0):
    from models.diffusion import create_diffusion

    diffusion = create_diffusion(str(steps))
    loop = diffusion.ddim_sample_loop if method == "ddim" else diffusion.p_sample_loop
    t0 = time.perf_counter()
    loop(net, (1, FRAMES, 4, LATENT, LATENT), clip_denoised=False, rng=[np.random.default_rng(seed)]).asnumpy()
    return time.perf_counter() - t0


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mindone_path", default="", help="folder holding the `mindone` package (pip --target)")
    p.add_argument("--steps", type=int, default=8, help="denoising steps timed per network (after 2 warm-up)")
    p.add_argument("--cpu_threads", type=int, default=1)
    p.add_argument("--skip_full", action="store_true", help="skip the whole DDIM-50 / DDPM-250 runs")
    args = p.parse_args()

    from models.runtime import setup_device
    setup_device("CPU", mode="graph", cpu_threads=args.cpu_threads, seed=0)
    import mindspore as ms

    from models.latte import Latte

    print(f"Latte-S/2, {FRAMES} frames of {LATENT}x{LATENT}x4 latents, batch 1, fp32, graph mode, "
          f"{args.cpu_threads} CPU thread(s), load average {os.getloadavg()[0]:.1f}", flush=True)
    ours = Latte(input_size=LATENT, num_frames=FRAMES, learn_sigma=True, **SIZE)
    print("ours runs " + ("its fused CPU kernels" if ours.fused_kernels else "plain ops (fused CPU kernels off or "
                          "not built)") + "; LATTE_CPU_KERNELS=0 selects the plain-ops path", flush=True)
    rng = np.random.default_rng(0)
    for name, param in ours.parameters_dict().items():  # non-zero everywhere, so outputs can be compared
        if "adaLN_modulation" in name or "final_layer.linear" in name:
            param.set_data(ms.Tensor(rng.normal(0, 0.02, param.shape).astype(np.float32)))
    ours.set_train(False)

    results = {"ours": time_steps(ours, args.steps + 2)}
    try:
        theirs = mindone_latte(args.mindone_path)
    except Exception as err:  # noqa: BLE001  (not installed, or an API change in MindONE)
        theirs = None
        print(f"MindONE: not measured ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
              f"install it with `pip install --no-deps --target /tmp/mindone mindone==0.5.0` and pass "
              f"--mindone_path /tmp/mindone", flush=True)
    if theirs is not None:
        theirs.set_train(False)
        left = copy_weights(ours, theirs)
        x = ms.Tensor(rng.standard_normal((1, FRAMES, 4, LATENT, LATENT)).astype(np.float32))
        t = ms.Tensor(np.array([500], np.int32))
        diff = np.abs(ours(x, t).asnumpy() - theirs(x, t).asnumpy()).max()
        print(f"MindONE's network with our weights ({len(left)} of its parameters not ours: "
              f"{', '.join(sorted({n.rsplit('.', 1)[-1] for n in left})) or 'none'}): max |difference| of one "
              f"forward {diff:.2e}", flush=True)
        results["mindone"] = time_steps(theirs, args.steps + 2)

    medians, cpu_medians = {}, {}
    for which, (times, cpu) in results.items():
        medians[which], cpu_medians[which] = float(np.median(times[2:])), float(np.median(cpu[2:]))
        print(f"{which:8s} {medians[which]:.3f} s per denoising step, {cpu_medians[which]:.3f} CPU-s (median of "
              f"{len(times) - 2}; steps {', '.join(f'{s:.2f}' for s in times[2:])}; first incl. compile "
              f"{times[0]:.1f} s)", flush=True)
    if "mindone" in medians:
        print(f"speed-up: {medians['mindone'] / medians['ours']:.2f}x wall, "
              f"{cpu_medians['mindone'] / cpu_medians['ours']:.2f}x CPU time (MindONE / ours)", flush=True)
    # How close to the hardware: a step is one forward pass (a third of bench_train's training FLOPs).
    bench_train = _bench_train()
    flops = bench_train.latte_train_flops(depth=SIZE["depth"], frames=FRAMES, size=LATENT) / 3
    peak = bench_train.matmul_peak()
    print(f"one step = {flops / 1e9:.0f} GFLOP of matmuls; fp32 matmul peak here {peak:.0f} GFLOP/s -> "
          + ", ".join(f"{which} {flops / m / 1e9:.0f} GFLOP/s ({100 * flops / m / 1e9 / peak:.0f}%)"
                      for which, m in medians.items()), flush=True)

    if not args.skip_full:
        full_run(ours, "ddim", 2)  # compile outside the timing
        ddim = full_run(ours, "ddim", 50)
        print(f"DDIM-50 whole run:  {ddim:7.1f} s", flush=True)
        ddpm = full_run(ours, "ddpm", 250)
        print(f"DDPM-250 whole run: {ddpm:7.1f} s  ({ddpm / ddim:.1f}x DDIM-50)", flush=True)


if __name__ == "__main__":
    main()
