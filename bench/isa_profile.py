"""Where a command spends its CPU time, by library and symbol, and how much of it runs AVX-512 code.

    GLOG_v=3 .venv/bin/python bench/isa_profile.py --max_isa avx2 -- .venv/bin/python bench/bench_vae.py \
        --role ours --stage encode --batch 1 --reps 1

Runs the command under `perf record -e cpu-clock` (a timer: hardware counters are often not available
on virtual machines) and prints each library's share, the top symbols, and for each symbol whether its
code holds zmm (AVX-512) instructions and the share of its samples that landed on one. This is how to
check what `--max_isa avx2` (LATTE_MAX_ISA, models/cpu_features.py) leaves at AVX-512: code that decides
by CPUID at runtime and has no cap of its own. Code JIT-compiled at runtime (oneDNN's kernels) has no
file to disassemble; it shows as its own line, capped through ONEDNN_MAX_CPU_ISA.
"""
import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peer  # noqa: E402

SAMPLE = re.compile(r"^\s*[0-9a-f]+\s+(?P<sym>.+?)\+0x(?P<off>[0-9a-f]+)\s+\((?P<dso>[^)]*)\)\s*$")
UNKNOWN = re.compile(r"^\s*[0-9a-f]+\s+(?P<sym>\S+)\s+\((?P<dso>[^)]*)\)\s*$")


def samples(data):
    """Counter of (dso, symbol, offset) over perf's samples."""
    out = subprocess.run(["perf", "script", "-i", data, "-F", "ip,sym,symoff,dso"], capture_output=True,
                         text=True).stdout
    counts = collections.Counter()
    for line in out.splitlines():
        m = SAMPLE.match(line) or UNKNOWN.match(line)
        if m:
            counts[(m["dso"], m["sym"], int(m.groupdict().get("off") or "0", 16))] += 1
    return counts


def zmm_offsets(dso, sym):
    """Offsets within `sym` of the instructions that use zmm registers, or None when its code cannot be
    read (JIT code, the kernel, a stripped symbol)."""
    if not dso.startswith("/") or not Path(dso).exists():
        return None
    table = subprocess.run(["nm", "-S", "--defined-only", dso], capture_output=True, text=True).stdout
    table += subprocess.run(["nm", "-D", "-S", "--defined-only", dso], capture_output=True, text=True).stdout
    for line in table.splitlines():
        parts = line.split()
        if len(parts) == 4 and parts[3].split("@")[0] == sym.split("@")[0]:
            start, size = int(parts[0], 16), int(parts[1], 16)
            break
    else:
        return None
    asm = subprocess.run(["objdump", "-d", "--no-show-raw-insn", f"--start-address={start}",
                          f"--stop-address={start + size}", dso], capture_output=True, text=True).stdout
    offsets, has_code = set(), False
    for line in asm.splitlines():
        m = re.match(r"^\s*([0-9a-f]+):\s+(.*)$", line)
        if m:
            has_code = True
            if "zmm" in m[2]:
                offsets.add(int(m[1], 16) - start)
    return offsets if has_code else None


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    peer.add_max_isa_argument(p)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--freq", type=int, default=499)
    p.add_argument("command", nargs=argparse.REMAINDER)
    args = p.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    peer.cap_isa(args.max_isa)
    print(peer.machine_line())
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "perf.data")
        run = subprocess.run(["perf", "record", "-e", "cpu-clock", "-F", str(args.freq), "-o", data, "--", *command],
                             capture_output=True, text=True)
        for line in run.stdout.splitlines():
            if line.startswith("RESULT "):
                print(line)
        if run.returncode:
            print(f"command failed (exit {run.returncode}):\n{run.stderr[-2000:]}")
            return 1
        counts = samples(data)
    total = sum(counts.values()) or 1
    by_dso, by_sym = collections.Counter(), collections.Counter()
    for (dso, sym, _), n in counts.items():
        by_dso[Path(dso).name or dso] += n
        by_sym[(dso, sym)] += n
    print(f"{total} samples at {args.freq} Hz; load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print("by library: " + ", ".join(f"{d} {100 * n / total:.1f}%" for d, n in by_dso.most_common(12)))
    zmm_total = zmm_code_total = 0
    for (dso, sym), n in by_sym.most_common():
        zmm = zmm_offsets(dso, sym)
        on_zmm = sum(c for (d, s, off), c in counts.items() if d == dso and s == sym and zmm and off in zmm)
        zmm_total += on_zmm
        zmm_code_total += n if zmm else 0
        if n >= by_sym.most_common(args.top)[-1][1]:
            note = "code unreadable" if zmm is None else (f"zmm code, {100 * on_zmm / n:.0f}% of its samples on zmm"
                                                          if zmm else "no zmm")
            print(f"  {100 * n / total:5.1f}%  {sym[:70]:70s} {Path(dso).name:28s} {note}")
    print(f"samples in symbols holding zmm code: {100 * zmm_code_total / total:.1f}%; "
          f"on a zmm instruction: {100 * zmm_total / total:.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
