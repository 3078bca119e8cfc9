"""cache_store: round trips in both formats, clip reads, settings checks, crash safety, shards, CLI."""
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import cache_store
from cache_store import cli, zarr_backend
from cache_store.manifest import CorruptEntryError
from cache_store.mindrecord_backend import page_layout

ROOT = Path(__file__).resolve().parents[1]
SHAPE = (4, 4, 4)  # latent C, h, w: tiny, the layout logic does not care
SETTINGS = {"vae_sha256": "ab" * 32, "scale_factor": 0.18215, "image_size": 32, "crop": "center",
            "latent_shape": list(SHAPE)}
SMALL = {"chunk_frames": 16, "shard_frames": 64, "segment_frames": 16, "page_bytes": 1 << 15}


def latents(i, n=None):
    """Deterministic (mean, std) of entry i, float32 (n, C, h, w)."""
    rng = np.random.default_rng(i)
    n = n or 5 + (i * 7) % 40
    return (rng.standard_normal((n, *SHAPE)).astype(np.float32),
            rng.uniform(0.01, 1.0, (n, *SHAPE)).astype(np.float32))


def make(path, fmt="zarr", dtype="float16", **layout):
    return cache_store.create_or_open(path, {**SETTINGS, "dtype": dtype}, format=fmt, **{**SMALL, **layout})


def as_stored(x, dtype):
    return x.astype(dtype).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# Round trips and clip reads
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["zarr", "mindrecord"])
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_round_trip_whole_and_streamed_entries(tmp_path, fmt, dtype):
    store = make(tmp_path / "c", fmt, dtype)
    data = {f"e{i}": latents(i) for i in range(6)}
    data["long"] = latents(99, n=150)  # spans shards (64 rows) and many segments
    with store.writer(commit_every=3) as w:
        for k, (m, s) in data.items():
            if k == "long":  # streamed in uneven pieces, as the ingest does for a long video
                w.begin_entry(k, {"source": "/v/long.mp4", "kind": "video"})
                for j in range(0, len(m), 37):
                    w.append(m[j:j + 37], s[j:j + 37])
                w.commit_entry({"source_bytes": 1234, "fps": 25})
            else:
                w.write_entry(k, m, s, {"source": f"/frames/{k}", "kind": "frames"})
    store = cache_store.open(tmp_path / "c")
    table = store.entries()
    assert table.column_names == cache_store.SCHEMA.names
    rows = {r["id"]: r for r in table.to_pylist()}
    assert set(rows) == set(data) and all(r["status"] == "ok" for r in rows.values())
    assert rows["long"]["num_frames"] == 150 and rows["long"]["source_bytes"] == 1234
    assert rows["long"]["extra"] == '{"fps": 25}' and rows["e0"]["kind"] == "frames"
    assert rows["e0"]["checksum"].startswith("sha256:") and rows["e0"]["encode_seconds"] >= 0
    for k, (m, s) in data.items():
        gm, gs = store.read_entry(k)
        assert gm.dtype == np.float32 and gm.shape == m.shape
        np.testing.assert_array_equal(gm, as_stored(m, dtype))
        np.testing.assert_array_equal(gs, as_stored(s, dtype))
    m, s = data["long"]
    clips = [(0, 16, 1), (15, 16, 1), (16, 16, 1), (63, 2, 1), (60, 16, 3), (3, 5, 29), (149, 1, 1)]
    for start, n, stride in clips:  # chunk (16) and shard (64) boundaries, strides, the last frame
        gm, gs = store.read_clip("long", start, n, stride)
        np.testing.assert_array_equal(gm, as_stored(m[start:start + (n - 1) * stride + 1:stride], dtype))
        np.testing.assert_array_equal(gs, as_stored(s[start:start + (n - 1) * stride + 1:stride], dtype))
    assert store.verify() == []


def test_checksum_is_the_same_in_both_formats(tmp_path):
    sums = []
    for fmt in ("zarr", "mindrecord"):
        store = make(tmp_path / fmt, fmt)
        with store.writer() as w:
            w.write_entry("a", *latents(1, n=40))
        sums.append(store.entries().to_pylist()[0]["checksum"])
    assert sums[0] == sums[1]


