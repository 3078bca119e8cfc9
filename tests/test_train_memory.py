"""Training-step memory changes that must not change a single number: the clip factor applied inside
the AdamW update (no scaled copy of every gradient) against the step as it was computed before."""
from dataclasses import replace

import numpy as np
import pytest

import mindspore as ms
from mindspore import Tensor, ops

from trainer.config import TrainConfig
from trainer.optim import global_norm


def _tiny_step(cfg):
    from models.diffusion import create_diffusion
    from models.latte import Latte
    from trainer.step import TrainStep

    ms.set_seed(0)
    net = Latte(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_frames=2)
    return TrainStep(net, create_diffusion(""), cfg, jit=False)


def _scaled_first_fused(g):
    """StepGraphs._fused_step before the clip moved into the update: a list of scaled gradients first."""
    def step(x0, t, noise, y, lr, decay, b1p, b2p, eps_t, max_norm, ema_decay):
        (_, stats), grads = g._grad_fn(x0, t, noise, y, Tensor(np.float32(1.0)))
        norm = global_norm(grads)
        coef = ops.minimum(max_norm / (norm + 1e-6), 1.0)
        grads = [gr * coef for gr in grads]
        g.optimizer.update(grads, lr, decay, b1p, b2p, eps_t)
        g.ema.update(ema_decay)
        return stats, norm
    return step


def _scaled_first_apply(g):
    """StepGraphs._apply_step before the change: every accumulation buffer times coef, then the update."""
    def apply(lr, decay, b1p, b2p, eps_t, coef, ema_decay):
        g.optimizer.update([a * coef for a in g.accum], lr, decay, b1p, b2p, eps_t)
        g.ema.update(ema_decay)
        for a in g.accum:
            ops.assign(a, ops.zeros_like(a))
        return ema_decay
    return apply


@pytest.mark.parametrize("accumulation", [1, 2])
def test_clip_inside_the_update_equals_scaling_every_gradient_first(accumulation):
    cfg = TrainConfig(cache_folder="c", clip_max_norm=0.05, start_clip_iter=0, weight_decay=0.01,
                      gradient_accumulation_steps=accumulation)
    rng = np.random.default_rng(0)
    batches = []
    for _ in range(3):
        x = rng.standard_normal((2, 2, 4, 8, 8)).astype(np.float32)
        noise = rng.standard_normal(x.shape).astype(np.float32)
        t, y = rng.integers(0, 1000, 2).astype(np.int32), np.zeros(2, np.int32)
        b = 2 // accumulation
        batches.append([(x[i * b:(i + 1) * b], t[i * b:(i + 1) * b], noise[i * b:(i + 1) * b], y[:b])
                        for i in range(accumulation)])
    new, ref = _tiny_step(cfg), _tiny_step(replace(cfg))
    if accumulation == 1:
        ref._fused = _scaled_first_fused(ref.graphs)
    else:
        ref._apply = _scaled_first_apply(ref.graphs)
    for s, batch in enumerate(batches):
        got, want = new(batch, s, 1e-3, 0.05, 0.9), ref(batch, s, 1e-3, 0.05, 0.9)
        assert got == want, (s, got, want)
        assert got[3] > 0.05  # the clip engaged at every step
    for name, p in new.graphs.parameters_and_names():
        other = dict(ref.graphs.parameters_and_names())[name]
        assert np.array_equal(p.asnumpy(), other.asnumpy()), name  # weights, moments, EMA, buffers


def test_heap_is_released_after_each_new_graph_compile_only(monkeypatch):
    """The compile's freed working memory goes back to the OS before the graph's first run (the
    training step's activations would land beside it), once per compiled graph, not every call."""
    from models import runtime

    runtime._release_heap_after_compiles()  # setup_device installs it; installing twice is a no-op
    runtime._release_heap_after_compiles()
    events = []
    monkeypatch.setattr(runtime, "release_freed_heap", lambda: events.append("release"))

    class Twice(ms.nn.Cell):
        @ms.jit
        def double(self, x):
            return x * 2

    cell = Twice()
    x = Tensor(np.ones((3,), np.float32))
    assert cell.double(x).asnumpy().tolist() == [2.0, 2.0, 2.0]
    cell.double(x)
    assert events == ["release"]
    cell.double(Tensor(np.ones((2, 5), np.float32)))  # another input shape: a new graph
    assert events == ["release", "release"]
