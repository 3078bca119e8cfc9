"""`latte sample`: DDPM/DDIM shapes and determinism, per-sample seeds independent of the batch,
classifier-free guidance, GIF/MP4/PNG outputs that decode back, loading training and converted
checkpoints, and one-line errors for configs that do not fit the checkpoint."""
import os
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

import mindspore as ms

from models.config import ConfigError
from models.convert import save_weights
from models.diffusion import create_diffusion
from models.latte import Latte
from models.vae import AutoencoderKL
from sampler import sample_latents, write_videos
from sampler import main as sample_main
from trainer import checkpoint as ckpt
from conftest import assert_f32_close

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2, mlp_ratio=4.0,
            num_frames=4, learn_sigma=True, extras=1)
TINY_CLASS = dict(TINY, extras=2, num_classes=3, class_dropout_prob=0.1)
TINY_VAE = dict(block_out_channels=[8, 16], layers_per_block=1, norm_num_groups=4, latent_channels=4)


def _weights(config, seed=0):
    """Random weights for a tiny Latte, with the zero-initialised layers made non-zero (a fresh
    Latte predicts exactly 0, which would make every test below trivially pass)."""
    ms.set_seed(seed)
    net = Latte(**config)
    rng = np.random.default_rng(seed)
    out = {}
    for name, p in net.parameters_dict().items():
        v = p.asnumpy()
        if "adaLN_modulation" in name or "final_layer.linear" in name:
            v = rng.normal(0, 0.05, v.shape).astype(np.float32)
        out[name] = v
    return out


def _net(config, seed=0):
    net = Latte(**config)
    for name, p in net.parameters_dict().items():
        p.set_data(ms.Tensor(_weights(config, seed)[name]))
    net.set_train(False)
    return net


@pytest.fixture(scope="module")
def uncond():
    return _net(TINY)


@pytest.fixture(scope="module")
def classy():
    return _net(TINY_CLASS)


@pytest.fixture(scope="module", autouse=True)
def _graph_mode():
    # A tiny Latte forward takes ~1 s in PyNative and ~0.03 s compiled (after ~5 s per batch shape):
    # sampling calls it dozens of times, so this module runs in graph mode, then restores the suite's.
    ms.set_context(mode=ms.GRAPH_MODE)
    yield
    ms.set_context(mode=ms.PYNATIVE_MODE)


