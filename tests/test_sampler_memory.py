"""Memory of `latte sample` beyond the sampler's own tests: dropping the library pages the process no
longer runs (models.runtime.drop_clean_library_pages) loses nothing and lowers the file-backed RSS."""
import ctypes
import mmap
import os
import subprocess
import sys
from pathlib import Path

import pytest

from models.runtime import _clean_library_mappings, drop_clean_library_pages, rss_split

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps")

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]


def _map_private(path, size, writable):
    fd = os.open(path, os.O_RDONLY)
    try:
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        addr = _libc.mmap(None, size, prot, mmap.MAP_PRIVATE, fd, 0)
    finally:
        os.close(fd)
    assert addr not in (None, ctypes.c_void_p(-1).value)
    return addr


def test_dropping_library_pages_keeps_written_copies_and_maps_clean_pages_again_with_the_same_bytes(tmp_path):
    """A relocated read-only segment (written, then made read-only: RELRO) holds the only copy of its
    bytes and must not be dropped; a clean read-only mapping is dropped and reads back the file."""
    size = 4 * mmap.PAGESIZE
    path = tmp_path / "lib.bin"
    with open(path, "wb") as f:
        f.write(bytes(range(256)) * (size // 256))
        f.flush()
        os.fsync(f.fileno())  # written back: a dirty page-cache page counts as Private_Dirty, and is kept
    clean = _map_private(str(path), size, writable=False)
    relro = _map_private(str(path), size, writable=True)
    try:
        ctypes.memset(relro, 7, size)  # copy-on-write: anonymous pages now hold these bytes
        assert _libc.mprotect(relro, size, mmap.PROT_READ) == 0
        assert ctypes.string_at(clean, size)[:4] == b"\x00\x01\x02\x03"  # resident now
        ranges = _clean_library_mappings()
        assert any(start <= clean < end for start, end in ranges)
        assert not any(start <= relro < end for start, end in ranges)
        assert not any(start <= id(object()) < end for start, end in ranges)  # the heap: anonymous
        os.environ.pop("LATTE_DROP_LIBRARY_PAGES", None)
        drop_clean_library_pages()
        assert ctypes.string_at(relro, size) == b"\x07" * size
        assert ctypes.string_at(clean, size) == path.read_bytes()
    finally:
        _libc.munmap(clean, size)
        _libc.munmap(relro, size)


def test_setup_device_drops_the_library_pages_of_the_import_and_results_stay_bit_equal():
    """In a fresh process: `import mindspore` leaves >100 MB of file pages resident that setup_device
    drops; a network call after another drop gives the bytes it gave before; LATTE_DROP_LIBRARY_PAGES=0
    keeps them."""
    code = """
import numpy as np
from models.runtime import setup_device, drop_clean_library_pages, rss_split  # imports mindspore
file_mb = rss_split()["RssFile"]
setup_device("CPU", "pynative", 1)
after_setup = rss_split()["RssFile"]
import mindspore as ms
from models.latte import Latte
net = Latte(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_frames=4)
x = ms.Tensor(np.random.default_rng(0).standard_normal((1, 4, 4, 8, 8)).astype(np.float32))
t = ms.Tensor(np.array([7], np.int32))
before = net(x, t).asnumpy()
dropped = drop_clean_library_pages()
print(file_mb, after_setup, dropped, int(np.array_equal(net(x, t).asnumpy(), before)))
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "LATTE_COMPILE_CACHE": "0"}
    env.pop("LATTE_DROP_LIBRARY_PAGES", None)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    file_mb, after_setup, dropped, same = map(float, run.stdout.split()[-4:])
    print(f"file RSS {file_mb:.0f} MB after the import, {after_setup:.0f} MB after setup_device; "
          f"{dropped:.0f} MB dropped after a network call")
    assert after_setup < file_mb - 100 and dropped > 0
    assert same == 1
    kept = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=600,
                          env={**env, "LATTE_DROP_LIBRARY_PAGES": "0"})
    assert kept.returncode == 0, kept.stderr[-2000:]
    file_mb, after_setup, dropped, same = map(float, kept.stdout.split()[-4:])
    assert dropped == 0.0 and after_setup >= file_mb - 5 and same == 1
