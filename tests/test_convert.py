"""Weight conversion (`latte convert`) and strict `load_weights`, end to end: real torch files of the
original code in, MindSpore files out, networks reproducing the original outputs."""
import ast
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import mindspore as ms
from mindspore import Parameter, Tensor, nn

import latte_cli
from models.checkpoint_io import write_safetensors
from models.convert import infer_latte_config, infer_vae_config, load_weights, read_metadata, save_weights
from models.latte import LATTE_MODELS, Latte
from tests.torch_zip import TensorView, save_torch_zip

ROOT = Path(__file__).resolve().parents[1]

# The tiny oracle models (reference README).
LATTE_TINY = dict(input_size=16, patch_size=2, in_channels=4, hidden_size=64, depth=4, num_heads=4,
                  mlp_ratio=4.0, num_frames=4, learn_sigma=True)
VAE_TINY = dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=32, latent_channels=4)


def convert(*args):
    """Run `latte convert ARGS` through the console-script dispatcher; returns the exit code."""
    return latte_cli.main(["convert", *map(str, args)])


def read_keys(path):
    """{name: shape} from a keys_*.txt file ("name<TAB>(d0, d1, ...)")."""
    keys = {}
    for line in Path(path).read_text().splitlines():
        name, shape = line.split("\t")
        keys[name] = tuple(ast.literal_eval(shape))
    return keys


def shape_only(shape):
    """A zero-memory array of `shape` (infer_* look at shapes only)."""
    return np.lib.stride_tricks.as_strided(np.zeros(1, np.float32), shape, (0,) * len(shape))


# ----------------------------------------------------------------------------------------------------
# the oracle files of the original code
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, extra", [("latte_tiny_uncond", {}),
                                         ("latte_tiny_class", {"extras": 2, "num_classes": 5})])
def test_original_latte_file_converts_and_reproduces_the_original_output(oracle_dir, tmp_path, name, extra):
    target = tmp_path / f"{name}.ckpt"
    assert convert("--kind", "latte", "--source", oracle_dir / f"{name}.pt", "--target", target,
                   "--num-heads", 4) == 0
    config = {**LATTE_TINY, "extras": 1, **extra}
    assert read_metadata(target)["config"] == config  # inferred from the shapes alone

    net = Latte(**config)
    net.set_train(False)
    loaded = load_weights(net, target)
    assert len(loaded) == len(read_keys(oracle_dir / f"keys_{name}.txt"))
    ref = np.load(oracle_dir / f"{name}.npz")
    y = Tensor(ref["y"], ms.int32) if "y" in ref else None
    out = net(Tensor(ref["x"]), Tensor(ref["t"], ms.int32), y).asnumpy()
    np.testing.assert_allclose(out, ref["out"], atol=2e-5, rtol=0)


def test_original_vae_file_converts_and_reproduces_the_original_posterior_mean(oracle_dir, tmp_path, capsys):
    from models.vae import AutoencoderKL

    target = tmp_path / "vae_tiny.safetensors"
    assert convert("--kind", "vae", "--source", oracle_dir / "vae_tiny.pt", "--target", target, "--check") == 0
    assert "check: loaded strictly" in capsys.readouterr().out
    meta = read_metadata(target)
    assert meta["kind"] == "vae"
    assert meta["config"]["block_out_channels"] == [32, 64] and meta["config"]["layers_per_block"] == 1

    net = AutoencoderKL(**VAE_TINY, jit=False)  # one call: compiling would cost more than it saves
    net.set_train(False)
    load_weights(net, target)
    ref = np.load(oracle_dir / "vae_tiny.npz")
    mean, _ = net.encode(Tensor(ref["image"]))
    np.testing.assert_allclose(mean.asnumpy(), ref["mean"], atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------------------------------
# full-size files: sd-vae-ft-mse with 2022 names, a Latte-XL/2 training checkpoint
# ----------------------------------------------------------------------------------------------------

OLD_ATTENTION = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}


