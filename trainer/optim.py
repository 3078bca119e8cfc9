"""AdamW with PyTorch's semantics, EMA, the learning-rate schedule and the fp16 loss scaler.

Why not MindSpore's optimizers: `nn.AdamWeightDecay` applies no bias correction (so its first steps
are ~30x larger than torch's), and `mindspore.experimental.optim.AdamW` matches torch but runs a
dozen small kernels per parameter. Here the update is the fused `ops.Adam` kernel, fed so that it
computes exactly torch's AdamW:

    torch:   p -= lr/bc1 * m / (sqrt(v)/sqrt(bc2) + eps),      bc_i = 1 - beta_i**step
    ops.Adam: p -= lr*sqrt(bc2)/bc1 * m / (sqrt(v) + eps')
    with eps' = eps*sqrt(bc2) the two are the same expression.

Decoupled weight decay (`p *= 1 - lr*wd`) runs first, as in torch. All per-step scalars (bias
corrections, lr) are computed on the host in float64 and passed in as tensors, so the compiled step
never recompiles and the step count lives in the checkpoint, not in the graph.
"""
import math

import numpy as np

from mindspore import Parameter, Tensor, ops


def learning_rate_at(step, cfg):
    """The lr of update number `step + 1` (step = updates already done): linear warmup from 0 over
    `warmup_steps`, then constant or a cosine from `learning_rate` to `min_learning_rate` at
    `train_steps`. A pure function of the step, so changing `train_steps` on resume is harmless."""
    lr = cfg.learning_rate
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "cosine":
        span = max(cfg.train_steps - cfg.warmup_steps, 1)
        progress = min(max(step - cfg.warmup_steps, 0) / span, 1.0)
        return cfg.min_learning_rate + 0.5 * (lr - cfg.min_learning_rate) * (1 + math.cos(math.pi * progress))
    return lr


def _f32(x):
    return Tensor(np.float32(x))


def _zeros_like(param, name):
    return Parameter(Tensor(np.zeros(param.shape, np.float32)), name=name, requires_grad=False)


class AdamW:
    """torch.optim.AdamW(params, lr, betas, eps, weight_decay) over `params` (fp32 Parameters).

    `update(grads, scalars)` is graph-safe (call it inside `ms.jit`); `scalars(step, lr)` gives the
    host-side inputs for update number `step + 1`. Moments are `exp_avg.<name>` / `exp_avg_sq.<name>`.
    """

    def __init__(self, params, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        self.params = list(params)
        self.beta1, self.beta2 = float(betas[0]), float(betas[1])
        self.eps = float(eps)
        self.weight_decay = float(weight_decay)
        self.exp_avg = [_zeros_like(p, f"exp_avg.{p.name}") for p in self.params]
        self.exp_avg_sq = [_zeros_like(p, f"exp_avg_sq.{p.name}") for p in self.params]
        self._b1, self._b2 = _f32(self.beta1), _f32(self.beta2)
        self._adam = ops.Adam()

    def scalars(self, step, lr):
        """(lr, 1 - lr*wd, beta1**t, beta2**t, eps*sqrt(1 - beta2**t)) for update t = step + 1."""
        t = step + 1
        b1p, b2p = self.beta1 ** t, self.beta2 ** t
        return tuple(_f32(v) for v in (lr, 1.0 - lr * self.weight_decay, b1p, b2p,
                                       self.eps * math.sqrt(1.0 - b2p)))

    def update(self, grads, lr, decay, b1p, b2p, eps_t, coef=None):
        """One AdamW step of every parameter. `coef` (a scalar tensor, or None) is the gradient clip
        factor: each gradient is scaled just before its own Adam kernel, and that product waits for
        the previous parameter's update, so at most one scaled gradient exists at a time (a list of
        scaled copies made before the loop held a second set of all gradients: 130 MB at Latte-S/2).
        The numbers are those of scaling first: the same g * coef, then the same kernel."""
        done = []
        previous = None
        for p, m, v, g in zip(self.params, self.exp_avg, self.exp_avg_sq, grads):
            if coef is not None:
                g = (g if previous is None else ops.depend(g, previous)) * coef
            if self.weight_decay:  # a Python constant: no op at all when 0, the original's default
                # the gradient waits for the decay, so Adam updates the decayed weights in place
                g = ops.depend(g, ops.assign(p, p * decay))
            previous = self._adam(p, m, v, b1p, b2p, lr, self._b1, self._b2, eps_t, g)[0]
            done.append(previous)
        return done

    def state(self):
        """{checkpoint name: Parameter} of the moments."""
        return {p.name: p for p in self.exp_avg + self.exp_avg_sq}


class EMA:
    """Exponential moving average of `params`: `ema = decay*ema + (1-decay)*param` after every
    update, as the original's `update_ema`. Starts as a copy of the weights."""

    def __init__(self, params):
        self.params = list(params)
        self.shadow = [Parameter(Tensor(p.asnumpy().copy()), name=f"ema.{p.name}", requires_grad=False)
                       for p in self.params]

    def update(self, decay):
        one_minus = 1.0 - decay
        return [ops.assign(e, e * decay + p * one_minus) for e, p in zip(self.shadow, self.params)]

    def copy_from_params(self):
        for e, p in zip(self.shadow, self.params):
            e.set_data(Tensor(p.asnumpy().copy()))


_dot = ops.MatMul()


def global_norm(grads):
    """sqrt(sum of squares) over all gradients, as torch's clip_grad_norm_ returns (before clipping).
    Each square sum is a (1, n) x (n, 1) matmul: on MindSpore's CPU backend ReduceSum(Square(g)) over
    Latte-S/2's 32 M gradients took 105 ms, the matmuls 42 ms (one read of g, no squared copy)."""
    return ops.sqrt(ops.addn([_dot(g.reshape(1, -1), g.reshape(-1, 1)).reshape(()) for g in grads]))


def clip_coefficient(norm, max_norm):
    """torch's clip factor: max_norm / (norm + 1e-6), clamped to 1 (max_norm = inf never clips)."""
    return min(max_norm / (norm + 1e-6), 1.0)


class LossScaler:
    """Dynamic loss scale for fp16 (host side): halve and skip the update on an overflow, double
    after `window` finite steps. Its two numbers are part of the checkpoint."""

    def __init__(self, scale=65536.0, window=1000, enabled=True):
        self.scale = float(scale) if enabled else 1.0
        self.window = int(window)
        self.enabled = enabled
        self.good_steps = 0

    def update(self, finite):
        if not self.enabled:
            return
        if not finite:
            self.scale = max(self.scale / 2.0, 1.0)
            self.good_steps = 0
            return
        self.good_steps += 1
        if self.good_steps >= self.window:
            self.scale *= 2.0
            self.good_steps = 0

    def state(self):
        return {"scale": self.scale, "good_steps": self.good_steps, "enabled": self.enabled}

    def load(self, state):
        if self.enabled and state.get("enabled"):
            self.scale, self.good_steps = float(state["scale"]), int(state["good_steps"])
