"""Sampling benchmark: seconds per denoising step of our Latte against the original PyTorch Latte (and
MindONE's), and DDIM-50 against DDPM-250 wall time, on this CPU.

    GLOG_v=3 python bench/bench_sample.py --peer_python /work/torchenv/bin/python --skip_full
    pip install --no-deps --target /tmp/mindone mindone==0.5.0     # only its model code is used
    GLOG_v=3 python bench/bench_sample.py --mindone_path /tmp/mindone

Each side runs in a fresh process (same threads), alternating `--rounds` times; printed: medians,
peak RSS (VmHWM), ratios, CPU/ISA and load average, and "SKIPPED" for a peer that is not available.
The torch peer is bench/torch_latte.py (checked against the original's oracle outputs by
bench/check_torch_latte.py, run first) under torch.inference_mode; its step is the network call plus
the same DDPM posterior arithmetic on torch (a few passes over a 16x4x32x32 tensor).

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

`--cli` instead runs `latte sample` itself end to end (load, denoise, VAE decode, GIF/MP4 writing) on
a Latte-S/2 checkpoint and a VAE of sd-vae-ft-mse's size that it writes (random weights), twice into
one fresh compile cache, and prints each run's peak RSS, CPU seconds, s/step and decode time:

    GLOG_v=3 python bench/bench_sample.py --cli --steps 4

Memory, both sides: peak RSS (VmHWM) and, at the highest VmRSS a thread sampled every 5 ms, its split
into RssAnon (heap, tensors, graphs: the work) and RssFile (mapped library code and files), then the
resident set by mapping at the end (/proc/self/smaps grouped: the framework's libraries, oneDNN, other
shared objects and Python extensions, heap and anonymous memory). Ours drops the clean library pages
it no longer runs, as `latte sample` does (models.runtime.drop_clean_library_pages);
`--compare_library_pages` adds a third side, ours with them kept (LATTE_DROP_LIBRARY_PAGES=0).
"""
import argparse
import collections
import importlib.util
import json
import os
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
os.environ.setdefault("GLOG_v", "3")

import numpy as np  # noqa: E402

SIZE = dict(depth=12, hidden_size=384, patch_size=2, num_heads=6)  # Latte-S/2
FRAMES, LATENT = 16, 32


def _status():
    import peer  # bench/peer.py: stdlib only, so the torch child reads it too
    return peer.proc_status_mb(("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem"))


class PeakSplit(threading.Thread):
    """Samples /proc/self/status every `every_s` and keeps the sample of the highest VmRSS: VmHWM says
    how high the resident set went, this says of what (anon vs file pages) it was made there. A
    sample may miss the exact peak moment by a few ms; `at_peak()` gives VmRSS with the split."""

    def __init__(self, every_s=0.005):
        super().__init__(daemon=True)
        self.every_s, self.best, self.stop = every_s, _status(), False

    def run(self):
        while not self.stop:
            now = _status()
            if now["VmRSS"] > self.best["VmRSS"]:
                self.best = now
            time.sleep(self.every_s)

    def at_peak(self):
        now = _status()
        best = now if now["VmRSS"] > self.best["VmRSS"] else self.best
        return {"peak_rss_mb": now["VmHWM"], "sampled_peak_mb": best["VmRSS"], "peak_anon_mb": best["RssAnon"],
                "peak_file_mb": best["RssFile"], "peak_shmem_mb": best.get("RssShmem", 0.0)}


def _mapping_group(name):
    base = os.path.basename(name)
    if not name.startswith("/"):
        return "heap+anon" if name in ("", "[heap]") or name.startswith("[anon") else name
    if base.startswith(("libmindspore", "libms", "_c_expression", "_c_dataengine", "_c_mindrecord")):
        return "mindspore .so"
    if base.startswith(("libtorch", "libc10", "_C.")):
        return "torch .so"
    if base.startswith(("libdnnl", "libmkl", "libgomp", "libiomp")):
        return "oneDNN/OpenMP .so"
    if ".so" in base:
        return "other .so/ext"
    return "other files"


