"""A latent cache at an s3:// URL, against a real S3 server (moto) that these tests start on 127.0.0.1
at a free port: ingest -> info -> verify -> train, SIGKILL and resume, two shards at once, a corrupted
object, the server going away mid-run, and the one-line errors for bad buckets, credentials,
endpoints and schemes. Latents come from the demo VAE on 32 px frames (4x4 latents), so every run
is a few seconds; what a run stored is compared with a local-disk run of the same command."""
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("s3fs", reason="the s3 extra (pip install latte-ms[s3]) is not installed")
moto_server = pytest.importorskip("moto.server", reason="moto[server] (the test extra) is not installed")

import cache_store  # noqa: E402
from cache_store import cli  # noqa: E402
from ingest import cli as ingest_cli, pipeline  # noqa: E402
from ingest.synthetic import make_sky_dataset  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BASE = ["-c", str(ROOT / "demo/ingest.yaml"), "--vae_weights", str(ROOT / "demo/sky_vae.safetensors"), "--image_size", "32", "--micro_batch", "4", "--commit_every", "1",
        "--chunk_frames", "4", "--shard_frames", "8", "--progress", "false"]
COMPARED = ("status", "reason", "num_frames", "checksum", "source", "kind", "source_bytes")
CREDS = {"AWS_ACCESS_KEY_ID": "testing-key", "AWS_SECRET_ACCESS_KEY": "testing-secret-do-not-print",
         "AWS_DEFAULT_REGION": "us-east-1"}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """moto's S3 in this process. Its buckets live in moto's in-process backend, so a server stopped
    and started again on the same port serves the same objects (the store 'coming back')."""

    def __init__(self):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = None

    def start(self):
        self.server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()

    def stop(self):
        self.server.stop()


@pytest.fixture(scope="module")
def s3():
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    saved = {k: os.environ.get(k) for k in [*CREDS, "AWS_ENDPOINT_URL"]}
    server = Server()
    server.start()
    os.environ.update(CREDS, AWS_ENDPOINT_URL=server.url)
    import boto3

    client = boto3.client("s3", endpoint_url=server.url)
    client.create_bucket(Bucket="lake")
    yield server, client
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def sky(tmp_path_factory):
    root = tmp_path_factory.mktemp("sky") / "data"
    make_sky_dataset(root, num_videos=2, clips_per_video=2, frames_per_clip=8, size=(40, 48), layout="nested",
                     seed=3)
    return root


def ingest(data, cache, *more):
    cfg = ingest_cli.parse_args([*BASE, "--data_folder", str(data), "--cache_folder", str(cache), *more])
    return pipeline.run_ingest(cfg, environ={})


def snapshot(cache):
    """{id: row fields} of a cache whose every ok entry verifies (checksums equal = latents bit-equal)."""
    store = cache if isinstance(cache, cache_store.Store) else cache_store.open(str(cache))
    assert store.verify() == []
    return {i: tuple(r[k] for k in COMPARED) for i, r in store.rows().items()}


@pytest.fixture(scope="module")
def reference(sky, tmp_path_factory):
    cache = tmp_path_factory.mktemp("ref") / "cache"
    ingest(sky, cache)
    return snapshot(cache)


@pytest.fixture(scope="module")
def cli_env(s3, tmp_path_factory):
    env = dict(os.environ, GLOG_v="3", PYTHONPATH=str(ROOT), MS_COMPILER_CACHE_ENABLE="1",
               MS_COMPILER_CACHE_PATH=str(tmp_path_factory.mktemp("ms_compile_cache")))
    for key in ("RANK_ID", "RANK_SIZE", "MS_WORKER_NUM", "MS_NODE_ID", "MS_ROLE"):
        env.pop(key, None)
    return env


