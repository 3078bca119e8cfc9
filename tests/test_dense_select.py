"""The Linear layers on oneDNN's sgemm (cpu_kernels.SgemmDense / SgemmMatMulNT, dense_* in
cpu_kernels.cc) compute what MindSpore's MatMul path computes, forward and backward, and
models/dense_select.py chooses between them once per machine and thread count, cached, or as forced."""
import json

import numpy as np
import pytest

import mindspore as ms
from mindspore import Tensor, ops

from conftest import assert_f32_close
from models import cpu_kernels, dense_select, plain_cells
from models.latte import Latte

pytestmark = pytest.mark.skipif(not cpu_kernels.sgemm_found(),
                                reason="fused kernels not built or libdnnl's sgemm not found")


def rand(*shape, seed=0):
    return Tensor(np.random.default_rng(seed).standard_normal(shape).astype(np.float32))


def assert_same_grads(fn_a, fn_b, inputs):
    out_a, out_b = fn_a(*inputs), fn_b(*inputs)
    assert_f32_close(out_a, out_b)
    dy = rand(*out_b.shape, seed=7)
    argnums = tuple(range(len(inputs)))
    grads_a = ms.grad(lambda *a: (fn_a(*a) * dy).sum(), argnums)(*inputs)
    grads_b = ms.grad(lambda *a: (fn_b(*a) * dy).sum(), argnums)(*inputs)
    for i, (ga, gb) in enumerate(zip(grads_a, grads_b)):
        assert_f32_close(ga, gb, err_msg=f"input {i}")


# odd sizes: the sgemm's vector loops and their tails
def test_sgemm_dense_equals_matmul_dense_forward_and_grads():
    x, w, b = rand(37, 19, seed=1), rand(23, 19, seed=2), rand(23, seed=3)
    assert_same_grads(cpu_kernels.SgemmDense(), plain_cells.Dense(), (x, w, b))


def test_sgemm_weight_grad_summed_in_row_slices_equals_matmul():
    """dW = dy^T x is summed in 512-row slices (kWeightGradRows in cpu_kernels.cc): 1100 rows are two
    whole slices and a tail, accumulated into dW."""
    x, w, b = rand(1100, 19, seed=11), rand(23, 19, seed=12), rand(23, seed=13)
    assert_same_grads(cpu_kernels.SgemmDense(), plain_cells.Dense(), (x, w, b))
    assert_same_grads(cpu_kernels.SgemmMatMulNT(), ops.MatMul(transpose_b=True), (x, w))


def test_sgemm_matmul_nt_equals_matmul_forward_and_grads():
    x, w = rand(41, 29, seed=4), rand(17, 29, seed=5)
    assert_same_grads(cpu_kernels.SgemmMatMulNT(), ops.MatMul(transpose_b=True), (x, w))


def test_bias_gelu_project_on_sgemm_equals_matmul():
    z, b, w = rand(33, 24, seed=6), rand(24, seed=8), rand(11, 24, seed=9)
    on_sgemm = cpu_kernels.BiasGELUProject()
    on_sgemm.use_sgemm()
    assert_same_grads(on_sgemm, cpu_kernels.BiasGELUProject(), (z, b, w))


@pytest.fixture
def two_threads():
    cpu_kernels.set_threads(2)
    yield
    cpu_kernels.set_threads(1)


def test_sgemm_dense_splits_over_two_threads_and_still_equals_matmul(two_threads):
    """At two intra-op threads the sgemm gets a threadpool (one thread before: MindSpore's libdnnl
    runs single-threaded without one) and its products are split, with MatMul's results."""
    x, w, b = rand(384, 96, seed=1), rand(160, 96, seed=2), rand(160, seed=3)
    cpu_kernels.SgemmDense()(x, w, b).asnumpy()  # the library is loaded and holds the two threads from here
    before = cpu_kernels.dense_pool_splits()
    assert_same_grads(cpu_kernels.SgemmDense(), plain_cells.Dense(), (x, w, b))
    assert cpu_kernels.library_threads() == 2
    assert cpu_kernels.dense_pool_splits() > before