def sd_vae_2022_state_dict(oracle_dir, conv_shaped):
    """The 248 tensors of sd-vae-ft-mse under the 2022 attention names, random values."""
    rng = np.random.default_rng(0)
    state_dict = {}
    for name, shape in read_keys(oracle_dir / "keys_vae_sd_ft_mse.txt").items():
        for new, old in OLD_ATTENTION.items():
            name = name.replace(f".{new}.", f".{old}.")
        if conv_shaped and len(shape) == 2:
            shape = shape + (1, 1)
        state_dict[name] = rng.standard_normal(shape, dtype=np.float32)
    return state_dict


@pytest.mark.parametrize("suffix, conv_shaped", [(".bin", False), (".safetensors", True)])
def test_sd_vae_ft_mse_with_2022_attention_names_loads_into_the_default_vae(oracle_dir, tmp_path, suffix,
                                                                              conv_shaped):
    from models.vae import AutoencoderKL

    state_dict = sd_vae_2022_state_dict(oracle_dir, conv_shaped)
    assert len(state_dict) == 248 and "encoder.mid_block.attentions.0.query.weight" in state_dict
    source = tmp_path / f"diffusion_pytorch_model{suffix}"
    if suffix == ".bin":
        save_torch_zip(source, state_dict)
    else:
        write_safetensors(source, state_dict)
    target = tmp_path / "vae.ckpt"
    assert convert("--kind", "vae", "--source", source, "--target", target) == 0

    net = AutoencoderKL()
    assert len(load_weights(net, target)) == 248
    params = net.parameters_dict()
    old = state_dict["decoder.mid_block.attentions.0.proj_attn.weight"].reshape(512, 512)
    np.testing.assert_array_equal(params["decoder.mid_block.attentions.0.to_out.0.weight"].asnumpy(), old)
    np.testing.assert_array_equal(params["encoder.conv_in.weight"].asnumpy(), state_dict["encoder.conv_in.weight"])
    assert read_metadata(target)["config"]["block_out_channels"] == [128, 256, 512, 512]


def test_latte_xl2_training_checkpoint_takes_ema_and_strips_module_prefix(oracle_dir, tmp_path, capsys):
    keys = read_keys(oracle_dir / "keys_latte_XL2_sky.txt")
    # float16 views into one shared storage keep the torch file small (a legal torch layout: slices of
    # one storage); each tensor starts at its own offset so that no two tensors are equal.
    largest = max(int(np.prod(s)) for s in keys.values())
    buffer = np.random.default_rng(0).standard_normal(largest + 1000, dtype=np.float32).astype(np.float16)
    ema = {f"module.{n}": TensorView(buffer, i, s) for i, (n, s) in enumerate(keys.items())}
    model = {f"module.{n}": TensorView(buffer, 500 + i, s) for i, (n, s) in enumerate(keys.items())}
    source = save_torch_zip(tmp_path / "skytimelapse.pt", {"ema": ema, "model": model, "steps": 1000})
    # fp16 safetensors: half the 2.7 GB, and load_weights maps it (a .ckpt is parsed whole, ~3x its
    # size in memory); load_weights casts to the float32 parameters.
    target = tmp_path / "latte_sky.safetensors"
    assert convert("--kind", "latte", "--source", source, "--target", target, "--dtype", "fp16") == 0
    printed = capsys.readouterr().out
    assert "292 tensors, 673,994,912 parameters, fp16" in printed and "stripped the 'module.' prefix" in printed
    meta = read_metadata(target)
    assert meta["variant"] == "Latte-XL/2"
    assert meta["config"] == dict(input_size=32, patch_size=2, in_channels=4, hidden_size=1152, depth=28,
                                  num_heads=16, mlp_ratio=4.0, num_frames=16, learn_sigma=True, extras=1)

    net = LATTE_MODELS["Latte-XL/2"](input_size=32, num_frames=16)
    assert len(load_weights(net, target)) == 292
    params = net.parameters_dict()
    for i, name in [(0, "pos_embed"), (291, "final_layer.adaLN_modulation.1.bias"), (100, list(keys)[100])]:
        expected = buffer[i:i + params[name].size].astype(np.float32).reshape(keys[name])
        np.testing.assert_array_equal(params[name].asnumpy(), expected)  # ema, not model


