"""The VAE against diffusers' AutoencoderKL on torch, side by side, on this CPU (not run by CI).

    GLOG_v=3 .venv/bin/python bench/bench_vae.py --peer_python /work/torchenv/bin/python
    GLOG_v=3 .venv/bin/python bench/bench_vae.py --stages encode --batches 1 --rounds 3   # quicker

sd-vae-ft-mse's architecture (random weights on both sides), 256 px frames. For every stage (encode =
quant_conv(encoder(x)), decode = decoder(post_quant_conv(z))) and batch size, ours and the peer run
alternately in fresh processes with the same intra-op thread count, `--rounds` times; each child
warms up (the first call compiles: printed as "first") and then times `--reps` calls. Printed: the
CPU model + ISA and load average, per round and median s/frame, frames/s, peak RSS (VmHWM) of each
side and the ratios, our GFLOP/s against the best of several fp32 matmul peak measurements, the
convolution each 3x3 shape uses here (models/conv_select.py) and the largest deviation of the
full-size VAE's output from the direct (im2col) path. Without a torch interpreter the peer is
skipped and the output says so.
"""
import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peer  # noqa: E402

SD_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, norm_num_groups=32)


def encoder_flops(ch=SD_VAE["block_out_channels"], layers=SD_VAE["layers_per_block"], size=256, latent=4):
    """Multiply-adds x 2 of one frame through encoder + quant_conv (convs, attention matmuls)."""
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
    total += conv(c, 2 * latent, 3, s) + conv(2 * latent, 2 * latent, 1, s)
    return total