def test_clip_outside_the_entry_is_a_clear_error(tmp_path):
    store = make(tmp_path / "c")
    with store.writer() as w:
        w.write_entry("a", *latents(1, n=20))
        w.record_failure("b", "failed", "cannot decode frame 3")
    with pytest.raises(ValueError, match="does not fit entry 'a' of 20 frames"):
        store.read_clip("a", 10, 16)
    with pytest.raises(ValueError, match="no entry 'zzz'"):
        store.read_clip("zzz", 0, 1)
    with pytest.raises(ValueError, match="'b' is failed"):
        store.read_clip("b", 0, 1)


def test_fast_reader_equals_zarr_reader(tmp_path):
    store = make(tmp_path / "c")
    with store.writer() as w:
        for i in range(5):
            w.write_entry(f"e{i}", *latents(i, n=50))
    reader = store._reader
    loc = store.entry("e0")["location"]
    rng = np.random.default_rng(0)
    for _ in range(20):
        rows = np.sort(rng.choice(250, size=rng.integers(1, 40), replace=False))
        reader.use_fast_path = True
        fast = reader.read(loc, rows)
        reader.use_fast_path = False
        np.testing.assert_array_equal(fast, reader.read(loc, rows))
    assert reader._fast[loc] == (64, 16)  # the fast path was really taken
    copy = pickle.loads(pickle.dumps(store))  # data-loader workers get the store pickled
    np.testing.assert_array_equal(copy.read_clip("e3", 7, 16)[0], store.read_clip("e3", 7, 16)[0])


