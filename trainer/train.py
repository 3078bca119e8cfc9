"""`latte train`: train Latte on a latent cache (or on raw videos, VAE-encoding on the fly).

    latte train -c configs/training/sky_cache.yaml --cache_folder CACHE --output_folder results/sky
    latte train -c configs/training/sky_cache.yaml --output_folder results/sky --resume auto
    latte train -c configs/training/sky_video.yaml --data_folder sky_train --vae_checkpoint vae.ckpt
    msrun --worker_num=2 --local_worker_num=2 --master_addr=127.0.0.1 --master_port=8118 --join=True \\
        latte_cli.py train -c configs/training/sky_cache.yaml --use_parallel True

The objective is the original's (models.diffusion: MSE on epsilon + the variational bound for the
learned variance, t uniform in [0, 1000)). Everything random is drawn on the host from generators
keyed by (seed, stream, global sample index) (trainer/data.py), so a run killed at any point and
resumed from its last checkpoint repeats the uninterrupted run exactly, and one resumed on another
number of ranks with the same global batch (through --gradient_accumulation_steps) sees the same
samples, timesteps and noise. Only rank 0 writes.

Output folder: checkpoints/step_*.safetensors (see trainer/checkpoint.py), config.yaml (the
resolved config), log.jsonl (one line per step), loss.png (updated at every checkpoint).
"""
import dataclasses
import math
import os
import sys
import time
import zlib

import numpy as np
import yaml

from models.config import ConfigError, parse_config
from models.registry import latte_kwargs
from trainer import checkpoint as ckpt
from trainer.config import ARCH_KEYS, TrainConfig, resume_changes
from trainer.data import DIFFUSION_STREAM, BatchLayout, DataError, TrainData, make_loader, sample_rng
from trainer.logs import PLOT_NAME, JsonlLog, plot_losses, read_log
from trainer.optim import LossScaler, learning_rate_at

def latte_config(cfg, latent_shape):
    """Latte(**kwargs) for this config and latent shape (C, h, w), in `models.convert`'s format."""
    config = latte_kwargs(cfg.model_name, latent_shape, cfg.num_frames, cfg.learn_sigma, cfg.num_classes,
                          cfg.class_dropout_prob, cfg.hidden_size, cfg.depth, cfg.num_heads)
    if config["hidden_size"] % config["num_heads"]:
        raise ConfigError(f"hidden_size {config['hidden_size']} is not divisible by num_heads {config['num_heads']}")
    if latent_shape[1] % config["patch_size"]:
        raise ConfigError(f"latent size {latent_shape[1]} is not a multiple of {cfg.model_name}'s patch size")
    return config


def _say(rank, *args):
    if rank == 0:
        print(*args, file=sys.stderr, flush=True)


def _setup_parallel(cfg):
    """(rank, world size); under msrun every process calls this before building anything."""
    if not cfg.use_parallel:
        return 0, 1
    import mindspore as ms
    from mindspore.communication import get_group_size, get_rank, init

    if "MS_WORKER_NUM" not in os.environ and "RANK_SIZE" not in os.environ:
        raise ConfigError("use_parallel True needs a launcher: run under `msrun --worker_num=N --local_worker_num=N "
                          "--master_addr=127.0.0.1 --master_port=P --join=True latte_cli.py train ...`")
    init()
    ms.set_auto_parallel_context(parallel_mode=ms.ParallelMode.DATA_PARALLEL, gradients_mean=True,
                                 device_num=get_group_size())
    return get_rank(), get_group_size()


def _resolve_resume(cfg, rank):
    """(path, metadata) of the checkpoint to resume from, or (None, None) for a fresh run."""
    if cfg.resume == "auto":
        path, meta = ckpt.find_resume(cfg.output_folder, warn=lambda m: _say(rank, m))
        if path is None:
            _say(rank, f"resume auto: no valid checkpoint in {ckpt.checkpoint_dir(cfg.output_folder)}: starting fresh")
        return path, meta
    if cfg.resume:
        if not os.path.isfile(cfg.resume):
            raise ConfigError(f"resume checkpoint {cfg.resume} not found: check the path or use --resume auto")
        return cfg.resume, ckpt.verify(cfg.resume)
    if ckpt.list_checkpoints(cfg.output_folder):
        raise ConfigError(f"output_folder {cfg.output_folder} already holds checkpoints: pass --resume auto to "
                          f"continue that run, or choose another --output_folder")
    return None, None


