"""What this processor and compiler are, as keys for on-disk caches (kernel builds, measured choices).

Our machines all say "AMD EPYC" in /proc/cpuinfo's "model name" while some have AVX-512 and some only
AVX2, so the model name cannot key anything that depends on the instruction set: a library built with
-march=native on one dies with SIGILL on the other, and a convolution that wins on one loses on the
other. The keys here are what actually decides: the ISA flags the kernel reports, what the compiler's
-march=native resolves to, and the compiler's version.

`LATTE_MAX_ISA=avx2` caps this process at AVX2 + FMA on an AVX-512 machine, to measure what an AVX2 machine
would run without one: the fused kernels are built with -march=haswell, oneDNN (MindSpore's matmuls and
the Winograd conv's sgemm) is capped through ONEDNN_MAX_CPU_ISA, and every key below names the cap, so
no choice measured or library built with AVX-512 is reused under it (nor the other way round). It is an
emulation: the cores, caches and clocks stay this machine's. MindSpore's nnacl kernels need no cap:
their AVX/AVX-512 switches (X86_*_Support in libnnacl.so) read CPU flags that nothing in MindSpore 2.10
initialises, so they stay off on every machine.
"""
import functools
import hashlib
import os
import platform
import shutil
import subprocess
from pathlib import Path

# ISA extensions that change which code is legal or fastest; the rest of /proc/cpuinfo's flags
# (power management, virtualisation, bug lists) vary between identical machines.
_ISA_PREFIXES = ("sse", "ssse", "avx", "fma", "f16c", "bmi", "amx", "vnni", "popcnt", "sha", "aes")

MAX_ISA_ENV = "LATTE_MAX_ISA"
# What each cap keeps of /proc/cpuinfo's flags (those -march=haswell enables: AVX2, FMA, F16C, BMI),
# the compiler's target for it, and the names oneDNN (ours and torch's), MKL and ATen give the same cap.
_CAPS = {
    "avx2": {
        "flags": frozenset({"sse", "sse2", "ssse3", "sse4_1", "sse4_2", "avx", "avx2", "fma", "f16c", "bmi1",
                            "bmi2", "popcnt", "aes"}),
        "march": ("-march=haswell", "-mtune=native"),  # AVX2 code, scheduled for the core that runs it
        "env": {"ONEDNN_MAX_CPU_ISA": "AVX2", "DNNL_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2",
                "ATEN_CPU_CAPABILITY": "avx2"},
        # glibc picks its memcpy/memset variants at process start: __memmove_avx512_unaligned_erms
        # (zmm) or the EVEX ones (ymm16-31, AVX512VL) unless these are marked unusable
        "glibc_hwcaps": "glibc.cpu.hwcaps=-AVX512F,-AVX512VL,-AVX512BW,-AVX512DQ,-AVX512CD",
    },
}
NATIVE_MARCH = ("-march=native",)


