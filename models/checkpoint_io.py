"""Read PyTorch checkpoints and safetensors files into numpy, without torch and without running code.

A `.pt` / `.pth` / `.bin` file written by `torch.save` (since torch 1.6) is a zip archive holding
`<name>/data.pkl` (a pickle of the object graph) and `<name>/data/<key>` (raw tensor storages).
Unpickling an untrusted file with the stock `pickle` module can run arbitrary code (`__reduce__`), so
`read_checkpoint` uses an unpickler that resolves only the handful of globals that tensor storage
needs, each mapped to a pure-numpy stand-in. Any other global is refused before it is called.

`.safetensors` files are written and validated with the `safetensors` package; this module adds
what it lacks (bfloat16, memory-mapped reading, the atomic write and a checksum over header and
data), and is the one place in the project that parses or writes torch and safetensors files.
MindSpore `.ckpt` files are read and written by MindSpore itself, in models/convert.py (through
`atomic_write` here).
"""
import collections
import io
import json
import os
import pickle
import re
import struct
import sys
import tempfile
import zipfile
import zlib

import numpy as np

from models.config import first_line


class UnsafeCheckpointError(ValueError):
    """The pickle asks for a global that tensor storage does not need (possibly malicious)."""


class CheckpointFormatError(ValueError):
    """The file is not a checkpoint this reader understands."""


# torch storage class name -> numpy dtype. "BFloat16" has no numpy dtype: kept as raw uint16 and
# widened to float32 after rebuilding (bf16 is the top half of an fp32).
_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": "bfloat16", "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}


def bf16_to_float32(raw_uint16):
    return (np.asarray(raw_uint16, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


class _StorageType:
    def __init__(self, name):
        self.name = name
        self.dtype = _STORAGE_DTYPES[name]


class _Storage:
    """A flat numpy array standing for one torch storage; `bf16` marks raw bfloat16 bits."""

    def __init__(self, array, bf16):
        self.array, self.bf16 = array, bf16


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None):
    flat = storage.array
    size, stride = tuple(size), tuple(stride)
    if len(size) == 0:
        out = flat[storage_offset:storage_offset + 1].reshape(())
    else:
        needed = storage_offset + sum((n - 1) * s for n, s in zip(size, stride)) + 1
        if any(n == 0 for n in size):
            out = np.zeros(size, flat.dtype)
        elif needed > flat.size:
            raise CheckpointFormatError(f"tensor of size {size} overruns its storage of {flat.size} elements")
        else:
            item = flat.itemsize
            out = np.lib.stride_tricks.as_strided(flat[storage_offset:], shape=size,
                                                  strides=tuple(s * item for s in stride))
    out = np.array(out, copy=True)  # own the memory: the zip buffer is released after loading
    return bf16_to_float32(out) if storage.bf16 else out


def _rebuild_tensor(storage, storage_offset, size, stride):
    return _rebuild_tensor_v2(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *state):
    return data


def _ordered_dict(*args):
    return collections.OrderedDict(*args)


class _Namespace(dict):
    """Stand-in for `argparse.Namespace` (DiT-style checkpoints store the training args): a dict whose
    BUILD state becomes its items, so nothing of argparse is ever imported or run."""

    def __setstate__(self, state):
        self.update(state if isinstance(state, dict) else {})


def _numpy_scalar(dtype, data):
    return np.frombuffer(data, dtype=dtype)[0]


def _numpy_dtype(name, *_):
    return np.dtype(name)


def _reconstruct_ndarray(*_):
    raise UnsafeCheckpointError("numpy arrays pickled by value are not supported (only tensors)")


_SAFE_GLOBALS = {
    ("collections", "OrderedDict"): _ordered_dict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch", "Size"): tuple,
    ("argparse", "Namespace"): _Namespace,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,
    ("numpy", "dtype"): _numpy_dtype,
}
_SAFE_GLOBALS.update({("torch", name): _StorageType(name) for name in _STORAGE_DTYPES})


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, fileobj, load_storage):
        super().__init__(fileobj)
        self._load_storage = load_storage

    def find_class(self, module, name):
        try:
            return _SAFE_GLOBALS[(module, name)]
        except KeyError:
            raise UnsafeCheckpointError(
                f"refusing to load global '{module}.{name}': a weights file needs only tensors") from None

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType)):
            raise UnsafeCheckpointError(f"unexpected persistent id {pid!r:.80}")
        return self._load_storage(pid[1], str(pid[2]))


