"""The DiT/improved-DDPM diffusion: parity with the original's outputs, respacing, samplers, RNG."""
import math

import numpy as np
import pytest
import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops

from conftest import assert_f32_close, load_strict
from models.diffusion import create_diffusion, space_timesteps

SHAPE = (2, 2, 4, 4, 4)  # (N, F, C, H, W) for the stand-in model


class StandIn(nn.Cell):
    """A deterministic per-sample "network" (N, F, C, H, W) -> (N, F, 2C, H, W) that depends on t.
    `eps_w` only feeds the epsilon channels and `var_w` only the variance channels, and it records
    the timesteps it was called with."""

    def __init__(self, channels=4):
        super().__init__()
        rs = np.random.RandomState(0)
        self.eps_w = Parameter(Tensor(rs.randn(channels, channels).astype(np.float32) * 0.3), name="eps_w")
        self.var_w = Parameter(Tensor(rs.randn(channels, channels).astype(np.float32) * 0.3), name="var_w")
        self.seen_t = []

    def construct(self, x, t):
        xl = x.transpose(0, 1, 3, 4, 2)  # channels last for the matmuls
        scale = (1.0 + t.astype(ms.float32) / 1000.0).reshape(-1, 1, 1, 1, 1)
        eps = ops.tanh(ops.matmul(xl, self.eps_w)) * scale
        v = ops.tanh(ops.matmul(xl, self.var_w) + scale - 1.5)
        return ops.cat([eps, v], 4).transpose(0, 1, 4, 2, 3)


class Recorder(StandIn):
    def construct(self, x, t):
        self.seen_t.append(t.asnumpy().tolist())
        return super().construct(x, t)


def _steps(i, n):
    return Tensor(np.full((n,), i, dtype=np.int32))


def _randn(shape, seed):
    return Tensor(np.random.RandomState(seed).randn(*shape).astype(np.float32))


@pytest.fixture(scope="module")
def oracle(oracle_dir):
    return dict(np.load(oracle_dir / "diffusion_oracle.npz"))


@pytest.fixture(scope="module")
def latte_tiny(oracle_dir):
    from models.checkpoint_io import read_state_dict
    from models.latte import Latte

    net = Latte(input_size=16, patch_size=2, in_channels=4, hidden_size=64, depth=4, num_heads=4,
                mlp_ratio=4, num_frames=4, learn_sigma=True, extras=1)
    load_strict(net, read_state_dict(oracle_dir / "latte_tiny_uncond.pt"))
    net.set_train(False)
    return net


def _assert_close(actual, expected, atol=1e-5, rtol=0.0):
    """Parity with the oracle: the documented absolute bound (1e-5 on eps-sized values)."""
    actual = actual.asnumpy() if isinstance(actual, Tensor) else np.asarray(actual)
    np.testing.assert_allclose(actual, expected, atol=atol, rtol=rtol)


# ------------------------------------------------------------------------------------------------
# Parity with the original (oracle)
# ------------------------------------------------------------------------------------------------

def test_schedule_matches_original(oracle):
    d = create_diffusion("")
    assert d.num_timesteps == 1000 and d.timestep_map == list(range(1000))
    for key in ("betas", "alphas_cumprod", "posterior_log_variance_clipped"):
        assert getattr(d, key).dtype == np.float64
        np.testing.assert_allclose(getattr(d, key), oracle[key], rtol=1e-12, atol=0)


def test_respacing_250_matches_original(oracle):
    d = create_diffusion("250")
    assert d.num_timesteps == 250
    np.testing.assert_array_equal(d.timestep_map, oracle["timestep_map_250"])
    np.testing.assert_allclose(d.betas, oracle["betas_250"], rtol=1e-12, atol=0)


def test_training_losses_match_original(oracle, latte_tiny):
    d = create_diffusion("")
    terms = d.training_losses(latte_tiny, Tensor(oracle["train_x0"]), Tensor(oracle["train_t"]),
                              noise=Tensor(oracle["train_noise"]))
    for key in ("loss", "mse", "vb"):
        assert terms[key].shape == (2,)
        _assert_close(terms[key], oracle[key])


