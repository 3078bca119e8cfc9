"""models.vae: diffusers' AutoencoderKL in MindSpore, checked against the original's outputs."""
import numpy as np
import pytest

from mindspore import Tensor

from conftest import assert_f32_close, load_strict, param_shapes, read_keys
from models.checkpoint_io import read_state_dict
from models.vae_layers import Conv2d, GroupNorm
from models.vae import AutoencoderKL

TINY = dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=32, latent_channels=4)


@pytest.fixture(scope="module")
def tiny_vae(oracle_dir):
    vae = AutoencoderKL(**TINY)
    load_strict(vae, read_state_dict(oracle_dir / "vae_tiny.pt"))
    return vae


def test_param_names_and_shapes_are_the_diffusers_state_dict(oracle_dir):
    assert param_shapes(AutoencoderKL(**TINY)) == read_keys(oracle_dir / "keys_vae_tiny.txt")


def test_default_constructor_is_sd_vae_ft_mse(oracle_dir):
    vae = AutoencoderKL()
    shapes = param_shapes(vae)
    assert shapes == read_keys(oracle_dir / "keys_vae_sd_ft_mse.txt")
    assert len(shapes) == 248
    assert sum(int(np.prod(s)) for s in shapes.values()) == 83_653_863
    assert vae.scaling_factor == 0.18215


def test_encode_matches_diffusers(tiny_vae, oracle_dir):
    ref = np.load(oracle_dir / "vae_tiny.npz")
    image = Tensor(ref["image"])
    moments = tiny_vae.encode_moments(image).asnumpy()
    mean, std = tiny_vae.encode(image)
    np.testing.assert_allclose(moments, ref["moments"], rtol=0, atol=1e-4)
    np.testing.assert_allclose(mean.asnumpy(), ref["mean"], rtol=0, atol=1e-4)
    np.testing.assert_allclose(std.asnumpy(), ref["std"], rtol=0, atol=1e-4)
    z = (mean.asnumpy() + std.asnumpy() * ref["eps"]) * tiny_vae.scaling_factor
    np.testing.assert_allclose(z, ref["z_scaled"], rtol=0, atol=1e-4)


def test_decode_matches_diffusers(tiny_vae, oracle_dir):
    ref = np.load(oracle_dir / "vae_tiny.npz")
    decoded = tiny_vae.decode(Tensor(ref["mean"])).asnumpy()
    np.testing.assert_allclose(decoded, ref["decoded_from_mean"], rtol=0, atol=1e-4)


def test_logvar_is_clamped_before_std():
    moments = np.zeros((1, 8, 2, 2), np.float32)
    moments[:, 4:] = np.array([-100.0, 0.0, 100.0, 2.0], np.float32).reshape(1, 4, 1, 1)
    _, std = AutoencoderKL.moments_to_mean_std(Tensor(moments))
    np.testing.assert_allclose(std.asnumpy()[0, :, 0, 0], np.exp(0.5 * np.array([-30.0, 0.0, 20.0, 2.0])),
                               rtol=1e-5)


def test_micro_batched_encode_and_decode_equal_one_shot(tiny_vae):
    # 64 px like the oracle image, so the (1, ...) graphs compiled by the tests above are reused
    frames = Tensor(np.random.default_rng(0).uniform(-1, 1, (2, 3, 64, 64)).astype(np.float32))
    mean, std = tiny_vae.encode(frames)
    mean_mb, std_mb = tiny_vae.encode(frames, micro_batch=1)
    # another batch size is another computation for BLAS: equal up to float32 rounding
    assert_f32_close(mean_mb, mean)
    assert_f32_close(std_mb, std)
    assert_f32_close(tiny_vae.decode(mean, micro_batch=1), tiny_vae.decode(mean))


def test_cpu_calls_hold_at_most_one_large_frame(tiny_vae, monkeypatch):
    """On CPU a batch is cut into calls of cpu_pixels_per_call output pixels (peak memory follows
    the call, not the batch), with the same result as one call over the whole batch."""
    frames = Tensor(np.random.default_rng(5).uniform(-1, 1, (3, 3, 32, 32)).astype(np.float32))
    whole_mean, _ = tiny_vae.encode(frames)
    z = whole_mean
    whole_rec = tiny_vae.decode(z)
    calls = []
    encode_fn, decode_fn = tiny_vae._encode_fn, tiny_vae._decode_fn
    monkeypatch.setattr(tiny_vae, "_encode_fn", lambda x: calls.append(("encode", x.shape[0])) or encode_fn(x))
    monkeypatch.setattr(tiny_vae, "_decode_fn", lambda x: calls.append(("decode", x.shape[0])) or decode_fn(x))
    monkeypatch.setattr(tiny_vae, "cpu_pixels_per_call", 32 * 32)  # one 32 px frame per call
    mean, _ = tiny_vae.encode(frames, micro_batch=8)
    rec = tiny_vae.decode(z)
    assert calls == [("encode", 1)] * 3 + [("decode", 1)] * 3
    assert_f32_close(mean, whole_mean)
    assert_f32_close(rec, whole_rec)
    monkeypatch.setattr(tiny_vae, "cpu_pixels_per_call", 2 * 32 * 32 + 5)  # two frames: a call of 2, then 1
    calls.clear()
    tiny_vae.encode(frames)
    assert calls == [("encode", 2), ("encode", 1)]


@pytest.mark.parametrize("kernel,stride,padding", [(3, 1, 1), (1, 1, 0), (3, 2, "down")])
def test_matmul_conv_equals_native_conv(kernel, stride, padding):
    rng = np.random.default_rng(kernel + stride)
    x = Tensor(rng.standard_normal((2, 5, 10, 12)).astype(np.float32))
    fast = Conv2d(5, 7, kernel, stride=stride, padding=padding, impl="matmul")
    native = Conv2d(5, 7, kernel, stride=stride, padding=padding, impl="native")
    native.weight.set_data(fast.weight.value())
    native.bias.set_data(fast.bias.value())
    got, want = fast(x).asnumpy(), native(x).asnumpy()
    assert got.shape == want.shape == ((2, 7, 10, 12) if stride == 1 else (2, 7, 5, 6))
    assert_f32_close(got, want)


def test_group_norm_matches_numpy():
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((2, 8, 3, 5)) * 3 + 5).astype(np.float32)
    gn = GroupNorm(4, 8, eps=1e-6)
    gn.weight.set_data(Tensor(rng.standard_normal(8).astype(np.float32)))
    gn.bias.set_data(Tensor(rng.standard_normal(8).astype(np.float32)))
    xg = x.reshape(2, 4, -1).astype(np.float64)
    want = ((xg - xg.mean(-1, keepdims=True)) / np.sqrt(xg.var(-1, keepdims=True) + 1e-6)).reshape(x.shape)
    want = want * gn.weight.asnumpy().reshape(1, -1, 1, 1) + gn.bias.asnumpy().reshape(1, -1, 1, 1)
    assert_f32_close(gn(Tensor(x)), want)


def test_bad_inputs_are_rejected_with_a_clear_message(tiny_vae):
    with pytest.raises(ValueError, match="multiple of 2"):
        tiny_vae.encode(Tensor(np.zeros((1, 3, 33, 32), np.float32)))
    with pytest.raises(ValueError, match="micro_batch"):
        tiny_vae.encode(Tensor(np.zeros((2, 3, 32, 32), np.float32)), micro_batch=0)
    with pytest.raises(ValueError, match="conv_impl"):
        AutoencoderKL(**TINY, conv_impl="fast")
