"""Latte network: numerically equal to the original PyTorch code, same parameter names, all variants."""
import numpy as np
import pytest

import mindspore as ms
from mindspore import Tensor

from models.checkpoint_io import read_state_dict
from mindspore import ops

from conftest import assert_f32_close, load_strict, param_shapes, rand, read_keys
from models import plain_cells
from models.latte import LATTE_MODELS, Latte, TimestepEmbedder

F16_EPS = float(np.finfo(np.float16).eps)  # 9.8e-4: the float16 compute dtype rounds to this

TINY = dict(input_size=16, patch_size=2, in_channels=4, hidden_size=64, depth=4, num_heads=4,
            mlp_ratio=4.0, num_frames=4, learn_sigma=True)
SMALL = dict(input_size=8, in_channels=4, hidden_size=32, depth=2, num_heads=2)


def tiny_from_oracle(oracle_dir, name):
    kwargs = dict(extras=2, num_classes=5) if name == "class" else {}
    net = Latte(**TINY, **kwargs)
    load_strict(net, read_state_dict(oracle_dir / f"latte_tiny_{name}.pt"))
    net.set_train(False)
    return net, np.load(oracle_dir / f"latte_tiny_{name}.npz")


@pytest.mark.parametrize("name", ["uncond", "class"])
def test_tiny_model_matches_original_outputs_and_intermediates(oracle_dir, name):
    net, ref = tiny_from_oracle(oracle_dir, name)
    x, t = Tensor(ref["x"]), Tensor(ref["t"])
    y = Tensor(ref["y"]) if name == "class" else None

    out = net(x, t, y).asnumpy()
    assert out.shape == ref["out"].shape == (2, 4, 8, 16, 16)
    np.testing.assert_allclose(out, ref["out"], rtol=0, atol=2e-5)

    # float32 sin/cos of t*freq with t=500: one ulp in a frequency is ~3e-5 of argument
    t_freq = TimestepEmbedder.timestep_embedding(t, 256).asnumpy()
    np.testing.assert_allclose(t_freq, ref["t_freq"], rtol=0, atol=3e-5)
    np.testing.assert_allclose(net.t_embedder(t).asnumpy(), ref["t_emb"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(net.pos_embed.asnumpy(), ref["pos_embed"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(net.temp_embed.asnumpy(), ref["temp_embed"], rtol=0, atol=1e-6)
    frames = Tensor(ref["x"].reshape(-1, 4, 16, 16))  # (N*F, C, H, W), as the original feeds it
    np.testing.assert_allclose(net.x_embedder(frames).asnumpy(), ref["x_embed_noPos"], rtol=0, atol=1e-5)


def test_fresh_tables_equal_original_sincos(oracle_dir):
    ref = np.load(oracle_dir / "latte_tiny_uncond.npz")
    net = Latte(**TINY)
    np.testing.assert_allclose(net.pos_embed.asnumpy(), ref["pos_embed"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(net.temp_embed.asnumpy(), ref["temp_embed"], rtol=0, atol=1e-6)
    assert not net.pos_embed.requires_grad and not net.temp_embed.requires_grad


def test_parameter_names_and_shapes_equal_torch_state_dict(oracle_dir):
    assert param_shapes(Latte(**TINY)) == read_keys(oracle_dir / "keys_latte_tiny_uncond.txt")
    net = Latte(**TINY, extras=2, num_classes=5)
    assert param_shapes(net) == read_keys(oracle_dir / "keys_latte_tiny_class.txt")


def test_latte_xl2_sky_parameters_equal_released_checkpoint(oracle_dir):
    # The Sky checkpoint is unconditional (extras=1): it has no y_embedder, so num_classes is unused.
    keys = read_keys(oracle_dir / "keys_latte_XL2_sky.txt")
    net = LATTE_MODELS["Latte-XL/2"](input_size=32, num_frames=16, extras=1)
    shapes = param_shapes(net)
    assert shapes == keys
    assert len(shapes) == 292
    assert sum(int(np.prod(s)) for s in shapes.values()) == 673_994_912


def test_registry_has_all_twelve_variants_with_paper_sizes():
    assert sorted(LATTE_MODELS) == sorted(f"Latte-{s}/{p}" for s in ("XL", "L", "B", "S") for p in (2, 4, 8))
    net = LATTE_MODELS["Latte-S/4"](input_size=8, num_frames=2)
    assert len(net.blocks) == 12 and net.hidden_size == 384 and net.num_heads == 6 and net.patch_size == 4


def test_fresh_model_predicts_exactly_zero():
    net = Latte(**SMALL, num_frames=2)
    out = net(rand((2, 2, 4, 8, 8)), Tensor(np.array([3, 999])))
    assert out.shape == (2, 2, 8, 8, 8)
    assert np.all(out.asnumpy() == 0)


def _randomise_zero_layers(net, seed=0):
    """Give the adaLN-Zero layers weights so that outputs depend on every input."""
    rng = np.random.default_rng(seed)
    for name, p in net.parameters_and_names():
        if "adaLN_modulation" in name or "final_layer.linear" in name:
            p.set_data(Tensor(rng.normal(0, 0.02, p.shape).astype(np.float32)))
    return net


@pytest.mark.parametrize("patch_size,num_frames", [(4, 2), (2, 8)])
def test_other_patch_sizes_and_frame_counts_run(patch_size, num_frames):
    net = _randomise_zero_layers(Latte(**SMALL, patch_size=patch_size, num_frames=num_frames, learn_sigma=False))
    out = net(rand((1, num_frames, 4, 8, 8)), Tensor(np.array([7])))
    assert out.shape == (1, num_frames, 4, 8, 8)
    assert np.isfinite(out.asnumpy()).all() and np.abs(out.asnumpy()).max() > 0


def test_wrong_num_frames_is_a_clear_error():
    net = Latte(**SMALL, num_frames=4)
    with pytest.raises(ValueError, match="num_frames=4"):
        net(rand((1, 3, 4, 8, 8)), Tensor(np.array([7])))


def test_class_conditional_model_needs_labels_and_they_matter():
    net = _randomise_zero_layers(Latte(**SMALL, num_frames=2, extras=2, num_classes=3))
    x, t = rand((2, 2, 4, 8, 8)), Tensor(np.array([5, 5]))
    with pytest.raises(ValueError, match="labels"):
        net(x, t)
    a = net(x, t, Tensor(np.array([0, 0]))).asnumpy()
    b = net(x, t, Tensor(np.array([0, 2]))).asnumpy()
    np.testing.assert_array_equal(a[0], b[0])
    assert np.abs(a[1] - b[1]).max() > 1e-6
    assert tuple(net.y_embedder.embedding_table.weight.shape) == (4, 32)  # 3 classes + null


def test_label_dropout_only_in_training_mode():
    net = _randomise_zero_layers(Latte(**SMALL, num_frames=2, extras=2, num_classes=3, class_dropout_prob=1.0))
    x, t, y = rand((1, 2, 4, 8, 8)), Tensor(np.array([5])), Tensor(np.array([1]))
    null = Tensor(np.array([3]))
    net.set_train(False)
    eval_out = net(x, t, y).asnumpy()
    null_out = net(x, t, null).asnumpy()
    assert np.abs(eval_out - null_out).max() > 1e-6
    net.set_train(True)  # p=1: every label becomes the null class
    assert_f32_close(net(x, t, y), null_out)  # training mode may take other kernels
    dropped = net.y_embedder(y, False, force_drop_ids=Tensor(np.array([1])))
    np.testing.assert_array_equal(dropped.asnumpy(), net.y_embedder.embedding_table.weight.asnumpy()[3:4])


def test_forward_with_cfg_guides_eps_and_keeps_variance():
    net = _randomise_zero_layers(Latte(**SMALL, num_frames=2, extras=2, num_classes=3))
    net.set_train(False)
    half = rand((1, 2, 4, 8, 8))
    x = Tensor(np.concatenate([half.asnumpy()] * 2))
    t, y = Tensor(np.array([9, 9])), Tensor(np.array([2, 3]))  # conditional, then null class
    plain = net(x, t, y).asnumpy()
    same = net.forward_with_cfg(x, t, y, 1.0).asnumpy()
    assert same.shape == (2, 2, 8, 8, 8)
    assert_f32_close(same[:, :, :4], np.stack([plain[0, :, :4]] * 2))
    assert_f32_close(same[:, :, 4:], plain[:, :, 4:])
    guided = net.forward_with_cfg(x, t, y, 4.0).asnumpy()
    expected = plain[1, :, :4] + 4.0 * (plain[0, :, :4] - plain[1, :, :4])
    assert_f32_close(guided[0, :, :4], expected)
    np.testing.assert_array_equal(guided[1, :, :4], guided[0, :, :4])


def _layer_norm(x):
    xc = x - x.mean(axis=-1, keep_dims=True)
    return xc / ops.sqrt((xc * xc).mean(axis=-1, keep_dims=True) + 1e-6)


@pytest.mark.parametrize("op,reference,shapes", [
    (plain_cells.Dense(), lambda x, w, b: ops.matmul(x, w.T) + b, [(7, 5), (3, 5), (3,)]),
    (plain_cells.BiasAdd(), lambda z, b: z + b, [(2, 6, 8), (8,)]),
    (plain_cells.NormModulate(), lambda x, shift, scale: _layer_norm(x) * (1 + scale) + shift,
     [(2, 6, 8), (2, 1, 8), (2, 1, 8)]),
    (plain_cells.GatedResidual(), lambda x, gate, z, b: x + gate * (z + b), [(2, 6, 8), (2, 1, 8), (2, 6, 8), (8,)]),
    (plain_cells.Softmax(), lambda x: ops.softmax(x, axis=-1), [(2, 3, 5, 5)]),
], ids=["dense", "bias_add", "norm_modulate", "gated_residual", "softmax"])
def test_hand_written_backwards_equal_autodiff(op, reference, shapes):
    args = [rand(shape, seed=i) for i, shape in enumerate(shapes)]
    out = op(*args)
    out = out[0] if isinstance(out, tuple) else out
    assert_f32_close(out, reference(*args))
    weight = rand(out.shape, seed=9)  # a random cotangent
    positions = tuple(range(len(args)))

    def loss(*a):
        o = op(*a)
        return ((o[0] if isinstance(o, tuple) else o) * weight).sum()

    def reference_loss(*a):
        return (reference(*a) * weight).sum()

    grads = ms.grad(loss, grad_position=positions)(*args)
    expected = ms.grad(reference_loss, grad_position=positions)(*args)
    for g, e in zip(grads if isinstance(grads, tuple) else (grads,), expected if isinstance(expected, tuple) else (expected,)):
        assert_f32_close(g, e)


def test_gelu_is_torch_tanh_gelu_with_exact_gradient():
    x = (np.random.default_rng(0).standard_normal(64) * 3).astype(np.float32)
    x64 = x.astype(np.float64)
    u = np.sqrt(2 / np.pi) * (x64 + 0.044715 * x64 ** 3)
    expected = 0.5 * x64 * (1 + np.tanh(u))
    expected_grad = 0.5 * (1 + np.tanh(u)) + 0.5 * x64 * (1 - np.tanh(u) ** 2) * np.sqrt(2 / np.pi) * (
        1 + 3 * 0.044715 * x64 ** 2)
    gelu = plain_cells.GELUTanh()
    assert_f32_close(gelu(Tensor(x))[0], expected)  # erf-GELU is 1e-3 away
    grad = ms.grad(lambda a: gelu(a)[0].sum())(Tensor(x))
    assert_f32_close(grad, expected_grad)


def test_gradients_flow_in_graph_mode_and_match_pynative():
    net = _randomise_zero_layers(Latte(**SMALL, num_frames=2, use_recompute=True))
    x, t = rand((1, 2, 4, 8, 8)), Tensor(np.array([100]))
    params = net.trainable_params()

    def loss_fn(x, t):
        return (net(x, t) ** 2).mean()

    grad_fn = ms.value_and_grad(loss_fn, None, params)
    loss, grads = grad_fn(x, t)
    jit_loss, jit_grads = ms.jit(grad_fn)(x, t)
    assert_f32_close(jit_loss, loss, ulps=64)
    assert len(grads) == len(params) and "pos_embed" not in [p.name for p in params]
    for g, jg in zip(grads, jit_grads):
        assert_f32_close(jg, g, ulps=1024)  # graph mode fuses and reorders a recomputed backward
    assert all(np.abs(g.asnumpy()).max() > 0 for g in grads)


def test_float16_compute_dtype_stays_close_to_float32_and_trains():
    # bf16 matmuls have no CPU kernel, so only fp16 can be checked here.
    ref = _randomise_zero_layers(Latte(**SMALL, num_frames=2))
    half = Latte(**SMALL, num_frames=2, dtype=ms.float16)
    for (name, p), (name16, p16) in zip(ref.parameters_and_names(), half.parameters_and_names()):
        assert name == name16 and p16.dtype == ms.float32  # parameters stay fp32
        p16.set_data(p.data.copy())
    x, t = rand((1, 2, 4, 8, 8)), Tensor(np.array([3]))
    out = half(x, t)
    assert out.dtype == ms.float32
    # float16 activations: the bound is float16 rounding (eps 9.8e-4) times the depth, relative to
    # the output's scale, not a fixed 2e-3 that is ~2 fp16 ulps for outputs near 1.
    want = ref(x, t).asnumpy()
    scale = float(np.abs(want).max())
    used = float(np.abs(out.asnumpy() - want).max()) / (16 * F16_EPS * scale)
    print(f"float16 vs float32: {used:.3g} of the 16-fp16-ulp bound used")
    assert used <= 1, used
    grads = ms.grad(lambda a: (half(a, t) ** 2).mean(), None, half.trainable_params())(x)
    assert all(np.isfinite(g.asnumpy()).all() for g in grads)


def test_flash_attention_off_ascend_is_a_clear_error():
    if ms.get_context("device_target") == "Ascend":
        pytest.skip("flash attention is available here")
    with pytest.raises(ValueError, match="Ascend"):
        Latte(**SMALL, num_frames=2, dtype=ms.float16, enable_flash_attention=True)


def test_plain_cells_take_the_same_arguments_as_the_fused_kernels():
    """Each block has one construct: it calls whichever module's cells apply, so their calls must match."""
    import inspect

    from models import cpu_kernels

    for name in ("BiasGELU", "NormModulate", "GatedResidual", "Softmax", "QKVSplit", "HeadsMerge"):
        fused, plain = getattr(cpu_kernels, name), getattr(plain_cells, name)
        assert inspect.signature(fused.construct) == inspect.signature(plain.construct), name
