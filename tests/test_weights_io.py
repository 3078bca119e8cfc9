"""The one weights I/O module (models.checkpoint_io on the safetensors package) and the training
checkpoints on top of it: bf16 writing, the atomic write, and a checksum that covers the header
(names, shapes, metadata such as the sampler position) as well as the data."""
import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest

from models.checkpoint_io import (CheckpointFormatError, float32_to_bf16, read_header, read_safetensors,
                                  verify_checksum, write_safetensors)
from trainer import checkpoint as ckpt


def _write_checkpoint(folder, step, position=5):
    path = ckpt.checkpoint_path(folder, step)
    ckpt.save(path, {"model.w": np.arange(12, dtype=np.float32).reshape(3, 4), "ema.w": np.ones((3, 4), np.float32)},
              {"step": step, "sampler": {"draw": 40, "position": position}}, {"model_name": "Latte-S/2"})
    return path


def _edit_header(path, old, new):
    """Replace `old` by `new` (same length) inside the JSON header, as a stray write or a hand edit would."""
    raw = bytearray(Path(path).read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    header = raw[8:8 + n].decode()
    assert header.count(old) == 1 and len(old) == len(new), header
    raw[8:8 + n] = header.replace(old, new).encode()
    Path(path).write_bytes(bytes(raw))


def test_checksum_covers_a_tensor_shape_in_the_header(tmp_path):
    good, edited = _write_checkpoint(tmp_path, 10), _write_checkpoint(tmp_path, 20)
    _edit_header(edited, '"model.w":{"dtype":"F32","shape":[3,4]', '"model.w":{"dtype":"F32","shape":[4,3]')
    warnings = []
    path, meta = ckpt.find_resume(tmp_path, warn=warnings.append)
    assert path == good and meta["state"]["step"] == 10
    assert len(warnings) == 1 and "step_0000020.safetensors: checksum mismatch" in warnings[0]


def test_checksum_covers_the_sampler_position_in_the_metadata(tmp_path):
    good, edited = _write_checkpoint(tmp_path, 10), _write_checkpoint(tmp_path, 20, position=5)
    _edit_header(edited, '\\"position\\": 5', '\\"position\\": 7')
    assert json.loads(read_header(edited)[1][ckpt.STATE_KEY])["sampler"]["position"] == 7  # still parses
    warnings = []
    path, _ = ckpt.find_resume(tmp_path, warn=warnings.append)
    assert path == good
    assert "step_0000020.safetensors: checksum mismatch" in warnings[0]


def test_checksum_covers_the_data(tmp_path):
    path = _write_checkpoint(tmp_path, 10)
    raw = bytearray(Path(path).read_bytes())
    raw[-3] ^= 0x01  # one bit of the last tensor
    Path(path).write_bytes(bytes(raw))
    with pytest.raises(ckpt.CheckpointError, match="checksum mismatch"):
        ckpt.verify(path)


def test_legacy_data_only_checkpoints_still_resume(tmp_path):
    """Format 1 checksummed the data section only: such a run can still be resumed."""
    import zlib
    path = ckpt.checkpoint_path(tmp_path, 10)
    data = np.ones((3, 4), np.float32)
    state = json.dumps({"step": 10}, sort_keys=True)
    meta = {"format": "latte-ms-train/1", ckpt.STATE_KEY: state, ckpt.CONFIG_KEY: "{}", ckpt.NET_KEY: "{}",
            "checksum": f"crc32:{zlib.crc32(data.tobytes()):08x}", "data_bytes": str(data.nbytes)}
    head = json.dumps({"model.w": {"dtype": "F32", "shape": [3, 4], "data_offsets": [0, 48]},
                       "__metadata__": meta}).encode()
    head += b" " * (-len(head) % 8)
    os.makedirs(os.path.dirname(path))
    Path(path).write_bytes(struct.pack("<Q", len(head)) + head + data.tobytes())
    assert ckpt.verify(path)["state"]["step"] == 10


def test_write_safetensors_stores_bf16_rounded_to_nearest_even(tmp_path):
    values = np.array([1.0, -2.5, 1 + 2 ** -8, 1 + 3 * 2 ** -8, 3.0e38, np.nan], np.float32)
    path = tmp_path / "w.safetensors"
    write_safetensors(path, {"w": values, "steps": np.arange(3, dtype=np.int64)}, dtype="bf16")
    entries, _, _ = read_header(path)
    assert entries["w"]["dtype"] == "BF16" and entries["steps"]["dtype"] == "I64"  # integers stay as they are
    back = read_safetensors(path)
    # 1 + 2^-8 is halfway between two bf16 values: ties go to the even one (1.0); 1 + 3*2^-8 rounds up.
    np.testing.assert_array_equal(back["w"][:4], np.array([1.0, -2.5, 1.0, 1 + 2 ** -6], np.float32))
    assert np.isclose(back["w"][4], 3.0e38, rtol=2 ** -8) and np.isnan(back["w"][5])
    np.testing.assert_array_equal(back["steps"], np.arange(3))
    np.testing.assert_array_equal(float32_to_bf16(np.float32([1.0])), np.uint16([0x3F80]))
    verify_checksum(path)


def test_a_failed_check_leaves_neither_the_file_nor_a_temp(tmp_path):
    path = tmp_path / "w.safetensors"

    def refuse(tmp):
        assert os.path.exists(tmp)
        raise ValueError("does not load")

    with pytest.raises(ValueError, match="does not load"):
        write_safetensors(path, {"w": np.ones(3, np.float32)}, check=refuse)
    assert os.listdir(tmp_path) == []


def test_a_truncated_file_is_named_as_truncated(tmp_path):
    path = tmp_path / "w.safetensors"
    write_safetensors(path, {"w": np.ones(64, np.float32)})
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 4)
    with pytest.raises(CheckpointFormatError, match="w.safetensors: .*truncated"):
        read_header(path)
