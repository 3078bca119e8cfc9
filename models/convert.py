"""Convert PyTorch Latte / VAE weights to MindSpore, and load weights into a network strictly.

    latte convert --kind latte --source skytimelapse.pt --target latte_sky.ckpt --check
    latte convert --kind vae --source sd-vae-ft-mse/diffusion_pytorch_model.bin --target vae.ckpt
    latte convert --kind vae --source vae.safetensors --target vae.safetensors --format safetensors

Our networks use exactly the PyTorch state-dict names and shapes (see models/latte.py, models/vae.py),
so conversion is only: unwrap the checkpoint (`ema`, else `model`, else the dict itself), strip a
DDP `module.` prefix, rename the 2022 VAE attention names, and write the tensors. torch is never
imported: `checkpoint_io` reads the torch zip format with an unpickler that refuses any code.

The written file also stores the architecture inferred from the shapes (`read_metadata`), so the
sampler can rebuild the network without being told the variant:

    meta = read_metadata("latte_sky.ckpt")      # {"kind": "latte", "config": {...}, "variant": ...}
    net = Latte(**meta["config"]); load_weights(net, "latte_sky.ckpt")
"""
import argparse
import collections
import contextlib
import json
import math
import mmap
import os
import re
import struct
import sys
import time

import numpy as np

from models.checkpoint_io import (CheckpointFormatError, UnsafeCheckpointError, atomic_write, bf16_to_float32,
                                  flatten, map_safetensors, read_checkpoint, read_header, verify_if_checksummed,
                                  write_safetensors)
from models.config import first_line
from models.dtypes import DTYPE_NAMES, NUMPY_DTYPES
from models.registry import heads_for_hidden, variant_of

METADATA_KEY = "latte_convert_metadata"  # the JSON string stored beside the tensors
TORCH_SUFFIXES = (".pt", ".pth", ".bin")
LIST_NAMES = 5  # how many names an error message lists per category


# Names that tell a state dict's kind; checked after unwrapping.
KIND_KEYS = {
    "latte": ("x_embedder.proj.weight", "t_embedder.mlp.0.weight", "blocks.0.attn.qkv.weight",
              "final_layer.linear.weight"),
    "vae": ("encoder.conv_in.weight", "encoder.down_blocks.0.resnets.0.conv1.weight",
            "decoder.conv_in.weight", "quant_conv.weight", "post_quant_conv.weight"),
}

# diffusers' 2022 AttentionBlock names -> the current Attention names (what our VAE uses).
_VAE_ATTN_OLD = re.compile(r"^(.*\.attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)$")
_VAE_ATTN_NEW = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_VAE_ATTN_WEIGHT = re.compile(r"^.*\.attentions\.\d+\.(to_q|to_k|to_v|to_out\.0)\.weight$")


# ----------------------------------------------------------------------------------------------------
# reading and normalising a PyTorch state dict
# ----------------------------------------------------------------------------------------------------

def _unwrap(tensors, group=None):
    """Pick the weights out of a training checkpoint: `group` if given, else `ema`, else `model`,
    else everything. Returns (state dict, chosen group or None, names left out)."""
    groups = {name.split(".", 1)[0] for name in tensors}
    if group is None:
        group = next((g for g in ("ema", "model", "state_dict") if g in groups), None)
    elif group not in groups:
        raise ValueError(f"no group '{group}' in the file (top-level names: {_some(sorted(groups))}); "
                         f"pass another --group or none")
    if group is None:
        return dict(tensors), None, []
    prefix = group + "."
    picked = {name[len(prefix):]: v for name, v in tensors.items() if name.startswith(prefix)}
    left = [name for name in tensors if not name.startswith(prefix)]
    return picked, group, left


def _strip_module(state_dict):
    """DistributedDataParallel saves `module.<name>`; only a leading `module.` is removed."""
    if state_dict and all(name.startswith("module.") for name in state_dict):
        return {name[len("module."):]: v for name, v in state_dict.items()}, True
    return state_dict, False


