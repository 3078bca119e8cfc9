"""`latte ingest`: synthetic Sky-like data (nested and flat frame folders, mp4s) -> tiny random VAE ->
cache_store. In-process runs share one compiled VAE; runs that must be killed or run side by side are
real `latte ingest` subprocesses sharing a MindSpore compile cache, so each starts in seconds."""
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import cache_store
from ingest import cli, pipeline, reader_thread, vae_setup
from ingest.reader_thread import Batch, Begin, End, Fail, Row
from ingest.readers import read_frames
from ingest.sources import EntryError, discover_entries
from ingest.synthetic import make_bad_inputs, make_sky_dataset
from conftest import assert_f32_close
from models.runtime import setup_device

ROOT = Path(__file__).resolve().parents[1]
# The tiny demo VAE on 32 px frames (4x4 latents), 4 frames per VAE call, a manifest commit after every
# entry and small zarr shards, so that entries of 12 frames cross shard files and a run has many
# commits to be killed between.
BASE = ["-c", str(ROOT / "configs/ingest/tiny.yaml"), "--image_size", "32", "--micro_batch", "4",
        "--commit_every", "1", "--chunk_frames", "4", "--shard_frames", "8", "--progress", "false"]
COMPARED = ("status", "reason", "num_frames", "checksum", "source", "kind", "source_bytes")


def config(data, cache, *more):
    return cli.parse_args([*BASE, "--data_folder", str(data), "--cache_folder", str(cache), *more])


def ingest(data, cache, *more):
    return pipeline.run_ingest(config(data, cache, *more), environ={})


def snapshot(cache):
    """What a cache holds, independent of where its bytes sit: {id: row fields}; verify() must pass."""
    store = cache_store.open(cache)
    assert store.verify() == []
    return {i: tuple(r[k] for k in COMPARED) for i, r in store.rows().items()}


@pytest.fixture(scope="session")
def sky(tmp_path_factory):
    """Both layouts plus an mp4: 5 frame folders of 12 frames (48x64) and a 24-frame video."""
    root = tmp_path_factory.mktemp("sky") / "data"
    expected = make_sky_dataset(root, num_videos=2, clips_per_video=2, frames_per_clip=12, size=(48, 64),
                                layout="nested", seed=1, videos=1)
    expected.update(make_sky_dataset(root, num_videos=1, clips_per_video=1, frames_per_clip=12, size=(48, 64),
                                     layout="flat", seed=2))
    return root, expected


@pytest.fixture(scope="session")
def reference(sky, tmp_path_factory):
    """An uninterrupted single-process run: what every resumed, sharded or retried run must equal."""
    cache = tmp_path_factory.mktemp("ref") / "cache"
    result = ingest(sky[0], cache)
    return cache, snapshot(cache), result


@pytest.fixture(scope="session")
def cli_env(tmp_path_factory):
    env = dict(os.environ, GLOG_v="3", MS_COMPILER_CACHE_ENABLE="1",
               MS_COMPILER_CACHE_PATH=str(tmp_path_factory.mktemp("ms_compile_cache")))
    for key in ("RANK_ID", "RANK_SIZE", "MS_WORKER_NUM", "MS_NODE_ID", "MS_ROLE"):
        env.pop(key, None)
    return env


