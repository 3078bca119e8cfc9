"""The compile cache that models.runtime.setup_device turns on in graph mode: a second process loads
the graphs the first one saved, any change to what a graph depends on gives a new folder, a run whose
graphs differ from those cached never loads one by position, and results are bit-equal either way.

Each run is a fresh child process (the cache path is read once per process, at its first compile)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]

# A small graph with a fused C++ kernel (an aot custom op) and batch sizes from $BATCHES (not the
# command line, which keys the folder); prints
# the cache folder and the output as JSON.
CHILD = r"""
import json, os, sys
import numpy as np
import pytest
from models.runtime import setup_device
import models.runtime as runtime
setup_device("CPU", "graph", cpu_threads=1)
import mindspore as ms
from mindspore import nn, ops
from models.conv_select import Im2ColConv

class Net(nn.Cell):
    def __init__(self):
        super().__init__()
        self.conv = Im2ColConv()
        width = int(os.environ.get("WIDTH", "4"))
        self.w = ms.Tensor(np.random.default_rng(0).standard_normal((width, 3, 3, 3), np.float32))
        self.b = ms.Tensor(np.linspace(-1, 1, width, dtype=np.float32))
        self.p = ms.Parameter(ms.Tensor(np.ones(width, np.float32)), name="p")
        self.jitted = ms.jit(self.halve)  # how the VAE compiles its encoder and decoder
        # an operator picked per machine (as dense_select picks sgemm or MatMul): same inputs and weights
        self.act = ops.Sigmoid() if os.environ.get("ACT") == "sigmoid" else ops.ReLU()
    def construct(self, x):
        return self.act(self.conv(x, self.w, self.b)) * self.p.reshape(1, -1, 1, 1) * 2
    def halve(self, x):
        return self.conv(x, self.w, self.b) * 0.5

net = Net()
outs = []
for n in map(int, os.environ["BATCHES"].split(",")):
    x = ms.Tensor(np.random.default_rng(n).standard_normal((n, 3, 6, 6), np.float32))
    outs.append(net(x).asnumpy().tolist())
    outs.append(net.jitted(x).asnumpy().tolist())
if os.environ.get("SELECTED_CONV"):
    # large enough for conv_select to consult its choice file (a conv per frame of >= MIN_MACS)
    from models.conv_select import SelectedConv
    class Big(nn.Cell):
        def __init__(self):
            super().__init__()
            self.conv = SelectedConv()
        def construct(self, x, w, b):
            return self.conv(x, w, b)
    rng = np.random.default_rng(0)
    xb = ms.Tensor(rng.standard_normal((1, 64, 128, 128), np.float32))
    wb = ms.Tensor(rng.standard_normal((64, 64, 3, 3), np.float32) / 24)
    outs.append(Big()(xb, wb, ms.Tensor(np.zeros(64, np.float32))).asnumpy()[0, :2].tolist())
if os.environ.get("JIT_STEP"):
    # a training-step shape: an ms.jit function closing over parameters it updates in place
    from mindspore import Parameter
    w = Parameter(ms.Tensor(np.ones((3, 3), np.float32)), name="w")
    def loss_fn(x):
        return (ops.matmul(x, w) ** 2).sum()
    grad = ms.value_and_grad(loss_fn, None, [w])
    @ms.jit
    def step(x):
        loss, (g,) = grad(x)
        ops.assign_sub(w, g * 0.01)
        return loss
    outs.append([float(step(ms.Tensor(np.full((2, 3), 0.5, np.float32))).asnumpy()) for _ in range(3)])
print("RESULT " + json.dumps({"folder": os.environ.get("MS_COMPILER_CACHE_PATH") if os.environ.get("MS_COMPILER_CACHE_ENABLE") == "1" else None,
                             "outs": outs}))
