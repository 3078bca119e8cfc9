"""One optimizer step of Latte as compiled graphs: loss, gradients, data-parallel mean, clipping,
AdamW and EMA.

Every random number (timesteps, noise, label dropout, the latent sample) is drawn on the host and
passed in, so a step is a pure function of (weights, optimizer state, batch) and a resumed run
repeats the uninterrupted one exactly. Two paths:

- fused (no accumulation, no fp16): one graph does the whole step, including the clip factor;
- buffered (gradient accumulation or fp16 loss scaling): each micro-batch adds its gradient to
  `accum.*` buffers; `finish` averages (and all-reduces, and unscales) them and returns the norm;
  the host then either applies the update or, on an fp16 overflow, drops it and lowers the scale.
"""
import numpy as np

import mindspore as ms
from mindspore import Parameter, ParameterTuple, Tensor, nn, ops

from trainer.optim import EMA, AdamW, clip_coefficient, global_norm


def _f32(x):
    return Tensor(np.float32(x))


class StepGraphs(nn.Cell):
    """The step's compiled pieces, as `ms.jit` methods of a Cell that owns every Parameter they read
    or write: the network (a sub-cell), the AdamW moments, the EMA shadows and the accumulation
    buffers (ParameterTuples). MindSpore's compile cache binds a reloaded graph's weights by name
    from its Cell's parameters_dict (set_weights_values); a reloaded graph of a plain function has
    nothing to bind them from and ran to loss NaN at its first step, measured. auto_prefix=False
    keeps the names the checkpoints use (`blocks.0...`, `exp_avg.*`, `ema.*`)."""

    def __init__(self, net, diffusion, cfg, world_size=1):
        super().__init__(auto_prefix=False)
        self.net, self.diffusion = net, diffusion
        self.params = list(net.trainable_params())
        self.conditional = cfg.num_classes > 0
        self.clip = cfg.clip_max_norm > 0
        self.world_size = world_size
        self.optimizer = AdamW(self.params, (cfg.adam_beta1, cfg.adam_beta2), cfg.adam_eps, cfg.weight_decay)
        self.ema = EMA(self.params)
        self.moments = ParameterTuple(self.optimizer.exp_avg + self.optimizer.exp_avg_sq)
        self.ema_shadow = ParameterTuple(self.ema.shadow)
        buffered = cfg.gradient_accumulation_steps > 1 or cfg.dtype == "fp16"
        self.accum = (ParameterTuple(Parameter(Tensor(np.zeros(p.shape, np.float32)), name=f"accum.{p.name}",
                                               requires_grad=False) for p in self.params) if buffered else ())
        if world_size > 1:
            self.reducer = nn.DistributedGradReducer(self.params, mean=True, degree=world_size)
            self.allreduce = ops.AllReduce()
        self._grad_fn = ms.value_and_grad(self._loss, None, self.params, has_aux=True)

    def _terms(self, x0, t, noise, y):
        kwargs = {"y": y} if self.conditional else None
        return self.diffusion.training_losses(self.net, x0, t, model_kwargs=kwargs, noise=noise)

    def _loss(self, x0, t, noise, y, scale):
        terms = self._terms(x0, t, noise, y)
        loss = terms["loss"].mean()
        return loss * scale, ops.stack([loss, terms["mse"].mean(), terms["vb"].mean()])

    def _mean_over_ranks(self, stats):
        if self.world_size > 1:
            stats = self.allreduce(stats) / self.world_size
        return stats

    def _update(self, grads, lr, decay, b1p, b2p, eps_t, ema_decay, coef=None):
        done = self.optimizer.update(grads, lr, decay, b1p, b2p, eps_t, coef)
        # EMA reads the updated weights: make it wait for every Adam kernel.
        ema_decay = ops.depend(ema_decay, done)
        return self.ema.update(ema_decay)

    def _fused_step(self, x0, t, noise, y, lr, decay, b1p, b2p, eps_t, max_norm, ema_decay):
        (_, stats), grads = self._grad_fn(x0, t, noise, y, _f32(1.0))
        if self.world_size > 1:
            grads = self.reducer(grads)
        norm = global_norm(grads)
        # the clip factor is applied inside the update, one gradient at a time (no scaled copy of all)
        coef = ops.minimum(max_norm / (norm + 1e-6), 1.0) if self.clip else None
        done = self._update(grads, lr, decay, b1p, b2p, eps_t, ema_decay, coef)
        return ops.depend(self._mean_over_ranks(stats), done), ops.depend(norm, done)

    def _accumulate_step(self, x0, t, noise, y, scale):
        (_, stats), grads = self._grad_fn(x0, t, noise, y, scale)
        done = [ops.assign_add(a, g) for a, g in zip(self.accum, grads)]
        return ops.depend(stats, done)

    def _finish_step(self, inv_scale, stats):
        grads = tuple(a * inv_scale for a in self.accum)  # the reducer maps over a tuple, not a list
        if self.world_size > 1:
            grads = self.reducer(grads)
        done = [ops.assign(a, g) for a, g in zip(self.accum, grads)]
        return ops.depend(global_norm(grads), done), ops.depend(self._mean_over_ranks(stats), done)

    def _apply_step(self, lr, decay, b1p, b2p, eps_t, coef, ema_decay):
        done = self._update(list(self.accum), lr, decay, b1p, b2p, eps_t, ema_decay, coef if self.clip else None)
        # the buffers are cleared only after the update has read them
        zero = [ops.assign(a, ops.depend(ops.zeros_like(a), done)) for a in self.accum]
        return ops.depend(ema_decay, zero)

    def _zero_step(self):
        return [ops.assign(a, ops.zeros_like(a)) for a in self.accum]

    def _eval_loss(self, x0, t, noise, y):
        return self._terms(x0, t, noise, y)["loss"]