def _check_same_config(meta, cfg, world, path, rank):
    """Refuse to resume with result-changing keys that differ from the checkpoint's, naming each,
    unless --resume_allow_changes says the change is meant (then say what changed)."""
    saved_world = int(meta["state"].get("sampler", {}).get("world_size", 1))
    changes = resume_changes(meta["config"], cfg, saved_world, world)
    if not changes:
        return
    listed = ", ".join(f"{key} {old!r} -> {new!r}" for key, old, new in changes)
    if any(key == "global_batch" for key, _, _ in changes):
        listed += (" (world size x batch_size x gradient_accumulation_steps; another number of ranks keeps the "
                   "global batch through --gradient_accumulation_steps)")
    if not cfg.resume_allow_changes:
        raise ConfigError(f"{path} was trained with another config ({listed}): resume with the checkpoint's "
                          f"values, or pass --resume_allow_changes True to continue with the new ones (the run "
                          f"then differs from an uninterrupted one)")
    _say(rank, f"warning: resuming {path} with changed {listed} (--resume_allow_changes): the run differs from "
               f"an uninterrupted one from here on")


def _check_same_model(meta, cfg, net_config, path):
    saved = meta["config"]
    for key in ARCH_KEYS:
        if key in saved and saved[key] != getattr(cfg, key):
            raise ConfigError(f"{path} was trained with {key}={saved[key]!r} but the config says "
                              f"{getattr(cfg, key)!r}: set --{key} {saved[key]} to resume it")
    saved_net = meta["net_config"].get("config")
    if saved_net and saved_net != net_config:
        diff = sorted(k for k in set(net_config) | set(saved_net) if net_config.get(k) != saved_net.get(k))
        raise ConfigError(f"{path} holds a network with different {', '.join(diff)}: resume with the config it was "
                          f"trained with")


# ------------------------------------------------------------------------------------------------
# the run
# ------------------------------------------------------------------------------------------------

def _micro_batch(cfg, data, x, labels, indices, num_timesteps):
    """(x0, t, noise, y) of one micro-batch of global samples `indices`; labels dropped to the null
    class for guidance here, on the host, so that the dropout is part of the reproducible random
    stream. Each sample's t, noise and dropout come from its own generator keyed by its global index,
    whichever rank and micro-step draws it."""
    if cfg.data_source == "video":
        x = data.encode(x, indices, cfg.latent_sample)
    rngs = [sample_rng(cfg.seed, DIFFUSION_STREAM, g) for g in indices]
    t = np.array([r.integers(0, num_timesteps) for r in rngs], np.int32)
    noise = np.stack([r.standard_normal(x.shape[1:], dtype=np.float32) for r in rngs])
    y = np.asarray(labels, np.int32)
    if cfg.num_classes:
        drop = np.array([r.random() for r in rngs]) < cfg.class_dropout_prob
        y = np.where(drop, cfg.num_classes, y).astype(np.int32)
    return x, t, noise, y


def _validate(cfg, step_fn, clips, num_timesteps):
    """Mean training loss of the held-out clips at `val_timesteps` evenly spaced t, fixed noise."""
    ts = np.linspace(0, num_timesteps - 1, cfg.val_timesteps).round().astype(np.int32)
    rows = [(i, x, y, t) for i, (x, y) in enumerate(clips) for t in ts]
    losses = []
    b = cfg.batch_size
    for start in range(0, len(rows), b):
        chunk = rows[start:start + b]
        n = len(chunk)
        chunk = chunk + [chunk[-1]] * (b - n)  # pad to the compiled batch shape
        x0 = np.stack([x for _, x, _, _ in chunk])
        noise = np.stack([np.random.default_rng([cfg.seed, 3, i, int(t)]).standard_normal(x.shape, dtype=np.float32)
                          for i, x, _, t in chunk])
        t = np.array([t for *_, t in chunk], np.int32)
        y = np.array([y for _, _, y, _ in chunk], np.int32)
        losses.extend(step_fn.eval_loss(x0, t, noise, y)[:n].tolist())
    return float(np.mean(losses))


def _save(cfg, net, step_fn, data, layout, step, draw, scaler, net_config, final):
    tensors = {f"model.{name}": p.asnumpy() for name, p in net.parameters_dict().items()}
    trainable = {p.name for p in step_fn.params}
    tensors.update({f"ema.{name}": p.asnumpy() for name, p in net.parameters_dict().items() if name not in trainable})
    tensors.update({name: p.asnumpy() for name, p in step_fn.state().items()})
    epoch, position = data.order.position(draw)
    state = {"step": step, "epoch": epoch, "final": final,
             # draw: the global index of the next sample (trainer/data.py's layout)
             "sampler": {"draw": draw, "position": position, "per_epoch": data.order.per_epoch,
                         "num_items": data.order.num_items, "world_size": layout.world_size,
                         "global_batch": layout.global_batch},
             "rng": {"seed": cfg.seed, "scheme": "numpy default_rng keyed by (seed, stream, global sample index)"},
             "loss_scale": scaler.state()}
    path = ckpt.checkpoint_path(cfg.output_folder, step)
    net_meta = {"kind": "latte", "config": net_config, "variant": cfg.model_name,
                "scale_factor": data.scale}  # what `latte sample` divides by
    if data.class_names:
        net_meta["class_names"] = data.class_names  # `latte sample --class_labels` takes these names
    ckpt.save(path, tensors, state, dataclasses.asdict(cfg), net_meta)
    ckpt.prune(cfg.output_folder, cfg.keep_checkpoints)
    plot_losses(read_log(os.path.join(cfg.output_folder, "log.jsonl")), os.path.join(cfg.output_folder, PLOT_NAME))
    return path