DRIVER = """import os, signal, sys, time
sys.path.insert(0, {root!r})
spec = os.environ.get('LATTE_TEST_PUT')
if spec:  # before the N-th PUT of a manifest part / latents shard object: SIGKILL, or pause until told
    import cache_store.fs as fs
    import zarr.storage as zs
    where, nth, how = spec.split(':')
    seen = [0]
    def before_put():
        seen[0] += 1
        if seen[0] == int(nth):
            if how == 'kill':
                os.kill(os.getpid(), signal.SIGKILL)
            flag = os.environ['LATTE_TEST_FLAG']
            open(flag + '.paused', 'w').close()
            while not os.path.exists(flag + '.go'):
                time.sleep(0.01)
    real_pipe, real_set = fs.Location.pipe, zs.FsspecStore.set
    def pipe(self, rel, data):
        if where == 'manifest' and rel.startswith('manifest/part-'):
            before_put()
        return real_pipe(self, rel, data)
    async def set(self, key, value, *a, **k):
        if where == 'latents' and '/c/' in key:
            before_put()
        return await real_set(self, key, value, *a, **k)
    fs.Location.pipe, zs.FsspecStore.set = pipe, set
import latte_cli
sys.exit(latte_cli.main(['ingest', *sys.argv[1:]]))
"""


