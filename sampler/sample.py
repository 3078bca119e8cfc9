"""`latte sample`: videos from a trained Latte, decoded by the VAE, written as GIF, MP4 and a PNG grid.

    latte sample -c configs/inference/sky.yaml --checkpoint pretrained/latte_sky.ckpt --vae pretrained/sd-vae-ft-mse.ckpt
    latte sample -c configs/inference/tiny.yaml --checkpoint results/demo --vae demo/sky_vae.safetensors
    latte sample -c configs/inference/sky.yaml --sample_method ddim --sampling_steps 50 --num_samples 8

The checkpoint is a `latte train` file (`step_*.safetensors`, EMA weights unless `--weights model`),
a training output folder (its newest checkpoint), or a `latte convert` output of an original Latte
release. The network is rebuilt from the architecture saved in the checkpoint; config keys that
describe the model (model_name, image_size, num_frames, num_classes) are then only checked against
it, so a config for another model is a one-line error rather than garbage samples. They are needed
only for a checkpoint without saved architecture.

Sampling follows the original `sample.py`: x_T ~ N(0, I), DDPM or DDIM over `sampling_steps` evenly
respaced steps of the 1000, `clip_denoised=False`, classifier-free guidance when guidance_scale > 1
(class-conditional models only), latents divided by the VAE scale factor and decoded frame by frame.
Reproducible: sample i draws all its noise from its own generator seeded by (seed, i), so it is the
same video whatever the batch size or the number of samples.

Output: `<output_folder>/<timestamp>/sample_<i>.gif`, `sample_<i>.mp4`, `grid.png` (first frames)
and `config.yaml` (the resolved config plus what was loaded); the folder is printed at the end.
"""
import dataclasses
import datetime
import os
import sys
import time

import numpy as np
import yaml

from models.checkpoint_io import (CheckpointFormatError, newest_good_checkpoint, read_header, step_checkpoints,
                                  verify_if_checksummed)
from models.config import ConfigError, first_line, parse_config
from models.registry import latte_kwargs, same_architecture, variant_sizes
from sampler.config import SampleConfig


# ------------------------------------------------------------------------------------------------
# loading
# ------------------------------------------------------------------------------------------------

def resolve_checkpoint(path, warn=None):
    """A weights file whose checksum holds; a training output folder (or its checkpoints/ folder)
    means its newest good step file, each damaged newer one skipped with a warning (as `latte train
    --resume auto` does). A damaged file named directly is refused."""
    warn = warn or (lambda msg: print(msg, file=sys.stderr, flush=True))
    if not path:
        raise ConfigError("no checkpoint given: pass --checkpoint PATH (a `latte train` checkpoint or output "
                          "folder, or a `latte convert` output)")
    if os.path.isdir(path):
        for folder in (os.path.join(path, "checkpoints"), path):
            newest, _ = newest_good_checkpoint(folder, warn=warn)
            if newest:
                return newest
            if step_checkpoints(folder):
                raise ConfigError(f"checkpoint folder {folder} holds no undamaged step_*.safetensors: pass another "
                                  f"checkpoint")
        raise ConfigError(f"checkpoint folder {path} holds no step_*.safetensors: pass a checkpoint file")
    if not os.path.isfile(path):
        raise ConfigError(f"checkpoint {path} not found: check the path (convert released .pt weights with "
                          f"`latte convert --kind latte`)")
    if path.endswith(".safetensors"):
        try:
            verify_if_checksummed(path)
        except CheckpointFormatError as err:
            raise ConfigError(f"checkpoint {err}: pass the run folder to take its newest good checkpoint, or "
                              f"another file") from None
    return path


def weight_groups(path):
    """Top-level name groups of a training checkpoint ({"model", "ema", "opt"}), or empty for a file of
    plain parameter names. Reads only the safetensors header."""
    if not path.endswith(".safetensors"):
        return set()
    try:
        names = read_header(path)[0]
    except CheckpointFormatError:
        raise ConfigError(f"checkpoint {path} is damaged or not a safetensors file") from None
    groups = {name.split(".", 1)[0] for name in names}
    return groups if groups & {"model", "ema"} else set()


