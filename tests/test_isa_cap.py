"""LATTE_MAX_ISA=avx2 (models/cpu_features.py): on an AVX-512 machine, a process held to AVX2 + FMA builds
its kernels for that ISA and keys every cache by the cap, and the kernels built that way still compute
what the plain ops do."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from models import cpu_features, cpu_kernels

ROOT = Path(__file__).resolve().parents[1]
AVX512_MACHINE = ("avx", "avx2", "avx512bw", "avx512f", "avx512vl", "fma", "sse", "sse2", "sse4_2")
AVX2_MACHINE = ("avx", "avx2", "fma", "sse", "sse2", "sse4_2")


@pytest.fixture
def machine(monkeypatch):
    """Set which flags /proc/cpuinfo reports, and clear LATTE_MAX_ISA."""
    monkeypatch.delenv("LATTE_MAX_ISA", raising=False)

    def pretend(flags):
        monkeypatch.setattr(cpu_features, "real_cpu_flags", lambda: flags)
    return pretend


def test_avx2_cap_changes_isa_key_build_flags_and_library_name(machine, monkeypatch):
    machine(AVX512_MACHINE)
    native = (cpu_features.isa_key(), cpu_kernels.library_name("g++"), cpu_kernels.source_digest())
    assert native[0].startswith("avx512f-") and "-march=native" in cpu_kernels.build_flags()
    assert cpu_features.library_env() == {} and cpu_features.max_isa() is None

    monkeypatch.setenv("LATTE_MAX_ISA", "avx2")
    assert cpu_features.max_isa() == "avx2"
    assert not any(f.startswith("avx512") for f in cpu_features.cpu_flags())
    flags = cpu_kernels.build_flags()
    assert "-march=haswell" in flags and "-march=native" not in flags
    key = cpu_features.isa_key()
    assert key.startswith("avx2cap-") and key != native[0]
    # the kernel library and conv_select's / dense_select's cache files (named by isa_key and
    # source_digest) are all new names: nothing built or measured with AVX-512 is reused
    assert cpu_kernels.library_name("g++") not in native and "avx2cap" in cpu_kernels.library_name("g++")
    assert cpu_kernels.source_digest() != native[2]
    caps = cpu_features.library_env()
    assert caps["ONEDNN_MAX_CPU_ISA"] == "AVX2" and "-AVX512F" in caps["GLIBC_TUNABLES"]
    assert "capped at avx2" in cpu_features.isa_summary()


def test_avx2_cap_changes_nothing_on_an_avx2_machine(machine, monkeypatch):
    machine(AVX2_MACHINE)
    native = (cpu_features.isa_key(), cpu_kernels.library_name("g++"))
    monkeypatch.setenv("LATTE_MAX_ISA", "avx2")
    assert cpu_features.max_isa() is None
    assert (cpu_features.isa_key(), cpu_kernels.library_name("g++")) == native
    assert cpu_kernels.build_flags() == cpu_kernels.FLAGS


def test_unknown_max_isa_is_a_config_error_naming_the_variable(machine, monkeypatch):
    from models.config import ConfigError
    machine(AVX512_MACHINE)
    monkeypatch.setenv("LATTE_MAX_ISA", "avx3")
    with pytest.raises(ConfigError, match="LATTE_MAX_ISA=.avx3.*avx2"):
        cpu_features.isa_key()


@pytest.mark.skipif("avx512f" not in cpu_features.real_cpu_flags(), reason="the cap only does something on AVX-512")
def test_kernels_built_under_the_avx2_cap_equal_plain_ops():
    """Parity tests of tests/test_cpu_kernels.py in a process started with LATTE_MAX_ISA=avx2 (its kernels
    are the -march=haswell build, cached beside the native one)."""
    tests = ("softmax_equals_plain_including_large_logits or bias_gelu_equals_bias_add_then_gelu "
             "or group_norm_and_silu_have_the_exact_gradient or fused_im2col_convolution_equals_plain")
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-o", "addopts=",
                          str(ROOT / "tests" / "test_cpu_kernels.py"), "-k", tests],
                         capture_output=True, text=True, cwd=ROOT, env={**os.environ, "LATTE_MAX_ISA": "avx2"})
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    summary = run.stdout.strip().splitlines()[-1]
    assert " passed" in summary and "skipped" not in summary, summary


@pytest.mark.skipif("avx512f" not in cpu_features.real_cpu_flags(), reason="the cap only does something on AVX-512")
def test_avx2_cap_reaches_mindspores_onednn_through_setup_device():
    """LATTE_MAX_ISA alone (no ONEDNN_MAX_CPU_ISA in the environment): setup_device imports cpu_features,
    which sets oneDNN's cap before MindSpore's first op, so its matmuls run AVX2 code."""
    code = ("import numpy as np, mindspore as ms\n"
            "from models.runtime import setup_device\n"
            "setup_device('CPU', 'pynative', cpu_threads=1)\n"
            "a = ms.Tensor(np.ones((64, 64), np.float32))\n"
            "ms.ops.matmul(a, a).asnumpy()\n"
            "from models.cpu_features import onednn_isa\n"
            "print('ISA', onednn_isa())\n")
    env = {k: v for k, v in os.environ.items() if k not in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env={**env, "LATTE_MAX_ISA": "avx2", "PYTHONPATH": str(ROOT)})
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip().splitlines()[-1] == "ISA avx2"