def mapping_rss():
    """Resident MB by mapping group (see _mapping_group), largest first, from /proc/self/smaps."""
    groups, current = collections.Counter(), "heap+anon"
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split(None, 6)
            if head and "-" in head[0] and not head[0].endswith(":"):
                current = _mapping_group(head[5].strip() if len(head) > 5 else "")
            elif head and head[0] == "Rss:":
                groups[current] += int(head[1]) / 1024
    return {k: round(v, 1) for k, v in groups.most_common()}


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


def _ours(rng):
    import mindspore as ms
    from models.latte import Latte

    ours = Latte(input_size=LATENT, num_frames=FRAMES, learn_sigma=True, **SIZE)
    print("ours runs " + ("its fused CPU kernels" if ours.fused_kernels else "plain ops (fused CPU kernels off or "
                          "not built)") + "; LATTE_CPU_KERNELS=0 selects the plain-ops path; Linear matmuls on "
          + ours.dense_impl + " (LATTE_DENSE=sgemm|mindspore forces)", flush=True)
    for name, param in ours.parameters_dict().items():  # non-zero everywhere, so outputs can be compared
        if "adaLN_modulation" in name or "final_layer.linear" in name:
            param.set_data(ms.Tensor(rng.normal(0, 0.02, param.shape).astype(np.float32)))
    ours.set_train(False)
    return ours


def child(args):
    """One side in this process: time `steps` denoising steps after 2 warm-up ones; report."""
    if args.role == "torch":
        return child_torch(args)
    peak = PeakSplit()
    peak.start()
    from models.runtime import drop_clean_library_pages, setup_device
    setup_device("CPU", mode="graph", cpu_threads=args.cpu_threads, seed=0, reuse_memory=True)  # as latte sample
    import mindspore as ms

    drop_clean_library_pages()  # as latte sample: after the import, and after loading the network
    rng = np.random.default_rng(0)
    ours = _ours(rng)
    drop_clean_library_pages()
    net = ours
    extra = {"fused_kernels": int(bool(ours.fused_kernels))}
    if args.role == "mindone":
        net = mindone_latte(args.mindone_path)
        net.set_train(False)
        left = copy_weights(ours, net)
        x = ms.Tensor(rng.standard_normal((1, FRAMES, 4, LATENT, LATENT)).astype(np.float32))
        t = ms.Tensor(np.array([500], np.int32))
        extra = {"max_diff_vs_ours": float(np.abs(ours(x, t).asnumpy() - net(x, t).asnumpy()).max()),
                 "params_not_ours": len(left)}
    times, cpu = time_steps(net, args.steps + 2)
    out = dict(extra, s_per_step=float(np.median(times[2:])), cpu_s_per_step=float(np.median(cpu[2:])),
               first_s=times[0])
    if args.role == "ours" and args.full:
        full_run(ours, "ddim", 2)  # compile outside the timing
        out["ddim50_s"] = full_run(ours, "ddim", 50)
        out["ddpm250_s"] = full_run(ours, "ddpm", 250)
    import peer
    if args.role == "ours":
        # the peak RSS of sampling is taken before the matmul-peak probe adds its own matrices and
        # graph (the torch side runs none); the round line shows both
        split, maps = peak.at_peak(), mapping_rss()
        peak.stop = True
        out["matmul_peak_gflops"], out["matmul_peak_cpu_per_wall"] = _bench_train().matmul_peak()
        out["peak_rss_mb_with_matmul_probe"] = peer.vmhwm_mb()
        print("RESULT " + json.dumps(dict(out, **split, mappings=maps, load_avg=os.getloadavg()[0],
                                          isa=peer.child_isa())), flush=True)
        return
    peak.stop = True
    peer.report(dict(out, **{k: v for k, v in peak.at_peak().items() if k != "peak_rss_mb"}, mappings=mapping_rss()))


