"""Whether and how a `latte train` run continues: which checkpoint (`--resume` '' / auto / a path),
whether it fits the config and the network, and loading it back (weights, optimizer, loss scale and
the position in the sample order).

A resumed run repeats the uninterrupted one exactly only if everything that changes the result is
the same: `check_same_config` refuses any other difference (trainer/config.py says which keys may
change), `check_same_model` any other network. `say` prints a line on rank 0 only.
"""
import os

import numpy as np

from models.config import ConfigError
from trainer import checkpoint as ckpt
from trainer.config import ARCH_KEYS, resume_changes


def resolve(cfg, say):
    """(path, metadata) of the checkpoint to resume from, or (None, None) for a fresh run."""
    if cfg.resume == "auto":
        path, meta = ckpt.find_resume(cfg.output_folder, warn=say)
        if path is None:
            say(f"resume auto: no valid checkpoint in {ckpt.checkpoint_dir(cfg.output_folder)}: starting fresh")
        return path, meta
    if cfg.resume:
        if not os.path.isfile(cfg.resume):
            raise ConfigError(f"resume checkpoint {cfg.resume} not found: check the path or use --resume auto")
        return cfg.resume, ckpt.verify(cfg.resume)
    if ckpt.list_checkpoints(cfg.output_folder):
        raise ConfigError(f"output_folder {cfg.output_folder} already holds checkpoints: pass --resume auto to "
                          f"continue that run, or choose another --output_folder")
    return None, None


def check_same_config(meta, cfg, world, path, say):
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
    say(f"warning: resuming {path} with changed {listed} (--resume_allow_changes): the run differs from "
        f"an uninterrupted one from here on")


def check_same_model(meta, cfg, net_config, path):
    """Refuse a checkpoint whose architecture keys or network kwargs differ from this run's."""
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


def restore(net, step_fn, tensors, path):
    """Copy the checkpoint's `model.*` weights and the optimizer state into the network and the step,
    refusing a missing tensor or another shape (a file written for another model)."""
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


def load(path, net, step_fn, scaler, data, layout, say):
    """Load the checkpoint at `path` into the network, optimizer and loss scale; returns (step, draw):
    the optimizer steps done and the global index of the next sample."""
    tensors, meta = ckpt.load(path)
    restore(net, step_fn, tensors, path)
    del tensors
    state = meta["state"]
    step, draw = int(state["step"]), int(state["sampler"]["draw"])
    if "global_batch" not in state["sampler"]:  # written before samples were keyed by global index
        draw = step * layout.global_batch
        say(f"warning: {path} predates the global sample order: the samples after it differ "
            f"from the ones its run would have drawn")
    scaler.load(state.get("loss_scale", {}))
    if state["sampler"].get("per_epoch") != data.order.per_epoch:
        say(f"warning: the data changed since {path} ({state['sampler'].get('per_epoch')} -> "
            f"{data.order.per_epoch} clips per epoch): the sample order does not continue exactly")
    say(f"resumed from {path} at step {step}")
    return step, draw
