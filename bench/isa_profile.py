"""Where a command spends its CPU time, by library and symbol, and how much of it runs AVX-512 code.

    GLOG_v=3 .venv/bin/python bench/isa_profile.py --max_isa avx2 -- .venv/bin/python bench/bench_vae.py \
        --role ours --stage encode --batch 1 --reps 1

Runs the command under `perf record -e cpu-clock` (a timer: hardware counters are often not available
on virtual machines) and prints each library's share, the top symbols, and for each symbol whether its
code holds AVX-512 instructions (EVEX-encoded: zmm, and the ymm/xmm forms of AVX512VL that GCC emits for
-march=native even at 256-bit vectors) and the share of its samples that landed on one. This is how to
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


def _without_arguments(name):
    """perf names a C++ function without its argument list, `nm -C` with it: drop a trailing "(...)"."""
    if not name.endswith(")"):
        return name
    depth = 0
    for i in range(len(name) - 1, -1, -1):
        depth += {")": 1, "(": -1}.get(name[i], 0)
        if depth == 0:
            return name[:i]
    return name


_symbol_tables = {}


def _symbols(dso):
    """(start, size, demangled name without arguments) of the symbols of `dso`, static and dynamic."""
    if dso not in _symbol_tables:
        rows = []
        for extra in ([], ["-D"]):
            table = subprocess.run(["nm", "-C", "-S", "--defined-only", *extra, dso], capture_output=True,
                                   text=True).stdout
            for line in table.splitlines():
                parts = line.split(maxsplit=3)
                if len(parts) == 4 and parts[2] in "tTwWiI":
                    rows.append((int(parts[0], 16), int(parts[1], 16), _without_arguments(parts[3]).split("@")[0]))
        _symbol_tables[dso] = rows
    return _symbol_tables[dso]


def evex_offsets(dso, sym):
    """Offsets within `sym` of its AVX-512 (EVEX-encoded: zmm, or ymm/xmm16-31 and masks under AVX512VL)
    instructions, or None when its code cannot be
    read (JIT code, the kernel, a stripped symbol)."""
    if not dso.startswith("/") or not Path(dso).exists():
        return None
    want = sym.split("@")[0]
    for start, size, name in _symbols(dso):
        if name == want or name.endswith(" " + want):  # nm -C puts a template's return type first
            break
    else:
        return None
    asm = subprocess.run(["objdump", "-d", f"--start-address={start}", f"--stop-address={start + size}", dso],
                         capture_output=True, text=True).stdout
    offsets, has_code = set(), False
    for line in asm.splitlines():
        m = re.match(r"^\s*([0-9a-f]+):\t([0-9a-f ]+)\t", line)  # an instruction's first line: address, bytes
        if m:
            has_code = True
            if m[2].startswith("62 "):  # the EVEX prefix: every AVX-512 instruction, zmm or not
                offsets.add(int(m[1], 16) - start)
    return offsets if has_code else None


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    peer.add_max_isa_argument(p)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--freq", type=int, default=499)
    p.add_argument("--delay_s", type=float, default=0,
                   help="start sampling this many seconds after the command starts (skip imports and compiles)")
    p.add_argument("command", nargs=argparse.REMAINDER)
    args = p.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    peer.cap_isa(args.max_isa)
    print(peer.machine_line())
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "perf.data")
        delay = ["-D", str(int(args.delay_s * 1000))] if args.delay_s else []
        run = subprocess.run(["perf", "record", "-e", "cpu-clock", "-F", str(args.freq), *delay, "-o", data, "--", *command],
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
    evex_total = evex_code_total = 0
    for (dso, sym), n in by_sym.most_common():
        evex = evex_offsets(dso, sym)
        on_evex = sum(c for (d, s, off), c in counts.items() if d == dso and s == sym and evex and off in evex)
        evex_total += on_evex
        evex_code_total += n if evex else 0
        if n >= by_sym.most_common(args.top)[-1][1]:
            note = "code unreadable" if evex is None else (f"AVX-512 code, {100 * on_evex / n:.0f}% of its samples on it"
                                                          if evex else "no AVX-512")
            print(f"  {100 * n / total:5.1f}%  {sym[:70]:70s} {Path(dso).name:28s} {note}")
    print(f"samples in symbols holding AVX-512 code: {100 * evex_code_total / total:.1f}%; "
          f"on an AVX-512 instruction: {100 * evex_total / total:.1f}% (JIT code and stripped symbols not counted)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