def _check_kind(state_dict, kind, source):
    missing = [k for k in KIND_KEYS[kind] if k not in state_dict]
    if not missing:
        return
    other = "vae" if kind == "latte" else "latte"
    if all(k in state_dict for k in KIND_KEYS[other]):
        raise ValueError(f"{source}: this is a {other.upper() if other == 'vae' else 'Latte'} state dict, "
                         f"not {kind}: pass --kind {other}")
    hint = ""
    if any(".mid.attn_1." in k or k.startswith("first_stage_model.") for k in state_dict):
        hint = "; it looks like the original CompVis/LDM naming: use the diffusers-format VAE file"
    elif any(k.startswith("transformer_blocks.") for k in state_dict):
        hint = "; it looks like a diffusers LatteTransformer3DModel: use the original Latte checkpoint"
    raise ValueError(f"{source}: neither a Latte nor a VAE state dict (no {missing[0]!r}; "
                     f"{len(state_dict)} tensors such as {_some(sorted(state_dict), 3)}){hint}")


def convert_vae_names(state_dict):
    """2022 attention names -> current ones, and 1x1-conv-shaped attention weights -> (C, C)."""
    out, renamed, reshaped = {}, 0, 0
    for name, value in state_dict.items():
        m = _VAE_ATTN_OLD.match(name)
        if m:
            name = f"{m.group(1)}.{_VAE_ATTN_NEW[m.group(2)]}.{m.group(3)}"
            renamed += 1
        if _VAE_ATTN_WEIGHT.match(name) and value.ndim == 4 and value.shape[2:] == (1, 1):
            value = value.reshape(value.shape[:2])
            reshaped += 1
        if name in out:
            raise ValueError(f"both the 2022 and the current name of {name!r} are in the file: keep one")
        out[name] = value
    return out, renamed, reshaped


def load_torch_weights(source, kind, group=None):
    """Read a .pt/.pth/.bin/.safetensors file and return (state dict with our names, notes)."""
    obj = read_checkpoint(source)
    tensors, others = flatten(obj, min_ndim=1)  # a 0-d tensor is a number (e.g. a step count), not a weight
    if not tensors:
        raise ValueError(f"{source}: holds no tensors: not a weights file")
    state_dict, chosen, left = _unwrap(tensors, group)
    state_dict, stripped = _strip_module(state_dict)
    notes = []
    if chosen:
        notes.append(f"took group '{chosen}'" + (f", left out {len(left)} other tensors" if left else ""))
    if stripped:
        notes.append("stripped the 'module.' prefix")
    if others:
        notes.append(f"dropped {len(others)} non-tensor entries ({_some(others, 3)})")
    _check_kind(state_dict, kind, source)
    if kind == "vae":
        state_dict, renamed, reshaped = convert_vae_names(state_dict)
        if renamed:
            notes.append(f"renamed {renamed} 2022 attention tensors (query/key/value/proj_attn)")
        if reshaped:
            notes.append(f"reshaped {reshaped} conv-shaped attention weights to (C, C)")
    return state_dict, notes


# ----------------------------------------------------------------------------------------------------
# architecture from shapes
# ----------------------------------------------------------------------------------------------------