def latte_ingest(data, cache, env, *more, kill=None, **popen):
    """A real `latte ingest` process. kill="manifest:N" / "latents:N" SIGKILLs it just before the N-th
    rename of a manifest part / latent file (":torn" also truncates the temp file first, as if the kill
    came half way through writing it). kill="pause" instead stops it at its first VAE batch after the
    first manifest commit and creates `<cache>.paused`, so a test can signal it mid-run from outside
    however fast the machine is (see wait_until_paused)."""
    driver = ("import os, signal, sys\n"
              f"sys.path.insert(0, {str(ROOT)!r})\n"
              "spec = os.environ.get('LATTE_TEST_KILL')\n"
              "if spec:\n"
              "    where, nth, how = (spec + '::').split(':')[:3]\n"
              "    seen, real = [0], os.replace\n"
              "    def replace(src, dst, *a, **k):\n"
              "        d = os.fspath(dst)\n"
              "        if where == 'pause':\n"
              "            seen[0] += d.endswith('.parquet')\n"
              "        elif d.endswith('.parquet') if where == 'manifest' else '/latents/' in d:\n"
              "            seen[0] += 1\n"
              "            if seen[0] == int(nth):\n"
              "                if how == 'torn':\n"
              "                    os.truncate(src, os.path.getsize(src) // 2)\n"
              "                os.kill(os.getpid(), signal.SIGKILL)\n"
              "        return real(src, dst, *a, **k)\n"
              "    os.replace = replace\n"
              "    if where == 'pause':  # block in the next encode after the first commit, until signalled\n"
              "        import time\n"
              "        from ingest import pipeline\n"
              "        encode = pipeline.encode\n"
              "        def paused_encode(*a, **k):\n"
              "            if seen[0]:\n"
              "                open(os.environ['LATTE_TEST_PAUSED'], 'w').close()\n"
              "                while True:\n"
              "                    time.sleep(1)  # a SIGINT raises KeyboardInterrupt here, mid-entry\n"
              "            return encode(*a, **k)\n"
              "        pipeline.encode = paused_encode\n"
              "import latte_cli\n"
              "sys.exit(latte_cli.main(['ingest', *sys.argv[1:]]))\n")
    script = cache.parent / "latte_ingest_driver.py"  # a file: MindSpore's compile cache hashes the main script
    script.write_text(driver)
    env = dict(env, LATTE_TEST_KILL=kill or "", LATTE_TEST_PAUSED=f"{cache}.paused")
    argv = [sys.executable, str(script), *BASE, "--data_folder", str(data), "--cache_folder", str(cache), *more]
    return subprocess.Popen(argv, env=env, cwd=cache.parent, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, **popen)


def wait_until_paused(proc, cache):
    """Wait for a kill="pause" process to reach its pause point: a bound for a hung run, not a speed."""
    deadline = time.monotonic() + 600
    while not Path(f"{cache}.paused").exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            _, err = proc.communicate()
            pytest.fail(f"latte ingest never paused after its first commit (exit {proc.returncode}):\n{err[-3000:]}")
        time.sleep(0.05)


@pytest.fixture
def restore_pynative():
    yield
    setup_device("CPU", mode="pynative", cpu_threads=1)  # cli.main set graph mode


# ---------------------------------------------------------------- what gets stored


def test_latents_equal_a_direct_vae_encode_of_the_transformed_frames(sky, reference, tmp_path):
    data, expected = sky
    cache = tmp_path / "f32"
    ingest(data, cache, "--dtype", "float32")
    store = cache_store.open(cache)
    cfg = config(data, cache)
    vae = pipeline.build_vae(cfg, *pipeline.describe_vae(cfg))
    ref16 = cache_store.open(reference[0])
    entries = {e.id: e for e in discover_entries(data)}
    assert sorted(store.rows()) == sorted(expected) and any(i.endswith(".mp4") for i in expected)
    for entry_id, n in expected.items():
        frames = read_frames(entries[entry_id], range(n), 32)  # the original transform
        direct = [np.concatenate(parts) for parts in zip(*[pipeline.encode(vae, frames[i:i + 4])
                                                            for i in range(0, n, 4)])]
        mean, std = store.read_entry(entry_id)
        assert mean.shape == (n, 4, 4, 4)
        assert_f32_close(mean, direct[0])  # the ingest may batch frames otherwise
        assert_f32_close(std, direct[1])
        mean16, std16 = ref16.read_entry(entry_id)  # the default float16 store
        np.testing.assert_allclose(mean16, direct[0], rtol=1e-3, atol=1e-3)
        np.testing.assert_allclose(std16, direct[1], rtol=1e-3, atol=1e-3)
    clip_mean, _ = store.read_clip(sorted(expected)[0], 2, 4, stride=3)  # any stride later: stride-1 cache
    np.testing.assert_array_equal(clip_mean, store.read_entry(sorted(expected)[0])[0][2:12:3])