def test_p_mean_variance_250_matches_original(oracle, latte_tiny):
    d = create_diffusion("250")
    z = Tensor(oracle["sample_z"])
    for index_key, prefix in (("sample_index", "p_"), ("sample_index2", "p2_")):
        out = d.p_mean_variance(latte_tiny, z, _steps(int(oracle[index_key]), 2), clip_denoised=False)
        _assert_close(out["mean"], oracle[prefix + "mean"])
        _assert_close(out["log_variance"], oracle[prefix + "log_variance"])
        _assert_close(out["variance"], np.exp(oracle[prefix + "log_variance"]), rtol=1e-6)
        # x_0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar): at t=999 1/sqrt(abar) = 157 amplifies the
        # float32 rounding of eps (and the terms reach |650|, where one ulp is 6e-5), so the 1e-5
        # bound applies to eps, i.e. 1e-5 / sqrt(abar) to x_0.
        index = int(oracle[index_key])
        _assert_close(out["pred_xstart"], oracle[prefix + "pred_xstart"],
                      atol=1e-5 * d.sqrt_recip_alphas_cumprod[index])


def test_ddpm_and_ddim_steps_match_original(oracle, latte_tiny):
    d = create_diffusion("250")
    z, t = Tensor(oracle["sample_z"]), _steps(int(oracle["sample_index"]), 2)
    ddpm = d.p_sample(latte_tiny, z, t, clip_denoised=False, noise=Tensor(oracle["sample_step_noise"]))
    _assert_close(ddpm["sample"], oracle["ddpm_next"])
    ddim = d.ddim_sample(latte_tiny, z, t, clip_denoised=False, eta=0.0)
    _assert_close(ddim["sample"], oracle["ddim_next"])
    _assert_close(ddim["pred_xstart"], oracle["p_pred_xstart"],
                  atol=1e-5 * d.sqrt_recip_alphas_cumprod[int(oracle["sample_index"])])


# ------------------------------------------------------------------------------------------------
# Respacing
# ------------------------------------------------------------------------------------------------

def test_respacing_other_counts_keep_the_base_alphas_cumprod():
    base = create_diffusion("")
    for spec, count in (("100", 100), ("ddim50", 50), ("10,15,20", 45), ("1000", 1000)):
        d = create_diffusion(spec)
        assert d.num_timesteps == count == len(d.timestep_map)
        assert d.timestep_map == sorted(d.timestep_map) and d.timestep_map[0] == 0
        # The respaced betas are built so the kept steps have the base process's alpha-bar.
        np.testing.assert_allclose(d.alphas_cumprod, base.alphas_cumprod[d.timestep_map], rtol=1e-12)
    assert create_diffusion("100").timestep_map[-1] == 999
    assert create_diffusion("ddim50").timestep_map == list(range(0, 1000, 20))
    assert sorted(space_timesteps(300, "10,15,20"))[:3] == [0, 11, 22]  # first section: 100 steps into 10


def test_impossible_respacing_is_a_clear_error():
    with pytest.raises(ValueError, match="1001"):
        create_diffusion("1001")
    with pytest.raises(ValueError, match="ddim999"):
        create_diffusion("ddim999")


def test_model_is_called_with_original_timesteps():
    net = Recorder()
    d = create_diffusion("250")
    x = _randn(SHAPE, 1)
    d.p_mean_variance(net, x, Tensor(np.array([249, 100], np.int32)), clip_denoised=False)
    d.training_losses(net, x, Tensor(np.array([0, 1], np.int32)), noise=_randn(SHAPE, 2))
    assert net.seen_t == [[999, 401], [0, 4]]


# ------------------------------------------------------------------------------------------------
# Training loss
# ------------------------------------------------------------------------------------------------

def _np_decoder_nll_bits(x, mean, log_var):
    """The discretised-Gaussian NLL of the original, written in float32 numpy (at t=0 the bins are
    ~0.5 std wide and the CDF difference cancels: float64 would differ by 1e-4), in bits per dim."""
    x, mean, log_var = (np.asarray(a, np.float32) for a in (x, mean, log_var))
    cdf = lambda v: 0.5 * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (v + 0.044715 * v ** 3)))
    inv_std = np.exp(-0.5 * log_var)
    plus, minus = cdf(inv_std * (x - mean + 1 / 255)), cdf(inv_std * (x - mean - 1 / 255))
    logp = np.where(x < -0.999, np.log(np.maximum(plus, 1e-12)),
                    np.where(x > 0.999, np.log(np.maximum(1 - minus, 1e-12)),
                             np.log(np.maximum(plus - minus, 1e-12))))
    return -logp.reshape(len(x), -1).mean(1) / math.log(2.0)