def _read_torch_zip(path):
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        pkl = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
        if len(pkl) != 1:
            raise CheckpointFormatError(f"{path}: zip archive without one data.pkl: not a torch.save file")
        prefix = pkl[0][: -len("data.pkl")]
        order = prefix + "byteorder"
        big_endian = order in names and zf.read(order).strip() == b"big"
        cache = {}

        def load_storage(storage_type, key):
            if key not in cache:
                raw = zf.read(f"{prefix}data/{key}")
                bf16 = storage_type.dtype == "bfloat16"
                dtype = np.dtype(np.uint16 if bf16 else storage_type.dtype)
                if big_endian:
                    dtype = dtype.newbyteorder(">")
                array = np.frombuffer(raw, dtype=dtype)
                if big_endian:
                    array = array.astype(array.dtype.newbyteorder("<"))
                cache[key] = _Storage(array, bf16)
            return cache[key]

        return _RestrictedUnpickler(io.BytesIO(zf.read(pkl[0])), load_storage).load()


# ----------------------------------------------------------------------------------------------------
# safetensors: the `safetensors` package writes and validates the format; kept here is what it lacks
# for us: bfloat16 <-> float32 (numpy has no bfloat16), memory-mapped reading (a 2.7 GB Latte-XL file
# is loaded one tensor at a time), the atomic write, and a checksum over header and data.
# ----------------------------------------------------------------------------------------------------

# safetensors dtype -> numpy dtype of the stored bytes ("BF16" is widened to float32 on reading).
_ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16,
              "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
              "BOOL": np.bool_}
_ST_NAMES = {np.dtype(v): k for k, v in _ST_DTYPES.items() if k != "BF16"}
CHECKSUM_KEY = "checksum"
_CHUNK = 1 << 24


def float32_to_bf16(array):
    """float32 -> raw bfloat16 bits (uint16), rounding to nearest even as torch does; NaN stays NaN."""
    bits = np.ascontiguousarray(array, dtype=np.float32).view(np.uint32)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    return np.where(np.isnan(array), np.uint16(0x7FC0), rounded).astype(np.uint16)


def read_header(path):
    """(tensor entries {name: {"dtype", "shape", "data_offsets"}}, metadata, offset of the data). The
    package validates the layout (offsets, sizes, file length); the offsets it does not expose are
    read from the JSON header. Raises CheckpointFormatError naming the file."""
    from safetensors import SafetensorError, safe_open

    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                raise CheckpointFormatError(f"{path}: header length {n} exceeds the file: truncated or not "
                                            f"a safetensors file")
            header = json.loads(f.read(n))
        end = max((info["data_offsets"][1] for name, info in header.items() if name != "__metadata__"), default=0)
        if size < 8 + n + end:
            raise CheckpointFormatError(f"{path}: {size} bytes but the header describes {8 + n + end}: truncated")
        with safe_open(path, "np") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError, ValueError, struct.error, KeyError, TypeError, IndexError, AttributeError) as err:
        if isinstance(err, CheckpointFormatError):
            raise
        problem = first_line(err)
        raise CheckpointFormatError(f"{path}: damaged or not a safetensors file ({problem})") from None
    header.pop("__metadata__", None)
    return header, metadata, 8 + n


def map_safetensors(path, prefix=""):
    """{name: array} of the tensors whose names start with `prefix`, memory-mapped read-only (BF16
    widened to float32 in memory): callers copy one tensor at a time, so no second copy of the file."""
    header, _, start = read_header(path)
    mapped = np.memmap(path, np.uint8, mode="r") if os.path.getsize(path) > start else np.zeros(0, np.uint8)
    out = collections.OrderedDict()
    for name, info in header.items():
        if name.startswith(prefix):
            begin, end = (start + o for o in info["data_offsets"])
            array = mapped[begin:end].view(_ST_DTYPES[info["dtype"]]).reshape(info["shape"])
            out[name] = bf16_to_float32(array) if info["dtype"] == "BF16" else array
    return out


def read_safetensors(path, with_metadata=False):
    """{name: ndarray} (own memory) of a safetensors file, and its metadata if asked."""
    tensors = collections.OrderedDict((k, np.array(v)) for k, v in map_safetensors(path).items())
    return (tensors, read_header(path)[1]) if with_metadata else tensors