def _count(state_dict, prefix):
    """1 + the largest N among names `<prefix>N.…` (0 if none)."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    found = [int(m.group(1)) for m in map(pattern.match, state_dict) if m]
    return max(found) + 1 if found else 0


def infer_latte_config(state_dict, num_heads=None):
    """Latte(**kwargs) for a state dict with the original names. num_heads is not visible in any
    shape: it is taken from the registry variant with this hidden size, else must be given."""
    try:
        hidden, in_channels, patch, _ = state_dict["x_embedder.proj.weight"].shape
        tokens = state_dict["pos_embed"].shape[1]
        num_frames = state_dict["temp_embed"].shape[1]
        out_features = state_dict["final_layer.linear.weight"].shape[0]
        mlp_hidden = state_dict["blocks.0.mlp.fc1.weight"].shape[0]
    except KeyError as err:
        raise ValueError(f"not a Latte state dict: no {err.args[0]!r}") from None
    depth = _count(state_dict, "blocks.")
    grid = math.isqrt(tokens)
    out_channels = out_features // (patch * patch)
    if grid * grid != tokens or out_channels not in (in_channels, 2 * in_channels):
        raise ValueError(f"inconsistent Latte shapes: pos_embed has {tokens} tokens, final layer "
                         f"{out_features} outputs for patch {patch} and {in_channels} channels")
    if num_heads is None:
        num_heads = heads_for_hidden(int(hidden))
        if num_heads is None:
            raise ValueError(f"hidden size {hidden} is not a registry variant, so the number of heads is "
                             f"unknown: pass --num-heads N")
    config = dict(input_size=int(grid * patch), patch_size=int(patch), in_channels=int(in_channels),
                  hidden_size=int(hidden), depth=int(depth), num_heads=int(num_heads),
                  mlp_ratio=mlp_hidden / hidden, num_frames=int(num_frames),
                  learn_sigma=bool(out_channels == 2 * in_channels), extras=1)
    if "y_embedder.embedding_table.weight" in state_dict:
        # The table has num_classes + 1 rows: the extra one is the null class for guidance.
        config.update(extras=2, num_classes=int(state_dict["y_embedder.embedding_table.weight"].shape[0] - 1))
    return config


def latte_variant(config):
    """Registry name ("Latte-XL/2") of a config, or None for a custom size."""
    return variant_of(config)


def infer_vae_config(state_dict, norm_num_groups=32):
    """AutoencoderKL(**kwargs) for a state dict with diffusers names. The GroupNorm group count is
    not visible in any shape (32 in every released SD VAE)."""
    try:
        levels = _count(state_dict, "encoder.down_blocks.")
        block_out_channels = [int(state_dict[f"encoder.down_blocks.{i}.resnets.0.conv1.weight"].shape[0])
                              for i in range(levels)]
        config = dict(in_channels=int(state_dict["encoder.conv_in.weight"].shape[1]),
                      out_channels=int(state_dict["decoder.conv_out.weight"].shape[0]),
                      block_out_channels=block_out_channels,
                      layers_per_block=_count(state_dict, "encoder.down_blocks.0.resnets."),
                      latent_channels=int(state_dict["post_quant_conv.weight"].shape[0]),
                      norm_num_groups=int(norm_num_groups))
    except KeyError as err:
        raise ValueError(f"not a VAE state dict: no {err.args[0]!r}") from None
    bad = [c for c in block_out_channels if c % norm_num_groups]
    if bad:
        raise ValueError(f"channels {bad} are not divisible by norm_num_groups={norm_num_groups}: "
                         f"pass --norm-num-groups")
    return config


def build_network(kind, config):
    """The MindSpore network for an inferred config (float32)."""
    if kind == "latte":
        from models.latte import Latte
        return Latte(**config)
    from models.vae import AutoencoderKL
    return AutoencoderKL(**config)


# ----------------------------------------------------------------------------------------------------
# writing and loading MindSpore weights
# ----------------------------------------------------------------------------------------------------



def save_weights(path, state_dict, fmt="ckpt", dtype="fp32", metadata=None, check=None):
    """Write `{name: ndarray}` as a MindSpore .ckpt or a .safetensors file, atomically: a crash
    leaves either the old file or the complete new one. `check(temp_path)`, if given, runs on the
    written file before it replaces `path` (a failed check leaves no file). Consumes `state_dict`."""
    path = os.fspath(path)
    meta = json.dumps(metadata or {}, sort_keys=True)

    def cast(value):  # floating tensors only; bf16 is rounded from float32 by the writer
        if not np.issubdtype(value.dtype, np.floating):
            return value
        return value.astype(np.float32 if dtype == "bf16" else NUMPY_DTYPES[dtype], copy=False)

    if fmt == "safetensors":
        tensors = {name: cast(np.asarray(v)) for name, v in state_dict.items()}
        state_dict.clear()
        write_safetensors(path, tensors, {METADATA_KEY: meta}, dtype, suffix=".tmp.safetensors", check=check)
        return
    if fmt != "ckpt" or not path.endswith(".ckpt"):
        raise ValueError(f"{path}: cannot write format {fmt!r} under this name: "
                         f"write a .ckpt or a .safetensors file")
    import mindspore as ms

    items = []
    for name in list(state_dict):
        value = ms.Tensor(cast(state_dict.pop(name)))
        if dtype == "bf16" and value.dtype == ms.float32:
            value = value.astype(ms.bfloat16)
        items.append({"name": name, "data": value})
    # save_checkpoint appends ".ckpt" to other names, so the temp name must end with it too.
    atomic_write(path, lambda tmp: ms.save_checkpoint(items, tmp, append_dict={METADATA_KEY: meta}),
                 suffix=".ckpt", check=check)


# .ckpt output (MindSpore's own format, what MindSpore users expect) still needs the two pieces
# below: reading one string entry without parsing the whole file (MindSpore parses all 2.7 GB of a
# Latte-XL file to return it), and loading a .ckpt while the page cache holds the memory.
# .safetensors files need neither: their header is JSON and their data is memory-mapped.

def _varint(buf, pos):
    result = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return result, pos


def _fields(buf):
    """(field number, value) of a protobuf message; length-delimited values as bytes."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        wire = key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 2:
            length, pos = _varint(buf, pos)
            value, pos = buf[pos:pos + length], pos + length
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            value, pos = buf[pos:pos + size], pos + size
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield key >> 3, value