def child_torch(args):
    peak = PeakSplit()
    peak.start()
    import torch
    import peer
    from torch_latte import Latte as TorchLatte

    torch.set_num_threads(args.cpu_threads)
    torch.manual_seed(0)
    net = TorchLatte(input_size=LATENT, num_frames=FRAMES, **SIZE).eval()
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)[::4]  # 250 steps (arithmetic only)
    alphas = torch.cumprod(1 - betas, 0)
    prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas[:-1]])
    post_var = betas * (1 - prev) / (1 - alphas)
    c1, c2 = (betas * prev.sqrt() / (1 - alphas)).float(), ((1 - prev) * (1 - betas).sqrt() / (1 - alphas)).float()
    log_clip = torch.log(torch.cat([post_var[1:2], post_var[1:]])).float()
    log_beta, ra, rm1 = torch.log(betas).float(), (1 / alphas).sqrt().float(), (1 / alphas - 1).sqrt().float()
    x = torch.randn(1, FRAMES, 4, LATENT, LATENT)
    times, cpu = [], []
    with torch.inference_mode():
        for i in reversed(range(250 - args.steps - 2, 250)):
            t0, c0 = time.perf_counter(), time.process_time()
            eps, v = net(x, torch.tensor([i * 4])).chunk(2, dim=2)
            frac = (v + 1) / 2
            log_var = frac * log_beta[i] + (1 - frac) * log_clip[i]
            mean = c1[i] * (ra[i] * x - rm1[i] * eps) + c2[i] * x
            x = mean + (0.5 * log_var).exp() * torch.randn_like(x) if i else mean
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
    peak.stop = True
    split = {k: v for k, v in peak.at_peak().items() if k != "peak_rss_mb"}  # report() adds VmHWM
    peer.report(dict(split, s_per_step=float(np.median(times[2:])), cpu_s_per_step=float(np.median(cpu[2:])),
                     first_s=times[0], torch=torch.__version__, mappings=mapping_rss()))


def _cli_files(folder):
    """A Latte-S/2 checkpoint (as `latte convert` writes it) and a VAE of sd-vae-ft-mse's size as a .ckpt
    (the README's format), random weights, in `folder`; their paths."""
    from models.convert import save_weights
    from models.latte import Latte
    from models.vae import AutoencoderKL

    rng = np.random.default_rng(0)
    config = dict(input_size=LATENT, in_channels=4, num_frames=FRAMES, learn_sigma=True, extras=1, mlp_ratio=4.0,
                  **SIZE)
    weights = {}
    for name, p in Latte(**config).parameters_dict().items():
        v = p.asnumpy()
        if "adaLN_modulation" in name or "final_layer.linear" in name:  # non-zero outputs
            v = rng.normal(0, 0.02, v.shape).astype(np.float32)
        weights[name] = v
    latte = os.path.join(folder, "latte_s2.safetensors")
    save_weights(latte, weights, "safetensors", "fp32", {"kind": "latte", "config": config, "variant": "Latte-S/2"})
    vae_config = dict(in_channels=3, out_channels=3, block_out_channels=[128, 256, 512, 512], layers_per_block=2,
                      latent_channels=4, norm_num_groups=32)
    vae = os.path.join(folder, "sd_vae.ckpt")
    save_weights(vae, {k: p.asnumpy() for k, p in AutoencoderKL(**vae_config).parameters_dict().items()}, "ckpt",
                 "fp32", {"kind": "vae", "config": vae_config})
    return latte, vae


