"""Fused float32 CPU kernels for Latte's transformer blocks and the VAE, as MindSpore "aot" custom ops.

On MindSpore's CPU backend a Latte-S/2 forward spent as long in the elementwise chains between the
matmuls (LayerNorm + adaLN modulation, bias + tanh GELU, gated residuals, the q/k/v head layouts,
softmax) as in the matmuls themselves: every op is one more pass over memory, and there is no
operator fusion on CPU. `cpu_kernels.cc` does each chain, forward and backward, in one pass. The
cells below wrap them with hand-written backward passes; `models/plain_cells.py` has the plain-ops
cells with the same interfaces, which `models/latte.py` uses on GPU/Ascend, for other dtypes, and
where the library cannot be built. `models/vae_layers.py` uses the im2col and GroupNorm (+ SiLU)
kernels for the VAE's convolutions.

The library is compiled on first use with the system C++ compiler (g++ by default, `CXX` to change)
for this processor (-march=native; -march=haswell under LATTE_MAX_ISA=avx2, see models/cpu_features.py), into `$LATTE_KERNEL_DIR` (default ~/.cache/latte/kernels). The
file name is keyed by what makes a build right or wrong for a machine: the instruction set (ISA flags,
what -march=native resolves to, the compiler version: `models.cpu_features.isa_key`), the source and
the flags, so nodes of a mixed cluster sharing a home folder each get their own build. One process
builds while the others (msrun workers) wait on a file lock; the compiler has a time limit; and a new
library is loaded and checked against numpy in a child process before it is put in place, so one that
crashes (SIGILL) or computes wrong is never cached. Any failure leaves the plain-ops path, with a
one-line note. `LATTE_CPU_KERNELS=0` turns the fused path off.
"""
import fcntl
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from mindspore import nn, ops

from models.cpu_features import isa_key, march_flags

SOURCE = Path(__file__).with_name("cpu_kernels.cc")
# -fno-trapping-math lets GCC vectorise the float->int step of exp; -fopenmp-simd honours the `omp simd`
# loops without linking an OpenMP runtime (the kernels are single-threaded, see the .cc file).
# build_flags() puts cpu_features.march_flags() in the place of -march=native (the target under LATTE_MAX_ISA).
FLAGS = ["-O3", "-march=native", "-fno-trapping-math", "-fno-math-errno", "-fopenmp-simd", "-std=c++17",
         "-shared", "-fPIC"]
# Seconds for one compile (about 1-5 s when the machine is busy) and one smoke test (a MindSpore import
# plus one op); past them something is wrong (a hung compiler, a library that never returns).
COMPILE_TIMEOUT = float(os.environ.get("LATTE_KERNEL_BUILD_TIMEOUT", "300"))
SMOKE_TIMEOUT = 300.0

# Run in a fresh interpreter on a candidate library (argv[1]): one kernel through MindSpore's aot
# loader against numpy. Exit 0 when right; a crash (SIGILL from an instruction this CPU lacks) or a
# wrong result rejects the library. The row length 67 covers the vector loops and their tails.
SMOKE_TEST = r"""
import sys
import numpy as np
import mindspore as ms
from mindspore import Tensor, ops
ms.set_device("CPU")
op = ops.Custom(sys.argv[1] + ":softmax_fwd", out_shape=lambda x: x, out_dtype=lambda x: x, func_type="aot")
x = np.random.default_rng(0).standard_normal((5, 67)).astype(np.float32) * 4
got = op(Tensor(x)).asnumpy()
e = np.exp(x - x.max(-1, keepdims=True))
want = e / e.sum(-1, keepdims=True)
if not np.allclose(got, want, rtol=1e-5, atol=1e-7):
    print(f"softmax_fwd is off by {np.abs(got - want).max():.3g}", file=sys.stderr)
    sys.exit(3)
"""

_library = None  # path of the built library, "" when it cannot be built


def _kernel_dir():
    return Path(os.environ.get("LATTE_KERNEL_DIR") or Path.home() / ".cache" / "latte" / "kernels")


def build_flags():
    """The compiler's options: FLAGS with the target for this machine (LATTE_MAX_ISA's cap, if any)."""
    out = []
    for flag in FLAGS:
        out += march_flags() if flag == "-march=native" else [flag]
    return out


def source_digest():
    """Digest of the kernels' source and flags: what a measured choice between kernels depends on
    besides the machine (conv_select's and dense_select's cache files carry it in their names)."""
    return hashlib.sha256(SOURCE.read_bytes() + " ".join(build_flags()).encode()).hexdigest()[:12]


