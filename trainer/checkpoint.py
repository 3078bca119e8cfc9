"""Training checkpoints: one safetensors file per save, written atomically and verifiable.

Layout of `<output_folder>/checkpoints/step_<step:07d>.safetensors`:

    model.<name>                 every parameter of the network (the PyTorch state-dict names)
    ema.<name>                   the EMA weights (non-trainable tables copied), what sampling uses:
                                 `models.load_weights(net, path, group="ema")`
    opt.exp_avg.<name>           AdamW first and second moments of each trainable parameter
    opt.exp_avg_sq.<name>

and string metadata: `latte_train_state` (JSON: step, epoch, sampler draw, RNG scheme, loss scale,
final flag), `latte_train_config` (the resolved config), `latte_convert_metadata` (the network's
constructor arguments, so `models.read_metadata` rebuilds it as for a converted checkpoint) and
`checksum` (CRC-32 of the header's names, shapes and metadata and of the data). A file is valid only
if the safetensors package accepts its layout and the checksum matches: a truncated, bit-flipped or
header-edited file is detected and skipped by `--resume auto` with a warning naming it.

The file format, the atomic write (unique temp file, fsync, `os.replace`, fsync the folder; never
`ms.save_checkpoint`, which deletes the old file first) and the checksum live in
models/checkpoint_io.py; this module keeps the policy: naming, what is stored, pruning, resume choice.
"""
import json
import os

import numpy as np

from models.checkpoint_io import (DATA_ONLY_CHECKSUM_FORMATS, CheckpointFormatError, map_safetensors,
                                  newest_good_checkpoint, read_header, step_checkpoints, verify_checksum,
                                  write_safetensors)

FORMAT = "latte-ms-train/2"
# Format 1 checksummed the data only; such a file is still accepted (its header is not covered).
LEGACY_FORMATS = DATA_ONLY_CHECKSUM_FORMATS
STATE_KEY, CONFIG_KEY, NET_KEY = "latte_train_state", "latte_train_config", "latte_convert_metadata"
TEMP_PREFIX = ".step_"


class CheckpointError(ValueError):
    """A checkpoint file that is truncated, corrupt or not ours; the message names the file."""


def checkpoint_dir(output_folder):
    return os.path.join(output_folder, "checkpoints")


def checkpoint_path(output_folder, step):
    return os.path.join(checkpoint_dir(output_folder), f"step_{step:07d}.safetensors")


def save(path, tensors, state, config, net_config=None):
    """Write `{name: ndarray}` and the metadata to `path` atomically."""
    metadata = {"format": FORMAT, STATE_KEY: json.dumps(state, sort_keys=True),
                CONFIG_KEY: json.dumps(config, sort_keys=True), NET_KEY: json.dumps(net_config or {}, sort_keys=True)}
    write_safetensors(path, tensors, metadata, prefix=TEMP_PREFIX)


def verify(path):
    """Check a checkpoint end to end (layout, checksum of header and data, or of the data only for
    LEGACY_FORMATS) without keeping the data in memory; returns its metadata with the JSON fields
    decoded. Raises CheckpointError."""
    try:
        if read_header(path)[1].get("format") not in (FORMAT, *LEGACY_FORMATS):
            raise CheckpointError(f"{path}: header is damaged or not a {FORMAT} checkpoint")
        return _decode(verify_checksum(path), path)
    except CheckpointFormatError as err:
        raise CheckpointError(str(err)) from None
    except OSError as err:
        raise CheckpointError(f"{path}: cannot be read ({err.strerror})") from None


def _decode(meta, path):
    try:
        return {"state": json.loads(meta[STATE_KEY]), "config": json.loads(meta[CONFIG_KEY]),
                "net_config": json.loads(meta.get(NET_KEY) or "{}")}
    except (KeyError, ValueError):
        raise CheckpointError(f"{path}: header is damaged or not a {FORMAT} checkpoint") from None


def is_train_checkpoint(path):
    """Whether `path` is a training checkpoint (header only, not verified)."""
    try:
        return STATE_KEY in read_header(path)[1]
    except CheckpointFormatError:
        return False


def load(path):
    """(tensors {name: ndarray}, metadata) of a verified checkpoint. Raises CheckpointError."""
    meta = verify(path)
    try:
        return {name: np.array(a) for name, a in map_safetensors(path).items()}, meta
    except CheckpointFormatError as err:
        raise CheckpointError(str(err)) from None


def list_checkpoints(output_folder):
    """[(step, path)] of the checkpoint files in `output_folder`, newest first (not verified)."""
    return step_checkpoints(checkpoint_dir(output_folder))


def find_resume(output_folder, warn=None):
    """(path, metadata) of the newest valid checkpoint, or (None, None). Each damaged newer one is
    skipped with a warning naming it."""
    return newest_good_checkpoint(checkpoint_dir(output_folder), verify, warn, errors=CheckpointError)


def prune(output_folder, keep):
    """Delete all but the `keep` newest periodic checkpoints; final ones (end of a run) stay."""
    periodic = []
    for _, path in list_checkpoints(output_folder):
        try:
            final = json.loads(read_header(path)[1][STATE_KEY]).get("final", False)
        except (CheckpointFormatError, ValueError, KeyError):
            final = False  # a damaged file is never worth keeping over good ones
        if not final:
            periodic.append(path)
    for path in periodic[keep:]:
        os.remove(path)


def remove_stale_temps(output_folder):
    """Temp files of a save that was killed midway (they are never valid checkpoints)."""
    folder = checkpoint_dir(output_folder)
    if os.path.isdir(folder):
        for name in os.listdir(folder):
            if name.startswith(TEMP_PREFIX) and name.endswith(".tmp"):
                os.remove(os.path.join(folder, name))
