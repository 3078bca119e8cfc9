"""The newest good step file of a run folder: one helper (models.checkpoint_io.newest_good_checkpoint)
behind `latte train --resume auto` (trainer.checkpoint.find_resume) and `latte sample --checkpoint RUN`
(sampler.sample.resolve_checkpoint)."""
import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest

from models.checkpoint_io import CheckpointFormatError, newest_good_checkpoint, step_checkpoints, write_safetensors
from models.config import ConfigError
from sampler.sample import resolve_checkpoint
from trainer import checkpoint as ckpt


def _legacy_checkpoint(path, step):
    """A format-1 training checkpoint as that version wrote it: its checksum covers the data only."""
    data = np.full((3, 4), step, np.float32)
    meta = {"format": "latte-ms-train/1", ckpt.STATE_KEY: json.dumps({"step": step}), ckpt.CONFIG_KEY: "{}",
            ckpt.NET_KEY: "{}", "checksum": f"crc32:{zlib.crc32(data.tobytes()):08x}", "data_bytes": str(data.nbytes)}
    head = json.dumps({"model.w": {"dtype": "F32", "shape": [3, 4], "data_offsets": [0, 48]},
                       "__metadata__": meta}).encode()
    head += b" " * (-len(head) % 8)
    Path(path).write_bytes(struct.pack("<Q", len(head)) + head + data.tobytes())


def _run_folder(tmp_path):
    """checkpoints/ with a legacy step 10, a good step 20 whose newest neighbour step 30 has one data
    bit flipped, and files that are not step files."""
    folder = tmp_path / "run" / "checkpoints"
    folder.mkdir(parents=True)
    _legacy_checkpoint(folder / "step_0000010.safetensors", 10)
    for step in (20, 30):
        ckpt.save(str(folder / f"step_{step:07d}.safetensors"), {"model.w": np.full((3, 4), step, np.float32)},
                  {"step": step}, {})
    raw = bytearray((folder / "step_0000030.safetensors").read_bytes())
    raw[-3] ^= 0x01
    (folder / "step_0000030.safetensors").write_bytes(bytes(raw))
    (folder / "step_latest.safetensors").write_bytes(b"not a step file")
    (folder / ".step_0000040.safetensors.tmp").write_bytes(b"a killed save")
    return folder


def test_newest_good_checkpoint_skips_a_damaged_newest_file_with_a_warning_naming_it(tmp_path):
    folder = _run_folder(tmp_path)
    assert [s for s, _ in step_checkpoints(folder)] == [30, 20, 10]
    warnings = []
    path, _ = newest_good_checkpoint(folder, warn=warnings.append)
    assert path == str(folder / "step_0000020.safetensors")
    assert len(warnings) == 1 and "warning: skipping checkpoint" in warnings[0]
    assert "step_0000030.safetensors: checksum mismatch" in warnings[0]
    # the trainer's resume choice and the sampler's are the same file, with the same warning
    trainer_warnings = []
    assert ckpt.find_resume(folder.parent, warn=trainer_warnings.append)[0] == path
    assert trainer_warnings == warnings
    sampler_warnings = []
    assert resolve_checkpoint(str(folder.parent), warn=sampler_warnings.append) == path
    assert sampler_warnings == warnings


def test_newest_good_checkpoint_accepts_a_legacy_data_only_checksum_in_trainer_and_sampler(tmp_path):
    folder = _run_folder(tmp_path)
    for step in (20, 30):
        os.remove(folder / f"step_{step:07d}.safetensors")
    legacy = str(folder / "step_0000010.safetensors")
    warnings = []
    assert newest_good_checkpoint(folder, warn=warnings.append)[0] == legacy and warnings == []
    path, meta = ckpt.find_resume(folder.parent, warn=warnings.append)
    assert path == legacy and meta["state"]["step"] == 10
    assert resolve_checkpoint(str(folder.parent), warn=warnings.append) == legacy  # refused before: the
    assert resolve_checkpoint(legacy, warn=warnings.append) == legacy  # sampler checked format 2's checksum
    assert warnings == []
    # its checksum still covers its data: one flipped bit and no reader takes it
    raw = bytearray(Path(legacy).read_bytes())
    raw[-1] ^= 0x01
    Path(legacy).write_bytes(bytes(raw))
    with pytest.raises(CheckpointFormatError, match="checksum mismatch"):
        newest_good_checkpoint(folder, warn=warnings.append, errors=())
    assert ckpt.find_resume(folder.parent, warn=warnings.append) == (None, None)
    with pytest.raises(ConfigError, match="holds no undamaged step_"):
        resolve_checkpoint(str(folder.parent), warn=warnings.append)


def test_newest_good_checkpoint_of_a_folder_without_step_files_is_none(tmp_path):
    assert newest_good_checkpoint(tmp_path / "missing") == (None, None)
    write_safetensors(tmp_path / "weights.safetensors", {"w": np.zeros(2, np.float32)})
    assert newest_good_checkpoint(tmp_path) == (None, None) and step_checkpoints(tmp_path) == []