def test_vb_is_the_decoder_nll_at_t0_and_kl_elsewhere():
    d, net = create_diffusion(""), StandIn()
    x0, noise = Tensor(np.tanh(_randn(SHAPE, 3).asnumpy())), _randn(SHAPE, 4)
    t = Tensor(np.array([0, 0], np.int32))
    terms = d.training_losses(net, x0, t, noise=noise)
    x_t = d.q_sample(x0, t, noise=noise)
    out = d.p_mean_variance(net, x_t, t, clip_denoised=False)
    expected = _np_decoder_nll_bits(x0.asnumpy(), out["mean"].asnumpy(), out["log_variance"].asnumpy())
    _assert_close(terms["vb"], expected, atol=2e-5)
    assert_f32_close(terms["loss"], terms["mse"].asnumpy() + terms["vb"].asnumpy(), ulps=4)
    # At t > 0 the term is the KL (compared with the original in test_training_losses_match_original).
    t = Tensor(np.array([5, 700], np.int32))
    terms = d.training_losses(net, x0, t, noise=noise)
    assert (terms["vb"].asnumpy() > 0).all()
    assert_f32_close(terms["mse"], ((noise.asnumpy() - net(d.q_sample(x0, t, noise), t).asnumpy()[:, :, :4]) ** 2)
                  .reshape(2, -1).mean(1))


def test_vb_does_not_train_the_mean_prediction():
    d, net = create_diffusion(""), StandIn()
    x0, noise, t = _randn(SHAPE, 5), _randn(SHAPE, 6), Tensor(np.array([3, 600], np.int32))
    grad_vb = ms.grad(lambda: d.training_losses(net, x0, t, noise=noise)["vb"].sum(), None,
                      [net.eps_w, net.var_w])()
    assert np.abs(grad_vb[0].asnumpy()).max() == 0.0  # mean detached
    assert np.abs(grad_vb[1].asnumpy()).max() > 0.0


def test_training_losses_in_graph_mode_equal_pynative():
    d, net = create_diffusion("250"), StandIn()
    x0, noise, t = _randn(SHAPE, 7), _randn(SHAPE, 8), Tensor(np.array([0, 123], np.int32))

    def loss_fn(x0, t, noise):
        terms = d.training_losses(net, x0, t, noise=noise)
        return terms["loss"].mean(), terms["vb"]

    grad_fn = ms.value_and_grad(loss_fn, None, net.trainable_params(), has_aux=True)
    (loss_py, vb_py), grads_py = grad_fn(x0, t, noise)
    (loss_graph, vb_graph), grads_graph = ms.jit(grad_fn)(x0, t, noise)
    assert_f32_close(loss_graph, loss_py)
    assert_f32_close(vb_graph, vb_py)
    for a, b in zip(grads_graph, grads_py):
        assert_f32_close(a, b, ulps=256)  # graph mode fuses and reorders the backward


def test_fixed_variance_diffusion_trains_on_mse_only():
    d = create_diffusion("", learn_sigma=False)
    eps_only = lambda x, t: ops.tanh(x)
    x0, noise, t = _randn(SHAPE, 9), _randn(SHAPE, 10), Tensor(np.array([1, 999], np.int32))
    terms = d.training_losses(eps_only, x0, t, noise=noise)
    assert "vb" not in terms
    np.testing.assert_array_equal(terms["loss"].asnumpy(), terms["mse"].asnumpy())  # loss is mse itself
    out = d.p_mean_variance(eps_only, x0, t, clip_denoised=False)
    assert out["variance"].shape == SHAPE
    assert_f32_close(out["variance"][:, 0, 0, 0, 0], [d.betas[1], d.betas[999]], ulps=1, scale=0)  # a cast


# ------------------------------------------------------------------------------------------------
# Samplers and their random numbers
# ------------------------------------------------------------------------------------------------

def test_last_ddpm_step_adds_no_noise():
    d, net, x = create_diffusion("10"), StandIn(), _randn(SHAPE, 11)
    a = d.p_sample(net, x, _steps(0, 2), clip_denoised=False, noise=_randn(SHAPE, 12))["sample"]
    b = d.p_sample(net, x, _steps(0, 2), clip_denoised=False, noise=_randn(SHAPE, 13))["sample"]
    np.testing.assert_array_equal(a.asnumpy(), b.asnumpy())
    mean = d.p_mean_variance(net, x, _steps(0, 2), clip_denoised=False)["mean"]
    np.testing.assert_array_equal(a.asnumpy(), mean.asnumpy())


def test_cond_fn_gradient_shifts_the_ddpm_mean_by_the_variance():
    d, net, x = create_diffusion("10"), StandIn(), _randn(SHAPE, 17)
    seen = []

    def cond_fn(x, t):
        seen.append(t.asnumpy().tolist())
        return ops.ones_like(x) * 0.5

    out = d.p_mean_variance(net, x, _steps(0, 2), clip_denoised=False)
    guided = d.p_sample(net, x, _steps(0, 2), clip_denoised=False, cond_fn=cond_fn)["sample"]
    assert_f32_close(guided, out["mean"] + 0.5 * out["variance"], ulps=4)
    ddim = d.ddim_sample(net, x, _steps(9, 2), clip_denoised=False, cond_fn=cond_fn)["sample"]
    plain = d.ddim_sample(net, x, _steps(9, 2), clip_denoised=False)["sample"]
    assert np.abs((ddim - plain).asnumpy()).max() > 1e-4
    assert seen == [[0, 0], [999, 999]]  # like the model, cond_fn sees the original timesteps


