"""Fused float32 CPU kernels for Latte's transformer blocks and the VAE, as MindSpore "aot" custom ops.

On MindSpore's CPU backend a Latte-S/2 forward spent as long in the elementwise chains between the
matmuls (LayerNorm + adaLN modulation, bias + tanh GELU, gated residuals, the q/k/v head layouts,
softmax) as in the matmuls themselves: every op is one more pass over memory, and there is no
operator fusion on CPU. `cpu_kernels.cc` does each chain, forward and backward, in one pass. The
cells below wrap them with hand-written backward passes; `models/latte.py` uses them on CPU in
float32 and keeps the plain-ops path (same math, same parameters) for GPU/Ascend, other dtypes, and
machines where the library cannot be built. `models/layers.py` does the same for the VAE's
convolutions (im2col written in one pass) and GroupNorm (+ SiLU).

The library is compiled on first use with the system C++ compiler (g++ by default, `CXX` to change)
for this processor (-march=native), into `$LATTE_KERNEL_DIR` (default ~/.cache/latte/kernels), keyed
by the source, the flags and the CPU model, so nodes of a mixed cluster sharing a home folder each
get their own build. `LATTE_CPU_KERNELS=0` turns the fused path off.
"""
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import mindspore as ms
from mindspore import nn, ops

SOURCE = Path(__file__).with_name("cpu_kernels.cc")
# -fno-trapping-math lets GCC vectorise the float->int step of exp; -fopenmp-simd honours the `omp simd`
# loops without linking an OpenMP runtime (the kernels are single-threaded, see the .cc file).
FLAGS = ["-O3", "-march=native", "-fno-trapping-math", "-fno-math-errno", "-fopenmp-simd", "-std=c++17",
         "-shared", "-fPIC"]

_library = None  # path of the built library, "" when it cannot be built


def _cpu_model():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "flags")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _kernel_dir():
    return Path(os.environ.get("LATTE_KERNEL_DIR") or Path.home() / ".cache" / "latte" / "kernels")