@functools.lru_cache(maxsize=None)
def real_cpu_flags():
    """Sorted tuple of the instruction-set flags of the first processor in /proc/cpuinfo (empty where
    there is no /proc/cpuinfo), whatever LATTE_MAX_ISA says."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            flags = line.split(":", 1)[1].split()
            return tuple(sorted(f for f in flags if f.startswith(_ISA_PREFIXES)))
    return ()


def max_isa():
    """The cap LATTE_MAX_ISA puts on this process ("avx2"), or None when there is none or it would
    change nothing (unset, "native", or a machine without anything above it). models.config.ConfigError
    (a ValueError) names the variable for a value it does not know."""
    value = os.environ.get(MAX_ISA_ENV, "").strip().lower()
    if value in ("", "native"):
        return None
    if value not in _CAPS:
        from models.config import ConfigError  # a ValueError that `latte` prints as one line, exit 2
        raise ConfigError(f"{MAX_ISA_ENV}={value!r} is not a known cap: use one of {', '.join(sorted(_CAPS))} "
                          "or unset it")
    real = set(real_cpu_flags())
    # a cap only counts where this machine has something the cap takes away (on a real AVX2 machine
    # LATTE_MAX_ISA=avx2 keeps its native build and keys), and where it has the ISA the cap keeps
    return value if (real - _CAPS[value]["flags"]) and value in real else None


def cpu_flags():
    """The instruction-set flags code may use here: real_cpu_flags(), less what LATTE_MAX_ISA takes away."""
    cap = max_isa()
    real = real_cpu_flags()
    return real if cap is None else tuple(f for f in real if f in _CAPS[cap]["flags"])


def march_flags():
    """The compiler's target options for code built here: -march=native, or the cap's target."""
    cap = max_isa()
    return list(NATIVE_MARCH if cap is None else _CAPS[cap]["march"])


def library_env():
    """Environment variables that put LATTE_MAX_ISA's cap on the libraries we and the peer call:
    oneDNN (both sides), MKL and ATen (torch), glibc's string functions (both); empty without a cap.
    Only a process started with them is sure to have them (glibc reads its tunables at start-up, the
    others when they first run): the benches' children are, and conv_select's measuring child inherits
    what apply_library_caps set in this process."""
    cap = max_isa()
    if cap is None:
        return {}
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    hwcaps = _CAPS[cap]["glibc_hwcaps"]
    if hwcaps not in tunables:
        tunables = f"{tunables}:{hwcaps}" if tunables else hwcaps
    return dict(_CAPS[cap]["env"], GLIBC_TUNABLES=tunables)


def apply_library_caps():
    """Put library_env() into this process's environment where not set already, before MindSpore's
    oneDNN reads ONEDNN_MAX_CPU_ISA (at its first primitive): called when this module is imported,
    which models.runtime and models.cpu_kernels do before any op runs. An unknown LATTE_MAX_ISA is left
    to the first isa_key() (inside a command, where it is one error line, not an import traceback)."""
    try:
        caps = library_env()
    except ValueError:
        return
    for key, value in caps.items():
        os.environ.setdefault(key, value)


# dnnl_cpu_isa_t values (oneDNN 3.x include/oneapi/dnnl/dnnl_types.h) of the ISAs a cap can leave
_DNNL_ISA = {0x1: "sse41", 0x3: "avx", 0x7: "avx2", 0xF: "avx2_vnni", 0x1F: "avx2_vnni_2", 0x27: "avx512_core",
             0x67: "avx512_core_vnni", 0xE7: "avx512_core_bf16", 0x1EF: "avx10_1_512",
             0xFEF: "avx10_1_512_amx", 0x1FEF: "avx10_1_512_amx_fp16"}


def onednn_isa():
    """The ISA MindSpore's own oneDNN (mindspore/lib/libdnnl.so.*) runs at in this process, as oneDNN
    names it (after a cap: "avx2"), or None where it cannot be asked. Imports MindSpore."""
    import ctypes
    import mindspore
    for lib in sorted((Path(mindspore.__file__).parent / "lib").glob("libdnnl.so*")):
        try:
            fn = ctypes.CDLL(str(lib)).dnnl_get_effective_cpu_isa
        except (OSError, AttributeError):
            continue
        fn.restype = ctypes.c_int
        value = fn()
        return _DNNL_ISA.get(value, hex(value))
    return None


def compiler_target(compiler="g++"):
    """(version line, what march_flags() resolve to, the -m options they enable) for `compiler`, or
    None when the compiler is missing or cannot say (then callers key on cpu_flags() alone)."""
    return _compiler_target(compiler, tuple(march_flags()))


@functools.lru_cache(maxsize=None)
def _compiler_target(compiler, march):
    if shutil.which(compiler) is None:
        return None
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30)
        target = subprocess.run([compiler, *march, "-Q", "--help=target"], capture_output=True,
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


def _widest(flags, names=("avx512f", "avx2", "avx", "sse4_2"), none="baseline"):
    return next((f for f in names if f in set(flags)), none)


def isa_summary():
    """One short readable line for benches and notes: architecture, the widest vector ISA, -march, and
    under LATTE_MAX_ISA the cap and the machine it is emulated on."""
    target = compiler_target()
    march = target[1] if target else "?"
    cap = max_isa()
    if cap is None:
        return f"{platform.machine()} {_widest(cpu_flags())} (-march=native -> {march})"
    return (f"{platform.machine()} ISA capped at {cap} (emulated on {_widest(real_cpu_flags())}; "
            f"{' '.join(march_flags())} -> {march}, {MAX_ISA_ENV}={cap})")


def isa_key(compiler="g++"):
    """A short string that differs whenever code built or tuned here could be wrong or slow on another
    machine: the ISA flags, the resolved compiler target and its -m options, and the compiler version.
    Under LATTE_MAX_ISA it starts with the cap ("avx2cap-") and also hashes the machine's real flags: a
    choice measured on AVX-512 cores held to AVX2 is not one measured on an AVX2 machine."""
    parts = [platform.machine(), " ".join(cpu_flags()), repr(compiler_target(compiler))]
    cap = max_isa()
    if cap is not None:
        parts += [f"{MAX_ISA_ENV}={cap}", " ".join(real_cpu_flags())]
    digest = hashlib.sha256("\n".join(parts).encode()).hexdigest()[:12]
    widest = _widest(cpu_flags(), ("avx512f", "avx2", "avx"), "base")
    return f"{widest}{'cap' if cap else ''}-{digest}"


apply_library_caps()