def _arch_from_keys(cfg, downscale, latent_channels):
    """Latte(**kwargs) from config keys, for a checkpoint that did not save its architecture."""
    missing = [k for k in ("model_name", "image_size", "num_frames") if getattr(cfg, k) is None]
    if missing:
        raise ConfigError(f"checkpoint {cfg.checkpoint} does not store its architecture: set "
                          f"{', '.join(missing)} (e.g. -c configs/inference/sky.yaml)")
    patch = variant_sizes(cfg.model_name)["patch_size"]
    if cfg.image_size % (downscale * patch):
        raise ConfigError(f"'image_size' {cfg.image_size} must be a multiple of {downscale * patch} "
                          f"(the VAE's {downscale}x downsampling times {cfg.model_name}'s patch size)")
    latent = cfg.image_size // downscale
    return latte_kwargs(cfg.model_name, (latent_channels, latent, latent), cfg.num_frames, cfg.learn_sigma,
                        cfg.num_classes or 0)


def _check_keys_match(cfg, config, variant, downscale, where):
    """Each model key the user set must agree with the checkpoint's saved architecture."""
    num_classes = config.get("num_classes", 0) if config.get("extras", 1) == 2 else 0
    saved = {"image_size": config["input_size"] * downscale, "num_frames": config["num_frames"],
             "num_classes": num_classes}
    wrong = [f"{key} {getattr(cfg, key)} (checkpoint: {value})" for key, value in saved.items()
             if getattr(cfg, key) is not None and getattr(cfg, key) != value]
    if cfg.model_name is not None and cfg.model_name != variant:
        if not same_architecture(cfg.model_name, config):
            wrong.insert(0, f"model_name {cfg.model_name} (checkpoint: {variant or 'custom'} with depth "
                            f"{config['depth']}, hidden {config['hidden_size']}, patch {config['patch_size']})")
    if wrong:
        raise ConfigError(f"{where} was trained as a different model than the config says: {'; '.join(wrong)}; "
                          f"use the config it was trained with, or set these keys to null")


def _no_init_parameters():
    """Build a network without initialising its weights: every weight then comes from the file
    (load_weights is strict), so the random init was work and memory for nothing (measured: 317 MB
    and ~5 s for sd-vae-ft-mse's AutoencoderKL, 66 MB and 0.8 s for Latte-S/2). MindSpore marks the
    context manager deprecated; without it the network is built as before."""
    import contextlib
    try:
        from mindspore.nn.utils import no_init_parameters
    except ImportError:
        return contextlib.nullcontext()
    return no_init_parameters()


def check_vae(cfg):
    """(AutoencoderKL kwargs, downscale, latent channels) of `cfg.vae`, its weights file checked as
    `load_vae` would (path, a VAE's metadata, every tensor name and shape) from its headers alone:
    `latte sample` builds and loads the VAE only after the denoising (sd-vae-ft-mse is ~335 MB that
    would sit idle through it), and a wrong file must still stop it before the first step."""
    from models.convert import check_weights
    from models.vae import AutoencoderKL, vae_config

    _check_vae_path(cfg)
    try:
        config = vae_config(cfg.vae)
        with _no_init_parameters():
            skeleton = AutoencoderKL(**config)  # names and shapes only: no weights allocated
        check_weights(skeleton, cfg.vae)
    except ValueError as err:
        raise ConfigError(first_line(err)) from None
    return config, skeleton.downscale, skeleton.latent_channels


def _check_vae_path(cfg):
    if not cfg.vae:
        raise ConfigError("no VAE given: pass --vae PATH (`latte convert --kind vae` of sd-vae-ft-mse, or "
                          "demo/sky_vae.safetensors for the demo's models)")
    if not os.path.isfile(cfg.vae):
        raise ConfigError(f"vae {cfg.vae} not found: check the path")