def test_group_flag_picks_model_over_ema_and_non_tensors_are_dropped_with_a_note(oracle_dir, tmp_path, capsys):
    from models.checkpoint_io import read_checkpoint

    ema = read_checkpoint(oracle_dir / "latte_tiny_uncond.pt")
    model = {name: value + 1 for name, value in ema.items()}
    source = save_torch_zip(tmp_path / "train.pt", {"ema": ema, "model": model, "args": {"lr": 1e-4}})
    target = tmp_path / "model.safetensors"
    assert convert("--kind", "latte", "--source", source, "--target", target, "--num-heads", 4,
                   "--group", "model", "--check") == 0
    printed = capsys.readouterr().out
    assert "took group 'model', left out 52 other tensors" in printed and "dropped 1 non-tensor" in printed
    net = Latte(**LATTE_TINY)
    load_weights(net, target)
    np.testing.assert_array_equal(net.parameters_dict()["blocks.0.attn.qkv.weight"].asnumpy(),
                                  model["blocks.0.attn.qkv.weight"])
    assert convert("--kind", "latte", "--source", source, "--target", target, "--group", "opt") == 2
    assert "no group 'opt'" in capsys.readouterr().err


def test_architecture_is_inferred_from_the_released_shapes(oracle_dir):
    latte = {n: shape_only(s) for n, s in read_keys(oracle_dir / "keys_latte_XL2_sky.txt").items()}
    assert infer_latte_config(latte) == dict(input_size=32, patch_size=2, in_channels=4, hidden_size=1152,
                                             depth=28, num_heads=16, mlp_ratio=4.0, num_frames=16,
                                             learn_sigma=True, extras=1)
    vae = {n: shape_only(s) for n, s in read_keys(oracle_dir / "keys_vae_sd_ft_mse.txt").items()}
    assert infer_vae_config(vae) == dict(in_channels=3, out_channels=3, block_out_channels=[128, 256, 512, 512],
                                         layers_per_block=2, latent_channels=4, norm_num_groups=32)
    tiny = {n: shape_only(s) for n, s in read_keys(oracle_dir / "keys_vae_tiny.txt").items()}
    assert infer_vae_config(tiny)["block_out_channels"] == [32, 64]
    with pytest.raises(ValueError, match="num-heads"):
        tiny = read_keys(oracle_dir / "keys_latte_tiny_uncond.txt")
        infer_latte_config({n: shape_only(s) for n, s in tiny.items()})


# ----------------------------------------------------------------------------------------------------
# hostile and broken input
# ----------------------------------------------------------------------------------------------------

class SystemCall:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


class Eval:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        import builtins
        return builtins.eval, (f"__import__('os').system({self.command!r})",)


@pytest.mark.parametrize("payload", [SystemCall, Eval])
def test_malicious_pickle_is_refused_and_nothing_is_written(tmp_path, capsys, payload):
    pwned = tmp_path / "pwned"
    source = save_torch_zip(tmp_path / "evil.pt", {"ema": {"w": np.ones((2, 2), np.float32)},
                                                  "x": payload(f"touch {pwned}")})
    target = tmp_path / "out.ckpt"
    assert convert("--kind", "latte", "--source", source, "--target", target) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "unsafe pickle" in err and str(source) in err
    assert not pwned.exists() and not target.exists()
    assert list(tmp_path.iterdir()) == [source]  # no temp file left either