def test_16_frame_clip_reads_at_most_two_chunks(tmp_path, monkeypatch):
    store = make(tmp_path / "c")
    with store.writer() as w:
        w.write_entry("a", *latents(1, n=7))  # entry "b" starts mid-chunk
        w.write_entry("b", *latents(2, n=200))
    reads = []
    real = zarr_backend._read_chunk
    monkeypatch.setattr(zarr_backend, "_read_chunk", lambda *a: reads.append(a[1]) or real(*a))
    for start in range(0, 200 - 16):
        reads.clear()
        store.read_clip("b", start, 16)
        assert 1 <= len(reads) <= 2, (start, len(reads))
    # zarr's own read path (verify uses it) also fetches only the needed byte ranges
    from zarr.storage import LocalStore
    got = []
    real_get = LocalStore.get

    async def counting_get(self, key, prototype=None, byte_range=None):
        buf = await real_get(self, key, prototype, byte_range)
        if "/c/" in key and buf is not None:
            got.append(len(buf))
        return buf

    monkeypatch.setattr(LocalStore, "get", counting_get)
    store._reader.use_fast_path = False
    store.read_clip("b", 30, 16)
    chunk = 16 * 2 * int(np.prod(SHAPE)) * 2 + 4
    index = (64 // 16) * 16 + 4
    assert sum(got) <= 2 * chunk + 2 * index, got


def test_file_count_is_bounded_by_frames_not_entries(tmp_path):
    store = make(tmp_path / "c")
    with store.writer(commit_every=100) as w:
        for i in range(300):
            w.write_entry(f"e{i}", *latents(i, n=3))  # 900 frames -> 15 shards of 64
    files = [p for p in (tmp_path / "c").rglob("*") if p.is_file()]
    assert len(files) <= 15 + 6, len(files)


def test_zarr_root_is_a_plain_zarr_v3_group_with_the_settings(tmp_path):
    import zarr

    make(tmp_path / "c")
    meta = zarr.open_group(tmp_path / "c", mode="r").attrs["latte_cache"]
    assert meta["format"] == "zarr" and meta["format_version"] == 1
    assert meta["settings"]["vae_sha256"] == SETTINGS["vae_sha256"] and meta["settings"]["dtype"] == "float16"


# ----------------------------------------------------------------------------------------------
# Settings and user errors
# ----------------------------------------------------------------------------------------------

def test_settings_mismatch_is_a_clear_error(tmp_path):
    make(tmp_path / "c")
    make(tmp_path / "c")  # same settings: fine
    with pytest.raises(ValueError, match=r"different settings \(image_size: stored 32, requested 64\)"):
        cache_store.create_or_open(tmp_path / "c", {**SETTINGS, "image_size": 64})
    with pytest.raises(ValueError, match="dtype: stored 'float16', requested 'float32'"):
        make(tmp_path / "c", dtype="float32")
    with pytest.raises(ValueError, match="holds a zarr cache, requested mindrecord"):
        make(tmp_path / "c", "mindrecord")
    with pytest.raises(ValueError, match="not a latent cache"):
        cache_store.open(tmp_path)
    with pytest.raises(ValueError, match="no such latent cache"):
        cache_store.open(tmp_path / "nope")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.txt").write_text("hi")
    with pytest.raises(ValueError, match="not empty and is not a latent cache"):
        make(tmp_path / "other")


def test_latent_shape_defaults_from_image_size_and_bad_latents_are_refused(tmp_path):
    store = cache_store.create_or_open(tmp_path / "c", {"image_size": 256})
    assert store.settings["latent_shape"] == [4, 32, 32] and store.settings["dtype"] == "float16"
    store = make(tmp_path / "d")
    with store.writer() as w:
        with pytest.raises(ValueError, match=r"this store holds \(frames, 4, 4, 4\)"):
            w.write_entry("a", np.zeros((3, 4, 8, 8)), np.zeros((3, 4, 8, 8)))
        with pytest.raises(ValueError, match="not finite"):
            w.write_entry("b", np.full((3, *SHAPE), 1e6), np.ones((3, *SHAPE)))
        w.write_entry("c", *latents(3))
    assert [r["id"] for r in store.entries().to_pylist()] == ["c"]
    assert store.verify() == []


def test_same_shard_cannot_be_written_by_two_writers_at_once(tmp_path):
    store = make(tmp_path / "c")
    with store.writer(0, 2):
        with pytest.raises(ValueError, match="another process is writing shard 00000-of-00002"):
            store.writer(0, 2)
        with store.writer(1, 2):
            pass
    with pytest.raises(ValueError, match="shard_index 2 / num_shards 2"):
        store.writer(2, 2)


# ----------------------------------------------------------------------------------------------
# Resume and crash safety
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["zarr", "mindrecord"])
def test_half_written_entry_is_redone_on_resume(tmp_path, fmt):
    store = make(tmp_path / "c", fmt)
    w = store.writer()
    w.write_entry("a", *latents(1))
    w.flush()
    w.begin_entry("b")
    w.append(*latents(2, n=100))  # > one zarr shard: latents reach the disk, no manifest row
    w.backend.flush() if fmt == "zarr" else None
    os.close(w._lock)  # "crash": the process is gone, nothing else is cleaned up
    assert [r["id"] for r in cache_store.open(tmp_path / "c").entries().to_pylist()] == ["a"]
    with make(tmp_path / "c", fmt).writer() as w2:
        w2.write_entry("b", *latents(3, n=30))  # different latents than the lost attempt
    store = cache_store.open(tmp_path / "c")
    np.testing.assert_array_equal(store.read_entry("b")[0], as_stored(latents(3, n=30)[0], "float16"))
    np.testing.assert_array_equal(store.read_entry("a")[0], as_stored(latents(1)[0], "float16"))
    assert store.verify() == []


def test_an_entry_retried_after_failure_is_ok_last_write_wins(tmp_path):
    store = make(tmp_path / "c")
    with store.writer(0, 2) as w:
        w.record_failure("a", "failed", "corrupt jpeg")
        w.record_failure("s", "skipped", "only 3 frames")
    with store.writer(0, 1) as w:  # a later run with another sharding retries it
        w.write_entry("a", *latents(1))
    rows = {r["id"]: r for r in store.entries().to_pylist()}
    assert rows["a"]["status"] == "ok" and rows["s"]["status"] == "skipped"


