"""What every bench shares: the machine line, the PyTorch peer's interpreter, child processes that
report one JSON line, alternating ours / peer rounds, medians and ratios.

The peer (torch, diffusers: the `bench` extra) usually lives in a separate environment from
MindSpore: `--peer_python PATH` names its interpreter; without it the bench's own interpreter is
used when it can import torch, and otherwise the peer is skipped, which the bench says plainly.
Each measurement is a fresh process with the same thread count, ours first then the peer, repeated
`rounds` times, so that a busy host (load average printed) slows both sides alike; figures are
medians over rounds, and peak memory is the child's VmHWM (peak resident set).

`--max_isa avx2` (add_max_isa_argument / cap_isa) holds both sides to AVX2 + FMA on an AVX-512 machine,
to measure what an AVX2 machine would see: every child inherits LATTE_MAX_ISA (ours: kernels built for
-march=haswell, their own ISA key) and the libraries' caps (ONEDNN_MAX_CPU_ISA for MindSpore's and torch's
oneDNN, MKL_ENABLE_INSTRUCTIONS for torch's sgemm, ATEN_CPU_CAPABILITY for torch's own kernels); each
child reports the ISA its libraries say they run at.
"""
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def cpu_model():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_line():
    from models.cpu_features import isa_summary
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return f"CPU: {cpu_model()}, {os.cpu_count()} vCPUs, {isa_summary()}; load average {load}"


def add_max_isa_argument(parser):
    parser.add_argument("--max_isa", default="", choices=("", "avx2"),
                        help="hold both sides to this ISA (emulate an AVX2 machine on an AVX-512 one; "
                             "see models/cpu_features.py)")


def cap_isa(name):
    """Parent side of --max_isa: put LATTE_MAX_ISA and the libraries' caps into this process's environment,
    which every child (ours and the peer) inherits. Nothing without a name."""
    if not name:
        return
    os.environ["LATTE_MAX_ISA"] = name
    from models.cpu_features import library_env, max_isa
    if max_isa() is None:
        print(f"note: --max_isa {name} changes nothing here: this CPU has nothing above it")
    os.environ.update(library_env())


def child_isa():
    """What the child's libraries say they run at: torch's ATen dispatch, or MindSpore's oneDNN and our
    kernels' compiler target (None in a child that loaded neither)."""
    if "torch" in sys.modules:
        import torch
        return f"ATen {torch.backends.cpu.get_cpu_capability()}, MKL/oneDNN capped: " \
               f"{os.environ.get('MKL_ENABLE_INSTRUCTIONS', 'no')}/{os.environ.get('ONEDNN_MAX_CPU_ISA', 'no')}"
    if "mindspore" in sys.modules:
        from models.cpu_features import march_flags, onednn_isa
        return f"oneDNN {onednn_isa()}, kernels {' '.join(march_flags())}"
    return None


def proc_status_mb(keys):
    """{key: MB} of the given /proc/self/status fields (kB there) of this process; both sides' children
    read it (models.runtime.rss_split is ours alone: it imports MindSpore)."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key = line.split(":", 1)[0]
        if key in keys:
            out[key] = int(line.split()[1]) / 1024
    return out


def vmhwm_mb():
    """Peak resident set of this process (VmHWM), in MB."""
    return proc_status_mb(("VmHWM",)).get("VmHWM", float("nan"))


def report(result):
    """Child side: print the one RESULT line the parent reads (peak RSS and load added here)."""
    result = dict(result, peak_rss_mb=vmhwm_mb(), load_avg=os.getloadavg()[0], isa=child_isa())
    print("RESULT " + json.dumps(result), flush=True)


def peer_python(path):
    """The interpreter that runs the torch peer, or (None, reason) when there is none."""
    if path:
        if not Path(path).exists():
            return None, f"--peer_python {path} does not exist"
        probe = subprocess.run([path, "-c", "import torch, diffusers"], capture_output=True, text=True)
        if probe.returncode:
            last = (probe.stderr.strip().splitlines() or ["?"])[-1]
            return None, f"{path} cannot import torch + diffusers ({last})"
        return path, ""
    probe = subprocess.run([sys.executable, "-c", "import torch, diffusers"], capture_output=True)
    if probe.returncode == 0:
        return sys.executable, ""
    return None, ("torch/diffusers not importable here; install the `bench` extra "
                  "(pip install -e .[bench]) or pass --peer_python PATH")


def latte_peers(peer_python_arg, mindone_path):
    """The interpreter of the original-Latte torch peer, checked against the original's oracle
    outputs (None when absent or when the check fails), after printing what runs and what is skipped."""
    py, why = peer_python(peer_python_arg)
    if py:
        check = subprocess.run([py, str(ROOT / "bench" / "check_torch_latte.py")], capture_output=True, text=True)
        print("torch Latte vs the original's oracle: " + (check.stdout.strip().splitlines() or ["?"])[-1])
        if check.returncode:
            py, why = None, "bench/check_torch_latte.py failed: the torch Latte is not the original"
    print(f"peer: the original Latte on torch ({py})" if py else f"torch peer SKIPPED: {why}")
    if not mindone_path:
        print("MindONE peer SKIPPED: no --mindone_path")
    return py


def run_child(cmd, env=None):
    """Run one child; return its RESULT dict, or None (its stderr tail printed) when it failed."""
    run = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
    if run.returncode or not lines:
        print(f"  child failed (exit {run.returncode}): {' '.join(cmd[:3])} ...\n{run.stderr[-2000:]}", file=sys.stderr)
        return None
    for line in run.stderr.splitlines():
        if line.startswith("conv_select:"):
            print("  " + line)
    return json.loads(lines[-1][len("RESULT "):])


def alternate(sides, rounds):
    """sides: {name: argv, (argv, extra env) or None}. Runs each side once per round, in order;
    returns {name: [results]}."""
    results = {name: [] for name in sides}
    for r in range(rounds):
        for name, spec in sides.items():
            if spec is None:
                continue
            cmd, env = spec if isinstance(spec, tuple) else (spec, None)
            res = run_child(cmd, env)
            if res is not None:
                results[name].append(res)
                print(f"  round {r + 1}/{rounds} {name}: " + ", ".join(
                    f"{k} {v:.3g}" for k, v in res.items() if isinstance(v, (int, float)))
                    + (f"; ISA: {res['isa']}" if r == 0 and res.get("isa") else ""), flush=True)
    return results


def median(results, key):
    values = [r[key] for r in results if key in r]
    return statistics.median(values) if values else float("nan")


def ratio(a, b):
    """a / b with two significant decimals whatever the size (never '0x' for ratios under 1)."""
    if not b or b != b or a != a:
        return "n/a"
    return f"{a / b:.2f}x"