def build_library():
    """Path of the compiled kernel library, building it if needed. Raises RuntimeError with a
    one-line reason when it cannot be built."""
    compiler = os.environ.get("CXX", "g++")
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C++ compiler {compiler!r} on PATH (install g++ or set CXX)")
    source = SOURCE.read_bytes()
    key = hashlib.sha256(source + " ".join([compiler] + FLAGS).encode() + _cpu_model().encode()).hexdigest()[:16]
    folder = _kernel_dir()
    target = folder / f"latte_cpu_kernels_{key}.so"
    if target.exists():
        return str(target)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RuntimeError(f"cannot create {folder} ({exc.strerror}): set LATTE_KERNEL_DIR to a writable folder")
    # unique temp name then rename: concurrent builds (msrun workers) never see a partial library
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".so.tmp")
    os.close(fd)
    try:
        run = subprocess.run([compiler, *FLAGS, "-o", tmp, str(SOURCE)], capture_output=True, text=True)
        if run.returncode:
            last = (run.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise RuntimeError(f"{compiler} failed on {SOURCE.name}: {last}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return str(target)


def available():
    """True when the fused kernels can be used: CPU device, not disabled, library built. Builds the
    library on first call; a failure is reported once on stderr and the plain-ops path is used."""
    global _library
    if os.environ.get("LATTE_CPU_KERNELS", "1") == "0":
        return False
    if _library is None:
        try:
            _library = build_library()
        except (RuntimeError, OSError) as exc:
            _library = ""
            print(f"note: fused CPU kernels unavailable ({exc}); Latte runs on plain MindSpore ops, "
                  "about 1.5x slower. LATTE_CPU_KERNELS=0 skips the attempt.", file=sys.stderr)
    return bool(_library)


def _op(name, out_shape, out_dtype):
    library = _library or build_library()
    return ops.Custom(f"{library}:{name}", out_shape=out_shape, out_dtype=out_dtype, func_type="aot")


def _same(*shapes):
    return shapes[0]


_zeros_like = ops.ZerosLike()


class BiasGELU(nn.Cell):
    """gelu_tanh(z + b) for z (..., K) and b (K,): fc1's bias add and the activation in one pass."""

    def __init__(self):
        super().__init__()
        self.fwd = _op("bias_gelu_fwd", _same, _same)
        self.bwd = _op("bias_gelu_bwd", lambda z, b, dy: (z, b), lambda z, b, dy: (z, b))

    def construct(self, z, b):
        return self.fwd(z, b)

    def bprop(self, z, b, out, dout):
        return self.bwd(z, b, dout)


class NormModulate(nn.Cell):
    """LayerNorm (no affine, eps 1e-6) then adaLN modulation, x (N, M, D), shift/scale (N, 1, D).
    Returns y alone (`latte._NormModulate` also returns what its backward reuses); the backward
    here recomputes each row's mean and 1/std from x (the row is read anyway)."""

    def __init__(self):
        super().__init__()
        self.fwd = _op("norm_modulate_fwd", lambda x, sh, sc: x, lambda x, sh, sc: x)
        self.bwd = _op("norm_modulate_bwd", lambda x, sc, dy: (x, sc, sc), lambda x, sc, dy: (x, x, x))

    def construct(self, x, shift, scale):
        return self.fwd(x, shift, scale)

    def bprop(self, x, shift, scale, out, dout):
        return self.bwd(x, scale, dout)


class GatedResidual(nn.Cell):
    """x + gate * (z + b) for x, z (N, M, D), a per-sample gate (N, 1, D) and z's bias b (D,):
    the projection's bias add and the adaLN-Zero gated residual in one pass."""

    def __init__(self):
        super().__init__()
        self.fwd = _op("gated_residual_fwd", lambda x, g, z, b: x, lambda x, g, z, b: x)
        self.bwd = _op("gated_residual_bwd", lambda g, z, b, d: (z, g, b), lambda g, z, b, d: (z, z, z))

    def construct(self, x, gate, z, b):
        return self.fwd(x, gate, z, b)

    def bprop(self, x, gate, z, b, out, dout):
        dz, dgate, db = self.bwd(gate, z, b, dout)
        return dout, dgate, dz, db


def _batched(shape_ref, heads, head_dim, temporal):
    n, f, t = shape_ref[0], shape_ref[1], shape_ref[2]
    return [n * t, heads, f, head_dim] if temporal else [n * f, heads, t, head_dim]


class QKVSplit(nn.Cell):
    """The fused qkv projection's rows (N, F, T, 3D) plus its bias -> q, k, v as (B, H, L, hd), with
    (B, L) = (N*F, T) for spatial and (N*T, F) for temporal attention; q comes out already scaled
    by hd^-0.5. One pass instead of bias add, transpose and unstack. `shape_ref` is an (N, F, T, ...)
    tensor that only carries the shape (the backward needs N, F and T separately)."""

    def __init__(self, num_heads, temporal):
        super().__init__()
        self.num_heads = num_heads
        kind = "temporal" if temporal else "spatial"

        def out_shape(qkv, b, ref):
            shape = _batched(ref, num_heads, qkv[3] // 3 // num_heads, temporal)
            return shape, shape, shape

        self.fwd = _op(f"qkv_split_{kind}", out_shape, lambda qkv, b, ref: (qkv, qkv, qkv))
        self.bwd = _op(f"qkv_split_{kind}_bwd",
                       lambda dq, dk, dv, ref: (list(ref[:3]) + [3 * dq[1] * dq[3]], [3 * dq[1] * dq[3]]),
                       lambda dq, dk, dv, ref: (dq, dq))

    def construct(self, qkv, b, shape_ref):
        return self.fwd(qkv, b, shape_ref)

    def bprop(self, qkv, b, shape_ref, out, dout):
        dqkv, db = self.bwd(dout[0], dout[1], dout[2], shape_ref)
        return dqkv, db, _zeros_like(shape_ref)


class HeadsMerge(nn.Cell):
    """Attention output (B, H, L, hd) -> (N, F, T, H*hd): the heads back side by side in token order."""

    def __init__(self, num_heads, temporal):
        super().__init__()
        kind = "temporal" if temporal else "spatial"
        self.fwd = _op(f"heads_merge_{kind}", lambda o, ref: list(ref[:3]) + [o[1] * o[3]], lambda o, ref: o)
        self.bwd = _op(f"heads_split_{kind}", lambda d, ref: _batched(ref, num_heads, d[3] // num_heads, temporal),
                       lambda d, ref: d)

    def construct(self, o, shape_ref):
        return self.fwd(o, shape_ref)

    def bprop(self, o, shape_ref, out, dout):
        return self.bwd(dout, shape_ref), _zeros_like(shape_ref)


class Softmax(nn.Cell):
    """Softmax over the last axis."""

    def __init__(self):
        super().__init__()
        self.fwd = _op("softmax_fwd", _same, _same)
        self.bwd = _op("softmax_bwd", lambda y, dy: y, lambda y, dy: y)

    def construct(self, x):
        return self.fwd(x)

    def bprop(self, x, out, dout):
        return (self.bwd(out, dout),)


class Im2Col(nn.Cell):
    """x (N, C, H, W) -> the im2col matrix (N, k*k*C + 1, Ho, Wo) of a k x k convolution, row
    (i*k + j)*C + c, plus a last row of ones for the bias. `down=False`: stride 1, "same" padding
    (k odd); `down=True`: diffusers' Downsample2D (stride 2, zero pad 1 at bottom and right). The
    backward is the adjoint scatter-add. `carrier` is an (N, C, 1, 1) constant giving the backward C."""

    def __init__(self, kernel_size, down):
        super().__init__()
        k, s, kind = kernel_size, (2 if down else 1), ("down" if down else "same")
        self.fwd = _op(f"im2col_{kind}", lambda x: [x[0], k * k * x[1] + 1, x[2] // s, x[3] // s], lambda x: x)
        self.bwd = _op(f"col2im_{kind}", lambda d, c: [d[0], c[1], d[2] * s, d[3] * s], lambda d, c: d)

    def construct(self, x, carrier):
        return self.fwd(x)

    def bprop(self, x, carrier, out, dout):
        return self.bwd(dout, carrier), _zeros_like(carrier)


class GroupNormAct(nn.Cell):
    """torch's GroupNorm (eps 1e-6, affine) of x (N, C, H, W), followed by SiLU when `silu`. The
    number of groups comes from `carrier`, an (N, G) constant. One pass for the statistics, one for
    the output; the backward is the exact GroupNorm (+ SiLU) gradient."""

    def __init__(self, silu):
        super().__init__()
        kind = "group_norm_silu" if silu else "group_norm"
        self.fwd = _op(f"{kind}_fwd", lambda x, g, b, c: x, lambda x, g, b, c: x)
        self.bwd = _op(f"{kind}_bwd", lambda x, g, b, c, d: (x, g, b), lambda x, g, b, c, d: (x, x, x))

    def construct(self, x, gamma, beta, carrier):
        return self.fwd(x, gamma, beta, carrier)

    def bprop(self, x, gamma, beta, carrier, out, dout):
        dx, dgamma, dbeta = self.bwd(x, gamma, beta, carrier, dout)
        return dx, dgamma, dbeta, _zeros_like(carrier)