WRITER_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {root!r})
    kill = os.environ.get("KILL")  # "module.attr:N": SIGKILL ourselves at the N-th call
    if kill:
        import importlib
        target, kill_at = kill.split(":")
        mod, attr = target.rsplit(".", 1)
        mod = importlib.import_module(mod)
        real, calls = getattr(mod, attr), [0]
        def hook(*a, **k):
            calls[0] += 1
            if calls[0] == int(kill_at):
                os.kill(os.getpid(), signal.SIGKILL)
            return real(*a, **k)
        setattr(mod, attr, hook)
    sys.path.insert(0, {tests!r})
    import test_cache_store
    if os.environ.get("HOLD_LAST"):  # block before the last entry's latents until killed: never finish
        import time
        real_latents, last = test_cache_store.latents, int(sys.argv[-1]) - 1
        def latents(i):
            while i == last:
                time.sleep(1)
            return real_latents(i)
        test_cache_store.latents = latents
    test_cache_store.write_all(sys.argv[1], sys.argv[2], *map(int, sys.argv[3:]))
""")


def write_all(out, fmt, shard, shards, n):
    """The ingest's loop in miniature: skip ok entries, stream the rest, record some failures."""
    store = make(out, fmt)
    done = {r["id"] for r in store.entries().to_pylist() if r["status"] == "ok"}
    with store.writer(shard, shards, commit_every=2) as w:
        for i in range(shard, n, shards):
            if f"e{i:03d}" in done:
                continue
            if i % 11 == 5:
                w.record_failure(f"e{i:03d}", "failed", "synthetic failure")
                continue
            m, s = latents(i)
            w.begin_entry(f"e{i:03d}")
            for j in range(0, len(m), 16):
                w.append(m[j:j + 16], s[j:j + 16])
            w.commit_entry({"source": f"/src/{i}"})


def run_writer(tmp_path, out, fmt, shard=0, shards=1, n=24, kill=None, background=False, hold_last=False):
    script = tmp_path / "writer.py"
    script.write_text(WRITER_SCRIPT.format(root=str(ROOT), tests=str(ROOT / "tests")))
    env = {**os.environ, "GLOG_v": "3", **({"KILL": kill} if kill else {}), **({"HOLD_LAST": "1"} if hold_last else {})}
    cmd = [sys.executable, str(script), str(out), fmt, str(shard), str(shards), str(n)]
    if background:
        return subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE)
    return subprocess.run(cmd, env=env, stderr=subprocess.PIPE, timeout=120)


def check_every_ok_row(out, n=24):
    store = cache_store.open(out)
    rows = store.entries().to_pylist()
    assert store.verify() == []
    for r in rows:
        i = int(r["id"][1:])
        if r["status"] == "ok":
            np.testing.assert_array_equal(store.read_entry(r["id"])[1], as_stored(latents(i)[1], "float16"))
        else:
            assert r["status"] == "failed" and i % 11 == 5
    return {r["id"] for r in rows}


@pytest.mark.parametrize("fmt,kills", [
    # os.replace: zarr's shard/metadata renames and the manifest rename; os.fsync: after a shard or
    # temp manifest is written, before the rename; write_table: before the temp manifest exists.
    ("zarr", ["os.replace:2", "os.fsync:4", "os.replace:9", "pyarrow.parquet.write_table:3", "os.fsync:13"]),
    # mindrecord: after a batch file is committed, before its manifest; at a manifest rename.
    ("mindrecord", ["os.fsync:2", "os.replace:2"]),
])
def test_sigkill_at_any_point_leaves_ok_rows_readable_and_resume_completes(tmp_path, fmt, kills):
    out, n = tmp_path / "c", 40
    seen = []
    for kill in kills:
        proc = run_writer(tmp_path, out, fmt, n=n, kill=kill)
        assert proc.returncode == -9, (kill, seen, proc.stderr.decode()[-2000:])
        seen.append(len(check_every_ok_row(out)) if (out / "manifest").exists() else 0)
    assert 0 < seen[-1] < n, seen  # the kills happened part way, after some commits
    proc = run_writer(tmp_path, out, fmt, n=n)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    assert check_every_ok_row(out) == {f"e{i:03d}" for i in range(n)}
    assert not list(out.rglob("*.partial")) and not list(out.rglob("*.tmp"))
    if fmt == "mindrecord":  # files of killed batches were deleted by the resumed writer
        referenced = {r["location"] for r in cache_store.open(out).entries().to_pylist() if r["location"]}
        assert {f"mindrecord/{p.name}" for p in out.glob("mindrecord/*.mindrecord")} == referenced


