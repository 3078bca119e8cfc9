"""Beyond one process: elastic resume (another number of ranks, the same global batch) and msrun's
multi-node form (two msrun invocations, node_rank 0 and 1, on this machine).

Every msrun start costs 10-20 s, so the runs are tiny (Latte hidden 64, 8x8 latents, pynative) and
few: the uninterrupted 2-rank run doubles as the first leg of the elastic one."""
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from trainer import checkpoint as ckpt
from trainer.config import TrainConfig
from trainer.data import BatchLayout
from trainer.logs import read_log
from latent_cache import clip_source, make_latent_cache

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "training" / "tiny_cache.yaml")
BIN = Path(sys.executable).parent
ENV = {**os.environ, "GLOG_v": "3", "PYTHONPATH": str(ROOT), "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
for key in ("RANK_ID", "RANK_SIZE", "MS_WORKER_NUM", "MS_NODE_ID", "MS_ROLE"):
    ENV.pop(key, None)

# On one machine both msrun invocations see 127.0.0.1 as their own address and would each start the
# scheduler; the second one's cannot bind the port. A real second machine does not, so node 1 runs
# msrun as a machine whose master is elsewhere: msrun's own entry point with its "is this my address"
# check answering no. Everything else (environment, ranks, rendezvous) is msrun's.
REMOTE_NODE_MSRUN = ("import sys\n"
                     "import mindspore.parallel.cluster.process_entity._api as api\n"
                     "api._is_local_ip = lambda ip: False\n"
                     "from mindspore.parallel.cluster.run import main\n"
                     "sys.argv[0] = 'msrun'\n"
                     "sys.exit(main())\n")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _msrun(logs, script_args, workers=2, node_rank=None, port=None):
    """The msrun command line (single node, or one node of `workers` one-worker nodes)."""
    local = workers if node_rank is None else 1
    launcher = [str(BIN / "msrun")] if not node_rank else [sys.executable, "-c", REMOTE_NODE_MSRUN]
    cmd = [*launcher, f"--worker_num={workers}", f"--local_worker_num={local}", "--master_addr=127.0.0.1",
           f"--master_port={port or _free_port()}", "--join=True", f"--log_dir={logs}"]
    if node_rank is not None:
        cmd.append(f"--node_rank={node_rank}")
    return cmd + [str(ROOT / "latte_cli.py"), *map(str, script_args)]


def _run(cmd, cwd, timeout=400):
    out = subprocess.run(cmd, env=ENV, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    logs = "".join(p.read_text() for p in Path(cwd).rglob("worker_*.log"))
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:] + logs[-3000:]
    return out


def _fingerprints(logs):
    """{rank: weights fingerprint} printed by each worker at the end of `latte train`."""
    prints = [line.split() for p in Path(logs).glob("worker_*.log") for line in p.read_text().splitlines()
              if "weights fingerprint" in line]
    return {line[1]: line[-1] for line in prints}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cache") / "latents"
    make_latent_cache(folder, num_entries=10, frames=(6, 12), latent_size=8, seed=0, short_entries=1)
    return str(folder)


def _train_args(cache, out, *more):
    return ["train", "-c", TINY, "--cache_folder", cache, "--output_folder", out, "--val_every", 0,
            "--mode", "pynative", "--progress", "False", "--batch_size", 2, "--keep_checkpoints", 10, *more]


# ------------------------------------------------------------------------------------------------
# elastic resume
# ------------------------------------------------------------------------------------------------

def _global_sequence(source, legs, seed, num_timesteps=1000):
    """{global index: (entry id, window start, latent, t, diffusion noise)} of every sample the ranks
    of `legs` (world, batch, accumulation, steps) read, through the trainer's own functions."""
    from trainer.train import _micro_batch

    cfg = TrainConfig(cache_folder="c", seed=seed)
    seen, first = {}, 0
    for world, batch, accum, steps in legs:
        for rank in range(world):
            layout = BatchLayout(world, batch, accum, rank)
            draws = layout.rank_draws(first, steps)
            for step in range(steps):
                for micro in range(accum):
                    indices = layout.micro_indices(first, step, micro)
                    k = (step * accum + micro) * batch
                    assert draws[k:k + batch] == indices.tolist()  # the loader reads what the step keys
                    x = np.stack([source[g][0] for g in indices])
                    _, t, noise, _ = _micro_batch(cfg, None, x, np.zeros(batch, np.int32), indices, num_timesteps)
                    for i, g in enumerate(indices.tolist()):
                        idx, start, _ = source.pick(g)
                        assert g not in seen
                        seen[g] = (source.items[idx].id, start, x[i], int(t[i]), noise[i])
        first += steps * world * batch * accum
    return seen


def test_sample_order_timesteps_and_noise_follow_the_global_index_not_the_rank(cache):
    source = clip_source(cache, seed=11)
    want = _global_sequence(source, [(2, 2, 1, 6)], seed=11)
    got = _global_sequence(source, [(2, 2, 1, 2), (1, 2, 2, 2), (4, 1, 1, 1), (1, 4, 1, 1)], seed=11)
    assert sorted(got) == sorted(want) == list(range(24))
    for g in want:
        assert got[g][:2] == want[g][:2] and got[g][3] == want[g][3], g
        np.testing.assert_array_equal(got[g][2], want[g][2])
        np.testing.assert_array_equal(got[g][4], want[g][4])
    # and the sequence is not one entry over and over: epochs permute the 8 entries
    assert len({want[g][0] for g in range(8)}) == 8


def test_elastic_resume_two_ranks_to_one_with_accumulation_and_back_equals_uninterrupted(cache, tmp_path):
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    # The uninterrupted run: 2 ranks x batch 2, 6 steps, a checkpoint every 2.
    _run(_msrun(tmp_path / "logs_ref", _train_args(cache, ref, "--train_steps", 6, "--ckpt_every", 2,
                                                   "--use_parallel", True)), tmp_path)
    # Its step-2 checkpoint is what a 2-rank run stopped at step 2 leaves behind.
    (cut / "checkpoints").mkdir(parents=True)
    shutil.copy(ckpt.checkpoint_path(ref, 2), ckpt.checkpoint_path(cut, 2))
    shutil.copy(ref / "log.jsonl", cut / "log.jsonl")
    # On to step 4 on one rank with 2 accumulation steps (the same global batch of 4) ...
    one = _run([sys.executable, str(ROOT / "latte_cli.py"),
                *map(str, _train_args(cache, cut, "--train_steps", 4, "--ckpt_every", 2, "--resume", "auto",
                                      "--gradient_accumulation_steps", 2))], tmp_path)
    assert "resumed from" in one.stderr and "warning" not in one.stderr, one.stderr[-2000:]
    # ... and back to 2 ranks for steps 5 and 6.
    _run(_msrun(tmp_path / "logs_cut", _train_args(cache, cut, "--train_steps", 6, "--ckpt_every", 2,
                                                   "--resume", "auto", "--use_parallel", True)), tmp_path)

    want = {r["step"]: r for r in read_log(ref / "log.jsonl") if "loss" in r}
    got = {r["step"]: r for r in read_log(cut / "log.jsonl") if "loss" in r}
    assert sorted(got) == sorted(want) == list(range(1, 7))
    worst = 0.0
    for step in range(1, 7):
        for key in ("loss", "mse", "vb", "grad_norm"):
            # float32 sums split another way (per micro-batch, accumulated, all-reduced), a few steps on
            np.testing.assert_allclose(got[step][key], want[step][key], rtol=2e-5, err_msg=f"{key} at step {step}")
            worst = max(worst, abs(got[step][key] - want[step][key]) / abs(want[step][key]))
    print(f"largest relative difference of the logged losses: {worst:.2e}")
    a, meta_a = ckpt.load(ckpt.checkpoint_path(ref, 6))
    b, meta_b = ckpt.load(ckpt.checkpoint_path(cut, 6))
    assert meta_a["state"]["sampler"] == meta_b["state"]["sampler"]  # next global index 24, world 2
    assert meta_b["state"]["sampler"]["draw"] == 24 and meta_b["state"]["sampler"]["global_batch"] == 4
    for name in a:
        np.testing.assert_allclose(b[name], a[name], rtol=1e-4, atol=1e-6, err_msg=name)
    print(f"largest difference of the step-6 tensors (weights, EMA, AdamW moments): "
          f"{max(float(np.abs(b[n] - a[n]).max()) for n in a):.2e}")
    _, meta_4 = ckpt.load(ckpt.checkpoint_path(cut, 4))
    assert meta_4["state"]["sampler"]["world_size"] == 1 and meta_4["config"]["gradient_accumulation_steps"] == 2


# ------------------------------------------------------------------------------------------------
# two msrun nodes
# ------------------------------------------------------------------------------------------------

def _two_nodes(tmp_path, name, args_of_node, timeout=400):
    """Both nodes of a 2-worker msrun job, node_rank 0 and 1, one worker each, started side by side."""
    port = _free_port()
    procs = []
    for node in (0, 1):
        cmd = _msrun(tmp_path / f"logs_{name}_{node}", args_of_node(node), node_rank=node, port=port)
        procs.append(subprocess.Popen(cmd, env=ENV, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    outs = []
    try:
        for proc in procs:
            outs.append(proc.communicate(timeout=timeout)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    logs = "".join(p.read_text() for p in tmp_path.glob(f"logs_{name}_*/*.log"))
    assert all(p.returncode == 0 for p in procs), "".join(o[-2000:] for o in outs) + logs[-4000:]
    return [tmp_path / f"logs_{name}_{node}" for node in (0, 1)]


def test_two_msrun_nodes_ingest_what_one_process_does_and_train_with_identical_weights(tmp_path):
    import cache_store
    from ingest import cli, pipeline
    from ingest.synthetic import make_sky_dataset

    make_sky_dataset(tmp_path / "sky", num_videos=2, clips_per_video=3, frames_per_clip=10, size=(64, 64), seed=4)
    ingest = ["-c", str(ROOT / "configs/ingest/tiny.yaml"), "--image_size", "64", "--data_folder", tmp_path / "sky",
              "--progress", "false", "--mode", "pynative"]
    pipeline.run_ingest(cli.parse_args([*map(str, ingest), "--cache_folder", str(tmp_path / "one")]),
                        environ={})
    _two_nodes(tmp_path, "ingest", lambda node: ["ingest", *ingest, "--cache_folder", tmp_path / "two"])
    one, two = cache_store.open(tmp_path / "one"), cache_store.open(tmp_path / "two")
    assert two.verify() == []
    assert {r["writer"] for r in two.rows().values()} == {"00000-of-00002", "00001-of-00002"}
    keys = ("status", "num_frames", "checksum", "source")
    assert {i: [r[k] for k in keys] for i, r in two.rows().items()} == \
        {i: [r[k] for k in keys] for i, r in one.rows().items()}
    assert len(one.rows()) == 6

    # Train on the 2-node store: each node names its own output folder, so that one is seen to stay empty.
    logs = _two_nodes(tmp_path, "train", lambda node: _train_args(
        tmp_path / "two", tmp_path / f"out{node}", "--train_steps", 3, "--ckpt_every", 3, "--val_entries", 0,
        "--use_parallel", True))
    prints = {**_fingerprints(logs[0]), **_fingerprints(logs[1])}
    assert sorted(prints) == ["0/2:", "1/2:"], prints
    assert len(set(prints.values())) == 1, prints  # identical weights on both ranks
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "out0")] == [3]
    assert not (tmp_path / "out1").exists()  # rank 1 writes nothing
    start = next(r for r in read_log(tmp_path / "out0" / "log.jsonl") if r.get("event") == "start")
    assert start["world_size"] == 2 and start["global_batch"] == 4
