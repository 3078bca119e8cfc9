"""How fast the VAE encoder runs on CPU, against the CPU's own matmul peak (not run by CI).

    GLOG_v=3 .venv/bin/python bench/bench_vae.py                 # 1 intra-op thread, 2 frames of 256 px
    GLOG_v=3 .venv/bin/python bench/bench_vae.py --threads 1,2   # one subprocess per thread count

Prints, from one run: the fp32 matmul peak (4096^3 through MindSpore in graph mode), the sd-vae-ft-mse
encoder's frames/s and achieved GFLOP/s at 256 px (random weights; conv and attention FLOPs counted
analytically), and the same encoder through MindSpore's native conv for comparison. The native path
is ~1000x slower on CPU, so it is timed on ONE frame at a small size and scaled by FLOPs.
"""
import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TORCH_S_PER_FRAME = 0.80  # diffusers AutoencoderKL.encode, 256 px, torch on this CPU (measured earlier)


def encoder_flops(vae, size):
    """Multiply-adds x 2 of one frame through encoder + quant_conv (convs, attention matmuls)."""
    ch = vae.block_out_channels
    layers = len(vae.encoder.down_blocks[0].resnets)
    conv = lambda cin, cout, k, s: 2 * cin * cout * k * k * s * s  # noqa: E731
    total = conv(3, ch[0], 3, size)
    s, prev = size, ch[0]
    for i, c in enumerate(ch):
        for j in range(layers):
            cin = prev if j == 0 else c
            total += conv(cin, c, 3, s) + conv(c, c, 3, s) + (conv(cin, c, 1, s) if cin != c else 0)
        prev = c
        if i < len(ch) - 1:
            s //= 2
            total += conv(c, c, 3, s)  # stride 2: counted at the output size
    c, t = ch[-1], s * s
    total += 2 * (conv(c, c, 3, s) * 2)  # two mid resnets
    total += 4 * 2 * t * c * c + 2 * 2 * t * t * c  # q, k, v, out projections; q k^T and attn v
    total += conv(c, 2 * vae.latent_channels, 3, s) + conv(2 * vae.latent_channels, 2 * vae.latent_channels, 1, s)
    return total


def best_time(fn, reps):
    fn()  # compile / warm up
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times), sum(times) / len(times)


def run(threads, frames, size, native_size, reps):
    from models.runtime import setup_device
    setup_device("CPU", "graph", cpu_threads=threads)
    import numpy as np
    import mindspore as ms
    from mindspore import ops
    from models.vae import AutoencoderKL

    print(f"== CPU, graph mode, {threads} intra-op thread(s), {os.cpu_count()} vCPUs ==")
    n = 4096
    a = ms.Tensor(np.random.default_rng(0).standard_normal((n, n), np.float32))

    @ms.jit
    def mm(x):
        return ops.matmul(x, x)[:1, :1]

    vae = AutoencoderKL()  # sd-vae-ft-mse, random weights, conv_impl="auto" -> im2col + matmul on CPU
    img = ms.Tensor(np.random.default_rng(1).uniform(-1, 1, (frames, 3, size, size)).astype(np.float32))
    flops = encoder_flops(vae, size) * frames
    # Peak and encoder are timed alternately, best of each, so that a busy host skews both alike.
    mm(a).asnumpy()
    vae.encode_moments(img).asnumpy()  # compile
    t_mm, t_enc = [], []
    for _ in range(reps):
        t_mm.append(best_time(lambda: mm(a).asnumpy(), 2)[0])
        t_enc.append(best_time(lambda: vae.encode_moments(img).asnumpy(), 1)[0])
    peak = 2 * n ** 3 / min(t_mm) / 1e9
    t_best, t_mean = min(t_enc), sum(t_enc) / len(t_enc)
    gflops = flops / t_best / 1e9
    print(f"fp32 matmul {n}^3: best {min(t_mm) * 1e3:.0f} ms -> peak {peak:.0f} GFLOP/s")
    print(f"encoder (matmul convs) {frames} x {size} px: best {t_best:.2f} s (mean {t_mean:.2f} s) -> "
          f"{frames / t_best:.2f} frames/s, {t_best / frames:.2f} s/frame, "
          f"{flops / frames / 1e9:.0f} GFLOP/frame, {gflops:.0f} GFLOP/s = {100 * gflops / peak:.0f} % of peak")
    print(f"  reference: diffusers (torch) encodes a {size} px frame in {TORCH_S_PER_FRAME:.2f} s on this CPU "
          f"(measured earlier, not in this run): ours {t_best / frames:.2f} s/frame, "
          f"{TORCH_S_PER_FRAME / (t_best / frames):.2f}x torch's speed")

    native = AutoencoderKL(conv_impl="native")
    small = ms.Tensor(np.random.default_rng(2).uniform(-1, 1, (1, 3, native_size, native_size)).astype(np.float32))
    t_small, _ = best_time(lambda: vae.encode_moments(small).asnumpy(), reps)
    t_nat, _ = best_time(lambda: native.encode_moments(small).asnumpy(), 1)
    f_small = encoder_flops(vae, native_size)
    scaled = t_nat * encoder_flops(vae, size) / f_small
    print(f"encoder, ONE frame at {native_size} px (native nn.Conv2d-style ops.conv2d is too slow for {size} px): "
          f"native {t_nat:.2f} s ({f_small / t_nat / 1e9:.1f} GFLOP/s) vs matmul {t_small:.3f} s "
          f"({f_small / t_small / 1e9:.0f} GFLOP/s): {t_nat / t_small:.0f}x; native scaled by FLOPs to {size} px: "
          f"~{scaled:.0f} s/frame")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", default="1", help="intra-op CPU threads; a comma list runs one process each")
    parser.add_argument("--frames", type=int, default=2, help="frames per encode call (memory ~1 GB each)")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--native-size", type=int, default=32, help="image size for the native-conv timing")
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    counts = [int(t) for t in args.threads.split(",")]
    if len(counts) == 1:
        run(counts[0], args.frames, args.size, args.native_size, args.reps)
        return
    for t in counts:
        cmd = [sys.executable, __file__, "--threads", str(t), "--frames", str(args.frames), "--size",
               str(args.size), "--native-size", str(args.native_size), "--reps", str(args.reps)]
        subprocess.run(cmd, check=True)


if __name__ == "__main__":
    main()