@pytest.fixture(scope="module")
def ema_latents():
    """What the CLI must produce for the `files` checkpoints with tiny.yaml (DDIM, seed 0) and 5 steps."""
    return sample_latents(_net(TINY, 1), create_diffusion("5"), 2, seed=0, method="ddim")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A `latte train`-style checkpoint (model/ema/opt groups + metadata), a `latte convert`-style
    plain file of the same network, one without metadata, and a tiny VAE."""
    root = tmp_path_factory.mktemp("sample_files")
    model, ema = _weights(TINY, 0), _weights(TINY, 1)
    tensors = {f"model.{k}": v for k, v in model.items()}
    tensors.update({f"ema.{k}": v for k, v in ema.items()})
    tensors.update({f"opt.exp_avg.{k}": np.zeros_like(v) for k, v in model.items()})
    net_meta = {"kind": "latte", "config": TINY, "variant": "Latte-S/2"}
    train_path = root / "run" / "checkpoints" / "step_0000020.safetensors"
    ckpt.save(str(train_path), tensors, {"step": 20}, {"model_name": "Latte-S/2"}, net_meta)
    save_weights(str(root / "converted.ckpt"), dict(ema), "ckpt", "fp32", net_meta)
    save_weights(str(root / "bare.safetensors"), dict(ema), "safetensors", "fp32", None)
    ms.set_seed(0)
    vae = AutoencoderKL(**TINY_VAE)
    save_weights(str(root / "vae.safetensors"), {k: p.asnumpy() for k, p in vae.parameters_dict().items()},
                 "safetensors", "fp32", {"kind": "vae", "config": TINY_VAE})
    return {"root": root, "run": root / "run", "train": train_path, "converted": root / "converted.ckpt",
            "bare": root / "bare.safetensors", "vae": root / "vae.safetensors"}


def _cli(files, *args, checkpoint=None, out=None):
    argv = ["-c", str(ROOT / "configs" / "inference" / "tiny.yaml"), "--checkpoint", str(checkpoint or files["run"]),
            "--vae", str(files["vae"]), "--output_folder", str(out or files["root"] / "samples"),
            "--sampling_steps", "5", "--num_samples", "2", "--mode", "graph", "--progress", "False",
            *map(str, args)]
    return sample_main(argv)


# ------------------------------------------------------------------------------------------------
# sampling
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["ddpm", "ddim"])
def test_sampling_shape_and_same_seed_same_videos(uncond, method):
    diffusion = create_diffusion("6")
    a = sample_latents(uncond, diffusion, 2, seed=3, method=method)
    b = sample_latents(uncond, diffusion, 2, seed=3, method=method)
    c = sample_latents(uncond, diffusion, 2, seed=4, method=method)
    assert a.shape == (2, 4, 4, 8, 8) and a.dtype == np.float32 and np.isfinite(a).all()
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).mean() > 0.1
    assert np.abs(a[0] - a[1]).mean() > 0.1  # each sample has its own noise


@pytest.mark.parametrize("method", ["ddpm", "ddim"])
def test_sampling_compiles_then_releases_the_freed_heap_before_the_first_step_runs(uncond, method, monkeypatch):
    """The graph compile's freed working memory goes back to the OS before the first step's activations
    are allocated (the run's peak RSS), once per new graph (setup_device's hook trims after every
    compile that compiled); the samples are the same as without."""
    import models.runtime as runtime_module

    diffusion = create_diffusion("4")
    fresh = _net(TINY)  # uncond's weights in a network whose graph no test compiled yet
    events = []
    compile_cell = type(fresh).compile
    monkeypatch.setattr(type(fresh), "compile", lambda self, *a, **k: (events.append("compile"),
                                                                       compile_cell(self, *a, **k))[1])
    monkeypatch.setattr(runtime_module, "release_freed_heap", lambda: events.append("release"))
    got = sample_latents(fresh, diffusion, 1, seed=5, method=method)
    assert events[:2] == ["compile", "release"] and events.count("release") == 1, events
    assert events.count("compile") == 1 + 4  # before the loop, then each step's call finds it compiled
    again = sample_latents(fresh, diffusion, 1, seed=5, method=method)  # compiled: nothing to trim
    assert events.count("release") == 1, events
    monkeypatch.undo()
    np.testing.assert_array_equal(got, sample_latents(uncond, diffusion, 1, seed=5, method=method))
    np.testing.assert_array_equal(again, got)


def test_release_freed_heap_runs_on_glibc():
    import platform

    from models.runtime import release_freed_heap
    assert release_freed_heap() is (platform.libc_ver()[0] == "glibc")


def test_ddim_with_eta_draws_noise_and_differs_from_eta_zero(uncond):
    diffusion = create_diffusion("6")
    zero = sample_latents(uncond, diffusion, 1, seed=0, method="ddim")
    noisy = sample_latents(uncond, diffusion, 1, seed=0, method="ddim", eta=1.0)
    np.testing.assert_array_equal(noisy, sample_latents(uncond, diffusion, 1, seed=0, method="ddim", eta=1.0))
    assert np.abs(zero - noisy).mean() > 1e-3


@pytest.mark.parametrize("method", ["ddpm", "ddim"])
def test_sample_i_is_the_same_video_whatever_the_batch_size_or_count(uncond, method):
    diffusion = create_diffusion("5")
    all_at_once = sample_latents(uncond, diffusion, 3, seed=7, method=method)
    one_by_one = sample_latents(uncond, diffusion, 3, seed=7, batch_size=1, method=method)
    pairs = sample_latents(uncond, diffusion, 3, seed=7, batch_size=2, method=method)
    first_only = sample_latents(uncond, diffusion, 1, seed=7, method=method)
    # Equal up to float rounding: matmuls over another batch size may sum in another order, and five
    # steps of the net pass it on (the random tiny net predicts large x_0): 1024 ulps of the scale.
    assert_f32_close(one_by_one, all_at_once, ulps=1024)
    assert_f32_close(pairs, all_at_once, ulps=1024)
    assert_f32_close(first_only[0], all_at_once[0], ulps=1024)


def test_guidance_changes_class_samples_and_scale_one_is_a_no_op(classy):
    diffusion = create_diffusion("5")
    labels = [0, 2]
    plain = sample_latents(classy, diffusion, 2, seed=1, labels=labels, num_classes=3)
    guided = sample_latents(classy, diffusion, 2, seed=1, guidance_scale=4.0, labels=labels, num_classes=3)
    assert np.abs(plain - guided).mean() > 1e-2
    # The guided path itself at scale 1 (eps_u + 1 * (eps_c - eps_u)) is the conditional model.
    y = ms.Tensor(np.array(labels + [3, 3], np.int32))
    rngs = [np.random.default_rng([1, i]) for i in range(2)]
    z = diffusion.p_sample_loop(lambda x, t, y: classy.forward_with_cfg(x, t, y, 1.0), (4, 4, 4, 8, 8),
                                clip_denoised=False, model_kwargs={"y": y}, rng=rngs).asnumpy()[:2]
    assert_f32_close(z, plain, ulps=1024)  # another batch (4 rows with the unconditional half)
    # ... and the label matters: another label gives another video from the same noise.
    other = sample_latents(classy, diffusion, 2, seed=1, labels=[1, 1], num_classes=3)
    assert np.abs(other[0] - plain[0]).mean() > 1e-2


def test_class_conditional_sampling_compiles_the_network_once(classy, monkeypatch):
    """The loop compiles the network before its first step with the arguments bound as the step's call
    binds them: given as `y=`, the label made MindSpore key a second graph and compile it at step 1."""
    from mindspore.graph import api

    compiled, original = [], api._CellGraphExecutor.compile

    def counting(self, obj, *args, **kwargs):
        result = original(self, obj, *args, **kwargs)
        compiled.append(bool(result[-1]))
        return result
    monkeypatch.setattr(api._CellGraphExecutor, "compile", counting)
    # a batch shape no other test compiled (3 rows), so the compile cannot come from an earlier test
    sample_latents(classy, create_diffusion("3"), 3, seed=2, labels=[0, 1, 2], num_classes=3)
    assert compiled.count(True) == 1, compiled


def test_guided_sampling_compiles_its_graph_before_the_first_step_then_releases_the_heap(classy, monkeypatch):
    """Classifier-free guidance runs as a Cell (sampler.guided.GuidedLatte), so the loop compiles it
    before the first step and trims the compile's freed heap, as for the plain network (a lambda got
    neither); its samples are those of the lambda over forward_with_cfg."""
    import models.runtime as runtime_module

    diffusion = create_diffusion("4")
    y = ms.Tensor(np.array([0, 2, 3, 3], np.int32))
    rngs = [np.random.default_rng([1, i]) for i in range(2)]
    by_lambda = diffusion.p_sample_loop(lambda x, t, y: classy.forward_with_cfg(x, t, y, 4.0), (4, 4, 4, 8, 8),
                                        clip_denoised=False, model_kwargs={"y": y}, rng=rngs).asnumpy()[:2]
    released = []
    monkeypatch.setattr(runtime_module, "release_freed_heap", lambda: released.append(1))
    guided = sample_latents(classy, diffusion, 2, seed=1, guidance_scale=4.0, labels=[0, 2], num_classes=3)
    assert released == [1]
    assert_f32_close(guided, by_lambda, ulps=1024)  # one graph instead of the net's graph plus op-by-op mixing


# ------------------------------------------------------------------------------------------------
# files
# ------------------------------------------------------------------------------------------------

def test_gif_mp4_and_grid_decode_back_to_the_right_frames(tmp_path):
    import av
    import decord

    rng = np.random.default_rng(0)
    videos = rng.integers(0, 256, (2, 6, 32, 64, 3), dtype=np.uint8)  # decord 0.6 mangles widths < 64
    written, notes = write_videos(str(tmp_path), videos, fps=8)
    assert notes == []
    assert sorted(os.listdir(tmp_path)) == ["grid.png", "sample_000.gif", "sample_000.mp4", "sample_001.gif",
                                            "sample_001.mp4"]
    reader = decord.VideoReader(str(tmp_path / "sample_000.mp4"))
    assert len(reader) == 6 and reader[0].shape == (32, 64, 3)
    assert abs(reader.get_avg_fps() - 8) < 0.01
    # decord cannot open GIFs (no frame count in the container): read them with PyAV and Pillow.
    with av.open(str(tmp_path / "sample_001.gif")) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == 6 and frames[0].shape == (32, 64, 3)
    gif = Image.open(tmp_path / "sample_001.gif")
    assert gif.n_frames == 6 and gif.size == (64, 32) and gif.info["loop"] == 0
    grid = np.asarray(Image.open(tmp_path / "grid.png"))
    assert grid.shape == (2 + 32 + 2, 2 + 2 * (64 + 2), 3)
    np.testing.assert_array_equal(grid[2:34, 2:66], videos[0, 0])


def test_cli_writes_gifs_mp4s_grid_and_config_into_a_new_folder_per_run(files, ema_latents, tmp_path, capsys):
    assert _cli(files, "--save_latents", "True", out=tmp_path) == 0
    (folder,) = [p for p in tmp_path.iterdir()]
    assert f"samples: {folder}" in capsys.readouterr().out
    names = sorted(os.listdir(folder))
    assert names == ["config.yaml", "grid.png", "latents.npy", "sample_000.gif", "sample_000.mp4", "sample_001.gif",
                     "sample_001.mp4"]
    gif = Image.open(folder / "sample_000.gif")
    assert gif.n_frames == 4 and gif.size == (16, 16)  # 8x8 latents, the tiny VAE upsamples x2
    record = yaml.safe_load((folder / "config.yaml").read_text())
    assert record["loaded"]["weights"] == "ema" and record["loaded"]["model"] == TINY
    # The EMA weights by default: the same latents as sampling the EMA net directly.
    assert_f32_close(np.load(folder / "latents.npy"), ema_latents, ulps=1024)

    assert _cli(files, "--save_latents", "True", "--weights", "model", "--save_gif", "False",
                "--save_mp4", "False", out=tmp_path) == 0  # a second run gets its own folder
    (second,) = [p for p in tmp_path.iterdir() if p != folder]
    assert sorted(os.listdir(second)) == ["config.yaml", "grid.png", "latents.npy"]
    assert np.abs(np.load(second / "latents.npy") - ema_latents).mean() > 1e-2  # the other weights


def test_latte_sample_builds_the_vae_after_releasing_the_network_and_decodes_the_same_videos(files, tmp_path,
                                                                                              monkeypatch):
    """The VAE is built and loaded only after the denoising, once the Latte net's graphs and weights are
    freed (sd-vae-ft-mse's ~335 MB sat idle through the whole denoise, and Latte's buffers were resident
    under the VAE's compile); built without a random init, it still decodes, bit for bit, the videos of
    a VAE built and loaded as models.vae.load_vae does on the saved latents."""
    import sys

    from models.vae import load_vae as library_load_vae
    from sampler import decode_latents, load_vae, release_network, sample_latents
    sample_module = sys.modules["sampler.sample"]  # `sampler.sample` is the function of that name

    events, decoded = [], []

    def denoise(*args, **kwargs):
        events.append("denoise")
        return sample_latents(*args, **kwargs)

    def release(net):
        events.append("release")
        release_network(net)
        events.append(sorted({int(p.size) for p in net.get_parameters()}))  # every weight emptied

    def build_vae(*args, **kwargs):
        events.append("load_vae")
        return load_vae(*args, **kwargs)

    def decode(*args, **kwargs):
        events.append("decode")
        decoded.append(decode_latents(*args, **kwargs))
        return decoded[-1]

    monkeypatch.setattr(sample_module, "sample_latents", denoise)
    monkeypatch.setattr(sample_module, "release_network", release)
    monkeypatch.setattr(sample_module, "load_vae", build_vae)
    monkeypatch.setattr(sample_module, "decode_latents", decode)
    assert _cli(files, "--save_latents", "True", "--save_mp4", "False", out=tmp_path) == 0
    assert events == ["denoise", "release", [1], "load_vae", "decode"]
    (folder,) = list(tmp_path.iterdir())
    latents = np.load(folder / "latents.npy")
    again = decode_latents(library_load_vae(str(files["vae"])), latents, 0.18215, micro_batch=16)
    assert again.dtype == np.uint8 and again.shape == decoded[0].shape
    np.testing.assert_array_equal(decoded[0], again)


@pytest.mark.parametrize("fmt", ["safetensors", "ckpt"])
def test_a_vae_file_that_does_not_fit_is_refused_before_latte_is_loaded(files, tmp_path, monkeypatch, fmt):
    """The VAE is loaded after the denoising, so its file is checked before it from its headers alone
    (names and shapes): a wrong file is the one-line error load_weights gives, before any step."""
    import sys

    from models.checkpoint_io import read_safetensors
    sample_module = sys.modules["sampler.sample"]

    tensors = read_safetensors(str(files["vae"]))
    del tensors["decoder.conv_out.bias"]
    tensors["decoder.conv_in.weight"] = np.zeros((3, 3, 1, 1), np.float32)
    bad = tmp_path / f"bad_vae.{fmt}"
    save_weights(str(bad), tensors, fmt, "fp32", {"kind": "vae", "config": TINY_VAE})
    loaded = []
    monkeypatch.setattr(sample_module, "load_latte", lambda *a, **k: loaded.append(1))
    with pytest.raises(ConfigError) as err:
        sample_main(["-c", str(ROOT / "configs" / "inference" / "tiny.yaml"), "--checkpoint", str(files["run"]),
                     "--vae", str(bad), "--output_folder", str(tmp_path / "out")])
    message = str(err.value)
    assert "\n" not in message and "does not match AutoencoderKL" in message
    assert "1 missing (decoder.conv_out.bias)" in message and "decoder.conv_in.weight (3, 3, 1, 1) vs" in message
    assert not loaded and not (tmp_path / "out").exists()


def test_a_vae_file_changed_during_the_denoising_keeps_the_latents(files, tmp_path, monkeypatch):
    """The VAE is loaded after the denoising; if its file no longer loads then (changed since the check),
    the error names it and where the denoised latents were saved: nothing computed is lost."""
    import shutil
    import sys

    sample_module = sys.modules["sampler.sample"]
    vae = tmp_path / "vae.safetensors"
    shutil.copy(files["vae"], vae)
    denoise = sample_module.sample_latents

    def denoise_then_damage(*args, **kwargs):
        latents = denoise(*args, **kwargs)
        vae.write_bytes(vae.read_bytes()[:-100])  # truncated while the denoising ran
        return latents

    monkeypatch.setattr(sample_module, "sample_latents", denoise_then_damage)
    with pytest.raises(ConfigError, match=r"vae.safetensors.*the denoised latents are saved in (.*latents\.npy)") as err:
        sample_main(["-c", str(ROOT / "configs" / "inference" / "tiny.yaml"), "--checkpoint", str(files["run"]),
                     "--vae", str(vae), "--output_folder", str(tmp_path / "out"), "--sampling_steps", "5",
                     "--num_samples", "2", "--progress", "False"])
    (kept,) = list((tmp_path / "out").glob("*/latents.npy"))
    assert str(kept) in str(err.value)
    latents = np.load(kept)
    assert latents.shape == (2, 4, 4, 8, 8) and np.isfinite(latents).all()


def test_weight_shapes_reads_a_ckpt_s_tensor_shapes_as_mindspore_loads_them(files, tmp_path):
    """The .ckpt header walk (names and dims, contents skipped) agrees with MindSpore's own reader,
    string entries (metadata) left out; a safetensors file gives the same from its JSON header."""
    from models.checkpoint_io import read_safetensors
    from models.convert import _read_ckpt, read_metadata, weight_shapes  # _read_ckpt: MindSpore's reader

    tensors = read_safetensors(str(files["vae"]))
    tensors["scalar"] = np.float32(3.0).reshape(())
    path = tmp_path / "vae.ckpt"
    save_weights(str(path), dict(tensors), "ckpt", "fp32", {"kind": "vae", "config": TINY_VAE})  # it consumes
    expected = {k: tuple(v.shape) for k, v in _read_ckpt(str(path), "").items() if not isinstance(v, str)}
    assert weight_shapes(str(path)) == expected == {k: v.shape for k, v in tensors.items()}
    assert read_metadata(str(path))["kind"] == "vae"  # the metadata entry is there, and skipped above
    del tensors["scalar"]
    assert weight_shapes(str(files["vae"])) == {k: v.shape for k, v in tensors.items()}
    assert weight_shapes(str(files["train"]), "ema.") == {k: v.shape for k, v in _weights(TINY, 1).items()}


def test_cli_loads_a_converted_checkpoint_like_the_ema_weights_of_a_training_one(files, ema_latents, tmp_path):
    assert _cli(files, "--save_latents", "True", "--save_gif", "False", "--save_mp4", "False",
                checkpoint=files["converted"], out=tmp_path) == 0
    (folder,) = list(tmp_path.iterdir())
    assert_f32_close(np.load(folder / "latents.npy"), ema_latents, ulps=1024)


def test_latte_built_without_a_random_init_is_the_loaded_network_bit_for_bit(files, monkeypatch):
    """load_latte builds the network without initialising its weights (every one comes from the file;
    no initializer runs): the same parameters, and the same output bit for bit, as a network built
    with its random init and then loaded."""
    from models.convert import load_weights
    from sampler.sample import SampleConfig, load_latte

    initialised, init_data = [], ms.Tensor.init_data
    monkeypatch.setattr(ms.Tensor, "init_data", lambda self, *a, **k: (initialised.append(self.shape),
                                                                        init_data(self, *a, **k))[1])
    net, config, _, group = load_latte(SampleConfig(checkpoint=str(files["train"])), downscale=2)
    monkeypatch.undo()
    # PatchEmbed initialises its one small weight itself (to reshape it); no other initializer runs
    n_initialised = sum(int(np.prod(shape)) for shape in initialised)
    assert n_initialised < 0.05 * sum(p.size for p in net.get_parameters()), initialised
    reference = Latte(**config)
    load_weights(reference, str(files["train"]), group=group)
    reference.set_train(False)
    ours = dict(net.parameters_and_names())
    for name, p in reference.parameters_and_names():
        np.testing.assert_array_equal(ours[name].asnumpy(), p.asnumpy())
    rng = np.random.default_rng(3)
    x = ms.Tensor(rng.standard_normal((2, 4, 4, 8, 8)).astype(np.float32))
    t = ms.Tensor(np.array([3, 700], np.int32))
    np.testing.assert_array_equal(net(x, t).asnumpy(), reference(x, t).asnumpy())


def test_class_labels_cycle_and_out_of_range_labels_are_an_error():
    from sampler.sample import labels_for

    assert labels_for([], 5, 3) == [0, 1, 2, 0, 1]
    assert labels_for([2], 3, 3) == [2, 2, 2]
    with pytest.raises(ConfigError, match=r"class_labels \[3\] are out of range: this model has 3 classes"):
        labels_for([1, 3], 2, 3)


def test_a_config_for_another_model_is_a_one_line_error(files, tmp_path):
    sky = str(ROOT / "configs" / "inference" / "sky.yaml")
    with pytest.raises(ConfigError) as err:
        sample_main(["-c", sky, "--checkpoint", str(files["train"]), "--vae", str(files["vae"]),
                     "--output_folder", str(tmp_path)])
    message = str(err.value)
    assert "\n" not in message
    for part in ("model_name Latte-XL/2", "image_size 256 (checkpoint: 16)", "num_frames 16 (checkpoint: 4)"):
        assert part in message
    assert not list(tmp_path.iterdir())  # nothing sampled


def test_a_checkpoint_without_architecture_needs_the_model_keys(files, tmp_path):
    with pytest.raises(ConfigError, match="does not store its architecture: set model_name, image_size, num_frames"):
        _cli(files, checkpoint=files["bare"], out=tmp_path)


@pytest.mark.parametrize("args, message", [
    (["--dtype", "bf16"], "bf16 is not supported on CPU"),
    (["--guidance_scale", "4"], "needs a class-conditional model"),
    (["--class_labels", "1"], "is unconditional"),
    (["--sampling_steps", "2000"], "at most 1000"),
    (["--eta", "0.5", "--sample_method", "ddpm"], "DDIM only"),
    (["--sample_method", "euler"], "choose one of: ddpm, ddim"),
])
def test_impossible_requests_are_one_line_errors(files, tmp_path, args, message):
    with pytest.raises(ConfigError, match=message):
        _cli(files, *args, out=tmp_path)


def test_missing_files_are_one_line_errors(files, tmp_path):
    with pytest.raises(ConfigError, match="checkpoint .*nope.ckpt not found"):
        _cli(files, checkpoint=tmp_path / "nope.ckpt", out=tmp_path)
    with pytest.raises(ConfigError, match="holds a vae network, not Latte"):
        _cli(files, checkpoint=files["vae"], out=tmp_path)


# ------------------------------------------------------------------------------------------------
# damaged checkpoints and non-finite samples
# ------------------------------------------------------------------------------------------------

def _flip_bit(path, offset_from_end=100):
    raw = bytearray(Path(path).read_bytes())
    raw[-offset_from_end] ^= 0x04  # one bit inside the data section (the last tensors: ema / opt groups)
    Path(path).write_bytes(bytes(raw))


def test_a_training_checkpoint_that_fails_its_checksum_is_refused(files, tmp_path, capsys):
    damaged = tmp_path / "step_0000020.safetensors"
    damaged.write_bytes(files["train"].read_bytes())
    _flip_bit(damaged)
    with pytest.raises(ConfigError, match=r"step_0000020.safetensors: checksum mismatch.*pass the run folder") as err:
        _cli(files, checkpoint=damaged, out=tmp_path / "samples")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "samples").exists()  # nothing sampled


def test_a_run_folder_falls_back_to_the_newest_good_checkpoint_with_a_warning(files, ema_latents, tmp_path, capsys):
    run = tmp_path / "run" / "checkpoints"
    run.mkdir(parents=True)
    (run / "step_0000010.safetensors").write_bytes(files["train"].read_bytes())
    (run / "step_0000030.safetensors").write_bytes(files["train"].read_bytes())
    _flip_bit(run / "step_0000030.safetensors")
    out = tmp_path / "samples"
    assert _cli(files, "--save_latents", "True", "--save_gif", "False", "--save_mp4", "False",
                checkpoint=tmp_path / "run", out=out) == 0
    err = capsys.readouterr().err
    assert "warning: skipping checkpoint" in err and "step_0000030.safetensors: checksum mismatch" in err
    assert f"loaded {run / 'step_0000010.safetensors'}" in err
    (folder,) = list(out.iterdir())
    np.testing.assert_allclose(np.load(folder / "latents.npy"), ema_latents, rtol=1e-4, atol=1e-4)


def test_non_finite_latents_stop_sampling_with_an_error(files, tmp_path, capsys):
    ema = _weights(TINY, 1)
    ema["final_layer.linear.bias"] = np.full_like(ema["final_layer.linear.bias"], np.nan)  # a diverged run
    path = tmp_path / "run" / "checkpoints" / "step_0000040.safetensors"
    ckpt.save(str(path), {f"ema.{k}": v for k, v in ema.items()}, {"step": 40}, {"model_name": "Latte-S/2"},
              {"kind": "latte", "config": TINY, "variant": "Latte-S/2"})
    out = tmp_path / "samples"
    assert _cli(files, checkpoint=path, out=out) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("latte sample: error: ") and "not finite (NaN or inf)" in err[-1]
    assert str(path) in err[-1]
    assert not out.exists()  # no black videos written


@pytest.mark.parametrize("fmt", ["safetensors", "ckpt"])
def test_loading_weights_keeps_no_second_copy_of_them_in_file_pages(tmp_path, monkeypatch, fmt):
    """Each tensor's pages of the file map are dropped once copied into its Parameter: while loading,
    at most about one tensor of the file is resident (the kernel maps up to 64 KB around each fault),
    instead of the map growing to a second copy of all the weights. A .ckpt is mapped too (MindSpore's
    reader held the file's bytes and every parsed tensor at once: sd-vae-ft-mse's 335 MB .ckpt
    loaded at ~660 MB over the process); nothing of it is read but through the map."""
    from models.convert import load_weights

    config = dict(TINY, hidden_size=256, num_heads=4)  # tensors of up to 1.5 MB, far above 64 KB
    weights = _weights(config)
    path = str(tmp_path / f"w.{fmt}")
    save_weights(path, dict(weights), fmt, "fp32", None)  # it empties the dict it gets
    if fmt == "ckpt":
        monkeypatch.setattr(ms, "load_checkpoint", None)  # MindSpore's reader is not used

    def mapped_rss_kb():
        rss, inside = 0, False
        for line in Path("/proc/self/smaps").read_text().splitlines():
            head = line.split()
            if "-" in head[0] and len(head) >= 5:
                inside = head[-1] == path
            elif inside and head[0] == "Rss:":
                rss += int(head[1])
        return rss

    seen = []
    set_data = ms.Parameter.set_data
    monkeypatch.setattr(ms.Parameter, "set_data", lambda self, *a, **k: (seen.append(mapped_rss_kb()),
                                                                           set_data(self, *a, **k))[1])
    net = Latte(**config)
    load_weights(net, path)
    largest_kb = max(v.nbytes for v in weights.values()) // 1024
    size_kb = os.path.getsize(path) // 1024
    assert len(seen) == len(weights) and size_kb > 4 * largest_kb
    assert max(seen) <= largest_kb + 256, f"up to {max(seen)} KB of the {size_kb} KB file resident while loading"
    for name, p in net.parameters_dict().items():
        np.testing.assert_array_equal(p.asnumpy(), weights[name])


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_a_mapped_ckpt_loads_the_values_mindspore_reads_sliced_tensors_included(tmp_path, monkeypatch, dtype):
    """A .ckpt is read through a file map (models.convert._map_ckpt): the same values as MindSpore's
    reader (bf16 widened as it casts), also for a tensor MindSpore stored as several row slices (it
    slices tensors over 512 MB; here every tensor over 1 KB, by lowering its slice size)."""
    from mindspore.train import serialization

    from models.convert import _ckpt_entries, _map_ckpt, _read_ckpt, load_weights

    monkeypatch.setattr(serialization, "SLICE_SIZE", 1)  # KB
    weights = _weights(TINY)
    path = str(tmp_path / "w.ckpt")
    save_weights(path, dict(weights), "ckpt", dtype, {"kind": "latte", "config": TINY})
    mapped, read = _map_ckpt(path, ""), _read_ckpt(path, "")
    assert sorted(mapped) == sorted(weights)  # the metadata string is not a tensor
    names = [entry[0] for entry in _ckpt_entries(path)]
    assert len(names) > len(set(names))  # some tensors were stored as several slices
    for name, value in mapped.items():
        np.testing.assert_array_equal(value, read[name].astype(ms.float32).asnumpy())
    net = Latte(**TINY)
    load_weights(net, path)
    for name, p in net.parameters_dict().items():
        np.testing.assert_array_equal(p.asnumpy(), read[name].astype(ms.float32).asnumpy())


def test_latte_sample_sets_up_the_device_with_memory_reuse(files, tmp_path, monkeypatch):
    """`latte sample` asks setup_device for SOMAS buffer reuse (24 MB less peak for Latte-S/2)."""
    import models.runtime

    calls = []

    def record(*args, **kwargs):
        calls.append(kwargs)
        raise KeyboardInterrupt  # stop before loading anything

    monkeypatch.setattr(models.runtime, "setup_device", record)
    with pytest.raises(KeyboardInterrupt):
        _cli(files, out=tmp_path)
    assert calls and calls[0].get("reuse_memory") is True


def test_setup_device_with_memory_reuse_selects_optimize_level_o1():
    """In a fresh process (the setting holds for the first setup_device of a process only)."""
    import subprocess
    import sys

    code = ("from models.runtime import setup_device; setup_device('CPU', 'pynative', 1, reuse_memory=True); "
            "import mindspore as ms; print(ms.get_context('memory_optimize_level'))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT), "GLOG_v": "3"})
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip().splitlines()[-1] == "1"  # O1 (MindSpore reports 0 by default)