def cli_end_to_end(args):
    """`latte sample` as a user runs it, twice into one fresh compile cache (compiling, then cached): peak
    RSS of the command's process (its rusage), its CPU seconds, and its own s/step and decode time."""
    import re
    import subprocess
    import tempfile

    import peer
    folder = tempfile.mkdtemp(prefix="bench_sample_cli_")
    # Written by a child: a command's peak RSS (rusage ru_maxrss) starts from what its forked parent held
    # resident, so this process stays without MindSpore and the networks.
    subprocess.run([sys.executable, __file__, "--make_cli_files", folder], check=True)
    latte, vae = (os.path.join(folder, name) for name in ("latte_s2.safetensors", "sd_vae.ckpt"))
    argv = [sys.executable, str(ROOT / "latte_cli.py"), "sample", "-c", str(ROOT / "configs/inference/tiny.yaml"),
            "--checkpoint", latte, "--vae", vae, "--num_samples", "1", "--sampling_steps", str(args.steps),
            "--sample_method", "ddpm", "--decode_micro_batch", "1", "--cpu_threads", str(args.cpu_threads),
            "--output_folder", os.path.join(folder, "out"), "--progress", "False"]
    env = dict(os.environ, LATTE_COMPILE_CACHE=os.path.join(folder, "compile_cache"), PYTHONPATH=str(ROOT))
    print(f"`latte sample`: Latte-S/2 {FRAMES}x{8 * LATENT}x{8 * LATENT}, DDPM {args.steps} steps, one video, "
          f"sd-vae-ft-mse-size VAE (.ckpt, random weights), decode_micro_batch 1; files in {folder}", flush=True)
    for run in ("compiling", "cached"):
        child = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        out = child.stdout.read()
        _, status, usage = os.wait4(child.pid, 0)
        timing = re.search(r"denoised in ([\d.]+)s \(([\d.]+) s/step\), decoded in ([\d.]+)s", out)
        if status or not timing:
            print(f"  {run}: FAILED (status {status})\n{out[-2000:]}")
            return
        print(f"  {run:9s} peak RSS {usage.ru_maxrss / 1024:5.0f} MB, {usage.ru_utime + usage.ru_stime:6.1f} CPU-s; "
              f"denoise {timing.group(2)} s/step (of {timing.group(1)} s incl. compile), decode "
              f"{timing.group(3)} s; load {os.getloadavg()[0]:.2f}", flush=True)
    print(peer.machine_line())