def _ckpt_string(path, name):
    """The string entry `name` of a .ckpt, found without parsing its tensors (MindSpore reads the
    whole 2.7 GB of a Latte-XL file to return one string). A .ckpt is one protobuf message
    `Checkpoint {repeated Value value = 1}`, `Value {string tag = 1; TensorProto tensor = 2}`,
    `TensorProto {dims = 1; tensor_type = 2; tensor_content = 3}`, strings stored as UTF-32.
    Walks the top level with seeks; None if the entry is absent or the layout is unexpected."""
    with open(path, "rb") as f:
        for at, length in _ckpt_values(f):
            f.seek(at)
            first = f.read(min(length, 10 + len(name.encode())))
            if first[:1] == b"\x0a":
                tag_len, tag_at = _varint(first, 1)
                if tag_len == len(name.encode()) and first[tag_at:tag_at + tag_len] == name.encode():
                    f.seek(at)
                    value = dict(_fields(f.read(length)))
                    tensor = dict(_fields(value.get(2, b"")))
                    if tensor.get(2) != b"str":
                        return None
                    content = tensor.get(3, b"")
                    return str(np.frombuffer(content, f"U{len(content) // 4}")[0])
    return None


def _ckpt_values(f):
    """(offset, length) of each top-level `Value` of the open .ckpt `f`, by seeks: the file is
    `Checkpoint {repeated Value value = 1}`, then possibly a crc trailer, where the walk stops."""
    size = os.fstat(f.fileno()).st_size
    pos = 0
    while pos < size:
        f.seek(pos)
        head = f.read(20)
        if not head or head[0] != 0x0A:  # field 1, length-delimited (else: a crc trailer)
            return
        length, start = _varint(head, 1)
        yield pos + start, length
        pos += start + length