def library_name(compiler):
    """File name of the library for this machine and compiler: differs whenever the ISA (flags,
    resolved target, LATTE_MAX_ISA), the compiler version, the source or the flags differ."""
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join([compiler] + build_flags()).encode()).hexdigest()[:12]
    return f"latte_cpu_kernels_{isa_key(compiler)}_{digest}.so"


def _last_line(text):
    return (text.strip().splitlines() or ["(no output)"])[-1]


def _run(command, timeout, what, hint=""):
    """Run `command` in its own process group with a time limit; on timeout kill the whole group (g++
    leaves cc1plus and as behind otherwise) and raise RuntimeError naming `what`, then `hint`."""
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise RuntimeError(f"{what} took longer than {timeout:g} s{hint}") from None
    return proc.returncode, out, err


def _compile(compiler, out):
    code, _, err = _run([compiler, *build_flags(), "-o", out, str(SOURCE)], COMPILE_TIMEOUT,
                        f"{compiler} on {SOURCE.name}", " (LATTE_KERNEL_BUILD_TIMEOUT to change)")
    if code:
        raise RuntimeError(f"{compiler} failed on {SOURCE.name}: {_last_line(err)}")


def _smoke_test(library):
    """Load `library` in a child process and check one kernel against numpy; RuntimeError if not right."""
    code, _, err = _run([sys.executable, "-c", SMOKE_TEST, library], SMOKE_TIMEOUT, "the smoke test of the new library")
    if code < 0:
        raise RuntimeError(f"the new library crashed its smoke test with {signal.Signals(-code).name} "
                           "(built for another processor?)")
    if code:
        raise RuntimeError(f"the new library failed its smoke test: {_last_line(err)}")


def build_library():
    """Path of the compiled kernel library, building and smoke-testing it if needed. Raises
    RuntimeError with a one-line reason when it cannot be built or does not pass; then nothing is
    left in the kernel folder but the lock file."""
    compiler = os.environ.get("CXX", "g++")
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C++ compiler {compiler!r} on PATH (install g++ or set CXX)")
    folder = _kernel_dir()
    target = folder / library_name(compiler)
    if target.exists():  # only libraries that passed the smoke test are ever renamed to this name
        return str(target)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        lock = open(target.with_suffix(".lock"), "a")
    except OSError as exc:
        raise RuntimeError(f"cannot write to {folder} ({exc.strerror}): set LATTE_KERNEL_DIR to a writable folder")
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the first process builds; the others wait here, then reuse it
        if target.exists():
            return str(target)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".build_", suffix=".so")
        os.close(fd)
        try:
            _compile(compiler, tmp)
            _smoke_test(tmp)
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return str(target)


def available():
    """True when the fused kernels can be used: not disabled, library built and smoke-tested. Builds
    the library on first call; a failure is reported once on stderr and the plain-ops path is used."""
    global _library
    if os.environ.get("LATTE_CPU_KERNELS", "1") == "0":
        return False
    if _library is None:
        try:
            _library = build_library()
        except (RuntimeError, OSError) as exc:
            _library = ""
            print(f"note: fused CPU kernels unavailable ({exc}); running on plain MindSpore ops (same results, "
                  "slower: see the README's Benchmarks). LATTE_CPU_KERNELS=0 skips the attempt.", file=sys.stderr)
    return bool(_library)


_dnnl_exposed = False


def expose_dnnl():
    """Make MindSpore's own oneDNN (mindspore/lib/libdnnl.so.*, already loaded by its CPU backend)
    visible to dlsym, so the fused Winograd conv (winograd{m}_fused in cpu_kernels.cc) can call its
    sgemm. True when it is; False leaves that kernel on its plain-loop GEMM (slower, same sums)."""
    global _dnnl_exposed
    if not _dnnl_exposed:
        import ctypes
        import mindspore
        for lib in sorted((Path(mindspore.__file__).parent / "lib").glob("libdnnl.so*")):
            try:
                ctypes.CDLL(str(lib), mode=ctypes.RTLD_GLOBAL)
                _dnnl_exposed = True
                break
            except OSError:
                continue
    return _dnnl_exposed


_band_threads = 1  # workers of the banded VAE convolutions; set_threads changes it
_handle = None  # ctypes handle of the library: the same dlopen handle, so the same globals, as MindSpore's