"""


def _run(tmp_path, batches, cache="", jit_step="", selected_conv="", width=4, act="relu"):
    env = dict(os.environ, PYTHONPATH=str(ROOT), GLOG_v="2", LATTE_KERNEL_DIR=str(tmp_path / "kernels"),
               LATTE_COMPILE_CACHE=cache or str(tmp_path / "compile"), BATCHES=batches, JIT_STEP=jit_step,
               SELECTED_CONV=selected_conv, WIDTH=str(width), ACT=act)
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env,
                         cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    line = next(l for l in run.stdout.splitlines() if l.startswith("RESULT "))
    result = json.loads(line[len("RESULT "):])
    result["loaded"] = run.stderr.count("Use the compilation cache")
    result["stderr"] = run.stderr
    return result


def test_compile_cache_second_process_loads_saved_graphs(tmp_path):
    first = _run(tmp_path, "2")
    assert first["folder"] and first["loaded"] == 0
    folder = Path(first["folder"])
    assert list(folder.rglob("compile_cache_0.mindir"))
    assert json.loads((folder / "signatures_rank0.json").read_text())
    second = _run(tmp_path, "2")
    assert second["folder"] == first["folder"]
    assert second["loaded"] == 2  # the Cell's graph and its ms.jit method's
    assert np.array_equal(np.array(second["outs"]), np.array(first["outs"]))


def test_compile_cache_results_bit_equal_without_cache(tmp_path):
    cached = _run(tmp_path, "2,3")
    reloaded = _run(tmp_path, "2,3")
    uncached = _run(tmp_path, "2,3", cache="0")
    assert uncached["folder"] is None and uncached["loaded"] == 0 and reloaded["loaded"] == 4
    for a, b, c in zip(cached["outs"], reloaded["outs"], uncached["outs"]):
        assert np.array_equal(np.array(a), np.array(c)) and np.array_equal(np.array(b), np.array(c))


def test_compile_cache_never_loads_a_graph_of_other_shapes(tmp_path, monkeypatch):
    """MindSpore loads cached graphs by compile order only: without the guard a (3, ...) input ran the
    graph compiled for (2, ...) and returned 2 rows. Same command line and config, so the same folder."""
    _run(tmp_path, "2,3")
    swapped = _run(tmp_path, "2,5")
    assert [len(o) for o in swapped["outs"]] == [2, 2, 5, 5]
    assert swapped["loaded"] == 2  # the (2, ...) graphs, still in place
    assert "compiling the rest of this run afresh" in swapped["stderr"]


def test_compile_cache_never_loads_the_graph_of_a_network_of_another_width(tmp_path):
    """Same command line, same input shapes, another network (wider weights and constants): the
    graphs of the first must not be loaded for the second."""
    _run(tmp_path, "2")
    wider = _run(tmp_path, "2", width=6)
    assert wider["loaded"] == 0 and "compiling the rest of this run afresh" in wider["stderr"]
    assert np.array(wider["outs"][0]).shape == (2, 6, 6, 6)


def test_compile_cache_never_loads_the_graph_of_another_operator_choice(tmp_path):
    """Same command line, inputs and weights, but another operator in the network (what a changed
    per-machine choice such as dense_select's sgemm vs MatMul makes): the first run's graph must not
    be loaded, or the second would compute with the first's operators."""
    _run(tmp_path, "2")
    other = _run(tmp_path, "2", act="sigmoid")
    assert "compiling the rest of this run afresh" in other["stderr"]
    uncached = _run(tmp_path, "2", cache="0", act="sigmoid")
    assert np.array_equal(np.array(other["outs"][0]), np.array(uncached["outs"][0]))


def test_compile_cache_key_changes_with_model_sources(tmp_path, monkeypatch):
    from models import runtime
    monkeypatch.setenv("LATTE_KERNEL_DIR", str(tmp_path))
    before = runtime.compile_cache_key("CPU", "graph", 1, ["latte", "train"])
    assert before == runtime.compile_cache_key("CPU", "graph", 1, ["latte", "train"])
    real = runtime._source_hash
    monkeypatch.setattr(runtime, "_source_hash", lambda: real() + "changed")
    assert runtime.compile_cache_key("CPU", "graph", 1, ["latte", "train"]) != before


def test_compile_cache_key_changes_with_forced_conv_and_config(tmp_path, monkeypatch):
    from models import runtime
    cfg = tmp_path / "run.yaml"
    cfg.write_text("batch_size: 1\n")
    argv = ["latte", "train", "-c", str(cfg)]
    before = runtime.compile_cache_key("CPU", "graph", 1, argv)
    cfg.write_text("batch_size: 2\n")
    after_config = runtime.compile_cache_key("CPU", "graph", 1, argv)
    monkeypatch.setenv("LATTE_CONV", "native")
    forced = runtime.compile_cache_key("CPU", "graph", 1, argv)
    assert len({before, after_config, forced}) == 3


def test_compile_cache_key_ignores_the_output_folder(tmp_path):
    """A training run into a new --output_folder compiles the same graphs: it reuses the folder."""
    from models import runtime
    argv = ["latte", "train", "-c", "x.yaml", "--output_folder", "runs/a", "--train_steps", "2"]
    key = runtime.compile_cache_key("CPU", "graph", 1, argv)
    assert key == runtime.compile_cache_key("CPU", "graph", 1, [a.replace("runs/a", "runs/b") for a in argv])
    assert key == runtime.compile_cache_key("CPU", "graph", 1, argv[:4] + ["--output_folder=runs/c"] + argv[6:])
    assert key != runtime.compile_cache_key("CPU", "graph", 1, argv[:-1] + ["3"])


def test_compile_cache_reloads_a_graph_only_while_its_conv_choice_holds(tmp_path):
    """A graph keeps the convolution it was compiled with: after the choice file changes (re-measured
    on another load, or edited), that graph is compiled afresh, never reloaded with the old conv."""
    from models import conv_select
    choices = tmp_path / "kernels" / f"conv_select_{conv_select.isa_key()}_{conv_select.kernels.source_digest()}.json"
    choices.parent.mkdir()
    choices.write_text(json.dumps({"64x128x128->64@t1": "winograd2"}))
    first = _run(tmp_path, "2", selected_conv="1")
    manifest = json.loads(next((tmp_path / "compile").rglob("signatures_rank0.json")).read_text())
    assert [64, 128, 128, 64, "winograd2"] in [c for e in manifest for c in e["convs"]]
    assert _run(tmp_path, "2", selected_conv="1")["loaded"] == 3
    choices.write_text(json.dumps({"64x128x128->64@t1": "im2col"}))
    changed = _run(tmp_path, "2", selected_conv="1")
    assert changed["loaded"] == 2  # the two small graphs before it
    assert "compiling the rest of this run afresh" in changed["stderr"]
    a, b = np.array(first["outs"][-1]), np.array(changed["outs"][-1])
    assert not np.array_equal(a, b)  # im2col's rounding, not the reloaded Winograd graph's
    np.testing.assert_allclose(b, a, rtol=0, atol=conv_select.TOLERANCE * np.abs(a).max() * 2)


def test_compile_cache_leaves_jit_functions_outside_a_cell_uncached(tmp_path):
    """Reloaded from the cache, an ms.jit step outside a Cell (trainer/step.py's before StepGraphs)
    gave loss NaN at its first step, measured on `latte train`: MindSpore binds weights only for
    Cells. The first such compile ends caching for its process."""
    first = _run(tmp_path, "2", jit_step="1")
    second = _run(tmp_path, "2", jit_step="1")
    assert second["loaded"] == 2  # the Cell graphs before it
    assert second["outs"][-1] == first["outs"][-1] and np.isfinite(second["outs"][-1]).all()


def test_compile_cache_prunes_folders_unused_for_a_month(tmp_path):
    import time
    from models import runtime
    old, recent, current = (tmp_path / name for name in ("old", "recent", "current"))
    for folder in (old, recent, current):
        (folder / "rank_0").mkdir(parents=True)
    month_ago = time.time() - (runtime.CACHE_MAX_AGE_DAYS + 1) * 86400
    os.utime(old, (month_ago, month_ago))
    os.utime(current, (month_ago, month_ago))  # in use now: kept whatever its age
    runtime.prune_compile_cache(tmp_path, keep=current)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["current", "recent"]


# ------------------------------------------------------------------------------------------------
# the training step (trainer/step.py's StepGraphs) through the cache
# ------------------------------------------------------------------------------------------------

def _train(tmp_path, name, cache, *args):
    """A tiny `latte train` (baseline validation at step 0, 2 steps) in a fresh process; returns its
    losses, grad norms, final checkpoint tensors, how many graphs it loaded from the cache and stderr."""
    from safetensors.numpy import load_file
    from trainer.logs import read_log
    out = tmp_path / name
    env = dict(os.environ, PYTHONPATH=str(ROOT), GLOG_v="2", LATTE_KERNEL_DIR=str(tmp_path / "kernels"),
               LATTE_COMPILE_CACHE=cache)
    # the same command line each time (it keys the cache folder): the output folder is moved aside after
    cmd = [sys.executable, str(ROOT / "latte_cli.py"), "train", "-c", str(ROOT / "configs/training/tiny_cache.yaml"),
           "--progress", "False", "--cache_folder", str(tmp_path / "latents"), "--output_folder",
           str(tmp_path / "out"), "--train_steps", "2", *args]
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    (tmp_path / "out").rename(out)
    records = read_log(str(out / "log.jsonl"))
    tensors = load_file(str(next((out / "checkpoints").glob("step_0000002.safetensors"))))
    return {"stats": [(r["step"], r.get("loss"), r.get("grad_norm"), r.get("val_loss")) for r in records
                      if "loss" in r or "val_loss" in r],
            "tensors": tensors, "loaded": run.stderr.count("Use the compilation cache"), "stderr": run.stderr}


@pytest.mark.parametrize("accumulation", [1, 2], ids=["fused", "buffered"])
def test_compile_cache_reloads_the_training_step_bit_equal(tmp_path, accumulation):
    """A repeated `latte train` loads its step's graphs (fused; or accumulate/finish/apply) and the
    validation graph from the cache, and its losses, grad norms and final weights, EMA and optimizer
    moments equal the first run's exactly (the first run compiles, as an uncached run does; cached
    and uncached graphs are compared in test_compile_cache_results_bit_equal_without_cache). A
    reloaded ms.jit step outside a Cell got no weights bound and ran to loss NaN at step 1."""
    from latent_cache import make_latent_cache
    make_latent_cache(tmp_path / "latents", num_entries=10, frames=(6, 12), latent_size=8, seed=0, short_entries=1)
    args = ("--gradient_accumulation_steps", accumulation)
    args = tuple(map(str, args))
    cache = str(tmp_path / "compile")
    first = _train(tmp_path, "first", cache, *args)
    manifest = next(Path(cache).rglob("signatures_rank0.json"))
    graphs = json.loads(manifest.read_text())
    saved = sorted(Path(cache).rglob("*.mindir"))
    names = [g["graph"].rsplit(".", 1)[-1] for g in graphs]
    assert names == (["_eval_loss", "_fused_step"] if accumulation == 1 else
                     ["_eval_loss", "_accumulate_step", "_finish_step", "_apply_step"]), names
    assert first["loaded"] == 0 and len(saved) == len(graphs)
    second = _train(tmp_path, "second", cache, *args)
    assert second["loaded"] == len(graphs) and "differ" not in second["stderr"]
    assert [p.name for p in Path(cache).iterdir() if p.is_dir()] == [manifest.parent.name]  # one folder, reused
    assert sorted(Path(cache).rglob("*.mindir")) == saved
    assert all(np.isfinite(v) for s in second["stats"] for v in s[1:] if v is not None)
    assert second["stats"] == first["stats"]
    assert second["tensors"].keys() == first["tensors"].keys()
    for name, value in first["tensors"].items():
        assert np.array_equal(second["tensors"][name], value), name