def _restore(net, step_fn, tensors, path):
    targets = {f"model.{name}": p for name, p in net.parameters_dict().items()}
    targets.update(step_fn.state())
    missing = [name for name in targets if name not in tensors]
    if missing:
        raise ckpt.CheckpointError(f"{path} lacks {len(missing)} tensors of this network (e.g. {missing[0]}): "
                                   f"it was written for another model")
    from mindspore import Tensor
    for name, p in targets.items():
        if tuple(tensors[name].shape) != tuple(p.shape):
            raise ckpt.CheckpointError(f"{path}: {name} has shape {tuple(tensors[name].shape)}, the network "
                                       f"{tuple(p.shape)}: it was written for another model")
        p.set_data(Tensor(np.array(tensors[name], dtype=np.float32)))


def weights_fingerprint(net):
    """CRC-32 over all weights: equal on every rank of a data-parallel run."""
    crc = 0
    for _, p in sorted(net.parameters_dict().items()):
        crc = zlib.crc32(np.ascontiguousarray(p.asnumpy()).tobytes(), crc)
    return f"{crc:08x}"


def train(cfg):
    from models.runtime import setup_device
    setup_device(cfg.device_target, cfg.mode, cfg.cpu_threads, seed=cfg.seed)
    rank, world = _setup_parallel(cfg)

    import mindspore as ms
    from models.diffusion import create_diffusion
    from models.latte import Latte
    from trainer.step import TrainStep

    resume_path, meta = _resolve_resume(cfg, rank)
    if meta is not None:
        _check_same_config(meta, cfg, world, resume_path, rank)
    data = TrainData(cfg, say=lambda msg: _say(rank, msg))
    layout = BatchLayout(world, cfg.batch_size, cfg.gradient_accumulation_steps, rank)
    net_config = latte_config(cfg, data.latent_shape)
    if meta is not None:
        _check_same_model(meta, cfg, net_config, resume_path)
    ms.set_seed(cfg.seed)  # the same initial weights on every rank
    net = Latte(**net_config, dtype=cfg.dtype, use_recompute=cfg.use_recompute,
                enable_flash_attention=cfg.enable_flash_attention)
    # Eval mode on purpose: label dropout is done on the host (see _micro_batch) so it is reproducible.
    net.set_train(False)
    if cfg.pretrained and resume_path is None:
        from models import load_weights
        group = "ema" if cfg.pretrained.endswith(".safetensors") and ckpt.is_train_checkpoint(cfg.pretrained) else None
        load_weights(net, cfg.pretrained, group=group)
        _say(rank, f"initial weights from {cfg.pretrained}" + (" (ema)" if group else ""))
    diffusion = create_diffusion("")
    step_fn = TrainStep(net, diffusion, cfg, world_size=world, jit=cfg.mode == "graph")
    scaler = LossScaler(cfg.loss_scale, cfg.loss_scale_window, enabled=cfg.dtype == "fp16")

    step, draw = 0, 0
    if resume_path is not None:
        tensors, meta = ckpt.load(resume_path)
        _restore(net, step_fn, tensors, resume_path)
        del tensors
        state = meta["state"]
        step, draw = int(state["step"]), int(state["sampler"]["draw"])
        if "global_batch" not in state["sampler"]:  # written before samples were keyed by global index
            draw = step * layout.global_batch
            _say(rank, f"warning: {resume_path} predates the global sample order: the samples after it differ "
                       f"from the ones its run would have drawn")
        scaler.load(state.get("loss_scale", {}))
        if state["sampler"].get("per_epoch") != data.order.per_epoch:
            _say(rank, f"warning: the data changed since {resume_path} ({state['sampler'].get('per_epoch')} -> "
                       f"{data.order.per_epoch} clips per epoch): the sample order does not continue exactly")
        _say(rank, f"resumed from {resume_path} at step {step}")

    global_batch = layout.global_batch
    n_params = sum(p.size for p in step_fn.params)
    _say(rank, f"{cfg.model_name}: {n_params / 1e6:.2f} M trainable parameters; global batch {global_batch} = "
               f"{world} ranks x {cfg.batch_size} clips x {cfg.gradient_accumulation_steps} accumulation steps")
    if step >= cfg.train_steps:
        _say(rank, f"already at step {step} >= train_steps {cfg.train_steps}: nothing to do")
        return 0

    log = None
    if rank == 0:
        os.makedirs(cfg.output_folder, exist_ok=True)
        ckpt.remove_stale_temps(cfg.output_folder)
        with open(os.path.join(cfg.output_folder, "config.yaml"), "w") as f:
            yaml.safe_dump(dataclasses.asdict(cfg), f, sort_keys=False)
        log = JsonlLog(cfg.output_folder, resume_step=step if resume_path else None)
        log.write({"step": step, "event": "start", "world_size": world, "local_batch": cfg.batch_size,
                   "accumulation": cfg.gradient_accumulation_steps, "global_batch": global_batch})
    val_clips = data.val_clips() if rank == 0 and cfg.val_every else []
    if val_clips and step == 0:  # the untrained baseline, so the curve shows how far it fell
        log.write({"step": 0, "val_loss": _validate(cfg, step_fn, val_clips, diffusion.num_timesteps)})

    first_step, first_draw = step, draw
    loader = make_loader(data.source, layout.rank_draws(first_draw, cfg.train_steps - step), cfg.batch_size,
                         cfg.num_workers)
    bar = None
    if rank == 0 and cfg.progress:
        from tqdm import tqdm
        bar = tqdm(total=cfg.train_steps, initial=step, dynamic_ncols=True, desc="train")
    path = None
    try:
        while step < cfg.train_steps:
            t0 = time.perf_counter()
            micro = []
            for k in range(cfg.gradient_accumulation_steps):
                x, labels, bad = next(loader)
                data.check(bad)
                indices = layout.micro_indices(first_draw, step - first_step, k)
                micro.append(_micro_batch(cfg, data, x, labels, indices, diffusion.num_timesteps))
            lr = learning_rate_at(step, cfg)
            max_norm = cfg.clip_max_norm if cfg.clip_max_norm and step >= cfg.start_clip_iter else math.inf
            loss, mse, vb, norm, applied = step_fn(micro, step, lr, max_norm, cfg.ema_decay, scaler.scale)
            scaler.update(applied)
            step += 1
            draw += global_batch
            dt = time.perf_counter() - t0
            if rank != 0:
                continue
            if step % cfg.log_every == 0 or step == cfg.train_steps:
                record = {"step": step, "loss": loss, "mse": mse, "vb": vb, "grad_norm": norm, "lr": lr,
                          "step_time": round(dt, 5), "samples_per_s": round(global_batch / dt, 4)}
                if scaler.enabled:
                    record.update(loss_scale=scaler.scale, skipped=not applied)
                log.write(record)
            if not math.isfinite(loss) and not scaler.enabled:
                raise DataError(f"loss is {loss} at step {step}: training diverged; lower --learning_rate or "
                                f"clip gradients (--clip_max_norm, --start_clip_iter)")
            if cfg.val_every and step % cfg.val_every == 0:
                log.write({"step": step, "val_loss": _validate(cfg, step_fn, val_clips, diffusion.num_timesteps)})
            if step % cfg.ckpt_every == 0 or step == cfg.train_steps:
                path = _save(cfg, net, step_fn, data, layout, step, draw, scaler, net_config,
                             final=step == cfg.train_steps)
            if bar is not None:
                bar.set_postfix(loss=f"{loss:.4f}", samples_s=f"{global_batch / dt:.2f}", refresh=False)
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
        if log is not None:
            log.close()
    print(f"rank {rank}/{world}: step {step}, weights fingerprint {weights_fingerprint(net)}", flush=True)
    if path:
        _say(rank, f"final checkpoint: {path}")
    return 0


def main(argv=None):
    cfg = parse_config(TrainConfig, sys.argv[1:] if argv is None else argv, prog="latte train",
                       description="Train Latte on a latent cache or raw videos.")
    try:
        return train(cfg)
    except DataError as err:  # the data itself is unusable (exit 1, as `latte cache verify` on corruption)
        print(f"latte train: error: {_one_line(err)}", file=sys.stderr)
        return 1
    except (ValueError, OSError) as err:
        # The class of user errors: ValueError is what every loader here raises for a file or value the
        # user named (ConfigError, CheckpointError, a weights file that does not fit, a missing data
        # folder), OSError a path that cannot be read or written. Program bugs are assertions and
        # other types, and keep their traceback.
        print(f"latte train: error: {_one_line(err)}", file=sys.stderr)
        return 2


def _one_line(err):
    text = " ".join(str(err).split()) or type(err).__name__
    if isinstance(err, OSError) and err.filename and str(err.filename) not in text:
        text = f"{err.filename}: {text}"
    return text


if __name__ == "__main__":
    sys.exit(main())