def test_clip_denoised_clamps_the_x0_prediction():
    d, net, x = create_diffusion("10"), StandIn(), _randn(SHAPE, 14) * 3
    out = d.p_mean_variance(net, x, _steps(9, 2), clip_denoised=True)
    assert np.abs(out["pred_xstart"].asnumpy()).max() <= 1.0
    assert np.abs(d.p_mean_variance(net, x, _steps(9, 2), clip_denoised=False)["pred_xstart"]
                  .asnumpy()).max() > 1.0


def test_sample_loops_give_the_shape_and_repeat_with_the_same_noise():
    d, net, z = create_diffusion("5"), StandIn(), _randn(SHAPE, 15)
    rngs = lambda: [np.random.RandomState(s) for s in (1, 2)]
    ddpm = [d.p_sample_loop(net, SHAPE, noise=z, clip_denoised=False, rng=rngs()).asnumpy() for _ in range(2)]
    assert ddpm[0].shape == SHAPE and np.isfinite(ddpm[0]).all()
    np.testing.assert_array_equal(ddpm[0], ddpm[1])
    other = d.p_sample_loop(net, SHAPE, noise=z, clip_denoised=False,
                            rng=[np.random.RandomState(s) for s in (3, 4)]).asnumpy()
    assert np.abs(other - ddpm[0]).max() > 1e-3  # the step noise matters
    # DDIM with eta=0: only x_T is random, so any step rng gives the same video.
    ddim = [d.ddim_sample_loop(net, SHAPE, noise=z, clip_denoised=False, eta=0.0, rng=r).asnumpy()
            for r in (rngs(), np.random.default_rng(9))]
    assert ddim[0].shape == SHAPE
    np.testing.assert_array_equal(ddim[0], ddim[1])
    eta1 = d.ddim_sample_loop(net, SHAPE, noise=z, clip_denoised=False, eta=1.0, rng=rngs()).asnumpy()
    assert np.abs(eta1 - ddim[0]).max() > 1e-3


def test_per_sample_rng_makes_a_sample_independent_of_the_batch():
    d, net = create_diffusion("4"), StandIn()
    pair = d.p_sample_loop(net, SHAPE, clip_denoised=False,
                           rng=[np.random.default_rng(s) for s in (10, 11)]).asnumpy()
    alone = d.p_sample_loop(net, (1,) + SHAPE[1:], clip_denoised=False,
                            rng=[np.random.default_rng(11)]).asnumpy()
    assert_f32_close(alone[0], pair[1])
    ddim_pair = d.ddim_sample_loop(net, SHAPE, clip_denoised=False, eta=0.5,
                                   rng=[np.random.default_rng(s) for s in (10, 11)]).asnumpy()
    ddim_alone = d.ddim_sample_loop(net, (1,) + SHAPE[1:], clip_denoised=False, eta=0.5,
                                    rng=[np.random.default_rng(10)]).asnumpy()
    assert_f32_close(ddim_alone[0], ddim_pair[0])


def test_guidance_batch_gets_the_same_noise_in_both_halves():
    d, net = create_diffusion("3"), StandIn()
    out = d.p_sample_loop(net, SHAPE, clip_denoised=False, rng=[np.random.default_rng(0)]).asnumpy()
    assert_f32_close(out[0], out[1])  # two rows of one batch: BLAS may block them apart
    with pytest.raises(ValueError, match="3 generators"):
        d.p_sample_loop(net, SHAPE, rng=[np.random.default_rng(s) for s in range(3)])


def test_sample_loop_without_rng_uses_the_mindspore_seed():
    d, net = create_diffusion("3"), StandIn()
    ms.set_seed(123)
    a = d.p_sample_loop(net, SHAPE, clip_denoised=False).asnumpy()
    ms.set_seed(123)
    b = d.p_sample_loop(net, SHAPE, clip_denoised=False).asnumpy()
    np.testing.assert_array_equal(a, b)


def test_progress_bar_reports_seconds_per_step(capsys):
    d, net = create_diffusion("3"), StandIn()
    d.ddim_sample_loop(net, SHAPE, noise=_randn(SHAPE, 16), clip_denoised=False, progress=True)
    err = capsys.readouterr().err
    assert "3/3" in err and "s/step" in err