def test_store_settings_record_what_defines_the_latents(reference):
    settings = cache_store.open(reference[0]).settings
    assert settings["vae_sha256"] == "random-seed-0"
    assert settings["scale_factor"] == 0.18215 and settings["image_size"] == 32 and settings["crop"] == "center"
    assert settings["dtype"] == "float16" and settings["latent_shape"] == [4, 4, 4]
    assert settings["vae_config"]["block_out_channels"] == [16, 32, 32, 32]
    assert cache_store.open(reference[0]).meta["format_version"] >= 1


def test_weights_file_sha256_is_recorded_and_its_metadata_gives_the_vae_shape(sky, tmp_path):
    from models.convert import save_weights

    cfg = config(sky[0], tmp_path / "x")
    vae = pipeline.build_vae(cfg, *pipeline.describe_vae(cfg))
    weights = tmp_path / "tiny_vae.safetensors"
    save_weights(str(weights), {k: p.asnumpy() for k, p in vae.parameters_and_names()}, "safetensors",
                 metadata={"kind": "vae", "config": pipeline.describe_vae(cfg)[0]})
    # the yaml's vae_* shape is ignored: the file says what it holds
    cfg = config(sky[0], tmp_path / "x", "--vae_weights", str(weights), "--vae_block_out_channels", "8,16")
    assert pipeline.describe_vae(cfg) == (pipeline.describe_vae(config(sky[0], tmp_path))[0],
                                          vae_setup.sha256_file(weights))


def test_mindrecord_format_end_to_end_equals_zarr(sky, reference, tmp_path):
    ingest(sky[0], tmp_path / "mr", "--format", "mindrecord")
    store = cache_store.open(tmp_path / "mr")
    assert store.format == "mindrecord"
    assert snapshot(tmp_path / "mr") == reference[1]  # same checksums: byte-identical latents
    entry_id = sorted(reference[1])[1]
    np.testing.assert_array_equal(store.read_clip(entry_id, 1, 8)[0],
                                  cache_store.open(reference[0]).read_clip(entry_id, 1, 8)[0])


# ---------------------------------------------------------------- status lines, resume, retry


def test_status_lines_and_manifest_location_are_printed(sky, reference, tmp_path, capsys):
    n = len(sky[1])
    lines = pipeline.status_lines(reference[2])
    assert lines[0] == "Start Video Index: 0."
    assert lines[1] == f"Saving Attempts: {n}: save {n} videos, failed 0 videos."
    assert lines[-1].startswith(f"Manifest: {reference[0]}/manifest/part-00000-of-00001.parquet")
    ingest(sky[0], reference[0])  # a rerun skips everything
    out = capsys.readouterr().out
    assert f"Saving Attempts: {n}: save 0 videos, failed 0 videos." in out
    assert f"not redone: {n} ok" in out


def test_resume_index_starts_at_the_nth_sorted_entry_without_touching_committed_ones(sky, reference, tmp_path,
                                                                                      capsys):
    cache = tmp_path / "cache"
    ids = [e.id for e in discover_entries(sky[0])]
    ingest(sky[0], cache, "--resume_index", "4")
    assert sorted(cache_store.open(cache).rows()) == sorted(ids[4:])
    assert "Start Video Index: 4." in capsys.readouterr().out
    before = cache_store.open(cache).rows()
    ingest(sky[0], cache)
    after = cache_store.open(cache).rows()
    assert all(after[i]["encoded_at"] == before[i]["encoded_at"] for i in before)  # committed ones untouched
    assert snapshot(cache) == reference[1]
    with pytest.raises(ValueError, match="resume_index 99 is past the last"):
        ingest(sky[0], cache, "--resume_index", "99")