def latte_ingest(data, url, env, tmp_path, *more, put=None):
    script = tmp_path / "latte_ingest_driver.py"
    script.write_text(DRIVER.format(root=str(ROOT)))
    env = dict(env, LATTE_TEST_PUT=put or "", LATTE_TEST_FLAG=str(tmp_path / "flag"))
    argv = [sys.executable, str(script), *BASE, "--data_folder", str(data), "--cache_folder", url, *more]
    return subprocess.Popen(argv, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(path, proc, timeout=120):
    t0 = time.monotonic()
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() - t0 < timeout
        time.sleep(0.01)


# ------------------------------------------------------------------------------------------------


def test_ingest_info_verify_and_train_from_an_s3_url(s3, sky, reference, tmp_path, cli_env, capsys):
    url = "s3://lake/caches/sky"
    result = ingest(sky, url)
    assert result.saved == len(reference) and result.manifest == f"{url}/manifest/part-00000-of-00001.parquet"
    assert snapshot(url) == reference  # the same latents, bit for bit, as on local disk
    keys = [o["Key"] for o in s3[1].list_objects_v2(Bucket="lake", Prefix="caches/sky/")["Contents"]]
    assert "caches/sky/zarr.json" in keys and not [k for k in keys if "lease" in k]  # lease released
    capsys.readouterr()
    assert cli.main(["info", url]) == 0
    out = capsys.readouterr().out
    assert f"{url}: zarr latent cache" in out and f"entries:  {len(reference)} (ok {len(reference)}" in out
    assert cli.main(["verify", url]) == 0
    assert f"verified {len(reference)} ok entries: 0 corrupt" in capsys.readouterr().out
    assert ingest(sky, url).already_ok == len(reference)  # rerun: nothing redone

    run = tmp_path / "run"
    train = subprocess.run(
        [sys.executable, str(ROOT / "latte_cli.py"), "train", "-c", str(ROOT / "demo/train.yaml"), "--cache_folder",
         url, "--output_folder", str(run), "--train_steps", "2", "--batch_size", "2", "--num_frames", "4",
         "--sample_stride", "1", "--hidden_size", "32", "--depth", "2", "--num_heads", "2", "--ckpt_every", "2",
         "--warmup_steps", "0", "--mode", "pynative", "--progress", "false"],
        env=cli_env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert train.returncode == 0, train.stderr[-3000:]
    assert (run / "checkpoints" / "step_0000002.safetensors").is_file()
    written = "".join(p.read_text(errors="replace") for p in run.rglob("*") if p.suffix in (".yaml", ".jsonl"))
    assert url in written and CREDS["AWS_SECRET_ACCESS_KEY"] not in written + train.stdout + train.stderr


@pytest.mark.parametrize("kill", ["manifest:2:kill", "latents:3:kill"])
def test_sigkill_during_an_s3_ingest_then_the_same_command_resumes_to_the_uninterrupted_result(
        s3, sky, reference, tmp_path, cli_env, kill):
    url = f"s3://lake/killed-{kill.split(':')[0]}"
    proc = latte_ingest(sky, url, cli_env, tmp_path, put=kill)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL, err[-2000:]
    partial = snapshot(url)  # every committed row reads back with its checksum
    assert len(partial) < len(reference) and all(reference[i] == row for i, row in partial.items())
    # the killed process's lease is still there; the same command on this host takes it over
    assert s3[1].list_objects_v2(Bucket="lake", Prefix=url[len("s3://lake/"):] + "/manifest/lease-")["KeyCount"] == 1
    ingest(sky, url)  # the same command, in this process
    assert snapshot(url) == reference


def test_two_shards_writing_one_bucket_at_once_equal_one_process(s3, sky, reference, tmp_path, cli_env):
    url = "s3://lake/sharded"
    procs = [latte_ingest(sky, url, cli_env, tmp_path / str(i), "--num_shards", "2", "--shard_index", str(i))
             for i in range(2) if (tmp_path / str(i)).mkdir() is None]
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-2000:]
    store = cache_store.open(url)
    assert {r["writer"] for r in store.rows().values()} == {"00000-of-00002", "00001-of-00002"}
    assert snapshot(url) == reference


def test_verify_finds_a_corrupted_object_and_names_the_entry(s3, sky, reference, capsys):
    url = "s3://lake/damaged"
    ingest(sky, url)
    client = s3[1]
    key = "damaged/latents/00000-of-00001/c/0/0/0/0/0"  # the first shard object: rows 0..7 = entry one
    raw = bytearray(client.get_object(Bucket="lake", Key=key)["Body"].read())
    raw[100:108] = bytes(8)  # inside the first chunk, whose crc32c no longer matches
    client.put_object(Bucket="lake", Key=key, Body=bytes(raw))
    capsys.readouterr()
    assert cli.main(["verify", url]) == 1
    out = capsys.readouterr().out
    first = sorted(reference)[0]
    assert f"CORRUPT {first}:" in out and f"verified {len(reference)} ok entries: 1 corrupt" in out


def test_server_going_away_mid_ingest_is_one_line_keeps_the_commits_and_the_rerun_completes(
        s3, sky, reference, tmp_path, cli_env):
    server = Server()  # a second endpoint of the same in-process moto, so stopping it spares the others
    server.start()
    env = dict(cli_env, AWS_ENDPOINT_URL=server.url)
    url = "s3://lake/outage"
    proc = latte_ingest(sky, url, env, tmp_path, put="manifest:3:pause")  # two entries committed
    wait_for(tmp_path / "flag.paused", proc)
    server.stop()
    (tmp_path / "flag.go").touch()
    t0 = time.monotonic()
    out, err = proc.communicate(timeout=300)
    print(f"failed {time.monotonic() - t0:.1f}s after the server went away")
    lines = [line for line in err.splitlines() if line.startswith("latte ingest: error:")]
    assert proc.returncode == 1 and len(lines) == 1, err[-3000:]
    assert "cannot reach the object store" in lines[0] and "rerun" in lines[0] and "Traceback" not in err
    assert CREDS["AWS_SECRET_ACCESS_KEY"] not in out + err
    server.start()  # the store comes back with what was committed
    partial = snapshot(cache_store.open(url, server.url))
    assert len(partial) == 2 and all(reference[i] == row for i, row in partial.items())
    ingest(sky, url, "--s3_endpoint_url", server.url)
    assert snapshot(cache_store.open(url, server.url)) == reference
    # Gone while readers have the store open (nothing read yet): they say so, they do not cry corruption.
    reader, verifier = cache_store.open(url, server.url), cache_store.open(url, server.url)
    reader.rows()  # the manifest is in memory: the next read goes straight to the latents
    server.stop()
    with pytest.raises(cache_store.StorageError, match="cannot reach the object store"):
        reader.read_clip(sorted(reference)[0], 0, 4)
    with pytest.raises(cache_store.StorageError, match="cannot reach the object store"):
        verifier.verify()


def test_bad_bucket_endpoint_and_scheme_are_one_line_errors(s3, capsys):
    cases = {
        ("info", "s3://no-such-bucket/c"): "bucket 'no-such-bucket' does not exist",
        ("info", "s3://lake/nothing-here"): "no latent cache there",
        ("info", "s3://lake/c", "--s3_endpoint_url", f"http://127.0.0.1:{free_port()}"): "cannot reach the object store",
        ("info", "gs://bucket/c"): "gs:// scheme needs gcsfs (pip install gcsfs)",
        ("verify", "s3://key:secret@lake/c"): "credentials in the URL are not accepted",
    }
    for argv, needle in cases.items():
        t0 = time.monotonic()
        assert cli.main(list(argv)) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("latte cache: error: ") and needle in err[0], (argv, err)
        assert "secret" not in err[0] and time.monotonic() - t0 < 60, (argv, err)


def test_a_server_that_never_answers_is_a_one_line_error_within_the_timeouts(s3, monkeypatch, capsys):
    """A socket that accepts connections (the kernel's backlog) and never replies: bounded by the read
    timeout x attempts, never a hang."""
    monkeypatch.setenv("LATTE_S3_READ_TIMEOUT", "0.2")
    with socket.socket() as mute:
        mute.bind(("127.0.0.1", 0))
        mute.listen(16)
        t0 = time.monotonic()
        assert cli.main(["info", "s3://lake/c", "--s3_endpoint_url", f"http://127.0.0.1:{mute.getsockname()[1]}"]) == 2
        took = time.monotonic() - t0
    err = capsys.readouterr().err.strip().splitlines()
    print(f"gave up after {took:.1f}s")
    assert len(err) == 1 and "cannot reach the object store" in err[0], err
    assert took < 30


def test_unknown_bucket_is_one_line_for_ingest_and_train_too(s3, sky):
    from trainer.data import DataError, open_cache

    assert ingest_cli.main([*BASE, "--data_folder", str(sky), "--cache_folder", "s3://no-such-bucket/c"]) == 2
    with pytest.raises(DataError, match="cannot open the latent cache s3://no-such-bucket/c: .*does not exist"):
        open_cache("s3://no-such-bucket/c")


def test_wrong_credentials_are_a_one_line_error(s3, tmp_path, capsys):
    """A moto server that checks signatures: the test keys are unknown to it (403 InvalidAccessKeyId)."""
    port = free_port()
    env = dict(os.environ, INITIAL_NO_AUTH_ACTION_COUNT="0")
    proc = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        t0 = time.monotonic()
        while socket.socket().connect_ex(("127.0.0.1", port)) != 0:
            assert proc.poll() is None and time.monotonic() - t0 < 60
            time.sleep(0.05)
        assert cli.main(["info", "s3://lake/c", "--s3_endpoint_url", f"http://127.0.0.1:{port}"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "access denied" in err[0] and "AWS_ACCESS_KEY_ID" in err[0], err
        assert CREDS["AWS_SECRET_ACCESS_KEY"] not in err[0] and CREDS["AWS_ACCESS_KEY_ID"] not in err[0]
    finally:
        proc.kill()
        proc.wait()


def test_racing_creators_agree_other_settings_and_foreign_prefixes_are_refused(s3):
    from concurrent.futures import ThreadPoolExecutor

    settings = {"latent_shape": [4, 4, 4], "dtype": "float16"}
    with ThreadPoolExecutor(4) as pool:  # four creators at once: one conditional PUT wins, all agree
        stores = list(pool.map(lambda _: cache_store.create_or_open("s3://lake/race", settings), range(4)))
    assert all(st.settings == stores[0].settings for st in stores)
    with pytest.raises(ValueError, match="different settings .*dtype: stored 'float16', requested 'float32'"):
        cache_store.create_or_open("s3://lake/race", {**settings, "dtype": "float32"})
    s3[1].put_object(Bucket="lake", Key="foreign/notes.txt", Body=b"not a cache")
    with pytest.raises(ValueError, match="holds objects but is not a latent cache"):
        cache_store.create_or_open("s3://lake/foreign", settings)


def test_a_live_writer_holds_its_shard_lease_and_releases_it_at_close(s3):
    store = cache_store.create_or_open("s3://lake/leased", {"latent_shape": [4, 4, 4]})
    with store.writer(0, 2):
        with pytest.raises(ValueError, match=r"another process \(host .*, pid %d.*is writing shard 00000-of-00002; "
                                             r"wait for it, or if it is dead delete s3://lake/leased/manifest/"
                                             r"lease-00000-of-00002.json" % os.getpid()):
            store.writer(0, 2)
        with store.writer(1, 2):  # other shards are free
            pass
    with store.writer(0, 2):  # released at close
        pass


def test_mindrecord_at_a_url_is_refused_in_one_line(s3, sky, tmp_path):
    with pytest.raises(ValueError, match="MindRecord caches are local only"):
        ingest(sky, "s3://lake/mr", "--format", "mindrecord")