def test_malicious_file_through_the_console_script_gives_one_line_and_exit_code_2(tmp_path):
    pwned = tmp_path / "pwned"
    source = save_torch_zip(tmp_path / "evil.bin", {"w": SystemCall(f"touch {pwned}")})
    result = subprocess.run([sys.executable, "-m", "latte_cli", "convert", "--kind", "vae", "--source",
                             str(source), "--target", str(tmp_path / "vae.ckpt")],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    err = result.stderr.strip()
    assert err.startswith("latte convert: error:") and len(err.splitlines()) == 1, err
    assert "posix.system" in result.stderr and not pwned.exists()


def test_bad_inputs_give_one_line_errors_naming_the_file(oracle_dir, tmp_path, capsys):
    not_a_checkpoint = tmp_path / "notes.pt"
    not_a_checkpoint.write_text("these are not weights\n")
    foreign = save_torch_zip(tmp_path / "resnet.pt", {"conv1.weight": np.ones((4, 3, 3, 3), np.float32)})
    cases = [
        (tmp_path / "missing.pt", "latte", "no such file"),
        (not_a_checkpoint, "latte", "neither a torch zip checkpoint nor a safetensors file"),
        (foreign, "vae", "neither a Latte nor a VAE state dict"),
        (oracle_dir / "vae_tiny.pt", "latte", "pass --kind vae"),
    ]
    for source, kind, message in cases:
        target = tmp_path / "out.ckpt"
        assert convert("--kind", kind, "--source", source, "--target", target, "--num-heads", 4) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err and str(source) in err, err
        assert not target.exists()


# ----------------------------------------------------------------------------------------------------
# strict loading
# ----------------------------------------------------------------------------------------------------

class Small(nn.Cell):
    def __init__(self):
        super().__init__()
        self.proj = nn.Dense(3, 2)
        self.table = Parameter(Tensor(np.zeros((4,), np.float32)), name="table")


def small_weights(**changes):
    weights = {"proj.weight": np.full((2, 3), 1.5, np.float32), "proj.bias": np.full((2,), 2.5, np.float32),
               "table": np.arange(4, dtype=np.float32)}
    weights.update(changes)
    return {k: v for k, v in weights.items() if v is not None}


@pytest.mark.parametrize("changes, message", [
    ({"proj.bias": None}, "1 missing (proj.bias)"),
    ({"extra.weight": np.ones(3, np.float32)}, "1 unexpected (extra.weight)"),
    ({"table": np.zeros((5,), np.float32)}, "1 mis-shaped, file vs network (table (5,) vs (4,))"),
])
def test_load_weights_names_missing_unexpected_and_misshaped_tensors(tmp_path, changes, message):
    path = tmp_path / "w.safetensors"
    write_safetensors(path, small_weights(**changes))
    net = Small()
    with pytest.raises(ValueError, match="does not match Small") as err:
        load_weights(net, path)
    assert message in str(err.value) and "\n" not in str(err.value)
    np.testing.assert_array_equal(net.table.asnumpy(), np.zeros(4))  # nothing was copied


@pytest.mark.parametrize("suffix, dtype", [(".ckpt", "fp16"), (".ckpt", "bf16"), (".safetensors", "fp16")])
def test_load_weights_casts_to_the_parameter_dtype(tmp_path, suffix, dtype):
    path = tmp_path / f"w{suffix}"
    save_weights(path, small_weights(), fmt=suffix[1:], dtype=dtype)  # values exact in 16 bits
    net = Small()
    assert sorted(load_weights(net, path)) == ["proj.bias", "proj.weight", "table"]
    assert net.proj.weight.dtype == ms.float32
    np.testing.assert_array_equal(net.table.asnumpy(), np.arange(4))


@pytest.mark.parametrize("suffix", [".ckpt", ".safetensors"])
def test_load_weights_picks_a_group_of_a_trainer_checkpoint(tmp_path, suffix):
    path = tmp_path / f"train{suffix}"
    groups = {f"ema.{k}": v for k, v in small_weights().items()}
    groups.update({f"model.{k}": v + 1 for k, v in small_weights().items()})
    save_weights(path, groups, fmt=suffix[1:])
    net = Small()
    load_weights(net, path, group="ema")
    np.testing.assert_array_equal(net.table.asnumpy(), np.arange(4))
    load_weights(net, path, prefix="model.")
    np.testing.assert_array_equal(net.table.asnumpy(), np.arange(4) + 1)
    with pytest.raises(ValueError, match="pass group='ema'"):
        load_weights(net, path)
    with pytest.raises(ValueError, match="3 missing .*pass group='ema'"):
        load_weights(net, path, group="opt")


def test_load_weights_into_the_wrong_network_says_what_the_file_holds(oracle_dir, tmp_path):
    target = tmp_path / "latte.ckpt"
    assert convert("--kind", "latte", "--source", oracle_dir / "latte_tiny_uncond.pt", "--target", target,
                   "--num-heads", 4) == 0
    with pytest.raises(ValueError, match=r"52 unexpected .*the file holds a latte network with .*\"depth\": 4"):
        load_weights(Small(), target)


def test_a_crash_while_writing_leaves_the_previous_file_intact(tmp_path, monkeypatch):
    path = tmp_path / "w.ckpt"
    save_weights(path, small_weights())
    before = path.read_bytes()

    def crash(items, name, **kwargs):
        Path(name).write_bytes(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(ms, "save_checkpoint", crash)
    with pytest.raises(OSError, match="disk full"):
        save_weights(path, small_weights(table=np.ones(4, np.float32)))
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["w.ckpt"]


def test_load_weights_reports_a_damaged_file_in_one_line(tmp_path):
    for name, data in [("w.ckpt", b"\x0a\x05garbage" * 20), ("w.safetensors", b"\xff" * 16)]:
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ValueError, match="re-create it") as err:
            load_weights(Small(), tmp_path / name)
        assert str(tmp_path / name) in str(err.value) and "\n" not in str(err.value)


def test_load_weights_refuses_an_unconverted_torch_file(oracle_dir):
    with pytest.raises(ValueError, match="latte convert"):
        load_weights(Small(), oracle_dir / "latte_tiny_uncond.pt")


# ----------------------------------------------------------------------------------------------------
# every conversion is checked against the inferred architecture
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("change, message", [
    ("drop", "1 missing (blocks.1.mlp.fc2.bias)"),
    ("extra", "1 unexpected (blocks.0.attn.extra)"),
    ("shape", "1 mis-shaped, file vs network (t_embedder.mlp.0.bias (65,) vs (64,))"),
])
@pytest.mark.parametrize("check", [False, True])
def test_convert_always_checks_names_and_shapes_and_writes_nothing_on_failure(oracle_dir, tmp_path, capsys,
                                                                              change, message, check):
    from models.checkpoint_io import read_state_dict
    state_dict = read_state_dict(oracle_dir / "latte_tiny_uncond.pt")
    if change == "drop":
        del state_dict["blocks.1.mlp.fc2.bias"]
    elif change == "extra":
        state_dict["blocks.0.attn.extra"] = np.ones(3, np.float32)
    else:
        state_dict["t_embedder.mlp.0.bias"] = np.ones(65, np.float32)
    source = tmp_path / "edited.safetensors"
    write_safetensors(source, state_dict)
    target = tmp_path / "out" / "latte.ckpt"
    args = ["--kind", "latte", "--source", source, "--target", target, "--num-heads", 4] + (["--check"] if check else [])
    assert convert(*args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and "do not fit the inferred Latte(" in err, err
    assert not target.exists() and not (tmp_path / "out").exists()


def test_a_conversion_whose_check_fails_leaves_no_file(oracle_dir, tmp_path, capsys, monkeypatch):
    """--check loads the written file before it takes the target's name: a file that does not load
    (here: a loader failure) is never left behind, and an older target stays as it was."""
    import models.convert as convert_module

    target = tmp_path / "latte.safetensors"
    target.write_bytes(b"the previous conversion")

    def fails(net, path, **kwargs):
        raise ValueError(f"{path}: does not load")

    monkeypatch.setattr(convert_module, "load_weights", fails)
    assert convert("--kind", "latte", "--source", oracle_dir / "latte_tiny_uncond.pt", "--target", target,
                   "--num-heads", 4, "--check") == 2
    assert "does not load" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["latte.safetensors"] and target.read_bytes() == b"the previous conversion"


def test_a_damaged_converted_safetensors_file_is_refused_by_load_weights(tmp_path):
    path = tmp_path / "w.safetensors"
    save_weights(path, small_weights(), fmt="safetensors")
    raw = bytearray(path.read_bytes())
    raw[-2] ^= 0x80  # the exponent byte of the last value
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="w.safetensors: checksum mismatch") as err:
        load_weights(Small(), path)
    assert "\n" not in str(err.value)


def test_bf16_safetensors_output_loads_as_float32(tmp_path):
    path = tmp_path / "w.safetensors"
    save_weights(path, small_weights(), fmt="safetensors", dtype="bf16")  # values exact in bf16
    net = Small()
    load_weights(net, path)
    np.testing.assert_array_equal(net.proj.weight.asnumpy(), np.full((2, 3), 1.5, np.float32))
