"""The fused CPU kernels (models/cpu_kernels.cc) compute what the plain-ops layers compute, forward
and backward, and Latte falls back to the plain path when they cannot be built."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import mindspore as ms
from mindspore import Tensor, ops

from conftest import assert_f32_close
from models import cpu_kernels, plain_cells
from models.latte import Latte

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason="no C++ compiler: fused kernels not built")

SMALL = dict(input_size=8, in_channels=4, hidden_size=32, depth=2, num_heads=2)


def rand(*shape, seed=0):
    return Tensor(np.random.default_rng(seed).standard_normal(shape).astype(np.float32))


def assert_same_fn(fused, plain, inputs, ulps=16):
    """Equal outputs, and equal gradients of a random projection of the outputs w.r.t. every input."""
    out_f, out_p = fused(*inputs), plain(*inputs)
    assert_f32_close(out_f, out_p, ulps=ulps)  # -march=native: FMA contraction differs by machine
    dy = rand(*out_p.shape, seed=7)
    argnums = tuple(range(len(inputs)))
    grads_f = ms.grad(lambda *a: (fused(*a) * dy).sum(), argnums)(*inputs)
    grads_p = ms.grad(lambda *a: (plain(*a) * dy).sum(), argnums)(*inputs)
    for i, (gf, gp) in enumerate(zip(grads_f, grads_p)):
        # the backward cancels terms of the size of dy (about 1) into the gradient: scale at least 1
        assert_f32_close(gf, gp, ulps=4 * ulps, scale=max(1.0, float(np.abs(gp.asnumpy()).max())), err_msg=f"input {i}")


def test_bias_gelu_equals_bias_add_then_gelu():
    z = rand(2, 5, 24) * 3  # wide range: both tails of the sigmoid
    assert_same_fn(cpu_kernels.BiasGELU(), plain_cells.BiasGELU(), (z, rand(24, seed=1)))


def test_norm_modulate_equals_layernorm_then_modulation():
    x = rand(2, 7, 40) * 2 + 1
    assert_same_fn(cpu_kernels.NormModulate(), plain_cells.NormModulate(),
                   (x, rand(2, 1, 40, seed=1), rand(2, 1, 40, seed=2)))


def test_gated_residual_with_bias_equals_plain():
    assert_same_fn(cpu_kernels.GatedResidual(), plain_cells.GatedResidual(),
                   (rand(2, 6, 16), rand(2, 1, 16, seed=1), rand(2, 6, 16, seed=2), rand(16, seed=3)))


def test_softmax_equals_plain_including_large_logits():
    x = rand(3, 4, 9) * 30
    assert_same_fn(cpu_kernels.Softmax(), plain_cells.Softmax(), (x,))


def test_softmax_underflow_gives_zero_never_a_subnormal():
    """Peaky attention: probabilities whose true value is below FLT_MIN are 0 (exp_approx's clamp at
    -87 had made each 1.6e-38 / row sum, a subnormal whenever the sum passed 1.4, and every vector
    holding one a microcode assist here and in the P.V matmul); the backward's products are never
    subnormal either. Values elsewhere stay those of float64 within float32 rounding."""
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((4, 6, 64)) * 80).astype(np.float32)
    x[..., 1] = x[..., 0] = x.max(-1)  # two maxima: row sums >= 2
    y = cpu_kernels.Softmax()(Tensor(x)).asnumpy()
    d = x.astype(np.float64) - x.max(-1, keepdims=True)
    want = np.exp(d) / np.exp(d).sum(-1, keepdims=True)
    tiny = np.finfo(np.float32).tiny
    assert not np.any((y != 0) & (np.abs(y) < tiny))
    assert np.all(y[d < -87.34] == 0)  # ln(FLT_MIN) = -87.34: the true value is subnormal or less
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=tiny)
    dy = Tensor(rng.standard_normal(x.shape).astype(np.float32) * 1e-4)
    dx = ms.grad(lambda a: (cpu_kernels.Softmax()(a) * dy).sum())(Tensor(x)).asnumpy()
    assert not np.any((dx != 0) & (np.abs(dx) < tiny))


def test_bias_gelu_project_equals_gelu_then_matmul():
    """The MLP cell whose backward recomputes the GELU output (not kept from the forward)."""
    z = rand(11, 24) * 3

    def plain(z, b, w):
        return ops.matmul(plain_cells.BiasGELU()(z, b), w.T)

    assert_same_fn(cpu_kernels.BiasGELUProject(), plain, (z, rand(24, seed=1), rand(8, 24, seed=2)))


def test_attention_recomputing_probabilities_equals_plain():
    """The attention cell whose backward recomputes softmax(q k^T) instead of keeping it."""
    q, k, v = rand(2, 3, 7, 4) * 2, rand(2, 3, 7, 4, seed=1), rand(2, 3, 7, 4, seed=2)

    def plain(q, k, v):
        return ops.BatchMatMul()(plain_cells.Softmax()(ops.BatchMatMul(transpose_b=True)(q, k)), v)

    assert_same_fn(cpu_kernels.Attention(), plain, (q, k, v))


@pytest.mark.parametrize("temporal", [False, True])
def test_qkv_split_and_heads_merge_are_the_attention_layouts(temporal):
    n, f, t, heads, hd = 2, 3, 5, 2, 4
    d = heads * hd
    ref = ops.zeros((n, f, t, 1), ms.float32)

    def plain_split(qkv, b):
        qkv = (qkv + b).reshape(n, f, t, 3, heads, hd)
        qkv = qkv.transpose(3, 0, 2, 4, 1, 5) if temporal else qkv.transpose(3, 0, 1, 4, 2, 5)
        q, k, v = ops.unstack(qkv.reshape(3, -1, heads, qkv.shape[-2], hd), 0)
        return ops.stack([q * hd ** -0.5, k, v])

    split, plain_cell = cpu_kernels.QKVSplit(heads, temporal), plain_cells.QKVSplit(heads, temporal)
    inputs = (rand(n, f, t, 3 * d), rand(3 * d))
    assert_same_fn(lambda qkv, b: ops.stack(split(qkv, b, ref)), plain_split, inputs)
    assert_same_fn(lambda qkv, b: ops.stack(plain_cell(qkv, b, ref)), plain_split, inputs)

    def plain_merge(o):
        o = o.reshape(n, t, heads, f, hd) if temporal else o.reshape(n, f, heads, t, hd)
        return (o.transpose(0, 3, 1, 2, 4) if temporal else o.transpose(0, 1, 3, 2, 4)).reshape(n, f, t, d)

    merge, plain_cell = cpu_kernels.HeadsMerge(heads, temporal), plain_cells.HeadsMerge(heads, temporal)
    o = rand(n * t, heads, f, hd) if temporal else rand(n * f, heads, t, hd)
    assert_same_fn(lambda o: merge(o, ref), plain_merge, (o,))
    assert_same_fn(lambda o: plain_cell(o, ref), plain_merge, (o,))


@pytest.mark.parametrize("mode", ["pynative", "graph"])
def test_fused_latte_equals_plain_latte_forward_and_gradients(mode):
    plain = Latte(**SMALL, num_frames=3, extras=2, num_classes=3, fused_kernels=False)
    fused = Latte(**SMALL, num_frames=3, extras=2, num_classes=3)
    assert fused.fused_kernels and not plain.fused_kernels
    rng = np.random.default_rng(0)
    for (name, p), (name_f, p_f) in zip(plain.parameters_and_names(), fused.parameters_and_names()):
        assert name == name_f  # same parameters: checkpoints load into either path
        value = Tensor((rng.standard_normal(p.shape) * 0.2).astype(np.float32))
        p.set_data(value)
        p_f.set_data(value.copy())
    x, t, y = rand(2, 3, 4, 8, 8), Tensor(np.array([10, 700])), Tensor(np.array([0, 2]))

    def grads(net):
        def loss(x):
            return (net(x, t, y) ** 2).mean()

        fn = ms.value_and_grad(loss, None, net.trainable_params())
        return (ms.jit(fn) if mode == "graph" else fn)(x)

    # Two blocks of attention + MLP, forward then backward: rounding compounds over ~50 ops each way,
    # so 256 ulps for outputs and 1024 for gradients (each scaled to its own largest |value|).
    assert_f32_close(fused(x, t, y), plain(x, t, y), ulps=256)
    (loss_p, grads_p), (loss_f, grads_f) = grads(plain), grads(fused)
    assert_f32_close(loss_f, loss_p, ulps=256)
    for param, gp, gf in zip(plain.trainable_params(), grads_p, grads_f):
        assert_f32_close(gf, gp, ulps=1024, err_msg=param.name)


def test_without_a_compiler_latte_falls_back_to_plain_ops(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("CXX", "no-such-compiler")
    monkeypatch.setenv("LATTE_KERNEL_DIR", str(tmp_path))
    with pytest.raises(RuntimeError, match="no C\\+\\+ compiler 'no-such-compiler'"):
        cpu_kernels.build_library()
    monkeypatch.setattr(cpu_kernels, "_library", None)
    net = Latte(**SMALL, num_frames=2)
    assert not net.fused_kernels and isinstance(net.blocks[0].norm_modulate, plain_cells.NormModulate)
    assert_one_line_note(capsys, "no-such-compiler")
    assert net(rand(1, 2, 4, 8, 8), Tensor(np.array([5]))).shape == (1, 2, 8, 8, 8)


def test_compiler_error_is_one_line_and_leaves_no_partial_library(monkeypatch, tmp_path):
    broken = tmp_path / "broken.cc"
    broken.write_text("this is not C++\n")
    monkeypatch.setattr(cpu_kernels, "SOURCE", broken)
    monkeypatch.setenv("LATTE_KERNEL_DIR", str(tmp_path / "kernels"))
    with pytest.raises(RuntimeError, match="failed on broken.cc") as info:
        cpu_kernels.build_library()
    assert "\n" not in str(info.value)
    assert libraries(tmp_path / "kernels") == []


# ---- building the library: cache key, lock, time limit, smoke test ------------------------------

def assert_one_line_note(capsys, reason):
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "fused CPU kernels unavailable" in err and reason in err, err


def libraries(folder):
    """Every library (finished or in progress) in a kernel folder; the lock file does not count."""
    return sorted(p.name for p in folder.iterdir() if ".so" in p.name)


def fake_compiler(path, before_compile):
    """A `CXX` that answers the version/target queries as g++ does and runs `before_compile` (shell)
    before compiling with g++."""
    path.write_text('#!/bin/sh\ncase "$*" in *--version*|*--help=target*) exec g++ "$@";; esac\n'
                    f'{before_compile}\nexec g++ "$@"\n')
    path.chmod(0o755)
    return str(path)


def test_library_name_differs_when_isa_flags_or_compiler_differ(monkeypatch):
    from models import cpu_features

    here = cpu_kernels.library_name("g++")
    assert cpu_kernels.library_name("g++") == here  # stable on one machine
    # another CPU generation that says the same "model name": the flags differ
    monkeypatch.setattr(cpu_features, "cpu_flags", lambda: ("avx", "avx2", "fma", "sse4_2"))
    avx2_only = cpu_kernels.library_name("g++")
    assert avx2_only != here and "avx2" in avx2_only
    # same flags, another compiler version or -march=native target
    monkeypatch.setattr(cpu_features, "compiler_target", lambda c: ("g++ (GCC) 99.1", "znver9", ("-mavx2",)))
    assert cpu_kernels.library_name("g++") not in (here, avx2_only)
    monkeypatch.setattr(cpu_kernels, "FLAGS", cpu_kernels.FLAGS + ["-DSOMETHING"])  # the flags are keyed too
    other_flags = cpu_kernels.library_name("g++")
    assert other_flags not in (here, avx2_only)


def test_concurrent_builders_compile_once(tmp_path):
    """Two processes (say two msrun workers) that find no library: one compiles under the lock, the other
    waits and reuses it. The compiler sleeps 2 s so the second one arrives while the first is building."""
    count = tmp_path / "compiles"
    env = dict(os.environ, CXX=fake_compiler(tmp_path / "cxx", f"echo run >> {count}; sleep 2"),
               LATTE_KERNEL_DIR=str(tmp_path / "kernels"), PYTHONPATH=str(ROOT))
    script = "from models import cpu_kernels; print(cpu_kernels.build_library())"
    procs = [subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    paths = [proc.communicate(timeout=600)[0].strip() for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0]
    assert paths[0] == paths[1] and Path(paths[0]).is_file()
    assert count.read_text().splitlines() == ["run"]
    assert libraries(tmp_path / "kernels") == [Path(paths[0]).name]


def test_compiler_past_its_time_limit_falls_back_with_the_note(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("CXX", fake_compiler(tmp_path / "cxx", "sleep 60"))
    monkeypatch.setenv("LATTE_KERNEL_DIR", str(tmp_path / "kernels"))
    monkeypatch.setattr(cpu_kernels, "COMPILE_TIMEOUT", 1.0)
    monkeypatch.setattr(cpu_kernels, "_library", None)
    assert not cpu_kernels.available()
    assert_one_line_note(capsys, "took longer than 1 s")
    assert libraries(tmp_path / "kernels") == []


# softmax_fwd kernels that build but must not be trusted: one computes wrong values, one executes an
# illegal instruction (what a library built for a newer CPU does on an older one)
BAD_SOFTMAX = {
    "wrong result": ("off by", "for (int64_t i = 0; i < numel(ndims[0], shapes[0]); i++) y[i] = 0.5f;"),
    "SIGILL": ("SIGILL", "__builtin_trap();"),
}


@pytest.mark.parametrize("case", sorted(BAD_SOFTMAX))
def test_library_failing_its_smoke_test_falls_back_and_is_not_cached(monkeypatch, tmp_path, capsys, case):
    reason, body = BAD_SOFTMAX[case]
    source = tmp_path / "bad.cc"
    source.write_text(
        "#include <cstdint>\n"
        "static int64_t numel(int nd, const int64_t *s) { int64_t n = 1; for (int i = 0; i < nd; i++) n *= s[i];"
        " return n; }\n"
        'extern "C" int softmax_fwd(int, void **params, int *ndims, int64_t **shapes, const char **, void *,'
        " void *) {\n  float *y = static_cast<float *>(params[1]);\n  " + body + "\n  (void)y; (void)numel;"
        " return 0;\n}\n")
    monkeypatch.setattr(cpu_kernels, "SOURCE", source)
    monkeypatch.setenv("LATTE_KERNEL_DIR", str(tmp_path / "kernels"))
    monkeypatch.setattr(cpu_kernels, "_library", None)
    assert not cpu_kernels.available()
    assert_one_line_note(capsys, reason)
    assert libraries(tmp_path / "kernels") == []
    with pytest.raises(RuntimeError, match=reason):  # tested again, not taken from a cache
        cpu_kernels.build_library()


def test_kernels_only_where_they_apply():
    assert not Latte(**SMALL, num_frames=2, dtype=ms.float16).fused_kernels
    with pytest.raises(ValueError, match="fused_kernels=True needs the CPU device and dtype float32"):
        Latte(**SMALL, num_frames=2, dtype=ms.float16, fused_kernels=True)


# ---- VAE layers -------------------------------------------------------------------------------

@pytest.mark.parametrize("stride, padding, size", [(1, 1, (6, 8)), (2, "down", (6, 8)),
                                                   (1, 1, (30, 36)), (2, "down", (60, 72))])
def test_fused_im2col_convolution_equals_plain(stride, padding, size):
    """The fused conv (one kernel, a band of ~256 output pixels at a time: one band for 6 x 8, seven
    with a short last one for the 30 x 36 output) against the plain ops, forward and backward."""
    from models.vae_layers import Conv2d

    fused = Conv2d(5, 7, 3, stride=stride, padding=padding, impl="matmul")
    plain = Conv2d(5, 7, 3, stride=stride, padding=padding, impl="matmul", fused_kernels=False)
    assert fused.fused_kernels and not plain.fused_kernels
    plain.weight.set_data(fused.weight.data.copy())
    plain.bias.set_data(fused.bias.data.copy())
    x = rand(2, 5, *size)
    assert_same_fn(fused, plain, (x,), ulps=40)  # outputs and the gradient w.r.t. x
    dy = rand(*plain(x).shape, seed=3)
    gw_f = ms.grad(lambda a: (fused(a) * dy).sum(), None, [fused.weight, fused.bias])(x)
    gw_p = ms.grad(lambda a: (plain(a) * dy).sum(), None, [plain.weight, plain.bias])(x)
    for gf, gp in zip(gw_f, gw_p):  # sums over batch and pixels: like the outputs' 40 ulps, a bit deeper
        assert_f32_close(gf, gp, ulps=64)


def _reference_group_norm(x, groups, gamma, beta, eps=1e-6):
    """GroupNorm from plain differentiable ops (autodiff gives the exact backward)."""
    n, c, h, w = x.shape
    g = x.reshape(n, groups, -1)
    mean = g.mean(-1, keep_dims=True)
    var = ((g - mean) ** 2).mean(-1, keep_dims=True)
    y = ((g - mean) / ops.sqrt(var + eps)).reshape(n, c, h, w)
    return y * gamma.reshape(1, c, 1, 1) + beta.reshape(1, c, 1, 1)


@pytest.mark.parametrize("then_silu, fused", [(False, True), (True, True), (False, False), (True, False)])
def test_group_norm_and_silu_have_the_exact_gradient(then_silu, fused):
    from models.vae_layers import GroupNorm

    norm = GroupNorm(4, 8, fused_kernels=None if fused else False)
    assert norm.fused_kernels == fused
    gamma, beta = rand(8, seed=1), rand(8, seed=2)
    norm.weight.set_data(gamma)
    norm.bias.set_data(beta)
    x = rand(2, 8, 5, 6) * 3 + 1

    def fused(x):
        return norm.then_silu(x) if then_silu else norm(x)

    def reference(x, gamma, beta):
        y = _reference_group_norm(x, 4, gamma, beta)
        return y * ops.sigmoid(y) if then_silu else y

    assert_f32_close(fused(x), reference(x, gamma, beta), ulps=32)  # a mean, a variance, a divide, a SiLU
    dy = rand(2, 8, 5, 6, seed=5)
    want = ms.grad(lambda x, g, b: (reference(x, g, b) * dy).sum(), (0, 1, 2))(x, gamma, beta)
    got = ms.grad(lambda x: (fused(x) * dy).sum(), 0, [norm.weight, norm.bias])(x)
    got = (got[0], *got[1])  # (dx, (dgamma, dbeta))
    for name, g, w in zip(("x", "gamma", "beta"), got, want):
        assert_f32_close(g, w, ulps=256, err_msg=name)  # sums over the group's 60 values of dy-weighted terms


def test_fused_vae_encode_and_decode_equal_plain(monkeypatch):
    from models.vae import AutoencoderKL

    config = dict(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, latent_channels=4)
    fused = AutoencoderKL(**config)
    monkeypatch.setenv("LATTE_CPU_KERNELS", "0")
    plain = AutoencoderKL(**config)
    assert fused.encoder.conv_in.fused_kernels and not plain.encoder.conv_in.fused_kernels
    for (name, p), (name_p, pp) in zip(fused.parameters_and_names(), plain.parameters_and_names()):
        assert name == name_p
        pp.set_data(p.data.copy())
    img = Tensor(np.random.default_rng(0).uniform(-1, 1, (2, 3, 16, 16)).astype(np.float32))
    moments_f, moments_p = fused.encode_moments(img).asnumpy(), plain.encode_moments(img).asnumpy()
    # ~20 convolutions and GroupNorms deep each way, plus a mid-block attention: 256 ulps of the scale
    assert_f32_close(moments_f, moments_p, ulps=256)
    z = Tensor(moments_p[:, :4])
    assert_f32_close(fused.decode(z), plain.decode(z), ulps=256)