def fsync_dir(folder):
    """fsync a folder, so that a rename into it survives a power cut (best effort: some file
    systems cannot open a folder for it)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path, write, prefix=None, suffix=".tmp", check=None):
    """Call `write(temp_path)`, fsync the temp file, `check(temp_path)` if given, then rename it over
    `path` and fsync the folder: a crash or a failed check leaves the old file (or none), never a
    partial or unchecked one. The temp file lies in the same folder (so the rename is atomic)."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=prefix or f".{os.path.basename(path)}.", suffix=suffix, dir=folder)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a weights file is an ordinary file
        if check is not None:
            check(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    fsync_dir(folder)


def _stored(array, bf16):
    """(contiguous little-endian array of the bytes to store, safetensors dtype name)."""
    array = np.asarray(array)
    if bf16 and np.issubdtype(array.dtype, np.floating):
        return float32_to_bf16(array), "BF16"
    if array.dtype not in _ST_NAMES:
        raise ValueError(f"dtype {array.dtype} cannot be stored in safetensors")
    return np.ascontiguousarray(array.astype(array.dtype.newbyteorder("<"), copy=False)), _ST_NAMES[array.dtype]


def _header_digest(entries, metadata):
    """The canonical JSON of what the header says (names, dtypes, shapes, metadata but the checksum):
    the checksum covers it, so an edited shape or sampler position fails like a flipped data bit."""
    described = {name: [info["dtype"], list(info["shape"])] for name, info in entries.items()}
    meta = {k: v for k, v in metadata.items() if k != CHECKSUM_KEY}
    return json.dumps([described, meta], sort_keys=True, separators=(",", ":")).encode()


def write_safetensors(path, tensors, metadata=None, dtype="fp32", prefix=None, suffix=".tmp", check=None):
    """Write `{name: ndarray}` atomically (`atomic_write`), with string metadata and a checksum of
    header and data under "checksum". dtype "bf16" stores floating tensors as bfloat16 (others as
    they are). `prefix`, `suffix` and `check` go to `atomic_write`. The package writes straight from the arrays' memory: no second copy of the file."""
    arrays, entries = {}, {}
    for name, value in tensors.items():
        try:
            arrays[name], st_dtype = _stored(value, dtype == "bf16")
        except ValueError as err:
            raise ValueError(f"tensor {name!r}: {err}") from None
        entries[name] = {"dtype": st_dtype, "shape": list(arrays[name].shape)}
    metadata = {str(k): str(v) for k, v in (metadata or {}).items()}
    crc = zlib.crc32(_header_digest(entries, metadata))
    for name in sorted(arrays):
        crc = zlib.crc32(arrays[name].reshape(-1).view(np.uint8), crc)
    metadata[CHECKSUM_KEY] = f"crc32:{crc:08x}"

    def write(tmp):
        from safetensors import TensorSpec, serialize_file
        specs = {name: TensorSpec(dtype="bfloat16" if entries[name]["dtype"] == "BF16" else a.dtype.name,
                                  shape=a.shape, data_ptr=a.ctypes.data, data_len=a.nbytes)
                 for name, a in arrays.items()}
        serialize_file(specs, tmp, metadata=metadata)

    atomic_write(path, write, prefix=prefix, suffix=suffix, check=check)


def verify_checksum(path):
    """Check the checksum of a file `write_safetensors` wrote (or a format-1 training checkpoint's,
    which covers the data only), reading the data in chunks. Returns the metadata; raises
    CheckpointFormatError naming the file if it fails or has no checksum."""
    entries, metadata, start = read_header(path)
    stored = metadata.get(CHECKSUM_KEY)
    if stored is None:
        raise CheckpointFormatError(f"{path}: has no checksum")
    if metadata.get("format") in DATA_ONLY_CHECKSUM_FORMATS:
        crc = _data_only_crc(path, start)
    else:
        crc = zlib.crc32(_header_digest(entries, metadata))
        with open(path, "rb") as f:
            for name in sorted(entries):
                begin, end = entries[name]["data_offsets"]
                f.seek(start + begin)
                while begin < end:
                    chunk = f.read(min(_CHUNK, end - begin))
                    if not chunk:
                        break
                    crc, begin = zlib.crc32(chunk, crc), begin + len(chunk)
    if f"crc32:{crc:08x}" != stored:
        raise CheckpointFormatError(f"{path}: checksum mismatch: the file is corrupt")
    return metadata


# Training checkpoints of format 1 checksummed the bytes after the header only; such runs still
# resume (trainer/checkpoint.py) and sample, so every reader checks them the same way.
DATA_ONLY_CHECKSUM_FORMATS = ("latte-ms-train/1",)


def _data_only_crc(path, start):
    crc = 0
    with open(path, "rb") as f:
        f.seek(start)
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return crc


def verify_if_checksummed(path):
    """Refuse (CheckpointFormatError) a damaged file this project wrote, i.e. one that carries a
    checksum; a safetensors file written elsewhere has none and is only checked for its layout."""
    if CHECKSUM_KEY in read_header(path)[1]:
        verify_checksum(path)


# ----------------------------------------------------------------------------------------------------
# the step files of a training run: `latte train --resume auto` and `latte sample --checkpoint RUN`
# ----------------------------------------------------------------------------------------------------

STEP_FILE = re.compile(r"^step_(\d+)\.safetensors$")


def step_checkpoints(folder):
    """[(step, path)] of the `step_<n>.safetensors` files in `folder`, newest first (not verified)."""
    if not os.path.isdir(folder):
        return []
    found = [(int(m.group(1)), os.path.join(folder, name)) for name in os.listdir(folder)
             if (m := STEP_FILE.match(name))]
    return sorted(found, reverse=True)


def newest_good_checkpoint(folder, verify=verify_if_checksummed, warn=None, errors=(CheckpointFormatError,)):
    """(path, what `verify` returned) of the newest step file in `folder` that `verify` accepts, or
    (None, None). Each newer one it refuses (raising one of `errors`, whose message names the file) is
    skipped with a warning: a run killed mid-save, or a file damaged since, costs one checkpoint."""
    warn = warn or (lambda msg: print(msg, file=sys.stderr, flush=True))
    for _, path in step_checkpoints(folder):
        try:
            return path, verify(path)
        except errors as err:
            warn(f"warning: skipping checkpoint {err}")
    return None, None


# ----------------------------------------------------------------------------------------------------
# entry points
# ----------------------------------------------------------------------------------------------------

def read_checkpoint(path):
    """The whole object stored in a torch file (dicts, lists, numbers, numpy arrays for tensors), or
    the tensors of a safetensors file as a dict."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    if path.endswith(".safetensors"):
        return read_safetensors(path)
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as f:
            magic = f.read(8)
        if magic[:1] == b"\x80":
            raise CheckpointFormatError(
                f"{path}: legacy (pre-1.6) torch format; re-save it with torch.save(..., "
                f"_use_new_zipfile_serialization=True) or as .safetensors")
        if len(magic) == 8 and struct.unpack("<Q", magic)[0] < 100_000_000:
            return read_safetensors(path)  # safetensors under another extension
        raise CheckpointFormatError(f"{path}: neither a torch zip checkpoint nor a safetensors file")
    try:
        return _read_torch_zip(path)
    except (UnsafeCheckpointError, CheckpointFormatError):
        raise
    except (pickle.UnpicklingError, zipfile.BadZipFile, KeyError, EOFError, struct.error) as err:
        raise CheckpointFormatError(f"{path}: damaged checkpoint ({type(err).__name__}: {err})") from None


def read_state_dict(path):
    """`{name: np.ndarray}` of the tensors in a torch or safetensors file, flattening nested dicts
    with dots (so `{"ema": {"w": t}}` gives `"ema.w"`). Non-tensor leaves are dropped."""
    return flatten(read_checkpoint(path))[0]


def flatten(obj, min_ndim=0):
    """({dotted name: ndarray} of the arrays of at least `min_ndim` dimensions in a nested dict, [the
    names of the other leaves]): `{"ema": {"w": t}}` gives `"ema.w"`."""
    tensors, others = collections.OrderedDict(), []

    def walk(prefix, value):
        if isinstance(value, np.ndarray) and value.ndim >= min_ndim:
            tensors[prefix] = value
        elif isinstance(value, dict):
            for key, sub in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), sub)
        else:
            others.append(prefix or "<root>")

    walk("", obj)
    return tensors, others
