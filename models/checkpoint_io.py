"""Read PyTorch checkpoints and safetensors files into numpy, without torch and without running code.

A `.pt` / `.pth` / `.bin` file written by `torch.save` (since torch 1.6) is a zip archive holding
`<name>/data.pkl` (a pickle of the object graph) and `<name>/data/<key>` (raw tensor storages).
Unpickling an untrusted file with the stock `pickle` module can run arbitrary code (`__reduce__`), so
`read_checkpoint` uses an unpickler that resolves only the handful of globals that tensor storage
needs, each mapped to a pure-numpy stand-in. Any other global is refused before it is called.

`.safetensors` is an 8-byte header length, a JSON header and raw little-endian bytes; it is read and
written here directly so the `safetensors` package is not needed either.
"""
import collections
import io
import json
import os
import pickle
import struct
import zipfile

import numpy as np


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
# safetensors
# ----------------------------------------------------------------------------------------------------

_ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": "bfloat16",
              "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
              "BOOL": np.bool_}
_ST_NAMES = {np.dtype(v): k for k, v in _ST_DTYPES.items() if v != "bfloat16"}


def read_safetensors(path, with_metadata=False):
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise CheckpointFormatError(f"{path}: too short to be a safetensors file")
        (n,) = struct.unpack("<Q", head)
        if n > 100_000_000:
            raise CheckpointFormatError(f"{path}: header length {n} is implausible: not a safetensors file")
        try:
            header = json.loads(f.read(n))
        except ValueError:
            raise CheckpointFormatError(f"{path}: header is not JSON: not a safetensors file") from None
        data = f.read()
    metadata = header.pop("__metadata__", None) or {}
    tensors = collections.OrderedDict()
    for name, info in header.items():
        begin, end = info["data_offsets"]
        if end > len(data):
            raise CheckpointFormatError(f"{path}: tensor {name!r} lies past the end of the file (truncated?)")
        kind = _ST_DTYPES.get(info["dtype"])
        if kind is None:
            raise CheckpointFormatError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
        raw = np.frombuffer(data[begin:end], dtype=np.uint16 if kind == "bfloat16" else kind)
        array = bf16_to_float32(raw) if kind == "bfloat16" else raw.copy()
        tensors[name] = array.reshape(info["shape"])
    return (tensors, metadata) if with_metadata else tensors


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


def write_safetensors(path, tensors, metadata=None):
    """Write `{name: ndarray}` atomically (temp file, fsync, rename). Metadata values must be strings.
    Tensors are written one at a time, so no second copy of the whole file is held in memory."""
    header, offset, arrays = {}, 0, []
    for name, array in tensors.items():
        array = np.asarray(array)
        if array.dtype not in _ST_NAMES:
            raise ValueError(f"tensor {name!r}: dtype {array.dtype} cannot be stored in safetensors")
        header[name] = {"dtype": _ST_NAMES[array.dtype], "shape": list(array.shape),
                        "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
        arrays.append(array)
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the format aligns the data start to 8 bytes
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for array in arrays:
            little = array.astype(array.dtype.newbyteorder("<"), copy=False)
            f.write(np.ascontiguousarray(little).data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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
    obj = read_checkpoint(path)
    flat = collections.OrderedDict()

    def walk(prefix, value):
        if isinstance(value, np.ndarray):
            flat[prefix] = value
        elif isinstance(value, dict):
            for key, sub in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), sub)

    walk("", obj)
    return flat