def load_vae(cfg, config=None):
    """The AutoencoderKL of `cfg.vae` (architecture from its saved config, else SD's; `config` from
    `check_vae` skips reading it again), fp32, its weights read straight into the network."""
    from models.vae import load_vae as load

    _check_vae_path(cfg)
    try:
        with _no_init_parameters():
            return load(cfg.vae, config=config)
    except ValueError as err:
        raise ConfigError(first_line(err)) from None


def load_latte(cfg, downscale, latent_channels=4, path=None):
    """(network, its constructor kwargs, the loaded file, group) for `cfg`; `downscale` and
    `latent_channels` are the VAE's; `path` is `resolve_checkpoint(cfg.checkpoint)` if already known."""
    from models import Latte, load_weights, read_metadata

    path = path or resolve_checkpoint(cfg.checkpoint)
    meta = read_metadata(path) if path.endswith((".ckpt", ".safetensors")) else {}
    if meta.get("kind", "latte") != "latte":
        raise ConfigError(f"checkpoint {path} holds a {meta['kind']} network, not Latte: pass --checkpoint and "
                          f"--vae the right way round")
    if meta.get("config"):
        config = dict(meta["config"])
        _check_keys_match(cfg, config, meta.get("variant"), downscale, path)
    else:
        config = _arch_from_keys(cfg, downscale, latent_channels)
    with _no_init_parameters():  # every weight comes from the file: Latte-S/2's random init was 66 MB, 0.8 s
        net = Latte(**config, dtype=cfg.dtype, enable_flash_attention=cfg.enable_flash_attention)
    groups = weight_groups(path)
    group = cfg.weights if groups else None
    if group and group not in groups:
        raise ConfigError(f"checkpoint {path} has no '{group}' weights (it holds {', '.join(sorted(groups))}): "
                          f"set --weights to one of those")
    load_weights(net, path, group=group)
    net.set_train(False)
    for p in net.get_parameters():
        p.requires_grad = False
    return net, config, path, group


# ------------------------------------------------------------------------------------------------
# sampling
# ------------------------------------------------------------------------------------------------

def labels_for(cfg_labels, num_samples, num_classes):
    """The label of each sample: `cfg_labels` cycled, else 0, 1, 2, ... cycled over the classes."""
    labels = list(cfg_labels) or list(range(num_classes))
    bad = [label for label in labels if label >= num_classes]
    if bad:
        raise ConfigError(f"class_labels {bad} are out of range: this model has {num_classes} classes (0..{num_classes - 1})")
    return [labels[i % len(labels)] for i in range(num_samples)]


def class_indices(cfg_labels, class_names):
    """`--class_labels` items (class names the checkpoint carries, or indices) -> ints."""
    out = []
    for label in cfg_labels:
        text = str(label)
        if class_names and text in class_names:
            out.append(class_names.index(text))
        elif text.isdigit():
            out.append(int(text))
        else:
            known = f"its classes are {', '.join(class_names)}" if class_names else "it carries no class names"
            raise ConfigError(f"class_labels {text!r} is neither a class name nor an index: {known}")
    return out