def read_metadata(path):
    """The metadata `latte convert` stored in a .ckpt / .safetensors file ({} if none):
    {"kind": "latte"|"vae", "config": kwargs of Latte / AutoencoderKL, "variant": name or None, ...}."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such weights file: check the path")
    try:
        if path.endswith(".safetensors"):
            raw = read_header(path)[1].get(METADATA_KEY)
        else:
            raw = _ckpt_string(path, METADATA_KEY)
    except (IndexError, ValueError, struct.error):
        raise ValueError(f"{path}: damaged or not a .ckpt / .safetensors weights file") from None
    return json.loads(raw) if isinstance(raw, str) else {}


def _some(names, n=LIST_NAMES):
    names = list(names)
    shown = ", ".join(map(str, names[:n]))
    return shown + (f", ... ({len(names) - n} more)" if len(names) > n else "")


_CKPT_DTYPES = {"Float32": np.float32, "Float16": np.float16, "Float64": np.float64, "Int8": np.int8,
                "UInt8": np.uint8, "Int16": np.int16, "UInt16": np.uint16, "Int32": np.int32, "UInt32": np.uint32,
                "Int64": np.int64, "UInt64": np.uint64, "Bool": np.bool_, "BFloat16": np.uint16}


def _ckpt_entries(path):
    """(name, dims, tensor type, offset of the content, its length in bytes) of each entry of a .ckpt,
    read without the contents: the top-level walk of `_ckpt_values`, parsing of each Value only its
    tag and the TensorProto fields before the content (dims, type), then a seek past it. A tensor
    over 512 MB is stored as several entries of the same name (row slices). ValueError (or
    IndexError) on a layout it does not know, e.g. an encrypted file."""
    entries = []
    with open(path, "rb") as f:
        for offset, length in _ckpt_values(f):
            f.seek(offset)
            value = f.read(min(length, 4096))  # tag, then the TensorProto's key, length, dims, type
            tag_len, at = _varint(value, 1)
            name = value[at:at + tag_len].decode()
            at += tag_len
            if value[at] != 0x12:  # field 2 (tensor), length-delimited
                raise ValueError("unexpected layout")
            _, at = _varint(value, at + 1)
            dims, dtype = [], None
            while True:
                key, at = _varint(value, at)
                if key == 0x08:  # dims, one varint each
                    dim, at = _varint(value, at)
                    dims.append(dim)
                elif key == 0x0A:  # dims, packed
                    n, at = _varint(value, at)
                    end = at + n
                    while at < end:
                        dim, at = _varint(value, at)
                        dims.append(dim)
                elif key == 0x12:  # tensor_type
                    n, at = _varint(value, at)
                    dtype = value[at:at + n].decode()
                    at += n
                elif key == 0x1A:  # tensor_content: the rest of the entry
                    n, at = _varint(value, at)
                    entries.append((name, tuple(dims), dtype, offset + at, n))
                    break
                else:
                    raise ValueError("unexpected layout")
    return entries


def _ckpt_shapes(path):
    """{name: shape} of the tensors of a .ckpt (string entries, the metadata, left out)."""
    return {name: dims for name, dims, dtype, _, _ in _ckpt_entries(path) if dtype != "str"}


def _map_ckpt(path, prefix):
    """{name: array} of the tensors of a .ckpt whose names start with `prefix`, memory-mapped read-only
    as `map_safetensors` does (BF16 widened, a sliced tensor joined in memory). MindSpore's own
    reader holds the whole file's bytes and every parsed tensor at once, twice the file before a
    single weight is copied (measured: loading sd-vae-ft-mse's 335 MB .ckpt peaked ~660 MB over
    the process); mapped, load_weights copies one tensor at a time and drops its pages. ValueError
    on a layout or type it does not know (the caller then uses MindSpore's reader)."""
    groups = collections.OrderedDict()
    for name, dims, dtype, offset, n in _ckpt_entries(path):
        if dtype != "str" and name.startswith(prefix):
            if dtype not in _CKPT_DTYPES:
                raise ValueError(f"tensor type {dtype}")
            groups.setdefault(name, []).append((dims, dtype, offset, n))
    mapped = np.memmap(path, np.uint8, mode="r") if groups else None
    out = collections.OrderedDict()
    for name, parts in groups.items():
        dims, dtype = parts[0][:2]
        flat = [mapped[offset:offset + n].view(_CKPT_DTYPES[dtype]) for _, _, offset, n in parts]
        array = flat[0] if len(flat) == 1 else np.concatenate(flat)
        out[name] = (bf16_to_float32(array) if dtype == "BFloat16" else array).reshape(dims)
    return out


def weight_shapes(path, prefix=""):
    """{name: shape} of the tensors in a .ckpt / .safetensors file whose names start with `prefix`
    (prefix removed), from the safetensors header or the .ckpt's tensor headers alone: nothing of the
    weights is read into memory. ValueError naming the file when it is not readable."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such weights file: check the path")
    if path.endswith(".safetensors"):
        try:
            verify_if_checksummed(path)
            shapes = {name: tuple(info["shape"]) for name, info in read_header(path)[0].items()}
        except CheckpointFormatError as err:
            raise ValueError(f"{err}; re-create it with `latte convert` (or use another checkpoint)") from None
    elif path.endswith(".ckpt"):
        try:
            shapes = _ckpt_shapes(path)
        except (IndexError, ValueError, UnicodeDecodeError):
            raise ValueError(f"{path}: not a readable MindSpore checkpoint; re-create it with `latte convert` "
                             f"or re-save it") from None
    else:
        raise ValueError(f"{path}: unknown weights format: use a .ckpt or .safetensors file")
    return {name[len(prefix):]: shape for name, shape in shapes.items() if name.startswith(prefix)}


class _Shaped:
    def __init__(self, shape):
        self.shape = shape


def check_weights(net, path, group=None):
    """The check `load_weights` makes before copying anything (every parameter of `net` in the file
    under `group`, nothing more, same shapes), from the file's headers alone: a caller that loads the
    weights late (`latte sample` builds its VAE after the denoising) reports a wrong file at once.
    `net` may be built without its weights (mindspore.nn.utils.no_init_parameters). ValueError as
    load_weights raises it."""
    path = os.fspath(path)
    prefix = f"{group}." if group is not None else ""
    shapes = {name: _Shaped(shape) for name, shape in weight_shapes(path, prefix).items()}
    _refuse_mismatches(net, path, prefix, shapes)


def _read_for_loading(path, prefix):
    """{name: Tensor or ndarray} of the tensors in a .ckpt / .safetensors file whose names start
    with `prefix` (prefix removed)."""
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such weights file: check the path")
    if path.endswith(TORCH_SUFFIXES):
        raise ValueError(f"{path} is a PyTorch file: convert it first with "
                         f"`latte convert --kind latte|vae --source {path} --target <name>.ckpt`")
    if path.endswith(".safetensors"):
        try:
            verify_if_checksummed(path)
            values = map_safetensors(path, prefix)
        except CheckpointFormatError as err:
            raise ValueError(f"{err}; re-create it with `latte convert` (or use another checkpoint)") from None
    elif path.endswith(".ckpt"):
        try:
            values = _map_ckpt(path, prefix)
        except (IndexError, ValueError, UnicodeDecodeError):
            values = _read_ckpt(path, prefix)
    else:
        raise ValueError(f"{path}: unknown weights format: use a .ckpt or .safetensors file")
    return {name[len(prefix):]: v for name, v in values.items()
            if name.startswith(prefix) and not isinstance(v, (str, int, float, bool))}


def _mem_available():
    """MemAvailable in bytes (free memory plus reclaimable page cache), or None off Linux."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


@contextlib.contextmanager
def _ckpt_memory_check_uses_mem_available():
    """MindSpore 2.10 refuses to parse a .ckpt larger than MemFree (SC_AVPHYS_PAGES), which leaves
    out the reclaimable page cache: right after writing a 2.7 GB Latte-XL checkpoint, loading it fails
    on a host with gigabytes to spare. Make its check measure MemAvailable instead."""
    from mindspore.train import serialization

    original = getattr(serialization, "_get_available_memory", None)
    if original is None or _mem_available() is None:
        yield
        return
    serialization._get_available_memory = _mem_available
    try:
        yield
    finally:
        serialization._get_available_memory = original


def _read_ckpt(path, prefix):
    import mindspore as ms

    def read(choice_func=None):
        with _ckpt_memory_check_uses_mem_available():
            return ms.load_checkpoint(path, choice_func=choice_func)

    try:
        return read(lambda name: name.startswith(prefix))
    except (ValueError, RuntimeError) as err:
        problem = first_line(err)
    if prefix:
        # MindSpore also raises when nothing passes the filter: a file that reads whole is fine and
        # simply holds nothing under this prefix.
        try:
            read()
            return {}
        except (ValueError, RuntimeError):
            pass
    raise ValueError(f"{path}: not a readable MindSpore checkpoint ({problem}); re-create it with "
                     f"`latte convert` or re-save it")


def mismatches(params, values):
    """(one line naming the missing, unexpected and mis-shaped tensors or "", the missing names) of
    `values` ({name: array}) against a network's `params` ({name: Parameter or array})."""
    missing = [name for name in params if name not in values]
    unexpected = [name for name in values if name not in params]
    misshaped = [f"{name} {tuple(values[name].shape)} vs {tuple(params[name].shape)}"
                 for name in params if name in values and tuple(values[name].shape) != tuple(params[name].shape)]
    parts = [f"{len(missing)} missing ({_some(missing)})" if missing else "",
             f"{len(unexpected)} unexpected ({_some(unexpected)})" if unexpected else "",
             f"{len(misshaped)} mis-shaped, file vs network ({_some(misshaped)})" if misshaped else ""]
    return "; ".join(p for p in parts if p), missing


def load_weights(net, path, group=None, prefix=None):
    """Copy every parameter of `net` from a .ckpt / .safetensors file, strictly: a name missing
    from the file, a tensor the net has no parameter for, or a shape mismatch is a ValueError that
    names them (nothing is copied then). Values are cast to each Parameter's dtype.

    `group="ema"` (or `prefix="ema."`) loads the tensors stored as `ema.<name>` — a trainer
    checkpoint holds several groups; other groups are ignored. Returns the loaded names."""
    import mindspore as ms

    path = os.fspath(path)
    if group is not None and prefix is not None:
        raise ValueError("pass either group= or prefix=, not both")
    prefix = f"{group}." if group is not None else (prefix or "")
    values = _read_for_loading(path, prefix)
    params = _refuse_mismatches(net, path, prefix, values)
    for name, param in params.items():
        value = values.pop(name)
        if isinstance(value, np.ndarray):
            target = {ms.float32: np.float32, ms.float16: np.float16}.get(param.dtype)
            mapped, value = value, ms.Tensor(np.ascontiguousarray(value, dtype=target))  # copies out of the file map
            _drop_mapped_pages(mapped)
        if value.dtype != param.dtype:
            value = value.astype(param.dtype)
        param.set_data(value)
    return list(params)


def _refuse_mismatches(net, path, prefix, values):
    """`net`'s parameters by name, or the ValueError naming what of `values` does not fit them."""
    params = net.parameters_dict()
    problems, missing = mismatches(params, values)
    if problems:
        where = f" under '{prefix}'" if prefix else ""
        hint = _group_hint(path, prefix, values, params) if len(missing) == len(params) else ""
        raise ValueError(f"{path}{where} does not match {type(net).__name__}: {problems}{hint}")
    return params


def _drop_mapped_pages(array):
    """Unmap the file pages under `array`, a view of a safetensors file map already copied out: they
    would otherwise stay resident (counted in RSS) until the whole map is closed, a second copy of the
    weights at the loading peak (+124 MB for Latte-S/2's EMA, measured). The page cache keeps them,
    so a page shared with a tensor not yet copied is simply read back in (as would be any page of a
    wrong range: dropping is always safe on a read-only map). `map_safetensors` maps from offset 0,
    so the root array starts where the map does."""
    root = array
    while isinstance(root, np.ndarray) and not isinstance(root.base, mmap.mmap):
        root = root.base
    if not isinstance(root, np.ndarray) or not hasattr(mmap, "MADV_DONTNEED") or not array.nbytes:
        return  # not file-mapped (BF16 widened, .ckpt), or no madvise here
    start = array.__array_interface__["data"][0] - root.__array_interface__["data"][0]
    first = start // mmap.PAGESIZE * mmap.PAGESIZE
    root.base.madvise(mmap.MADV_DONTNEED, first, start + array.nbytes - first)


def _group_hint(path, prefix, values, params):
    """When nothing matches, say what the file does hold: another group (a trainer checkpoint holds
    `ema.*`, `model.*`, ...) or, from its metadata, another network."""
    names = list(values) or [n for n in _all_names(path) if not n.startswith(prefix)]
    groups = {}
    for name in names:
        group, _, rest = name.partition(".")
        groups[group] = groups.get(group, 0) + (rest in params)
    fits = sorted(g for g, n in groups.items() if n == len(params))
    if fits:
        return f"; its tensors under '{fits[0]}.' fit: pass group='{fits[0]}'"
    meta = read_metadata(path) if path.endswith((".ckpt", ".safetensors")) else {}
    if meta.get("config"):
        return f"; the file holds a {meta.get('kind', '?')} network with {json.dumps(meta['config'])}"
    return ""


def _all_names(path):
    if path.endswith(".safetensors"):
        return list(read_header(path)[0])
    import mindspore as ms
    with _ckpt_memory_check_uses_mem_available():
        return [k for k, v in ms.load_checkpoint(path).items() if not isinstance(v, str)]


# ----------------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------------

def build_parser():
    parser = argparse.ArgumentParser(
        prog="latte convert",
        description="Convert PyTorch Latte or VAE weights (.pt/.pth/.bin torch files or .safetensors) "
                    "into a MindSpore .ckpt (or .safetensors), without torch. The inferred architecture is "
                    "stored in the file for the sampler.")
    parser.add_argument("--kind", required=True, choices=("latte", "vae"), help="what the file holds")
    parser.add_argument("--source", required=True, help="PyTorch file: .pt, .pth, .bin or .safetensors")
    parser.add_argument("--target", required=True, help="output file: .ckpt, or .safetensors")
    parser.add_argument("--format", choices=("ckpt", "safetensors"), default=None,
                        help="output format (default: from the target's suffix, else ckpt)")
    parser.add_argument("--dtype", choices=DTYPE_NAMES, default="fp32", help="stored dtype (default fp32)")
    parser.add_argument("--group", default=None,
                        help="which group of a training checkpoint to take (default: ema, else model, else all)")
    parser.add_argument("--num-heads", type=int, default=None,
                        help="Latte attention heads; needed only for hidden sizes outside the registry")
    parser.add_argument("--norm-num-groups", type=int, default=32, help="VAE GroupNorm groups (default 32)")
    parser.add_argument("--check", action="store_true",
                        help="also load the written file into the inferred network before keeping it (names and "
                             "shapes are always checked)")
    return parser


def _convert(args):
    fmt = args.format or ("safetensors" if args.target.endswith(".safetensors") else "ckpt")
    if fmt == "ckpt" and not args.target.endswith(".ckpt"):
        raise ValueError(f"{args.target}: a MindSpore checkpoint must end with .ckpt: rename the target "
                         f"or pass --format safetensors")
    if not os.path.isfile(args.source):
        raise ValueError(f"{args.source}: no such file: check --source")
    if os.path.abspath(args.source) == os.path.abspath(args.target):
        raise ValueError(f"{args.target}: the target is the source: choose another --target")
    start = time.time()
    try:
        state_dict, notes = load_torch_weights(args.source, args.kind, args.group)
        if args.kind == "latte":
            config = infer_latte_config(state_dict, args.num_heads)
            metadata = {"kind": "latte", "config": config, "variant": latte_variant(config)}
        else:
            config = infer_vae_config(state_dict, args.norm_num_groups)
            metadata = {"kind": "vae", "config": config}
    except UnsafeCheckpointError as err:
        raise ValueError(f"{args.source}: unsafe pickle, not loaded ({err}); only convert files from a "
                         f"trusted source, or get its .safetensors version") from None
    except CheckpointFormatError as err:
        raise ValueError(f"{err}: pass a torch.save file (.pt/.pth/.bin) or .safetensors") from None
    except ValueError as err:
        if str(err).startswith(args.source):
            raise
        raise ValueError(f"{args.source}: {err}") from None
    metadata["source"] = os.path.basename(args.source)
    # Always: a state dict that does not fit the architecture inferred from it (a missing block, an
    # extra or odd-shaped tensor) would be written as a file no network can load.
    net = build_network(args.kind, config)
    problems, _ = mismatches(net.parameters_dict(), state_dict)
    if problems:
        arguments = ", ".join(f"{k}={v}" for k, v in config.items())
        raise ValueError(f"{args.source}: the tensors do not fit the inferred {type(net).__name__}({arguments}): "
                         f"{problems}; nothing written")
    names = len(state_dict)
    values = sum(int(v.size) for v in state_dict.values())
    itemsize = {"fp32": 4, "fp16": 2, "bf16": 2}[args.dtype]

    # --check loads the written file strictly before it takes the target's name: a failure leaves no file.
    check = (lambda tmp: load_weights(net, tmp)) if args.check else None
    save_weights(args.target, state_dict, fmt, args.dtype, metadata, check=check)

    print(f"converted {args.source} -> {args.target} ({args.kind}, {fmt}) in {time.time() - start:.1f}s")
    print(f"  {names} tensors, {values:,} parameters, {args.dtype}, {values * itemsize / 2**20:.1f} MB")
    if metadata.get("variant"):
        print(f"  variant: {metadata['variant']}")
    print(f"  config: {json.dumps(config)}")
    for note in notes:
        print(f"  note: {note}")
    if args.check:
        arguments = ", ".join(f"{k}={v}" for k, v in config.items())
        print(f"  check: loaded strictly into {type(net).__name__}({arguments})")
    return 0


def main(argv=None):
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return _convert(args)
    except (ValueError, OSError) as err:  # user-caused: one line, no traceback
        message = first_line(err)
        print(f"latte convert: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