def test_retry_failed_redoes_only_failed_entries(sky, reference, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(sky[0], data)
    victim = sorted(p for p in data.rglob("*.jpg"))[5]
    good = victim.read_bytes()
    victim.write_bytes(b"not a jpeg")
    ingest(data, tmp_path / "cache")
    rows = cache_store.open(tmp_path / "cache").rows()
    bad = [i for i, r in rows.items() if r["status"] == "failed"]
    assert len(bad) == 1 and "frame 5" in rows[bad[0]]["reason"] and "not a readable image" in rows[bad[0]]["reason"]
    victim.write_bytes(good)
    ingest(data, tmp_path / "cache", "--retry_failed", "false")  # a plain rerun keeps the failed row
    assert cache_store.open(tmp_path / "cache").rows()[bad[0]]["status"] == "failed"
    assert "save 0 videos, failed 0 videos" in capsys.readouterr().out
    ingest(data, tmp_path / "cache", "--retry_failed")  # a bare flag, as documented
    after = cache_store.open(tmp_path / "cache").rows()
    assert "save 1 videos, failed 0 videos" in capsys.readouterr().out
    assert all(after[i]["encoded_at"] == rows[i]["encoded_at"] for i in rows if i != bad[0])
    got = snapshot(tmp_path / "cache")
    assert {i: v[:4] for i, v in got.items()} == {i: v[:4] for i, v in reference[1].items()}


def test_ingesting_into_a_cache_made_with_other_settings_is_a_one_line_error(sky, reference, capsys,
                                                                             restore_pynative):
    argv = [*BASE, "--data_folder", str(sky[0]), "--cache_folder", str(reference[0])]
    before = snapshot(reference[0])
    assert cli.main([*argv, "--dtype", "float32"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "different settings" in err and "dtype: stored 'float16', requested 'float32'" in err
    assert cli.main([*argv, "--random_vae_seed", "1"]) == 2
    assert "vae_sha256: stored 'random-seed-0', requested 'random-seed-1'" in capsys.readouterr().err
    assert cli.main([*argv, "--format", "mindrecord"]) == 2
    assert "holds a zarr cache" in capsys.readouterr().err
    assert snapshot(reference[0]) == before


# ---------------------------------------------------------------- bad input and fatal problems


def test_bad_inputs_end_as_manifest_rows_with_reasons_and_the_rest_is_ingested(tmp_path):
    data = tmp_path / "bad"
    expect = make_bad_inputs(data, size=(48, 64), num_frames=6)
    # fails part-way: frames 0..7 are encoded and appended before frame 9 turns out corrupt
    make_sky_dataset(data / "late_corrupt_src", num_videos=1, clips_per_video=1, frames_per_clip=12,
                     size=(48, 64), layout="flat", seed=5)
    (folder,) = (data / "late_corrupt_src").iterdir()
    folder.rename(data / "late_corrupt")
    (data / "late_corrupt_src").rmdir()
    sorted((data / "late_corrupt").iterdir())[9].write_bytes(b"\xff\xd8 broken")
    expect["late_corrupt"] = ("failed", "frame 9")
    result = ingest(data, tmp_path / "cache")
    store = cache_store.open(tmp_path / "cache")
    rows = store.rows()
    assert sorted(rows) == sorted(expect)
    for entry_id, (status, fragment) in expect.items():
        assert rows[entry_id]["status"] == status, (entry_id, rows[entry_id]["reason"])
        assert fragment in rows[entry_id]["reason"], (entry_id, rows[entry_id]["reason"])
        if status != "ok":
            assert rows[entry_id]["reason"] and rows[entry_id]["location"] == ""
    assert rows["good"]["reason"] == "" and "upscaled from 16x12" in rows["tiny"]["reason"]
    assert store.verify() == []  # the aborted entry left nothing behind an ok row
    ok = [i for i, (s, _) in expect.items() if s == "ok"]
    for entry_id in ok:
        assert np.isfinite(store.read_entry(entry_id)[0]).all()
    assert result.saved == len(ok) and result.failed + result.skipped == len(expect) - len(ok)


def test_fatal_problems_stop_before_any_work_with_one_line_errors(sky, tmp_path, capsys, restore_pynative):
    from latte_cli import main as latte
    from models.convert import save_weights

    (tmp_path / "a_file").write_text("x")
    save_weights(str(tmp_path / "empty.safetensors"), {"encoder.conv_in.bias": np.zeros(16, np.float32)},
                 "safetensors", metadata={"kind": "vae", "config": pipeline.describe_vae(config(sky[0], "x"))[0]})
    save_weights(str(tmp_path / "latte.safetensors"), {"x": np.zeros(1, np.float32)}, "safetensors",
                 metadata={"kind": "latte", "config": {}})
    (tmp_path / "vae.bin").write_bytes(b"torch pickle")
    cache = tmp_path / "cache"
    cases = {
        ("--data_folder", str(tmp_path / "nope")): "does not exist",
        ("--vae_weights", str(tmp_path / "missing.ckpt")): "not found",
        ("--vae_weights", str(tmp_path / "vae.bin")): "is a PyTorch file: convert it first",
        ("--vae_weights", str(tmp_path / "latte.safetensors")): "holds latte weights, not a VAE",
        ("--vae_weights", str(tmp_path / "empty.safetensors")): "does not match AutoencoderKL",
        ("--cache_folder", str(tmp_path / "a_file" / "cache")): "a_file is a file",
        ("--cache_folder", str(tmp_path / "a_file")): "is a file",
        ("--allow_random_vae", "false"): "'vae_weights' is not set",
        ("--image_size", "36"): "not a multiple of the VAE's downsampling factor 8",
        ("--micro_batch", "0"): "'micro_batch' is 0",
        ("--num_shards", "2", "--shard_index", "2"): "pass --shard_index 0..1",
        ("--no_such_key", "1"): "unknown key 'no_such_key'",
    }
    for extra, message in cases.items():
        argv = ["ingest", *BASE, "--data_folder", str(sky[0]), "--cache_folder", str(cache), *extra]
        assert latte(argv) == 2, extra
        err = capsys.readouterr().err.strip()
        assert err.startswith("latte ingest: error:") and "\n" not in err and message in err, (extra, err)
        assert not cache.exists(), extra  # nothing was created


def test_msrun_environment_gives_the_shard_and_its_scheduler_does_nothing(sky, tmp_path, capsys):
    cfg = config(sky[0], tmp_path / "c")
    assert pipeline.resolve_shards(cfg, {}) == (1, 0, "single process")
    assert pipeline.resolve_shards(cfg, {"RANK_ID": "3", "RANK_SIZE": "8", "MS_WORKER_NUM": "8",
                                         "MS_NODE_ID": "3"})[:2] == (8, 3)
    assert pipeline.resolve_shards(cfg, {"MS_WORKER_NUM": "4", "MS_NODE_ID": "1"})[:2] == (4, 1)
    with pytest.raises(ValueError, match="without a rank"):
        pipeline.resolve_shards(cfg, {"MS_WORKER_NUM": "4", "RANK_SIZE": "4"})
    explicit = config(sky[0], tmp_path / "c", "--num_shards", "2", "--shard_index", "1")
    assert pipeline.resolve_shards(explicit, {"RANK_ID": "0", "RANK_SIZE": "8"})[:2] == (2, 1)
    os.environ["MS_ROLE"] = "MS_SCHED"
    try:
        assert cli.main([*BASE, "--data_folder", str(sky[0]), "--cache_folder", str(tmp_path / "c")]) == 0
    finally:
        del os.environ["MS_ROLE"]
    assert "scheduler" in capsys.readouterr().out and not (tmp_path / "c").exists()


# ---------------------------------------------------------------- streaming


def test_reader_thread_runs_ahead_by_a_bounded_number_of_batches(sky, monkeypatch):
    produced, threads = [], set()

    def fake_batches(entry, batch_size, image_size, stride=1):
        for k in range(50):
            threads.add(threading.current_thread().name)
            produced.append(k)
            yield np.zeros((3 if k == 49 else batch_size, 3, image_size, image_size), np.float32)

    monkeypatch.setattr(reader_thread, "iter_frame_batches", fake_batches)
    monkeypatch.setattr(reader_thread, "probe", lambda entry, size: (50 * 4 - 1, (48, 64), []))
    entry = discover_entries(sky[0])[0]
    reader = reader_thread.Prefetcher([entry], batch_size=4, image_size=8, depth=3)
    items = iter(reader)
    assert isinstance(next(items), Begin)
    lead = []
    for k in range(50):
        batch = next(items)
        assert isinstance(batch, Batch) and batch.x.shape == (4, 3, 8, 8)
        assert batch.n == (3 if k == 49 else 4)  # padded to 4
        time.sleep(0.01)
        lead.append(len(produced) - (k + 1))
    assert isinstance(next(items), End)
    reader.close()
    assert threads == {"ingest-reader"} and max(lead) <= 3 + 1


def test_videos_are_read_in_chunks_that_equal_one_sequential_read(sky, monkeypatch):
    # decord decodes ahead of a slow consumer without bound, so the reader reopens a video per chunk
    monkeypatch.setattr(reader_thread, "VIDEO_CHUNK_FRAMES", 8)
    (video,) = [e for e in discover_entries(sky[0]) if e.kind == "video"]
    items = list(reader_thread.Prefetcher([video], batch_size=4, image_size=32, stride=2))  # chunks of 8 + 4
    assert [type(i) for i in items] == [Begin] + [Batch] * 3 + [End] and items[0].frames == 12
    got = np.concatenate([b.x[:b.n] for b in items[1:-1]])
    np.testing.assert_array_equal(got, read_frames(video, range(0, 24, 2), 32))


def test_reader_events_name_what_the_loop_records(sky, monkeypatch):
    # each event carries its fields by name: the loop records a failure's reason and source frames,
    # and a too-short entry's status, from these fields (not from positions in a tuple)
    entries = discover_entries(sky[0])[:2]

    def probe_fails_for_the_first(entry, size):
        if entry.id == entries[0].id:
            raise EntryError(f"{entry.path}: cannot open (test)")
        return 3, (48, 64), []

    monkeypatch.setattr(reader_thread, "probe", probe_fails_for_the_first)
    fail, row = list(reader_thread.Prefetcher(entries, batch_size=4, image_size=8, min_frames=5))
    assert isinstance(fail, Fail) and fail.entry == entries[0] and fail.source_frames == -1
    assert fail.reason.endswith("cannot open (test)")
    assert isinstance(row, Row) and row.entry == entries[1] and row.status == "skipped"
    assert row.source_frames == 3 and row.reason.startswith("only 3 frames (stride 1)")


# ---------------------------------------------------------------- crashes, Ctrl-C, scale-out


def test_latte_ingest_command_prints_the_seed_status_lines(sky, reference, tmp_path, cli_env):
    proc = latte_ingest(sky[0], tmp_path / "cache", cli_env)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    n = len(sky[1])
    assert "Start Video Index: 0.\n" in out and f"Saving Attempts: {n}: save {n} videos, failed 0 videos.\n" in out
    assert f"Manifest: {tmp_path / 'cache'}/manifest/part-00000-of-00001.parquet" in out
    assert snapshot(tmp_path / "cache") == reference[1]


@pytest.mark.parametrize("kill", ["manifest:1:torn", "manifest:3", "latents:9", "observed"])
def test_resume_after_sigkill_equals_uninterrupted_run(sky, reference, tmp_path, cli_env, kill):
    cache = tmp_path / "cache"
    if kill == "observed":  # from outside, mid-entry after the first commit, however fast the run is
        proc = latte_ingest(sky[0], cache, cli_env, kill="pause")
        wait_until_paused(proc, cache)
        proc.kill()
    else:
        proc = latte_ingest(sky[0], cache, cli_env, kill=kill)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL, err
    partial = snapshot(cache)  # consistent: every ok row reads back with its checksum
    assert len(partial) < len(reference[1])
    assert all(reference[1][i] == row for i, row in partial.items())
    if kill in ("manifest:3", "latents:9"):  # two entries committed, the third's part or a shard file torn
        assert len(partial) == 2
    ingest(sky[0], cache)
    assert snapshot(cache) == reference[1]
    assert not list((cache / "manifest").glob(".*.tmp"))


def test_ctrl_c_commits_finished_entries_and_prints_the_status_lines(sky, reference, tmp_path, cli_env):
    cache = tmp_path / "cache"
    proc = latte_ingest(sky[0], cache, cli_env, kill="pause")  # mid-entry after the first commit
    wait_until_paused(proc, cache)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    assert "latte ingest: interrupted" in err
    assert "Interrupted: finished entries are committed" in out and "Start Video Index: 0." in out
    saved = int(out.split("save ")[1].split(" videos")[0])
    assert 1 <= saved < len(reference[1])
    assert f"Saving Attempts: {saved}: save {saved} videos" in out
    assert len(snapshot(cache)) == saved  # every entry reported saved is committed
    ingest(sky[0], cache)
    assert snapshot(cache) == reference[1]


def test_two_shard_processes_write_what_one_process_writes(sky, reference, tmp_path, cli_env):
    cache = tmp_path / "cache"
    first = latte_ingest(sky[0], cache, cli_env, "--num_shards", "2", "--shard_index", "0")
    second = latte_ingest(sky[0], cache, dict(cli_env, RANK_ID="1", RANK_SIZE="2"))  # as msrun sets them
    for proc in (first, second):
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        assert "save 3 videos, failed 0 videos" in out
    store = cache_store.open(cache)
    assert {r["writer"] for r in store.rows().values()} == {"00000-of-00002", "00001-of-00002"}
    assert snapshot(cache) == reference[1]


# ---------------------------------------------------------------- damage, locks, noisy decoders


def test_verify_mark_failed_then_retry_failed_repairs_damage_in_the_last_partly_filled_shard(sky, reference,
                                                                                           tmp_path, capsys):
    from cache_store import cli

    cache = tmp_path / "cache"
    shutil.copytree(reference[0], cache)
    store = cache_store.open(cache)
    last = max(store.rows().values(), key=lambda r: r["row_start"] + r["num_frames"])
    shard_frames = store.layout["shard_frames"]
    tail = last["row_start"] + last["num_frames"]
    assert tail % shard_frames, "the writer's last shard must be partly filled for this test"
    shard = cache / last["location"] / f"c/{tail // shard_frames}/0/0/0/0"
    raw = bytearray(shard.read_bytes())
    raw[20] ^= 0x01  # one bit of the last shard's first chunk, which the resumed writer reloads
    shard.write_bytes(bytes(raw))
    assert cli.main(["verify", str(cache), "--mark_failed"]) == 1
    assert f"CORRUPT {last['id']}:" in capsys.readouterr().out
    result = ingest(sky[0], cache, "--retry_failed")
    assert (result.saved, result.failed) == (1, 0)
    assert cli.main(["verify", str(cache)]) == 0
    assert snapshot(cache) == reference[1]
    assert shard.read_bytes() == bytes(raw)  # the damaged file is left as it was, not rewritten


def test_a_shard_another_process_is_writing_is_a_one_line_error_before_the_vae_loads(sky, reference, tmp_path,
                                                                                     capsys, monkeypatch,
                                                                                     restore_pynative):
    cache = tmp_path / "cache"
    shutil.copytree(reference[0], cache)

    def no_vae(*a, **k):
        raise AssertionError("the VAE was loaded")

    monkeypatch.setattr(pipeline, "build_vae", no_vae)
    argv = [*BASE, "--data_folder", str(sky[0]), "--cache_folder", str(cache), "--retry_failed"]
    with cache_store.open(cache).writer(0, 1):  # holds the shard's lock as another process would
        assert cli.main(argv) == 2
    out, err = capsys.readouterr()
    assert err.startswith("latte ingest: error:") and err.count("\n") == 1, err
    assert "another process is writing shard 00000-of-00001" in err and "Saving Attempts" not in out


def test_decord_open_errors_do_not_reach_stderr(tmp_path, capfd):
    import sys as _sys

    from ingest.readers import open_reader
    from ingest.sources import EntryError

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 not really a video")
    (entry,) = discover_entries(tmp_path / "data")
    print("before", file=_sys.stderr, flush=True)
    with pytest.raises(EntryError, match="not a readable video"):
        open_reader(entry)
    print("after", file=_sys.stderr, flush=True)
    err = capfd.readouterr().err
    assert "ERROR opening" not in err and err == "before\nafter\n", err
