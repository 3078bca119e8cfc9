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
from trainer import resume
from trainer.config import TrainConfig
from trainer.data import DIFFUSION_STREAM, BatchLayout, DataError, TrainData, make_loader, sample_rng
from trainer.logs import PLOT_NAME, JsonlLog, plot_losses, read_log
from trainer.optim import LossScaler, learning_rate_at


def _say(rank, *args):
    """Print a line to stderr on rank 0 only (each rank would repeat it)."""
    if rank == 0:
        print(*args, file=sys.stderr, flush=True)


def latte_config(cfg, latent_shape):
    """Latte(**kwargs) for this config and latent shape (C, h, w), in `models.convert`'s format."""
    config = latte_kwargs(cfg.model_name, latent_shape, cfg.num_frames, cfg.learn_sigma, cfg.num_classes,
                          cfg.class_dropout_prob, cfg.hidden_size, cfg.depth, cfg.num_heads)
    if config["hidden_size"] % config["num_heads"]:
        raise ConfigError(f"hidden_size {config['hidden_size']} is not divisible by num_heads {config['num_heads']}")
    if latent_shape[1] % config["patch_size"]:
        raise ConfigError(f"latent size {latent_shape[1]} is not a multiple of {cfg.model_name}'s patch size")
    return config


def weights_fingerprint(net):
    """CRC-32 over all weights: equal on every rank of a data-parallel run."""
    crc = 0
    for _, p in sorted(net.parameters_dict().items()):
        crc = zlib.crc32(np.ascontiguousarray(p.asnumpy()).tobytes(), crc)
    return f"{crc:08x}"


def _one_line(err):
    """An error as the one line `latte train: error: ...` prints, naming the file of an OSError."""
    text = " ".join(str(err).split()) or type(err).__name__
    if isinstance(err, OSError) and err.filename and str(err.filename) not in text:
        text = f"{err.filename}: {text}"
    return text


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



# ------------------------------------------------------------------------------------------------
# set-up: device, data, network, resume
# ------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Run:
    """What the loop and the saves share, built once by `_build_run`."""
    cfg: TrainConfig
    rank: int
    world: int
    data: TrainData
    layout: BatchLayout
    net_config: dict
    net: object
    diffusion: object
    step_fn: object
    scaler: LossScaler

    def say(self, *args):
        _say(self.rank, *args)


def _build_run(cfg):
    """Device, ranks, data and network, checked against the checkpoint to resume (if any) before the
    network is built. Returns (run, resume path or None)."""
    from models.runtime import setup_device
    setup_device(cfg.device_target, cfg.mode, cfg.cpu_threads, seed=cfg.seed)
    rank, world = _setup_parallel(cfg)

    import mindspore as ms
    from models.diffusion import create_diffusion
    from models.latte import Latte
    from trainer.step import TrainStep

    say = lambda msg: _say(rank, msg)  # noqa: E731
    resume_path, meta = resume.resolve(cfg, say)
    if meta is not None:
        resume.check_same_config(meta, cfg, world, resume_path, say)
    data = TrainData(cfg, say=say)
    layout = BatchLayout(world, cfg.batch_size, cfg.gradient_accumulation_steps, rank)
    net_config = latte_config(cfg, data.latent_shape)
    if meta is not None:
        resume.check_same_model(meta, cfg, net_config, resume_path)
    ms.set_seed(cfg.seed)  # the same initial weights on every rank
    net = Latte(**net_config, dtype=cfg.dtype, use_recompute=cfg.use_recompute,
                enable_flash_attention=cfg.enable_flash_attention)
    # Eval mode on purpose: label dropout is done on the host (see _micro_batch) so it is reproducible.
    net.set_train(False)
    if cfg.pretrained and resume_path is None:
        _load_pretrained(net, cfg.pretrained, rank)
    diffusion = create_diffusion("")
    step_fn = TrainStep(net, diffusion, cfg, world_size=world, jit=cfg.mode == "graph")
    scaler = LossScaler(cfg.loss_scale, cfg.loss_scale_window, enabled=cfg.dtype == "fp16")
    return Run(cfg, rank, world, data, layout, net_config, net, diffusion, step_fn, scaler), resume_path


def _load_pretrained(net, path, rank):
    """Initial weights of a fresh run: a training checkpoint's EMA, or a converted file's one set."""
    from models import load_weights
    group = "ema" if path.endswith(".safetensors") and ckpt.is_train_checkpoint(path) else None
    load_weights(net, path, group=group)
    _say(rank, f"initial weights from {path}" + (" (ema)" if group else ""))


def _open_output(run, step, resumed):
    """Rank 0: the output folder with config.yaml and the JSONL log (continued after `step` on resume,
    or None on other ranks)."""
    cfg = run.cfg
    if run.rank != 0:
        return None
    os.makedirs(cfg.output_folder, exist_ok=True)
    ckpt.remove_stale_temps(cfg.output_folder)
    with open(os.path.join(cfg.output_folder, "config.yaml"), "w") as f:
        yaml.safe_dump(dataclasses.asdict(cfg), f, sort_keys=False)
    log = JsonlLog(cfg.output_folder, resume_step=step if resumed else None)
    log.write({"step": step, "event": "start", "world_size": run.world, "local_batch": cfg.batch_size,
               "accumulation": cfg.gradient_accumulation_steps, "global_batch": run.layout.global_batch})
    return log



# ------------------------------------------------------------------------------------------------
# the loop: one optimizer step, then log / validate / save on rank 0
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