def band_threads_for(cpu_threads):
    """Workers for the banded VAE convolutions at runtime.setup_device's `cpu_threads`: that count,
    or for 0 (MindSpore's own default, which uses the cores it may run on) the cores this process may use."""
    cpu_threads = int(cpu_threads or 0)
    if cpu_threads > 0:
        return cpu_threads
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def set_threads(cpu_threads):
    """Split the banded VAE convolutions (winograd{m}_fused, conv_band_*: nearly all of the VAE's work)
    over the intra-op thread count, as MindSpore's own matmuls are. Called by runtime.setup_device;
    reaches the library now if it is loaded, else when the first kernel op is made. Outputs are
    bit-identical for any count (each band's arithmetic is unchanged)."""
    global _band_threads
    _band_threads = band_threads_for(cpu_threads)
    if _handle is not None:
        _handle.latte_set_threads(_band_threads)


def library_threads():
    """The worker count the loaded library holds (None before any kernel op is made): for tests."""
    return None if _handle is None else _handle.latte_get_threads()


def _load_handle(library):
    # MindSpore dlopens the library by the same path when its first op runs; dlopen returns the
    # handle already open, so the count set here is the one its kernels read
    global _handle
    if _handle is None:
        import ctypes
        _handle = ctypes.CDLL(library)
        _handle.latte_set_threads.argtypes = [ctypes.c_int]
        _handle.latte_set_threads(_band_threads)


def _op(name, out_shape, out_dtype):
    library = _library or build_library()
    expose_dnnl()
    _load_handle(library)
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


_bmm = ops.BatchMatMul()
_bmm_nt = ops.BatchMatMul(transpose_b=True)
_bmm_tn = ops.BatchMatMul(transpose_a=True)
_matmul = ops.MatMul()
_matmul_nt = ops.MatMul(transpose_b=True)
_matmul_tn = ops.MatMul(transpose_a=True)


class BiasGELUProject(nn.Cell):
    """gelu_tanh(z + b) @ w.T for 2-D z (M, K), b (K,), w (D, K): the MLP after fc1's matmul, without
    fc2's bias (the block's gated residual adds it). The (M, K) GELU output is not kept for the
    backward: `bias_gelu_bwd_recompute` writes it again in the pass that computes dz, for fc2's
    weight gradient. Saves one (tokens x 4D) float32 tensor per block (25 MB at Latte-S/2's shape)."""

    def __init__(self):
        super().__init__()
        self.gelu = _op("bias_gelu_fwd", _same, _same)
        self.bwd = _op("bias_gelu_bwd_recompute", lambda z, b, dy: (z, b, z), lambda z, b, dy: (z, b, z))
        self.mm_nt, self.mm_nn, self.mm_tn = _matmul_nt, _matmul, _matmul_tn

    def use_sgemm(self):
        """fc2's three products on oneDNN's sgemm (the Dense kernels below) instead of MindSpore's MatMul."""
        self.mm_nt, self.mm_nn, self.mm_tn = _sgemm_ops()

    def construct(self, z, b, w):
        return self.mm_nt(self.gelu(z, b), w)

    def bprop(self, z, b, w, out, dout):
        dz, db, y = self.bwd(z, b, self.mm_nn(dout, w))
        return dz, db, self.mm_tn(dout, y)


class Attention(nn.Cell):
    """softmax(q @ k.T) @ v for q, k, v (B, H, L, hd) (q already scaled). The backward recomputes
    the probabilities from q and k (one more batched matmul and softmax) instead of keeping them:
    (B, H, L, L) is 4x q's size in a spatial block (L = 256 tokens, hd = 64)."""

    def __init__(self):
        super().__init__()
        self.softmax = _op("softmax_fwd", _same, _same)
        self.softmax_bwd = _op("softmax_bwd", lambda y, dy: y, lambda y, dy: y)

    def construct(self, q, k, v):
        return _bmm(self.softmax(_bmm_nt(q, k)), v)

    def bprop(self, q, k, v, out, dout):
        p = self.softmax(_bmm_nt(q, k))
        ds = self.softmax_bwd(p, _bmm_nt(dout, v))
        return _bmm(ds, k), _bmm_tn(ds, q), _bmm_tn(p, dout)


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


