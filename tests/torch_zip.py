"""Write real `torch.save` zip files without torch, for tests.

The format (torch >= 1.6): a zip archive (entries stored, not compressed) holding `<stem>/data.pkl`,
a protocol-2 pickle of the object graph in which every tensor is
`torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad, OrderedDict())` and every
storage is a persistent id `("storage", torch.FloatStorage, "<key>", "cpu", numel)` whose bytes lie in
`<stem>/data/<key>`, 64-byte aligned; plus small `byteorder`, `version` and `.format_version` entries.

torch is not installed, so the torch globals are written as raw GLOBAL opcodes (`_Global`) instead of
being looked up by the pickler. Anything else in the object (dicts, numbers, or a malicious object
with `__reduce__`) is pickled as usual, which is how the tests build hostile files.

    save_torch_zip(path, {"ema": {"w": np.ones((2, 3), np.float32)}})
    save_torch_zip(path, {"w": TensorView(buffer, offset=7, shape=(2, 3))})  # views share a storage
"""
import collections
import os
import pickle
import zipfile

import numpy as np

_STORAGE_NAMES = {
    np.dtype(np.float32): "FloatStorage", np.dtype(np.float64): "DoubleStorage",
    np.dtype(np.float16): "HalfStorage", np.dtype(np.int64): "LongStorage",
    np.dtype(np.int32): "IntStorage", np.dtype(np.int16): "ShortStorage",
    np.dtype(np.int8): "CharStorage", np.dtype(np.uint8): "ByteStorage", np.dtype(np.bool_): "BoolStorage",
}


class _Global:
    """A reference to `module.name` written as a GLOBAL opcode (the object itself need not exist)."""

    def __init__(self, module, name):
        self.module, self.name = module, name

    def __call__(self, *args):  # pickle only accepts callables as reduce functions
        raise NotImplementedError


_REBUILD = _Global("torch._utils", "_rebuild_tensor_v2")


class TensorView:
    """A tensor that is a view into `buffer` (a flat numpy array shared with other views), as
    `torch.save` writes slices of one storage: one storage entry, several tensors."""

    def __init__(self, buffer, offset, shape):
        assert buffer.ndim == 1 and offset + int(np.prod(shape)) <= buffer.size
        self.buffer, self.offset, self.shape = buffer, int(offset), tuple(int(n) for n in shape)


class _Pickler(pickle._Pickler):  # the pure-Python pickler lets us add a dispatch entry
    dispatch = pickle._Pickler.dispatch.copy()

    def __init__(self, file):
        super().__init__(file, protocol=2)
        self.storages = {}  # id(flat array) -> (key, flat array)

    def _save_global_ref(self, obj):
        self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())
        self.memoize(obj)

    dispatch[_Global] = _save_global_ref

    def _storage_key(self, flat):
        if id(flat) not in self.storages:
            self.storages[id(flat)] = (str(len(self.storages)), flat)
        return self.storages[id(flat)][0]

    def _save_tensor(self, flat, offset, shape):
        strides = tuple(int(np.prod(shape[i + 1:])) for i in range(len(shape)))
        storage = _StorageRef(flat, self._storage_key(flat))
        self.save_reduce(_REBUILD, (storage, offset, shape, strides, False, collections.OrderedDict()),
                         obj=None)

    def _save_ndarray(self, array):
        flat = np.ascontiguousarray(array).reshape(-1)
        self._save_tensor(flat, 0, tuple(array.shape))

    def _save_view(self, view):
        self._save_tensor(view.buffer, view.offset, view.shape)

    dispatch[np.ndarray] = _save_ndarray
    dispatch[TensorView] = _save_view

    def persistent_id(self, obj):
        if isinstance(obj, _StorageRef):
            name = _STORAGE_NAMES[obj.flat.dtype]
            return ("storage", _Global("torch", name), obj.key, "cpu", obj.flat.size)
        return None


class _StorageRef:
    def __init__(self, flat, key):
        self.flat, self.key = flat, key


def _write_aligned(zf, name, data, alignment=64):
    """Store `data` so that its bytes start at a multiple of `alignment` in the file, padding the
    local header's extra field the way torch does (field id "FB", filled with "Z")."""
    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_STORED
    header_end = zf.fp.tell() + 30 + len(name.encode())
    pad = -(header_end + 4) % alignment
    info.extra = b"FB" + pad.to_bytes(2, "little") + b"Z" * pad
    zf.writestr(info, data)


def save_torch_zip(path, obj, stem=None):
    """Write `obj` (nested dicts/lists of numpy arrays, `TensorView`s and plain values) to `path` in the
    torch zip format. Returns the path."""
    import io

    stem = stem or os.path.splitext(os.path.basename(path))[0]
    buf = io.BytesIO()
    pickler = _Pickler(buf)
    pickler.dump(obj)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        _write_aligned(zf, f"{stem}/data.pkl", buf.getvalue())
        _write_aligned(zf, f"{stem}/.format_version", b"1")
        _write_aligned(zf, f"{stem}/.storage_alignment", b"64")
        _write_aligned(zf, f"{stem}/byteorder", b"little")
        for key, flat in pickler.storages.values():
            _write_aligned(zf, f"{stem}/data/{key}", flat.astype(flat.dtype.newbyteorder("<")).tobytes())
        _write_aligned(zf, f"{stem}/version", b"3\n")
        _write_aligned(zf, f"{stem}/.data/serialization_id", b"0" * 40)
    return path