def _optimizer_step(run, loader, step, first_step, first_draw):
    """One optimizer step over `gradient_accumulation_steps` micro-batches; returns its log record
    (loss, mse, vb, grad_norm, lr, timing) and whether the update was applied (fp16 overflow skips it)."""
    cfg = run.cfg
    t0 = time.perf_counter()
    micro = []
    for k in range(cfg.gradient_accumulation_steps):
        x, labels, bad = next(loader)
        run.data.check(bad)
        indices = run.layout.micro_indices(first_draw, step - first_step, k)
        micro.append(_micro_batch(cfg, run.data, x, labels, indices, run.diffusion.num_timesteps))
    lr = learning_rate_at(step, cfg)
    max_norm = cfg.clip_max_norm if cfg.clip_max_norm and step >= cfg.start_clip_iter else math.inf
    loss, mse, vb, norm, applied = run.step_fn(micro, step, lr, max_norm, cfg.ema_decay, run.scaler.scale)
    run.scaler.update(applied)
    dt = time.perf_counter() - t0
    record = {"step": step + 1, "loss": loss, "mse": mse, "vb": vb, "grad_norm": norm, "lr": lr,
              "step_time": round(dt, 5), "samples_per_s": round(run.layout.global_batch / dt, 4)}
    if run.scaler.enabled:
        record.update(loss_scale=run.scaler.scale, skipped=not applied)
    return record


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


def _save(run, step, draw, final):
    """Checkpoint at `step` (model, EMA, optimizer, where the sample order stands), prune, redraw loss.png."""
    cfg, net, step_fn, data, layout = run.cfg, run.net, run.step_fn, run.data, run.layout
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
             "loss_scale": run.scaler.state()}
    path = ckpt.checkpoint_path(cfg.output_folder, step)
    net_meta = {"kind": "latte", "config": run.net_config, "variant": cfg.model_name,
                "scale_factor": data.scale}  # what `latte sample` divides by
    if data.class_names:
        net_meta["class_names"] = data.class_names  # `latte sample --class_labels` takes these names
    ckpt.save(path, tensors, state, dataclasses.asdict(cfg), net_meta)
    ckpt.prune(cfg.output_folder, cfg.keep_checkpoints)
    plot_losses(read_log(os.path.join(cfg.output_folder, "log.jsonl")), os.path.join(cfg.output_folder, PLOT_NAME))
    return path


def _after_step(run, log, record, draw, val_clips):
    """Rank 0 after step `record["step"]`: log it, refuse a diverged loss, validate and save when due.
    Returns the path of the checkpoint written, or None."""
    cfg, step, loss = run.cfg, record["step"], record["loss"]
    if step % cfg.log_every == 0 or step == cfg.train_steps:
        log.write(record)
    if not math.isfinite(loss) and not run.scaler.enabled:
        raise DataError(f"loss is {loss} at step {step}: training diverged; lower --learning_rate or "
                        f"clip gradients (--clip_max_norm, --start_clip_iter)")
    if cfg.val_every and step % cfg.val_every == 0:
        log.write({"step": step, "val_loss": _validate(cfg, run.step_fn, val_clips, run.diffusion.num_timesteps)})
    if step % cfg.ckpt_every == 0 or step == cfg.train_steps:
        return _save(run, step, draw, final=step == cfg.train_steps)
    return None


def _loop(run, log, step, draw):
    """Train from (step, draw) to `train_steps`; returns the last checkpoint written (rank 0), or None."""
    cfg = run.cfg
    val_clips = run.data.val_clips() if run.rank == 0 and cfg.val_every else []
    if val_clips and step == 0:  # the untrained baseline, so the curve shows how far it fell
        log.write({"step": 0, "val_loss": _validate(cfg, run.step_fn, val_clips, run.diffusion.num_timesteps)})
    first_step, first_draw = step, draw
    loader = make_loader(run.data.source, run.layout.rank_draws(first_draw, cfg.train_steps - step),
                         cfg.batch_size, cfg.num_workers)
    bar = None
    if run.rank == 0 and cfg.progress:
        from tqdm import tqdm
        bar = tqdm(total=cfg.train_steps, initial=step, dynamic_ncols=True, desc="train")
    path = None
    try:
        while step < cfg.train_steps:
            record = _optimizer_step(run, loader, step, first_step, first_draw)
            step += 1
            draw += run.layout.global_batch
            if run.rank != 0:
                continue
            path = _after_step(run, log, record, draw, val_clips) or path
            if bar is not None:
                bar.set_postfix(loss=f"{record['loss']:.4f}", samples_s=f"{record['samples_per_s']:.2f}",
                                refresh=False)
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return path, step



# ------------------------------------------------------------------------------------------------
# the command
# ------------------------------------------------------------------------------------------------

def train(cfg):
    """Set up (device, ranks, data, network, resume), train to `train_steps`, checkpointing on the way.
    Returns the exit status (0)."""
    run, resume_path = _build_run(cfg)
    step, draw = 0, 0
    if resume_path is not None:
        step, draw = resume.load(resume_path, run.net, run.step_fn, run.scaler, run.data, run.layout, run.say)
    n_params = sum(p.size for p in run.step_fn.params)
    run.say(f"{cfg.model_name}: {n_params / 1e6:.2f} M trainable parameters; global batch "
            f"{run.layout.global_batch} = {run.world} ranks x {cfg.batch_size} clips x "
            f"{cfg.gradient_accumulation_steps} accumulation steps")
    if step >= cfg.train_steps:
        run.say(f"already at step {step} >= train_steps {cfg.train_steps}: nothing to do")
        return 0
    log = _open_output(run, step, resumed=resume_path is not None)
    try:
        path, step = _loop(run, log, step, draw)
    finally:
        if log is not None:
            log.close()
    print(f"rank {run.rank}/{run.world}: step {step}, weights fingerprint {weights_fingerprint(run.net)}",
          flush=True)
    if path:
        run.say(f"final checkpoint: {path}")
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


if __name__ == "__main__":
    sys.exit(main())