class BandConv(nn.Cell):
    """y (N, O, Ho, Wo) of a k x k convolution of x (N, C, H, W) with weights w (O, C, k, k) and bias b
    (O,): Im2Col + one matmul in one kernel, a band of output rows at a time, so the whole im2col
    matrix never exists (see conv_band in cpu_kernels.cc). `down` as in Im2Col. The backward is the
    one of Im2Col + matmul: dw, db from dy and x's im2col, dx = col2im(wm^T dy)."""

    def __init__(self, kernel_size, down):
        super().__init__()
        s, kind = (2 if down else 1), ("down" if down else "same")
        self.fwd = _op(f"conv_band_{kind}", lambda x, w, b: [x[0], w[0], x[2] // s, x[3] // s],
                       lambda x, w, b: x)
        self.im2col = Im2Col(kernel_size, down)
        self.matmul_ta = ops.BatchMatMul(transpose_a=True)
        self.matmul_tb = ops.BatchMatMul(transpose_b=True)

    def construct(self, x, w, b):
        return self.fwd(x, w, b)

    def bprop(self, x, w, b, out, dout):
        n, o, ho, wo = dout.shape
        c, k = x.shape[1], w.shape[2]
        dy = dout.reshape(n, o, ho * wo)
        cols = self.im2col.fwd(x)  # (N, k*k*C + 1, Ho, Wo)
        g = self.matmul_tb(dy, cols.reshape(n, k * k * c + 1, ho * wo)).sum(0)  # (O, k*k*C + 1)
        dw = ops.narrow(g, 1, 0, k * k * c).reshape(o, k, k, c).transpose(0, 3, 1, 2)
        db = ops.narrow(g, 1, k * k * c, 1).reshape(o)
        wm = ops.concat([w.transpose(0, 2, 3, 1).reshape(o, k * k * c), b.reshape(o, 1)], 1)
        dcols = self.matmul_ta(ops.broadcast_to(wm.reshape(1, o, -1), (n, o, k * k * c + 1)), dy)
        dx = self.im2col.bwd(dcols.reshape(n, k * k * c + 1, ho, wo), ops.zeros((n, c, 1, 1), x.dtype))
        return dx, dw, db


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


# ---- Latte's Linear layers on oneDNN's sgemm (models/dense_select.py decides where) --------------------

def _sgemm_ops():
    """(x w^T, dy w, dy^T x) as custom ops on the sgemm kernels (dense_* in cpu_kernels.cc)."""
    return (_op("dense_nt", lambda x, w: [x[0], w[0]], lambda x, w: x),
            _op("dense_nn", lambda dy, w: [dy[0], w[1]], lambda dy, w: dy),
            _op("dense_tn", lambda dy, x: [dy[1], x[1]], lambda dy, x: dy))


def sgemm_found():
    """True when the Dense kernels run on oneDNN's sgemm (MindSpore's libdnnl found and made global),
    False when they would fall back to their plain loop (then the sgemm path must not be chosen)."""
    import ctypes
    if not available() or not expose_dnnl():
        return False
    return bool(ctypes.CDLL(_library).dense_sgemm_found())


def dense_pool_splits():
    """How many products the Dense kernels' sgemm has split over the intra-op threads (set_threads; at
    one thread it gets no threadpool and never splits), counted since the library was loaded."""
    import ctypes
    fn = ctypes.CDLL(build_library()).dense_pool_splits
    fn.restype = ctypes.c_int64
    return int(fn())


class SgemmDense(nn.Cell):
    """plain_cells.Dense on sgemm: y = x @ w.T + b for 2-D x; the backward (dx, dw, db) is one op."""

    def __init__(self):
        super().__init__()
        self.fwd = _op("dense_bias_nt", lambda x, w, b: [x[0], w[0]], lambda x, w, b: x)
        self.bwd = _op("dense_bias_bwd", lambda x, w, dy: (x, w, [w[0]]), lambda x, w, dy: (x, x, x))

    def construct(self, x, w, b):
        return self.fwd(x, w, b)

    def bprop(self, x, w, b, out, dout):
        return self.bwd(x, w, dout)


class SgemmMatMulNT(nn.Cell):
    """x @ w.T for 2-D x on sgemm (a Linear's matmul without its bias); backward dy @ w, dy.T @ x."""

    def __init__(self):
        super().__init__()
        self.fwd, self.nn_, self.tn = _sgemm_ops()

    def construct(self, x, w):
        return self.fwd(x, w)

    def bprop(self, x, w, out, dout):
        return self.nn_(dout, w), self.tn(dout, x)


def fma_peak_gflops(repeats=5):
    """This core's fp32 FMA peak, GFLOP per CPU-second: the best of `repeats` runs of register-only
    fused multiply-adds (dense_fma_peak_gflops in cpu_kernels.cc, ~0.1 s each; a busy sibling
    hyperthread only lowers a run, so the best is the ceiling). None where the library is not built."""
    import ctypes
    if not available():
        return None
    fn = ctypes.CDLL(_library).dense_fma_peak_gflops
    fn.restype, fn.argtypes = ctypes.c_double, [ctypes.c_int64]
    return max(fn(4_000_000) for _ in range(repeats))
