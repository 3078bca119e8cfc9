"""What this processor and compiler are, as keys for on-disk caches (kernel builds, measured choices).

Our machines all say "AMD EPYC" in /proc/cpuinfo's "model name" while some have AVX-512 and some only
AVX2, so the model name cannot key anything that depends on the instruction set: a library built with
-march=native on one dies with SIGILL on the other, and a convolution that wins on one loses on the
other. The keys here are what actually decides: the ISA flags the kernel reports, what the compiler's
-march=native resolves to, and the compiler's version.
"""
import functools
import hashlib
import platform
import shutil
import subprocess
from pathlib import Path

# ISA extensions that change which code is legal or fastest; the rest of /proc/cpuinfo's flags
# (power management, virtualisation, bug lists) vary between identical machines.
_ISA_PREFIXES = ("sse", "ssse", "avx", "fma", "f16c", "bmi", "amx", "vnni", "popcnt", "sha", "aes")


@functools.lru_cache(maxsize=None)
def cpu_flags():
    """Sorted tuple of the instruction-set flags of the first processor in /proc/cpuinfo (empty where
    there is no /proc/cpuinfo)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            flags = line.split(":", 1)[1].split()
            return tuple(sorted(f for f in flags if f.startswith(_ISA_PREFIXES)))
    return ()


@functools.lru_cache(maxsize=None)
def compiler_target(compiler="g++"):
    """(version line, what -march=native resolves to, the -m options it enables) for `compiler`, or
    None when the compiler is missing or cannot say (then callers key on cpu_flags() alone)."""
    if shutil.which(compiler) is None:
        return None
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30)
        target = subprocess.run([compiler, "-march=native", "-Q", "--help=target"], capture_output=True,
                                text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if version.returncode or target.returncode:
        return None
    march, enabled = "", []
    for line in target.stdout.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "-march=":
            march = parts[1]
        elif len(parts) == 2 and parts[1] == "[enabled]" and parts[0].startswith("-m"):
            enabled.append(parts[0])
    return (version.stdout.splitlines()[0] if version.stdout else compiler), march, tuple(sorted(enabled))


def isa_summary():
    """One short readable line for benches and notes: architecture, the widest vector ISA, -march."""
    flags = set(cpu_flags())
    widest = next((f for f in ("avx512f", "avx2", "avx", "sse4_2") if f in flags), "baseline")
    target = compiler_target()
    march = target[1] if target else "?"
    return f"{platform.machine()} {widest} (-march=native -> {march})"


def isa_key(compiler="g++"):
    """A short string that differs whenever code built or tuned here could be wrong or slow on another
    machine: the ISA flags, the resolved -march=native and its -m options, and the compiler version."""
    parts = [platform.machine(), " ".join(cpu_flags()), repr(compiler_target(compiler))]
    digest = hashlib.sha256("\n".join(parts).encode()).hexdigest()[:12]
    flags = set(cpu_flags())
    widest = next((f for f in ("avx512f", "avx2", "avx") if f in flags), "base")
    return f"{widest}-{digest}"