def _timed(fn, reps):
    """(first call incl. compile, median wall s, median CPU s of this process) over `reps` calls. CPU
    seconds are the steadier figure on a shared host (wall time there includes waiting for a core)."""
    t = time.perf_counter()
    fn()
    first = time.perf_counter() - t
    times, cpu = [], []
    for _ in range(reps):
        t, c = time.perf_counter(), time.process_time()
        fn()
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    return first, sorted(times)[len(times) // 2], sorted(cpu)[len(cpu) // 2]


def child_ours(args):
    from models.runtime import setup_device
    setup_device("CPU", "graph", cpu_threads=args.threads)
    import numpy as np
    import mindspore as ms
    from models.vae import AutoencoderKL

    vae = AutoencoderKL(**SD_VAE)
    rng = np.random.default_rng(1)
    if args.stage == "encode":
        x = ms.Tensor(rng.uniform(-1, 1, (args.batch, 3, args.size, args.size)).astype(np.float32))
        fn = lambda: vae.encode_moments(x).asnumpy()  # noqa: E731
    else:
        z = ms.Tensor(rng.standard_normal((args.batch, 4, args.size // 8, args.size // 8)).astype(np.float32))
        fn = lambda: vae.decode(z).asnumpy()  # noqa: E731
    first, t, cpu = _timed(fn, args.reps)
    out = {"s_per_frame": t / args.batch, "cpu_s_per_frame": cpu / args.batch, "first_s": first}
    if args.peak:
        from models import cpu_kernels
        out["matmul_peak_gflops"], out["matmul_peak_cpu_per_wall"] = matmul_peak()
        out["fma_peak_gflops"] = cpu_kernels.fma_peak_gflops()  # one core's ceiling (None: no kernels)
    peer.report(out)


def child_torch(args):
    import torch
    from diffusers import AutoencoderKL

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        **SD_VAE).eval()
    if args.stage == "encode":
        x = torch.rand(args.batch, 3, args.size, args.size) * 2 - 1
        fn = lambda: vae.quant_conv(vae.encoder(x))  # noqa: E731
    else:
        z = torch.randn(args.batch, 4, args.size // 8, args.size // 8)
        fn = lambda: vae.decode(z).sample  # noqa: E731
    with torch.inference_mode():
        first, t, cpu = _timed(fn, args.reps)
    peer.report({"s_per_frame": t / args.batch, "cpu_s_per_frame": cpu / args.batch, "first_s": first,
                 "torch": torch.__version__})


def matmul_peak(n=2048, repeats=7):
    """fp32 matmul GFLOP/s through MindSpore (graph mode) at the thread count setup_device gave the
    timed work, the best of `repeats` (a single timing on a shared host can land on either side of
    the truth, the best cannot exceed the peak), and the CPU-seconds per wall second of those timings:
    the threads that really computed (1.9 at cpu_threads=1 before setup_device pinned MindSpore to
    one computing thread, when this printed 212 GFLOP/s against one core's ~126 FMA peak)."""
    import numpy as np
    import mindspore as ms
    from mindspore import ops

    a = ms.Tensor(np.random.default_rng(0).standard_normal((n, n)).astype(np.float32))
    @ms.jit
    def mm(x):  # a named function: the graph compiler parses its source, and fails on a lambda
        return ops.matmul(x, x)

    mm(a).asnumpy()
    best, wall, cpu = float("inf"), 0.0, 0.0
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        mm(a).asnumpy()
        t, c = time.perf_counter() - t, time.process_time() - c
        best, wall, cpu = min(best, t), wall + t, cpu + c
    return 2 * n ** 3 / best / 1e9, cpu / wall


def child_deviation(args):
    """Largest deviation of the full-size VAE (encode and decode, one frame) on the selected convs
    from the same VAE forced onto the direct im2col path (LATTE_CONV read at graph compile)."""
    from models.runtime import setup_device
    setup_device("CPU", "graph", cpu_threads=args.threads)
    import numpy as np
    import mindspore as ms
    from models.vae import AutoencoderKL

    ms.set_seed(0)
    selected = AutoencoderKL(**SD_VAE)
    direct = AutoencoderKL(**SD_VAE)
    ms.load_param_into_net(direct, {p.name: p for p in selected.get_parameters()})
    rng = np.random.default_rng(2)
    x = ms.Tensor(rng.uniform(-1, 1, (1, 3, args.size, args.size)).astype(np.float32))
    z = ms.Tensor(rng.standard_normal((1, 4, args.size // 8, args.size // 8)).astype(np.float32))
    enc, dec = selected.encode_moments(x).asnumpy(), selected.decode(z).asnumpy()
    os.environ["LATTE_CONV"] = "im2col"
    enc_d, dec_d = direct.encode_moments(x).asnumpy(), direct.decode(z).asnumpy()
    rel = lambda a, b: float(np.abs(a - b).max() / np.abs(b).max())  # noqa: E731
    peer.report({"encode_dev": rel(enc, enc_d), "decode_dev": rel(dec, dec_d),
                 "encode_abs": float(np.abs(enc - enc_d).max()), "decode_abs": float(np.abs(dec - dec_d).max())})


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1, help="intra-op CPU threads, both sides")
    p.add_argument("--stages", default="encode,decode")
    p.add_argument("--batches", default="1,4")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--reps", type=int, default=2, help="timed calls per child after the warm-up call")
    p.add_argument("--rounds", type=int, default=3, help="ours/peer alternations per stage and batch")
    p.add_argument("--peer_python", default="", help="interpreter with torch + diffusers (the `bench` extra)")
    p.add_argument("--no_deviation", dest="deviation", action="store_false")
    p.add_argument("--direct_too", action="store_true",
                   help="also run ours forced onto the direct im2col convs (LATTE_CONV=im2col) as a third side")
    peer.add_max_isa_argument(p)
    p.add_argument("--role", choices=("ours", "torch", "deviation"), help=argparse.SUPPRESS)
    p.add_argument("--stage", default="encode", help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--peak", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    peer.cap_isa(args.max_isa)  # into the environment every child inherits
    if args.role:
        return {"ours": child_ours, "torch": child_torch, "deviation": child_deviation}[args.role](args)

    print(peer.machine_line())
    py, why = peer.peer_python(args.peer_python)
    print(f"peer: diffusers AutoencoderKL on torch ({py})" if py else f"peer SKIPPED: {why}")
    print(f"{args.threads} intra-op thread(s) on both sides, {args.size} px, {args.rounds} alternating rounds")
    base = ["--threads", str(args.threads), "--size", str(args.size), "--reps", str(args.reps)]
    summary = []
    for stage in args.stages.split(","):
        for batch in [int(b) for b in args.batches.split(",")]:
            print(f"== {stage}, batch {batch} ==")
            common = base + ["--stage", stage, "--batch", str(batch)]
            peak = ["--peak"] if stage == "encode" else []
            sides = {"ours": [sys.executable, __file__, "--role", "ours"] + common + peak,
                     "torch": [py, __file__, "--role", "torch"] + common if py else None}
            if args.direct_too:
                sides["ours_im2col"] = ([sys.executable, __file__, "--role", "ours"] + common, {"LATTE_CONV": "im2col"})
            res = peer.alternate(sides, args.rounds)
            ours_t, torch_t = peer.median(res["ours"], "s_per_frame"), peer.median(res["torch"], "s_per_frame")
            ours_m, torch_m = peer.median(res["ours"], "peak_rss_mb"), peer.median(res["torch"], "peak_rss_mb")
            line = (f"{stage} b{batch}: ours {ours_t:.3f} s/frame ({1 / ours_t:.2f} frames/s, first call "
                    f"{peer.median(res['ours'], 'first_s'):.1f} s, peak RSS {ours_m:.0f} MB)")
            if py:
                line += (f"; torch {torch_t:.3f} s/frame ({1 / torch_t:.2f} frames/s, first call "
                         f"{peer.median(res['torch'], 'first_s'):.1f} s, peak RSS {torch_m:.0f} MB); "
                         f"speed ours/torch {peer.ratio(torch_t, ours_t)} torch's frames/s (CPU-s: "
                         f"{peer.ratio(peer.median(res['torch'], 'cpu_s_per_frame'), peer.median(res['ours'], 'cpu_s_per_frame'))}), "
                         f"memory {peer.ratio(ours_m, torch_m)} torch's")
            else:
                line += "; torch SKIPPED"
            if stage == "encode" and res["ours"]:
                best_peak = max(r.get("matmul_peak_gflops", 0) for r in res["ours"])
                gflops = encoder_flops(size=args.size) / ours_t / 1e9
                # Winograd does fewer multiplications than the direct count, so this can pass 100 %
                line += (f"; {encoder_flops(size=args.size) / 1e9:.0f} GFLOP/frame (direct-conv count), "
                         f"{gflops:.0f} direct-equivalent GFLOP/s = {100 * gflops / best_peak:.0f} % of the fp32 matmul peak "
                         f"({best_peak:.0f} GFLOP/s, best of {7 * len(res['ours'])} at the timed work's "
                         f"{args.threads} thread(s), {peer.median(res['ours'], 'matmul_peak_cpu_per_wall'):.2f} "
                         f"CPU-s per wall s; one core's FMA peak {max(r.get('fma_peak_gflops') or 0 for r in res['ours']):.0f})")
            if res.get("ours_im2col"):
                t_d = peer.median(res["ours_im2col"], "s_per_frame")
                c_d = peer.median(res["ours_im2col"], "cpu_s_per_frame")
                line += (f"; ours on direct im2col convs {t_d:.3f} s/frame, {c_d:.3f} CPU-s/frame, peak RSS "
                         f"{peer.median(res['ours_im2col'], 'peak_rss_mb'):.0f} MB: selected convs "
                         f"{peer.ratio(t_d, ours_t)} (CPU-s {peer.ratio(c_d, peer.median(res['ours'], 'cpu_s_per_frame'))})")
            summary.append(line)
    print("== summary (medians over rounds) ==")
    print(peer.machine_line())
    for line in summary:
        print(line)
    if args.deviation:
        dev = peer.run_child([sys.executable, __file__, "--role", "deviation"] + base)
        if dev:
            print(f"selected convs vs direct im2col, full-size VAE, 1 frame: encode max deviation "
                  f"{dev['encode_abs']:.2e} ({dev['encode_dev']:.1e} of max |output|), decode "
                  f"{dev['decode_abs']:.2e} ({dev['decode_dev']:.1e})")


if __name__ == "__main__":
    main()
