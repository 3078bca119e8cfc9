"""`setup_device(cpu_threads=N)`: MindSpore's CPU ops compute on N threads in all.

MindSpore builds its CPU thread pool once per process, so each case is a fresh child process. The
check is the pool MindSpore built (its worker threads are named ActorThread_<i> / KernelThread_<i>,
and a split op runs its parts on both kinds): deterministic, unlike CPU-seconds over wall time,
which bench/ measures."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]

# a MatMul (oneDNN, split over the pool) and a BatchMatMul + Softmax, as in Latte's attention;
# prints the outputs and the names of the process's threads
CHILD = r"""
import json, os, sys
import numpy as np
from models.runtime import setup_device
setup_device("CPU", sys.argv[2], cpu_threads=int(sys.argv[1]))
import mindspore as ms
from mindspore import ops

def mm(x):
    return ops.matmul(x, x)

def attention(q, k):
    return ops.softmax(ops.bmm(q, k.transpose(0, 2, 1)), -1)

if sys.argv[2] == "graph":
    mm, attention = ms.jit(mm), ms.jit(attention)
rng = np.random.default_rng(0)
x = rng.standard_normal((384, 384), np.float32)
q = rng.standard_normal((6, 64, 32), np.float32)
out = {"mm": mm(ms.Tensor(x)).asnumpy().tolist(), "attention": attention(ms.Tensor(q), ms.Tensor(q)).asnumpy().tolist()}
tasks = f"/proc/{os.getpid()}/task"
out["threads"] = sorted(open(f"{tasks}/{t}/comm").read().strip() for t in os.listdir(tasks))
print(json.dumps(out))
"""


def _run(tmp_path, threads, mode):
    child = tmp_path / "child.py"  # ms.jit reads its function's source from a file
    child.write_text(CHILD)
    env = dict(os.environ, PYTHONPATH=str(ROOT), GLOG_v="3", LATTE_COMPILE_CACHE="0")
    proc = subprocess.run([sys.executable, str(child), str(threads), mode], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _pool(names):
    return (sum(n.startswith("ActorThread_") for n in names), sum(n.startswith("KernelThread_") for n in names))


def _check_values(out):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((384, 384), np.float32)
    q = rng.standard_normal((6, 64, 32), np.float32)
    want = x.astype(np.float64) @ x
    np.testing.assert_allclose(out["mm"], want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    s = np.einsum("bij,bkj->bik", q.astype(np.float64), q)
    p = np.exp(s - s.max(-1, keepdims=True))
    np.testing.assert_allclose(out["attention"], p / p.sum(-1, keepdims=True), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["graph", "pynative"])
def test_one_cpu_thread_means_one_computing_thread(tmp_path, mode):
    """threads_num(1) alone built one actor and one kernel thread, and a MatMul ran on both; now the
    pool is one actor thread and no kernel thread, so every op runs on the thread that launches it."""
    out = _run(tmp_path, 1, mode)
    assert _pool(out["threads"]) == (1, 0), out["threads"]
    _check_values(out)


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="MindSpore caps its pool at the core count")
def test_two_cpu_threads_mean_two_computing_threads(tmp_path):
    out = _run(tmp_path, 2, "graph")
    actors, kernels = _pool(out["threads"])
    assert actors + kernels == 2, out["threads"]
    _check_values(out)