def sample_latents(net, diffusion, num_samples, seed, batch_size=0, method="ddpm", eta=0.0, guidance_scale=1.0,
                   labels=None, num_classes=0, progress=False):
    """Denoise `num_samples` videos; returns float32 latents (N, F, C, h, w) in the diffusion's scale.

    Sample i draws x_T and every step's noise from `np.random.default_rng([seed, i])`, so it does not
    depend on the batch it was denoised in. `labels` (one per sample) for class-conditional models;
    guidance_scale > 1 runs each batch twice as wide, conditional then null-class half."""
    from mindspore import Tensor

    shape = (net.num_frames, net.in_channels, net.input_size, net.input_size)
    batch_size = batch_size or num_samples
    use_cfg = guidance_scale > 1.0
    if use_cfg:  # a Cell, so that the loop compiles it before the first step like the plain network
        from sampler.guided import GuidedLatte
        guided = GuidedLatte(net, guidance_scale)
    out = []
    for start in range(0, num_samples, batch_size):
        idx = list(range(start, min(start + batch_size, num_samples)))
        rngs = [np.random.default_rng([seed, i]) for i in idx]
        n = len(idx)
        if progress and batch_size < num_samples:
            print(f"samples {idx[0]}..{idx[-1]} of {num_samples}:", file=sys.stderr, flush=True)
        kwargs, model = {}, net
        if labels is not None:
            y = np.asarray([labels[i] for i in idx], np.int32)
            if use_cfg:  # [conditional half, unconditional half]; the halves share x_T and all noise
                y = np.concatenate([y, np.full(n, num_classes, np.int32)])
                model = guided
            kwargs["y"] = Tensor(y)
        rows = 2 * n if use_cfg else n
        loop = diffusion.ddim_sample_loop if method == "ddim" else diffusion.p_sample_loop
        extra = {"eta": eta} if method == "ddim" else {}
        z = loop(model, (rows,) + shape, clip_denoised=False, model_kwargs=kwargs, progress=progress, rng=rngs, **extra)
        out.append(z.asnumpy()[:n])
    return np.concatenate(out)


def release_network(net):
    """Free what the denoising network holds once its last step ran, so that the VAE decode does not
    come on top of it (`latte sample`'s peak was set there, Latte's graph and weights still resident):
    MindSpore's compiled graphs and their memory (`ms.ms_memory_recycle`: every graph of the process,
    so call it before the decode compiles the VAE's), the weights (each Parameter's data swapped for
    one element: a compiled Cell stays referenced from MindSpore's C++ side, measured, so dropping the
    Python name frees nothing), then the heap this freed (malloc_trim) and the library pages mapped
    only for the denoising. `net` cannot be called afterwards. Returns the RSS it freed, MB."""
    import gc

    import mindspore as ms

    from models.runtime import drop_clean_library_pages, release_freed_heap, rss_split

    before = rss_split()["VmRSS"]
    ms.ms_memory_recycle()
    empty = ms.Tensor(np.zeros((1,), np.float32))
    for p in net.get_parameters():
        p.set_data(empty, slice_shape=True)
    gc.collect()
    release_freed_heap()
    drop_clean_library_pages()
    return max(0.0, before - rss_split()["VmRSS"])


def decode_latents(vae, latents, scale_factor, micro_batch=8):
    """(N, F, C, h, w) scaled latents -> uint8 videos (N, F, H, W, 3); one video at a time, its frames
    through the decoder `micro_batch` at a time, so memory is bounded whatever N and F."""
    from mindspore import Tensor

    from models.video_io import to_uint8

    videos = []
    for z in latents:
        frames = vae.decode(Tensor(np.ascontiguousarray(z / np.float32(scale_factor), np.float32)),
                            micro_batch=micro_batch)
        videos.append(to_uint8(frames.asnumpy()))
    return np.stack(videos)


def make_run_folder(root):
    """`<root>/<YYYY-mm-dd_HH-MM-SS>`, with a -1, -2, ... suffix if that exists already."""
    stamp = datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    path, k = os.path.join(root, stamp), 0
    while True:
        try:
            os.makedirs(path)
            return path
        except FileExistsError:
            k += 1
            path = os.path.join(root, f"{stamp}-{k}")