def test_latte_on_sgemm_equals_latte_on_matmul(monkeypatch):
    """The whole model, every Linear switched: same output and parameter gradients."""
    def loss_and_grads(impl):
        monkeypatch.setenv("LATTE_DENSE", impl)
        ms.set_seed(0)
        net = Latte(input_size=8, num_frames=4, depth=2, hidden_size=32, patch_size=2, num_heads=2)
        assert net.dense_impl == impl
        rng = np.random.default_rng(0)
        for p in net.trainable_params():  # non-zero everywhere (adaLN and the final layer start at zero)
            p.set_data(Tensor(rng.standard_normal(p.shape).astype(np.float32) * 0.1))
        x, t = rand(1, 4, 4, 8, 8, seed=10), Tensor(np.array([7], np.int32))
        out = net(x, t)
        grads = ms.grad(lambda x_: (net(x_, t) ** 2).sum(), None, net.trainable_params())(x)
        return out, grads

    out_s, grads_s = loss_and_grads("sgemm")
    out_m, grads_m = loss_and_grads("mindspore")
    assert_f32_close(out_s, out_m)
    for gs, gm in zip(grads_s, grads_m):
        assert_f32_close(gs, gm, scale=float(np.abs(gm.asnumpy()).max()))


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LATTE_KERNEL_DIR", str(tmp_path))
    monkeypatch.delenv("LATTE_DENSE", raising=False)
    return tmp_path


def test_dense_choice_is_measured_once_and_cached_per_isa_and_threads(fresh_cache, monkeypatch):
    calls = []

    def fake_measure(shapes=dense_select.SHAPES):
        calls.append(1)
        return {"sgemm": (2.0, 1e-7), "mindspore": (1.0, 0.0)}  # MatMul faster here

    monkeypatch.setattr(dense_select, "measure", fake_measure)
    monkeypatch.setattr(dense_select, "_measure_in_child", dense_select._measure_and_save)
    assert dense_select.choose() == "mindspore"
    assert dense_select.choose() == "mindspore" and len(calls) == 1  # read back, not measured again
    path = dense_select.cache_path()
    assert path.parent == fresh_cache and dense_select.conv_select.isa_key() in path.name
    assert json.loads(path.read_text()) == {"dense@t1": "mindspore"}  # conftest runs one intra-op thread
    monkeypatch.setattr(dense_select.conv_select, "_threads", lambda: 2)  # another thread count: measured anew
    monkeypatch.setattr(dense_select, "measure", lambda shapes=None: {"sgemm": (1.0, 1e-7), "mindspore": (2.0, 0.0)})
    assert dense_select.choose() == "sgemm"
    assert json.loads(path.read_text()) == {"dense@t1": "mindspore", "dense@t2": "sgemm"}


def test_dense_choice_never_takes_an_inaccurate_sgemm(fresh_cache, monkeypatch):
    monkeypatch.setattr(dense_select, "measure", lambda shapes=None: {"sgemm": (1.0, 1e-3), "mindspore": (2.0, 0.0)})
    monkeypatch.setattr(dense_select, "_measure_in_child", dense_select._measure_and_save)
    assert dense_select.choose() == "mindspore"


def test_dense_choice_forced_by_env_measures_nothing(fresh_cache, monkeypatch):
    monkeypatch.setattr(dense_select, "_measure_in_child", lambda: pytest.fail("must not measure"))
    for impl in ("sgemm", "mindspore"):
        monkeypatch.setenv("LATTE_DENSE", impl)
        assert dense_select.choose() == impl
    monkeypatch.setenv("LATTE_DENSE", "blas")
    with pytest.raises(ValueError, match="LATTE_DENSE='blas'"):
        dense_select.choose()


def test_dense_stays_on_matmul_without_sgemm(fresh_cache, monkeypatch):
    monkeypatch.setenv("LATTE_DENSE", "sgemm")
    monkeypatch.setattr(cpu_kernels, "sgemm_found", lambda: False)
    assert dense_select.choose() == "mindspore"
    monkeypatch.setenv("LATTE_DENSE", "auto")
    monkeypatch.setattr(dense_select, "_measure_in_child", lambda: pytest.fail("must not measure"))
    assert dense_select.choose() == "mindspore"


def test_plain_latte_never_uses_sgemm(monkeypatch):
    monkeypatch.setenv("LATTE_DENSE", "sgemm")
    net = Latte(input_size=8, num_frames=4, depth=2, hidden_size=32, patch_size=2, num_heads=2, fused_kernels=False)
    assert net.dense_impl == "mindspore"
    assert not any(isinstance(c, (cpu_kernels.SgemmDense, cpu_kernels.SgemmMatMulNT)) for _, c in net.cells_and_names())


def test_dense_choice_counts_cpu_seconds_at_one_thread_and_wall_seconds_at_more(monkeypatch):
    monkeypatch.setattr(dense_select.conv_select, "_threads", lambda: 1)
    assert dense_select._criterion() == "cpu"
    monkeypatch.setattr(dense_select.conv_select, "_threads", lambda: 2)
    assert dense_select._criterion() == "wall"