def test_sigkill_at_a_random_moment(tmp_path):
    import time
    from conftest import random_kill_delay  # here: the writer subprocesses import this module

    out = tmp_path / "c"
    # The writer holds before its last entry until killed, so the kill lands mid-run however fast
    # the machine writes the other 399 entries (on a fast one, at the hold: after the last commit).
    proc = run_writer(tmp_path, out, "zarr", n=400, background=True, hold_last=True)
    try:
        deadline = time.monotonic() + 600  # a bound for a writer that never commits, not a speed
        while not list(out.glob("manifest/*.parquet")):
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]  # held: it cannot finish
            assert time.monotonic() < deadline, "the writer committed nothing in 600 s"
            time.sleep(0.01)  # wait for the first commit, then kill at an arbitrary later instant
        time.sleep(random_kill_delay(0, 0.3))
    finally:
        proc.kill()
    assert proc.wait() == -9, proc.stderr.read().decode()[-2000:]  # it could not have finished
    store = cache_store.open(out)
    assert store.verify() == []
    for r in store.entries().to_pylist():
        if r["status"] == "ok":
            i = int(r["id"][1:])
            np.testing.assert_array_equal(store.read_entry(r["id"])[0], as_stored(latents(i)[0], "float16"))


def test_two_concurrent_shard_writers_equal_one_writer(tmp_path):
    fmt = "zarr"  # writers, parts and merging are the same code for both formats
    write_all(tmp_path / "one", fmt, 0, 1, 20)
    procs = [run_writer(tmp_path, tmp_path / "two", fmt, shard=i, shards=2, n=20, background=True)
             for i in range(2)]
    for p in procs:
        assert p.wait(timeout=120) == 0, p.stderr.read().decode()[-2000:]
    a, b = cache_store.open(tmp_path / "one"), cache_store.open(tmp_path / "two")
    cols = ["id", "status", "num_frames", "checksum", "source", "reason"]
    assert a.entries().select(cols).to_pylist() == b.entries().select(cols).to_pylist()
    assert {r["writer"] for r in b.entries().to_pylist()} == {"00000-of-00002", "00001-of-00002"}
    for r in a.entries().to_pylist():
        if r["status"] == "ok":
            np.testing.assert_array_equal(a.read_clip(r["id"], 1, 2, 3)[0], b.read_clip(r["id"], 1, 2, 3)[0])
            np.testing.assert_array_equal(a.read_entry(r["id"])[1], b.read_entry(r["id"])[1])


# ----------------------------------------------------------------------------------------------
# MindRecord specifics
# ----------------------------------------------------------------------------------------------

def test_long_mindrecord_entry_is_split_into_bounded_segments(tmp_path):
    import mindspore.dataset as ds

    store = make(tmp_path / "c", "mindrecord", dtype="float32")
    m, s = latents(7, n=1000)
    with store.writer() as w:
        w.write_entry("long", m, s)
    row = store.entry("long")
    path = tmp_path / "c" / row["location"]
    dataset = ds.MindDataset([str(path)], shuffle=False)  # plain MindSpore reads the files
    records = list(dataset.create_dict_iterator(output_numpy=True, num_epochs=1))
    assert len(records) == 63 and max(int(r["frames"]) for r in records) == 16
    assert sum(int(r["frames"]) for r in records) == 1000
    assert [int(r["segment"]) for r in records] == list(range(63))
    page, per_page = page_layout(store.meta)
    assert per_page == 3 and path.stat().st_size > 63 / 3 * page  # the video spans 21 pages
    gm, gs = store.read_clip("long", 990, 10)
    np.testing.assert_array_equal(gm, m[990:])
    gm, gs = store.read_clip("long", 8, 16, stride=1)  # across a segment boundary
    np.testing.assert_array_equal(gs, s[8:24])
    assert store.verify() == []