def main():
    import peer
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--peer_python", default="", help="interpreter with torch (the `bench` extra)")
    p.add_argument("--mindone_path", default="", help="folder holding the `mindone` package (pip --target)")
    p.add_argument("--steps", type=int, default=6, help="denoising steps timed per child (after 2 warm-up)")
    p.add_argument("--rounds", type=int, default=2, help="alternations of the sides")
    p.add_argument("--cpu_threads", type=int, default=1)
    p.add_argument("--skip_full", dest="full", action="store_false", help="skip the whole DDIM-50 / DDPM-250 runs")
    p.add_argument("--compare_library_pages", action="store_true",
                   help="also run ours with its clean library pages kept resident (LATTE_DROP_LIBRARY_PAGES=0)")
    peer.add_max_isa_argument(p)
    p.add_argument("--cli", action="store_true",
                   help="instead: `latte sample` end to end, compiling then cached (ours only; --steps steps)")
    p.add_argument("--role", choices=("ours", "torch", "mindone"), help=argparse.SUPPRESS)
    p.add_argument("--make_cli_files", default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    peer.cap_isa(args.max_isa)  # into the environment every child inherits
    if args.role:
        return child(args)
    if args.make_cli_files:
        return _cli_files(args.make_cli_files)
    if args.cli:
        print(peer.machine_line(), flush=True)
        return cli_end_to_end(args)

    print(peer.machine_line())
    print(f"Latte-S/2, {FRAMES} frames of {LATENT}x{LATENT}x4 latents, batch 1, fp32, graph mode, "
          f"{args.cpu_threads} CPU thread(s), {args.rounds} rounds", flush=True)
    py = peer.latte_peers(args.peer_python, args.mindone_path)
    common = ["--steps", str(args.steps), "--cpu_threads", str(args.cpu_threads)]
    ours_cmd = [sys.executable, __file__, "--role", "ours"] + common + ([] if args.full else ["--skip_full"])
    sides = {"ours": ours_cmd,
             "ours_kept": (ours_cmd, {"LATTE_DROP_LIBRARY_PAGES": "0"}) if args.compare_library_pages else None,
             "torch": [py, __file__, "--role", "torch"] + common if py else None,
             "mindone": ([sys.executable, __file__, "--role", "mindone", "--mindone_path", args.mindone_path,
                          "--skip_full"] + common) if args.mindone_path else None}
    res = peer.alternate(sides, args.rounds)
    print("== summary (medians over rounds) ==")
    print(peer.machine_line())
    for which, rs in res.items():
        if rs:
            print(f"{which:8s} {peer.median(rs, 's_per_step'):.3f} s per denoising step, "
                  f"{peer.median(rs, 'cpu_s_per_step'):.3f} CPU-s, first step (incl. compile) "
                  f"{peer.median(rs, 'first_s'):.1f} s, peak RSS {peer.median(rs, 'peak_rss_mb'):.0f} MB"
                  + (f", max |diff| vs ours {rs[0]['max_diff_vs_ours']:.1e} (its RSS includes ours)"
                     if which == "mindone" else ""))
            if "peak_anon_mb" in rs[-1]:
                last = rs[-1]
                print(f"{'':8s} at its highest sampled RSS ({last['sampled_peak_mb']:.0f} MB, last round): "
                      f"anon {last['peak_anon_mb']:.0f} + file {last['peak_file_mb']:.0f} + shmem "
                      f"{last['peak_shmem_mb']:.0f} MB; resident at the end by mapping: " + ", ".join(
                          f"{k} {v:.0f}" for k, v in last["mappings"].items() if v >= 1))
    ours = res["ours"]
    if ours:
        t_ours = peer.median(ours, "s_per_step")
        def mem(key, which):
            return peer.ratio(peer.median(ours, key), peer.median(res[which], key))

        for which in ("torch", "mindone", "ours_kept"):
            if not res.get(which):
                continue
            if which == "ours_kept":
                print(f"ours vs ours_kept (library pages kept resident): peak memory {mem('peak_rss_mb', which)} its; "
                      f"anon at the peak {peer.median(ours, 'peak_anon_mb'):.0f} vs "
                      f"{peer.median(res[which], 'peak_anon_mb'):.0f} MB")
                continue
            cpu = peer.ratio(peer.median(res[which], "cpu_s_per_step"), peer.median(ours, "cpu_s_per_step"))
            anon = f", anon at the peak {mem('peak_anon_mb', which)} its" if "peak_anon_mb" in res[which][0] else ""
            print(f"ours vs {which}: {peer.ratio(peer.median(res[which], 's_per_step'), t_ours)} its steps/s "
                  f"(CPU-s: {cpu}); peak memory {mem('peak_rss_mb', which)} its{anon}")
        flops = _bench_train().latte_train_flops(depth=SIZE["depth"], frames=FRAMES, size=LATENT) / 3
        peak = max(r["matmul_peak_gflops"] for r in ours)
        print(f"one step = {flops / 1e9:.0f} GFLOP of matmuls; fp32 matmul peak {peak:.0f} GFLOP/s (best of "
              f"{7 * len(ours)}) -> ours {flops / t_ours / 1e9:.0f} GFLOP/s ({100 * flops / t_ours / 1e9 / peak:.0f}%)")
        if "ddim50_s" in ours[0]:
            ddim, ddpm = peer.median(ours, "ddim50_s"), peer.median(ours, "ddpm250_s")
            print(f"DDIM-50 whole run:  {ddim:7.1f} s\nDDPM-250 whole run: {ddpm:7.1f} s  ({ddpm / ddim:.1f}x DDIM-50)")


if __name__ == "__main__":
    main()