def write_videos(folder, videos, fps, save_gif=True, save_mp4=True):
    """GIF/MP4 per video and grid.png of first frames; returns the written paths and any notes."""
    from models import video_io

    written, notes = [], []
    if save_mp4 and not video_io.mp4_available():
        notes.append("MP4 skipped: PyAV is not installed (pip install av)")
        save_mp4 = False
    for i, video in enumerate(videos):
        if save_gif:
            written.append(os.path.join(folder, f"sample_{i:03d}.gif"))
            video_io.write_gif(written[-1], video, fps)
        if save_mp4:
            written.append(os.path.join(folder, f"sample_{i:03d}.mp4"))
            video_io.write_mp4(written[-1], video, fps)
    written.append(os.path.join(folder, "grid.png"))
    video_io.write_grid(written[-1], videos[:, 0])
    return written, notes


def _check_fits(cfg, latent_channels, config, path):
    """The loaded model's class count (0: unconditional); refuses a VAE (of `latent_channels`),
    guidance or labels that do not fit the model in `path` (its constructor kwargs `config`)."""
    if latent_channels != config["in_channels"]:
        raise ConfigError(f"vae {cfg.vae} has {latent_channels} latent channels but the Latte checkpoint expects "
                          f"{config['in_channels']}: pass the VAE the model was trained with")
    num_classes = config.get("num_classes", 0) if config["extras"] == 2 else 0
    if cfg.guidance_scale > 1 and not num_classes:
        raise ConfigError(f"guidance_scale {cfg.guidance_scale} needs a class-conditional model, and {path} is "
                          f"unconditional: set --guidance_scale 1")
    if cfg.guidance_scale > 1 and not config.get("class_dropout_prob", 0.1) > 0:
        raise ConfigError(f"guidance_scale {cfg.guidance_scale} needs the null class of label dropout, and {path} was "
                          f"trained with class_dropout_prob 0: set --guidance_scale 1")
    if cfg.class_labels and not num_classes:
        raise ConfigError(f"class_labels given but {path} is unconditional: drop --class_labels")
    return num_classes


def _refuse_non_finite(latents, path):
    """NaN weights or a diverged model would otherwise give black videos, written with exit 0."""
    bad = int(np.size(latents) - np.isfinite(latents).sum())
    if bad:
        raise ValueError(f"{bad} of {latents.size} sampled latent values are not finite (NaN or inf): the weights "
                         f"in {path} are damaged or diverged; sample from an earlier checkpoint")


def _write_outputs(cfg, latents, videos, loaded):
    """A new run folder with the videos, grid.png, latents.npy if asked, and config.yaml (the config
    plus what was `loaded`); returns (folder, written paths, notes)."""
    folder = make_run_folder(cfg.output_folder)
    written, notes = write_videos(folder, videos, cfg.fps, cfg.save_gif, cfg.save_mp4)
    if cfg.save_latents:
        written.append(os.path.join(folder, "latents.npy"))
        np.save(written[-1], latents)
    record = dataclasses.asdict(cfg)
    record["loaded"] = loaded
    with open(os.path.join(folder, "config.yaml"), "w") as f:
        yaml.safe_dump(record, f, sort_keys=False)
    return folder, written, notes