# ----------------------------------------------------------------------------------------------
# CLI: info and verify
# ----------------------------------------------------------------------------------------------

def test_info_prints_statuses_frames_settings_and_failures(tmp_path, capsys):
    store = make(tmp_path / "c")
    with store.writer() as w:
        w.write_entry("a", *latents(1, n=10))
        w.write_entry("b", *latents(2, n=20))
        w.record_failure("bad", "failed", "cannot decode frame 3")
        w.record_failure("short", "skipped", "only 2 frames")
    assert cli.main(["info", str(tmp_path / "c")]) == 0
    out = capsys.readouterr().out
    assert "entries:  4 (ok 2, failed 1, skipped 1)" in out
    assert "frames:   30 in ok entries" in out and "vae_sha256=abab" in out
    assert "FAILED bad: cannot decode frame 3" in out and "SKIPPED short: only 2 frames" in out


def test_cli_on_a_missing_folder_is_a_one_line_error(tmp_path, capsys):
    assert cli.main(["verify", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nope" in err and "no such latent cache" in err
    with pytest.raises(SystemExit):
        cli.main(["--help"])


def flip_bytes(path, offset):
    raw = bytearray(path.read_bytes())
    raw[offset:offset + 8] = bytes(b ^ 0xFF for b in raw[offset:offset + 8])
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("fmt", ["zarr", "mindrecord"])
def test_verify_detects_a_corrupted_chunk_and_exits_nonzero(tmp_path, capsys, fmt):
    out = tmp_path / "c"
    store = make(out, fmt)
    with store.writer() as w:
        w.write_entry("a", *latents(1, n=30))
        w.write_entry("b", *latents(2, n=30))
    assert cli.main(["verify", str(out)]) == 0
    assert "verified 2 ok entries: 0 corrupt" in capsys.readouterr().out
    row = store.entry("b")
    if fmt == "zarr":
        shard = out / row["location"] / "c/0/0/0/0/0"
        # rows 30..59 of shard 0: b's first chunk-row is 32, i.e. bytes from 2 chunks in
        flip_bytes(shard, 2 * (16 * 2 * int(np.prod(SHAPE)) * 2 + 4) + 100)
        with pytest.raises(CorruptEntryError, match="crc32c"):
            store.read_clip("b", 5, 4)
    else:
        path = out / row["location"]
        blob = path.read_bytes()
        flip_bytes(path, blob.index(latents(2, n=30)[0][:16].astype(np.float16).tobytes()) + 64)
    assert cli.main(["verify", str(out)]) == 1
    printed = capsys.readouterr().out
    assert "CORRUPT b:" in printed and "CORRUPT a" not in printed and "1 corrupt" in printed
    assert cli.main(["verify", str(out), "--mark_failed"]) == 1
    capsys.readouterr()
    rows = {r["id"]: r for r in cache_store.open(out).entries().to_pylist()}
    assert rows["b"]["status"] == "failed" and rows["b"]["reason"].startswith("verify:")
    assert cli.main(["verify", str(out)]) == 0  # what remains ok is intact


# ----------------------------------------------------------------------------------------------
# Repair: verify --mark_failed, then rewriting the failed entries (what ingest --retry_failed does)
# ----------------------------------------------------------------------------------------------

def sha256_bytes(path):
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def retry_failed(out, data):
    """What `latte ingest --retry_failed` does to the store: rewrite every failed entry."""
    store = cache_store.open(out)
    failed = sorted(i for i, r in store.rows().items() if r["status"] == "failed")
    with store.writer() as w:
        for entry_id in failed:
            w.write_entry(entry_id, *data[entry_id], {"source": f"/frames/{entry_id}", "kind": "frames"})
    return failed


# e0..e5 hold 5, 12, 19, 26, 33, 40 frames: rows 0..134 of 64-row shards, so shards 0 and 1 are
# full and shard 2 (rows 128..134) is the partly filled one the writer reopens.
DAMAGE = {  # where -> (file under the array, byte offset from its start (>= 0) or end (< 0), victims)
    "last_shard_chunk": ("c/2/0/0/0/0", 100, ["e5"]),
    "last_shard_index": ("c/2/0/0/0/0", -10, ["e5"]),
    "full_shard_chunk": ("c/0/0/0/0/0", 1000, ["e0", "e1"]),  # rows 0..15, one chunk of two entries
    "array_metadata": ("zarr.json", 0, [f"e{i}" for i in range(6)]),  # every entry of the array
}


@pytest.mark.parametrize("where", sorted(DAMAGE))
def test_repair_reencodes_a_damaged_entry_whatever_zarr_file_the_damage_is_in(tmp_path, capsys, where):
    out = tmp_path / "c"
    store = make(out)
    data = {f"e{i}": latents(i) for i in range(6)}
    with store.writer() as w:
        for k, (m, s) in data.items():
            w.write_entry(k, m, s, {"source": f"/frames/{k}", "kind": "frames"})
    name, offset, victims = DAMAGE[where]
    damaged = out / store.entry("e0")["location"] / name
    raw = bytearray(damaged.read_bytes())
    raw[offset] ^= 0x10  # one bit
    damaged.write_bytes(bytes(raw))
    damaged_sha = sha256_bytes(damaged)

    assert cli.main(["verify", str(out), "--mark_failed"]) == 1
    printed = capsys.readouterr().out
    assert [line.split(":")[0] for line in printed.splitlines() if line.startswith("CORRUPT")] == \
        [f"CORRUPT {v}" for v in victims]
    assert retry_failed(out, data) == victims
    capsys.readouterr()
    assert cli.main(["verify", str(out)]) == 0, capsys.readouterr().out
    store = cache_store.open(out)
    for k, (m, s) in data.items():
        np.testing.assert_array_equal(store.read_entry(k)[0], as_stored(m, "float16"))
        np.testing.assert_array_equal(store.read_entry(k)[1], as_stored(s, "float16"))
    # the damaged bytes were neither read into a new shard nor rewritten with a fresh crc32c
    assert sha256_bytes(damaged) == damaged_sha
    # and a later run of the writer goes on appending without tripping over them
    with store.writer() as w:
        w.write_entry("later", *latents(7))
    assert cache_store.open(out).verify() == []


def test_mindrecord_repair_reencodes_a_damaged_entry(tmp_path, capsys):
    out = tmp_path / "c"
    store = make(out, "mindrecord")
    data = {f"e{i}": latents(i) for i in range(4)}
    with store.writer() as w:
        for k, (m, s) in data.items():
            w.write_entry(k, m, s)
    path = out / store.entry("e2")["location"]
    flip_bytes(path, path.read_bytes().index(data["e2"][1][:4].astype(np.float16).tobytes()) + 3)
    assert cli.main(["verify", str(out), "--mark_failed"]) == 1
    assert retry_failed(out, data) == ["e2"]
    capsys.readouterr()
    assert cli.main(["verify", str(out)]) == 0, capsys.readouterr().out
    np.testing.assert_array_equal(cache_store.open(out).read_entry("e2")[1], as_stored(data["e2"][1], "float16"))


def test_mindrecord_clip_read_detects_a_flipped_bit_and_names_the_entry(tmp_path):
    out = tmp_path / "c"
    store = make(out, "mindrecord")
    with store.writer() as w:
        w.write_entry("a", *latents(1, n=40))
        w.write_entry("b", *latents(2, n=40))
    path = out / store.entry("b")["location"]
    mean_b = latents(2, n=40)[0].astype(np.float16)
    raw = bytearray(path.read_bytes())
    raw[raw.index(mean_b[16:32].tobytes()) + 77] ^= 0x01  # one bit of segment 1 (frames 16..31)
    path.write_bytes(bytes(raw))
    store = cache_store.open(out)
    np.testing.assert_array_equal(store.read_clip("b", 0, 16)[0], mean_b[:16].astype(np.float32))  # other segment
    with pytest.raises(CorruptEntryError, match=r"entry 'b': .*\.mindrecord: record \d+ \(segment 1 of 'b'\) "
                                                r"fails its crc32c"):
        store.read_clip("b", 10, 16)
    assert [p[0] for p in store.verify()] == ["b"]


def test_zarr_corruption_message_names_the_entry_and_the_shard_file(tmp_path, capsys):
    out = tmp_path / "c"
    store = make(out)
    with store.writer() as w:
        w.write_entry("a", *latents(1, n=30))
    shard = out / store.entry("a")["location"] / "c/0/0/0/0/0"
    flip_bytes(shard, 100)
    assert cli.main(["verify", str(out)]) == 1
    line = capsys.readouterr().out.splitlines()[0]
    assert line.startswith(f"CORRUPT a: {shard}: rows 0..29 unreadable (a chunk or the shard index fails its crc32c")
    assert "Stored" not in line and "b'" not in line
    store._reader.use_fast_path = False  # the zarr path of read_clip says the same
    with pytest.raises(CorruptEntryError) as err:
        store.read_clip("a", 0, 4)
    assert "entry 'a'" in str(err.value) and "fails its crc32c" in str(err.value) and "b'" not in str(err.value)


def test_rows_marked_failed_by_verify_keep_source_kind_and_frames(tmp_path, capsys):
    out = tmp_path / "c"
    store = make(out)
    with store.writer() as w:
        w.write_entry("a", *latents(1, n=30), {"source": "/videos/a.mp4", "kind": "video", "source_bytes": 999,
                                               "fps": 25})
    flip_bytes(out / store.entry("a")["location"] / "c/0/0/0/0/0", 100)
    assert cli.main(["verify", str(out), "--mark_failed"]) == 1
    row = cache_store.open(out).rows()["a"]
    assert row["status"] == "failed" and row["reason"].startswith("verify:")
    assert (row["source"], row["kind"], row["num_frames"], row["source_bytes"]) == ("/videos/a.mp4", "video", 30, 999)
    assert '"fps": 25' in row["extra"]


@pytest.mark.parametrize("fmt", ["zarr", "mindrecord"])
def test_info_reports_bytes_on_disk_and_file_sizes_apart(tmp_path, capsys, fmt):
    out = tmp_path / "c"
    store = make(out, fmt)
    with store.writer() as w:
        w.write_entry("a", *latents(1, n=30))
    info = cache_store.open(out).info()
    stats = [p.stat() for p in out.rglob("*") if p.is_file()]
    assert info["file_bytes"] == sum(st.st_size for st in stats)
    assert info["disk_bytes"] == sum(st.st_blocks * 512 for st in stats)
    assert info["latent_bytes"] == 30 * 2 * 64 * 2
    assert cli.main(["info", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "frames:   30 in ok entries, 7.5 KiB of latents\n" in printed
    assert "used on disk" in printed and "of file sizes" in printed
    assert ("MindRecord preallocates" in printed) == (fmt == "mindrecord")


def test_info_piped_into_head_ends_without_a_traceback(tmp_path):
    out = tmp_path / "c"
    store = make(out)
    with store.writer() as w:
        for i in range(300):  # many failure lines: more than a pipe buffer holds
            w.record_failure(f"entry_{i:04d}", "failed", "x" * 300)
    proc = subprocess.run(f"{sys.executable} -m latte_cli cache info {out} | head -n 2", shell=True, cwd=ROOT,
                          capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=300)
    assert proc.stdout.count("\n") == 2 and proc.stdout.startswith(f"{out}: zarr latent cache")
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, proc.stderr


def test_cache_help_names_the_cache_folder_option(capsys):
    for command in ("info", "verify"):
        with pytest.raises(SystemExit):
            cli.main([command, "--help"])
        text = capsys.readouterr().out
        assert "--cache_folder" in text and "--out" not in text, text
