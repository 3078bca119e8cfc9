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
`checksum` (CRC-32 of the data section). A file is valid only if its header parses, its size is
exactly what the header describes and the checksum matches: a truncated or bit-flipped file is
detected and skipped by `--resume auto` with a warning naming it.

Why not `ms.save_checkpoint`: it deletes the old file before writing the new one, so a crash in
between loses both. Here: unique temp file in the same folder, fsync, `os.replace`, fsync the folder.
"""
import json
import os
import re
import struct
import sys
import tempfile
import zlib

import numpy as np

from models.checkpoint_io import fsync_dir

FORMAT = "latte-ms-train/1"
STATE_KEY, CONFIG_KEY, NET_KEY = "latte_train_state", "latte_train_config", "latte_convert_metadata"
NAME = re.compile(r"^step_(\d+)\.safetensors$")
TEMP_PREFIX = ".step_"
_DTYPES = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16", np.dtype(np.int32): "I32",
           np.dtype(np.int64): "I64"}
_NUMPY = {v: k for k, v in _DTYPES.items()}
_CHUNK = 1 << 24


class CheckpointError(ValueError):
    """A checkpoint file that is truncated, corrupt or not ours; the message names the file."""


def checkpoint_dir(output_folder):
    return os.path.join(output_folder, "checkpoints")


def checkpoint_path(output_folder, step):
    return os.path.join(checkpoint_dir(output_folder), f"step_{step:07d}.safetensors")


def _bytes(a):
    return a.reshape(-1).view(np.uint8)  # the array's own memory, no copy


def save(path, tensors, state, config, net_config=None):
    """Write `{name: ndarray}` and the metadata to `path` atomically."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    arrays = {name: np.ascontiguousarray(a) for name, a in tensors.items()}
    header, offset, crc = {}, 0, 0
    for name, a in arrays.items():
        assert a.dtype in _DTYPES, (name, a.dtype)
        header[name] = {"dtype": _DTYPES[a.dtype], "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
        crc = zlib.crc32(_bytes(a), crc)
    header["__metadata__"] = {
        "format": FORMAT, STATE_KEY: json.dumps(state, sort_keys=True), CONFIG_KEY: json.dumps(config, sort_keys=True),
        NET_KEY: json.dumps(net_config or {}, sort_keys=True), "checksum": f"crc32:{crc:08x}", "data_bytes": str(offset)}
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # safetensors aligns the data to 8 bytes
    fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(struct.pack("<Q", len(head)))
            f.write(head)
            for a in arrays.values():
                f.write(_bytes(a))
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a checkpoint is an ordinary file
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    fsync_dir(folder)


def _read_header(path, f):
    size = os.fstat(f.fileno()).st_size
    raw = f.read(8)
    if len(raw) != 8:
        raise CheckpointError(f"{path}: truncated (no header)")
    (n,) = struct.unpack("<Q", raw)
    if n > min(size, 1 << 30):
        raise CheckpointError(f"{path}: header length {n} exceeds the file: truncated or not a checkpoint")
    try:
        header = json.loads(f.read(n))
        meta = header.pop("__metadata__")
        data_bytes = int(meta["data_bytes"])
        assert meta.get("format") == FORMAT
    except (ValueError, KeyError, TypeError, AssertionError):
        raise CheckpointError(f"{path}: header is damaged or not a {FORMAT} checkpoint") from None
    if size != 8 + n + data_bytes:
        raise CheckpointError(f"{path}: {size} bytes but the header describes {8 + n + data_bytes}: truncated")
    return header, meta, 8 + n


def verify(path):
    """Check a checkpoint end to end (header, size, CRC-32 of the data) without keeping the data in
    memory; returns its metadata with the JSON fields decoded. Raises CheckpointError."""
    try:
        with open(path, "rb") as f:
            header, meta, _ = _read_header(path, f)
            crc = 0
            while chunk := f.read(_CHUNK):
                crc = zlib.crc32(chunk, crc)
    except OSError as err:
        raise CheckpointError(f"{path}: cannot be read ({err.strerror})") from None
    if f"crc32:{crc:08x}" != meta.get("checksum"):
        raise CheckpointError(f"{path}: checksum mismatch: the file is corrupt")
    return _decode(meta)


def _decode(meta):
    return {"state": json.loads(meta[STATE_KEY]), "config": json.loads(meta[CONFIG_KEY]),
            "net_config": json.loads(meta.get(NET_KEY) or "{}")}


def load(path):
    """(tensors {name: ndarray}, metadata) of a verified checkpoint. Raises CheckpointError."""
    meta = verify(path)
    with open(path, "rb") as f:
        header, _, start = _read_header(path, f)
        f.seek(start)
        data = f.read()
    tensors = {}
    for name, info in header.items():
        b, e = info["data_offsets"]
        tensors[name] = np.frombuffer(data, dtype=_NUMPY[info["dtype"]], count=(e - b) // _NUMPY[info["dtype"]].itemsize,
                                      offset=b).reshape(info["shape"])
    return tensors, meta


def list_checkpoints(output_folder):
    """[(step, path)] of the checkpoint files in `output_folder`, newest first (not verified)."""
    folder = checkpoint_dir(output_folder)
    if not os.path.isdir(folder):
        return []
    found = [(int(m.group(1)), os.path.join(folder, name)) for name in os.listdir(folder) if (m := NAME.match(name))]
    return sorted(found, reverse=True)


def find_resume(output_folder, warn=None):
    """(path, metadata) of the newest valid checkpoint, or (None, None). Each damaged newer one is
    skipped with a warning naming it."""
    warn = warn or (lambda msg: print(msg, file=sys.stderr, flush=True))
    for _, path in list_checkpoints(output_folder):
        try:
            return path, verify(path)
        except CheckpointError as err:
            warn(f"warning: skipping checkpoint {err}")
    return None, None


def prune(output_folder, keep):
    """Delete all but the `keep` newest periodic checkpoints; final ones (end of a run) stay."""
    periodic = []
    for _, path in list_checkpoints(output_folder):
        try:
            with open(path, "rb") as f:
                _, meta, _ = _read_header(path, f)
            final = json.loads(meta[STATE_KEY]).get("final", False)
        except (CheckpointError, OSError, ValueError, KeyError):
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