class TrainStep:
    """Host side of the step: turns numpy micro-batches into one optimizer update through the
    compiled pieces of StepGraphs (`jit=False`: the same pieces run eagerly, for tests)."""

    def __init__(self, net, diffusion, cfg, world_size=1, jit=True):
        self.graphs = StepGraphs(net, diffusion, cfg, world_size)
        self.net, self.diffusion = net, diffusion
        self.params, self.optimizer, self.ema = self.graphs.params, self.graphs.optimizer, self.graphs.ema
        self.accum = list(self.graphs.accum)
        self.accum_steps = cfg.gradient_accumulation_steps
        self.buffered = bool(self.accum)
        wrap = ms.jit if jit else (lambda f: f)
        g = self.graphs
        self._fused = wrap(g._fused_step)
        self._accumulate = wrap(g._accumulate_step)
        self._finish = wrap(g._finish_step)
        self._apply = wrap(g._apply_step)
        self._zero = wrap(g._zero_step)
        self._eval = wrap(g._eval_loss)

    def __call__(self, micro_batches, step, lr, max_norm, ema_decay, loss_scale=1.0):
        """One optimizer update from `micro_batches` (list of (x0, t, noise, y) numpy arrays, one
        per accumulation step). `max_norm` is inf when clipping is off for this step. Returns
        (loss, mse, vb, grad_norm, applied); `applied` is False only for an fp16 overflow."""
        assert len(micro_batches) == self.accum_steps, (len(micro_batches), self.accum_steps)
        lr_t, decay, b1p, b2p, eps_t = self.optimizer.scalars(step, lr)
        ema_t = _f32(ema_decay)
        if not self.buffered:
            (x0, t, noise, y), = micro_batches
            stats, norm = self._fused(*_tensors(x0, t, noise, y), lr_t, decay, b1p, b2p, eps_t,
                                      _f32(max_norm), ema_t)
            return (*stats.asnumpy().tolist(), float(norm.asnumpy()), True)

        stats = np.zeros(3, np.float32)
        for x0, t, noise, y in micro_batches:
            stats += self._accumulate(*_tensors(x0, t, noise, y), _f32(loss_scale)).asnumpy()
        norm, stats = self._finish(_f32(1.0 / (loss_scale * self.accum_steps)),
                                   Tensor(stats / self.accum_steps))
        norm = float(norm.asnumpy())
        if not np.isfinite(norm):  # fp16 overflow (or a diverged run): drop this update
            self._zero()
            return (*stats.asnumpy().tolist(), norm, False)
        self._apply(lr_t, decay, b1p, b2p, eps_t, _f32(clip_coefficient(norm, max_norm)), ema_t)
        return (*stats.asnumpy().tolist(), norm, True)

    def eval_loss(self, x0, t, noise, y):
        """Per-sample training loss without gradients (validation)."""
        return self._eval(*_tensors(x0, t, noise, y)).asnumpy()

    def state(self):
        """{checkpoint name: Parameter} of everything the step owns besides the weights."""
        out = {f"opt.{name}": p for name, p in self.optimizer.state().items()}
        out.update({e.name: e for e in self.ema.shadow})
        return out


def _tensors(x0, t, noise, y):
    return (Tensor(np.ascontiguousarray(x0, np.float32)), Tensor(np.asarray(t, np.int32)),
            Tensor(np.ascontiguousarray(noise, np.float32)), Tensor(np.asarray(y, np.int32)))