def sample(cfg):
    """Check the VAE file, load the checkpoint, denoise `num_samples` videos, then load the VAE, decode
    them and write them to a new folder under `output_folder`; returns that folder."""
    from models.runtime import drop_clean_library_pages, setup_device
    setup_device(cfg.device_target, cfg.mode, cfg.cpu_threads, seed=cfg.seed, reuse_memory=True)

    from models import read_metadata
    from models.diffusion import create_diffusion

    # -- load -------------------------------------------------------------------------------------
    t0 = time.time()
    # A wrong path or a damaged file is reported before anything is loaded; the folder's warnings once.
    path = resolve_checkpoint(cfg.checkpoint)
    vae_kwargs, downscale, latent_channels = check_vae(cfg)  # the VAE itself is built after the denoising
    net, config, path, group = load_latte(cfg, downscale, latent_channels, path)
    num_classes = _check_fits(cfg, latent_channels, config, path)
    saved = read_metadata(path) if path.endswith((".ckpt", ".safetensors")) else {}
    class_names = saved.get("class_names")  # a `latte train` run on a labelled cache
    scale_factor = cfg.scale_factor or saved.get("scale_factor") or 0.18215
    labels = labels_for(class_indices(cfg.class_labels, class_names), cfg.num_samples, num_classes) \
        if num_classes else None
    diffusion = create_diffusion(str(cfg.sampling_steps), learn_sigma=config["learn_sigma"])

    image_size = config["input_size"] * downscale
    n_params = sum(p.size for p in net.get_parameters())
    drop_clean_library_pages()  # and what loading mapped, before the denoising's compile
    weights = f" ({group} weights)" if group else ""
    print(f"loaded {path}{weights}: Latte {n_params / 1e6:.2f} M parameters, {config['num_frames']} frames of "
          f"{image_size}x{image_size} px, {'classes ' + str(num_classes) if num_classes else 'unconditional'}; "
          f"VAE {cfg.vae} [{time.time() - t0:.1f}s]", file=sys.stderr, flush=True)
    method = f"{cfg.sample_method.upper()} {cfg.sampling_steps} steps" + (f", eta {cfg.eta}" if cfg.eta else "")
    guidance = f", guidance {cfg.guidance_scale} on labels {labels}" if cfg.guidance_scale > 1 else (
        f", labels {labels}" if labels else "")
    print(f"sampling {cfg.num_samples} videos, {method}{guidance}, seed {cfg.seed}, {cfg.dtype} on {cfg.device_target}",
          file=sys.stderr, flush=True)

    # -- denoise and decode -----------------------------------------------------------------------
    t1 = time.time()
    latents = sample_latents(net, diffusion, cfg.num_samples, cfg.seed, cfg.batch_size, cfg.sample_method, cfg.eta,
                             cfg.guidance_scale, labels, num_classes, progress=cfg.progress)
    t2 = time.time()
    _refuse_non_finite(latents, path)
    release_network(net)
    del net
    # Built only now: during the denoising its weights would have come on top of Latte's graph and
    # activations, and its compile on top of Latte's buffers (freed just above). check_vae passed, so
    # this fails only for a file changed meanwhile: the denoised latents are kept then.
    try:
        vae = load_vae(cfg, vae_kwargs)
    except ConfigError as err:
        kept = os.path.join(make_run_folder(cfg.output_folder), "latents.npy")
        np.save(kept, latents)
        raise ConfigError(f"{err} (the denoised latents are saved in {kept})") from None
    videos = decode_latents(vae, latents, scale_factor, cfg.decode_micro_batch)
    t3 = time.time()
    drop_clean_library_pages()  # the decode's (the VAE graph's compile) before the writers map theirs

    # -- write ------------------------------------------------------------------------------------
    loaded = {"checkpoint": path, "weights": group or "plain", "model": config, "labels": labels,
              "class_names": [class_names[i] for i in labels] if labels and class_names else None,
              "scale_factor": scale_factor,
              "seconds": {"denoise": round(t2 - t1, 2), "decode": round(t3 - t2, 2)}}
    folder, written, notes = _write_outputs(cfg, latents, videos, loaded)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    steps = cfg.sampling_steps * -(-cfg.num_samples // (cfg.batch_size or cfg.num_samples))
    print(f"denoised in {t2 - t1:.1f}s ({(t2 - t1) / steps:.3f} s/step), decoded in {t3 - t2:.1f}s; "
          f"{len(written)} files", file=sys.stderr)
    print(f"samples: {folder}", flush=True)
    return folder


def main(argv=None):
    cfg = parse_config(SampleConfig, sys.argv[1:] if argv is None else argv, prog="latte sample",
                       description="Sample videos from a trained Latte and write GIF/MP4/PNG.")
    try:
        sample(cfg)
    except ConfigError:
        raise
    except ValueError as err:  # a weights file that does not fit (models.load_weights): one line
        print(f"latte sample: error: {first_line(err)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
