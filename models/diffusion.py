"""Gaussian diffusion of DiT / improved DDPM, as used by Latte, for video latents (N, F, C, H, W).

A port of the original `diffusion/` package (gaussian_diffusion.py, respace.py, diffusion_utils.py,
`create_diffusion`) that gives the same numbers: the schedule is computed in float64 numpy exactly as
the original, then every array that is gathered by timestep is kept as a float32 Tensor, which is
what the original's `_extract_into_tensor` (float64 gather, then `.float()`) hands to the maths.

Differences from the image DiT code, all following Latte:
- the network gets x (N, F, C, H, W) and returns (N, F, 2C, H, W): epsilon and the variance
  interpolation `v` are split on dim 2, the channel dim of the video layout;
- `training_losses` is written with Tensor ops only (gathers, `ops.where` for the t == 0 choice, no
  host syncs), so a trainer can call it inside an `ms.jit` step differentiated by `ms.value_and_grad`.

Random numbers in the samplers: see `GaussianDiffusion.p_sample_loop`.
"""
import inspect
import math

import numpy as np
import mindspore as ms
from mindspore import Tensor, ops

# The options `create_diffusion` can build (the original also names PREVIOUS_X and LEARNED, which
# DiT never uses).
MEAN_TYPES = ("start_x", "epsilon")
VAR_TYPES = ("fixed_small", "fixed_large", "learned_range")
LOSS_TYPES = ("mse", "rescaled_mse", "kl", "rescaled_kl")


# ------------------------------------------------------------------------------------------------
# Schedules and respacing (float64 numpy, as the original)
# ------------------------------------------------------------------------------------------------

def get_named_beta_schedule(schedule_name, num_diffusion_timesteps):
    """Betas for `num_diffusion_timesteps`; "linear" is Ho et al.'s, scaled to keep its shape."""
    if schedule_name == "linear":
        scale = 1000 / num_diffusion_timesteps
        return np.linspace(scale * 0.0001, scale * 0.02, num_diffusion_timesteps, dtype=np.float64)
    if schedule_name == "squaredcos_cap_v2":
        return betas_for_alpha_bar(
            num_diffusion_timesteps, lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2)
    raise ValueError(f"noise_schedule {schedule_name!r} is unknown: use 'linear' or 'squaredcos_cap_v2'")


def betas_for_alpha_bar(num_diffusion_timesteps, alpha_bar, max_beta=0.999):
    """Discretise a cumulative-product function alpha_bar(t), t in [0, 1], into betas."""
    betas = []
    for i in range(num_diffusion_timesteps):
        t1, t2 = i / num_diffusion_timesteps, (i + 1) / num_diffusion_timesteps
        betas.append(min(1 - alpha_bar(t2) / alpha_bar(t1), max_beta))
    return np.array(betas)


def space_timesteps(num_timesteps, section_counts):
    """The set of original timesteps to keep.

    `section_counts` is a list of counts or a comma-separated string ("250", "10,15,20"): the
    original steps are cut into equal sections and each is strided evenly to its count (rounding
    fractional strides), so "250" of 1000 keeps 0, 4, 8, ..., 995, 999. "ddimN" uses the integer
    stride of the DDIM paper instead (range(0, T, stride) with exactly N steps).
    """
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            desired_count = int(section_counts[len("ddim"):])
            for i in range(1, num_timesteps):
                if len(range(0, num_timesteps, i)) == desired_count:
                    return set(range(0, num_timesteps, i))
            raise ValueError(f"timestep_respacing {section_counts!r}: cannot take exactly {desired_count} "
                             f"of {num_timesteps} steps with an integer stride; use a plain count instead")
        section_counts = [int(x) for x in section_counts.split(",")]
    size_per = num_timesteps // len(section_counts)
    extra = num_timesteps % len(section_counts)
    start_idx = 0
    all_steps = []
    for i, section_count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if size < section_count:
            raise ValueError(f"timestep_respacing: cannot divide a section of {size} steps into "
                             f"{section_count}; ask for at most {size}")
        frac_stride = 1 if section_count <= 1 else (size - 1) / (section_count - 1)
        cur_idx = 0.0
        for _ in range(section_count):
            all_steps.append(start_idx + round(cur_idx))
            cur_idx += frac_stride
        start_idx += size
    return set(all_steps)


# ------------------------------------------------------------------------------------------------
# Gaussian helpers (diffusion_utils.py)
# ------------------------------------------------------------------------------------------------

def mean_flat(tensor):
    """Mean over all non-batch dimensions."""
    return tensor.mean(axis=tuple(range(1, tensor.ndim)))


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + ops.exp(logvar1 - logvar2)
                  + ((mean1 - mean2) ** 2) * ops.exp(-logvar2))


def approx_standard_normal_cdf(x):
    """The tanh approximation of the standard normal CDF that the original uses,
    0.5 * (1 + tanh(y)) with y = sqrt(2/pi) (x + 0.044715 x^3), written as the identical sigmoid(2y):
    MindSpore's CPU tanh is off by up to 1e-4, which in the tails (1 + tanh ~ 1e-3) moved the
    decoder NLL by 2%; sigmoid is accurate to ~1e-5 relative there."""
    return ops.sigmoid(2.0 * math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3))


def discretized_gaussian_log_likelihood(x, means, log_scales):
    """Log-likelihood (nats) of x, taken as 8-bit data rescaled to [-1, 1], under a Gaussian
    discretised into bins of width 2/255; the edge bins extend to infinity."""
    assert x.shape == means.shape == log_scales.shape
    centered_x = x - means
    inv_stdv = ops.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered_x + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered_x - 1.0 / 255.0))
    log_cdf_plus = ops.log(ops.clamp(cdf_plus, min=1e-12))
    log_one_minus_cdf_min = ops.log(ops.clamp(1.0 - cdf_min, min=1e-12))
    log_cdf_delta = ops.log(ops.clamp(cdf_plus - cdf_min, min=1e-12))
    return ops.where(x < -0.999, log_cdf_plus,
                     ops.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


def _extract(table, t, ndim):
    """table[t] shaped (N, 1, ..., 1) to broadcast against an ndim-dims batch (a graph-safe gather)."""
    return ops.gather(table, t, 0).reshape((-1,) + (1,) * (ndim - 1))


def _standard_normal(shape, rng=None):
    """N(0, 1) float32 noise of `shape` from `rng` (see `p_sample_loop`), as a Tensor."""
    shape = tuple(shape)
    if rng is None:
        return ops.standard_normal(shape)
    if isinstance(rng, (list, tuple)):
        k = len(rng)
        if k == 0 or shape[0] % k:
            raise ValueError(f"rng: {k} generators cannot serve a batch of {shape[0]}; "
                             f"pass one generator per sample (or per half of a guidance batch)")
        rows = np.stack([np.asarray(g.standard_normal(shape[1:])) for g in rng])
        return Tensor(np.tile(rows, (shape[0] // k,) + (1,) * (len(shape) - 1)).astype(np.float32))
    return Tensor(np.asarray(rng.standard_normal(shape)).astype(np.float32))


# ------------------------------------------------------------------------------------------------
# The diffusion process
# ------------------------------------------------------------------------------------------------

class GaussianDiffusion:
    """Training loss and samplers of a diffusion with `len(betas)` steps.

    `timestep_map[i]` is the timestep the network is trained on / called with for step i (the
    identity unless respaced, see `SpacedDiffusion`). Every `t` argument is a 1-D integer Tensor of
    step indices into this (possibly respaced) process; arguments and results are Tensors.
    """

    def __init__(self, *, betas, model_mean_type, model_var_type, loss_type, timestep_map=None):
        assert model_mean_type in MEAN_TYPES and model_var_type in VAR_TYPES and loss_type in LOSS_TYPES
        self.model_mean_type = model_mean_type
        self.model_var_type = model_var_type
        self.loss_type = loss_type

        # float64 for accuracy, as the original; the float32 tables below are cast from these.
        betas = np.array(betas, dtype=np.float64)
        assert betas.ndim == 1 and (betas > 0).all() and (betas <= 1).all()
        self.betas = betas
        self.num_timesteps = int(betas.shape[0])
        self.timestep_map = list(range(self.num_timesteps)) if timestep_map is None else list(timestep_map)
        assert len(self.timestep_map) == self.num_timesteps

        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas, axis=0)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.alphas_cumprod_next = np.append(self.alphas_cumprod[1:], 0.0)
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.log_one_minus_alphas_cumprod = np.log(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)

        # Posterior q(x_{t-1} | x_t, x_0). Its variance is 0 at t = 0, so the log is clipped by
        # repeating the t = 1 value there.
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_log_variance_clipped = (
            np.log(np.append(self.posterior_variance[1], self.posterior_variance[1:]))
            if len(self.posterior_variance) > 1 else np.array([]))
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = ((1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas)
                                     / (1.0 - self.alphas_cumprod))

        # FIXED_LARGE uses beta_t, with the posterior variance at t = 0 for a better decoder NLL.
        fixed_large = np.append(self.posterior_variance[1], betas[1:])
        self._fixed_var = {
            "fixed_large": (fixed_large, np.log(fixed_large)),
            "fixed_small": (self.posterior_variance, self.posterior_log_variance_clipped),
        }.get(model_var_type)

        # float32 tables gathered by timestep inside (possibly graph-compiled) code.
        as_table = lambda a: Tensor(np.asarray(a, dtype=np.float64).astype(np.float32))
        self._sqrt_alphas_cumprod = as_table(self.sqrt_alphas_cumprod)
        self._sqrt_one_minus_alphas_cumprod = as_table(self.sqrt_one_minus_alphas_cumprod)
        self._one_minus_alphas_cumprod = as_table(1.0 - self.alphas_cumprod)
        self._log_one_minus_alphas_cumprod = as_table(self.log_one_minus_alphas_cumprod)
        self._sqrt_recip_alphas_cumprod = as_table(self.sqrt_recip_alphas_cumprod)
        self._sqrt_recipm1_alphas_cumprod = as_table(self.sqrt_recipm1_alphas_cumprod)
        self._alphas_cumprod = as_table(self.alphas_cumprod)
        self._alphas_cumprod_prev = as_table(self.alphas_cumprod_prev)
        self._posterior_variance = as_table(self.posterior_variance)
        self._posterior_log_variance_clipped = as_table(self.posterior_log_variance_clipped)
        self._posterior_mean_coef1 = as_table(self.posterior_mean_coef1)
        self._posterior_mean_coef2 = as_table(self.posterior_mean_coef2)
        self._log_betas = as_table(np.log(betas))
        if self._fixed_var is not None:
            self._fixed_variance, self._fixed_log_variance = (as_table(a) for a in self._fixed_var)
        self._map_is_identity = self.timestep_map == list(range(self.num_timesteps))
        self._timestep_map = Tensor(np.array(self.timestep_map, dtype=np.int32))

    # -- the model call ----------------------------------------------------------------------------

    def _model_timesteps(self, t):
        """The ORIGINAL timesteps of steps t, which the network sees (respace.py's _WrappedModel)."""
        if self._map_is_identity:
            return t
        return ops.gather(self._timestep_map, t, 0).astype(t.dtype)

    def _call_model(self, model, x, t, model_kwargs):
        out = model(x, self._model_timesteps(t), **(model_kwargs or {}))
        if isinstance(out, tuple):  # (output, extra) models
            out = out[0]
        return out.astype(ms.float32)

    # -- forward process ---------------------------------------------------------------------------

    def q_mean_variance(self, x_start, t):
        """Mean, variance and log variance of q(x_t | x_0)."""
        n = x_start.ndim
        mean = _extract(self._sqrt_alphas_cumprod, t, n) * x_start
        variance = ops.broadcast_to(_extract(self._one_minus_alphas_cumprod, t, n), x_start.shape)
        log_variance = ops.broadcast_to(_extract(self._log_one_minus_alphas_cumprod, t, n), x_start.shape)
        return mean, variance, log_variance

    def q_sample(self, x_start, t, noise=None):
        """Diffuse x_0 to step t: sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise."""
        if noise is None:
            noise = ops.standard_normal(x_start.shape)
        assert noise.shape == x_start.shape
        n = x_start.ndim
        return (_extract(self._sqrt_alphas_cumprod, t, n) * x_start
                + _extract(self._sqrt_one_minus_alphas_cumprod, t, n) * noise)

    def q_posterior_mean_variance(self, x_start, x_t, t):
        """Mean, variance and clipped log variance of the posterior q(x_{t-1} | x_t, x_0)."""
        assert x_start.shape == x_t.shape
        n = x_t.ndim
        mean = (_extract(self._posterior_mean_coef1, t, n) * x_start
                + _extract(self._posterior_mean_coef2, t, n) * x_t)
        variance = ops.broadcast_to(_extract(self._posterior_variance, t, n), x_t.shape)
        log_variance = ops.broadcast_to(_extract(self._posterior_log_variance_clipped, t, n), x_t.shape)
        return mean, variance, log_variance

    # -- reverse process ---------------------------------------------------------------------------

    def p_mean_variance(self, model, x, t, clip_denoised=True, denoised_fn=None, model_kwargs=None):
        """Apply the model to get p(x_{t-1} | x_t) and a prediction of x_0.

        `model(x, t, **model_kwargs)` is called with the original timesteps. `denoised_fn` maps the
        x_0 prediction before it is used; `clip_denoised` then clamps it to [-1, 1] (Latte samples
        latents with clip_denoised=False). Returns a dict: mean, variance, log_variance, pred_xstart.
        """
        out = self._call_model(model, x, t, model_kwargs)
        return self._p_mean_variance_from_output(out, x, t, clip_denoised, denoised_fn)

    def _p_mean_variance_from_output(self, model_output, x, t, clip_denoised=True, denoised_fn=None):
        B, F, C = x.shape[:3]
        assert t.shape == (B,)
        n = x.ndim
        if self.model_var_type == "learned_range":
            assert model_output.shape == (B, F, C * 2) + tuple(x.shape[3:]), \
                f"model output {model_output.shape} is not (N, F, 2C, ...) for x {x.shape}"
            model_output, model_var_values = ops.split(model_output, C, 2)
            # v in [-1, 1] interpolates the log variance between the clipped posterior variance
            # (min) and beta_t (max).
            min_log = _extract(self._posterior_log_variance_clipped, t, n)
            max_log = _extract(self._log_betas, t, n)
            frac = (model_var_values + 1) / 2
            model_log_variance = frac * max_log + (1 - frac) * min_log
            model_variance = ops.exp(model_log_variance)
        else:
            model_variance = ops.broadcast_to(_extract(self._fixed_variance, t, n), x.shape)
            model_log_variance = ops.broadcast_to(_extract(self._fixed_log_variance, t, n), x.shape)

        if self.model_mean_type == "start_x":
            pred_xstart = self._process_xstart(model_output, clip_denoised, denoised_fn)
        else:
            pred_xstart = self._process_xstart(
                self._predict_xstart_from_eps(x, t, model_output), clip_denoised, denoised_fn)
        model_mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x, t)
        assert model_mean.shape == model_log_variance.shape == pred_xstart.shape == x.shape
        return {"mean": model_mean, "variance": model_variance, "log_variance": model_log_variance,
                "pred_xstart": pred_xstart}

    @staticmethod
    def _process_xstart(x, clip_denoised, denoised_fn):
        if denoised_fn is not None:
            x = denoised_fn(x)
        if clip_denoised:
            return ops.clamp(x, -1.0, 1.0)
        return x

    def _predict_xstart_from_eps(self, x_t, t, eps):
        assert x_t.shape == eps.shape
        n = x_t.ndim
        return (_extract(self._sqrt_recip_alphas_cumprod, t, n) * x_t
                - _extract(self._sqrt_recipm1_alphas_cumprod, t, n) * eps)

    def _predict_eps_from_xstart(self, x_t, t, pred_xstart):
        n = x_t.ndim
        return ((_extract(self._sqrt_recip_alphas_cumprod, t, n) * x_t - pred_xstart)
                / _extract(self._sqrt_recipm1_alphas_cumprod, t, n))

    def condition_mean(self, cond_fn, p_mean_var, x, t, model_kwargs=None):
        """Shift the mean by variance * grad log p(y|x) (Sohl-Dickstein et al. 2015)."""
        gradient = cond_fn(x, self._model_timesteps(t), **(model_kwargs or {}))
        return p_mean_var["mean"] + p_mean_var["variance"] * gradient.astype(ms.float32)

    def condition_score(self, cond_fn, p_mean_var, x, t, model_kwargs=None):
        """Condition the score (Song et al. 2020): eps -= sqrt(1 - abar) * grad log p(y|x)."""
        alpha_bar = _extract(self._alphas_cumprod, t, x.ndim)
        eps = self._predict_eps_from_xstart(x, t, p_mean_var["pred_xstart"])
        eps = eps - ops.sqrt(1 - alpha_bar) * cond_fn(x, self._model_timesteps(t), **(model_kwargs or {}))
        out = dict(p_mean_var)
        out["pred_xstart"] = self._predict_xstart_from_eps(x, t, eps)
        out["mean"], _, _ = self.q_posterior_mean_variance(out["pred_xstart"], x, t)
        return out

    @staticmethod
    def _nonzero_mask(t, ndim):
        # No noise is added at the last step (t == 0).
        return (t != 0).astype(ms.float32).reshape((-1,) + (1,) * (ndim - 1))

    def p_sample(self, model, x, t, clip_denoised=True, denoised_fn=None, cond_fn=None,
                 model_kwargs=None, noise=None):
        """One DDPM step x_t -> x_{t-1}: mean + exp(log_variance / 2) * noise (no noise at t == 0).

        `noise` (same shape as x) is the step's N(0, 1) draw; drawn with `ops.standard_normal` when
        None. Returns a dict: sample, pred_xstart.
        """
        out = self.p_mean_variance(model, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn,
                                   model_kwargs=model_kwargs)
        if noise is None:
            noise = ops.standard_normal(x.shape)
        if cond_fn is not None:
            out["mean"] = self.condition_mean(cond_fn, out, x, t, model_kwargs=model_kwargs)
        sample = out["mean"] + self._nonzero_mask(t, x.ndim) * ops.exp(0.5 * out["log_variance"]) * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def ddim_sample(self, model, x, t, clip_denoised=True, denoised_fn=None, cond_fn=None,
                    model_kwargs=None, eta=0.0, noise=None):
        """One DDIM step (Song et al. 2021, eq. 12); eta=0 is deterministic and draws no noise.
        Same usage as `p_sample`."""
        out = self.p_mean_variance(model, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn,
                                   model_kwargs=model_kwargs)
        if cond_fn is not None:
            out = self.condition_score(cond_fn, out, x, t, model_kwargs=model_kwargs)
        # Re-derive eps from x_0: the model may predict x_0 (predict_xstart), and cond_fn moves it.
        eps = self._predict_eps_from_xstart(x, t, out["pred_xstart"])
        alpha_bar = _extract(self._alphas_cumprod, t, x.ndim)
        alpha_bar_prev = _extract(self._alphas_cumprod_prev, t, x.ndim)
        sigma = (eta * ops.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar))
                 * ops.sqrt(1 - alpha_bar / alpha_bar_prev))
        mean_pred = (out["pred_xstart"] * ops.sqrt(alpha_bar_prev)
                     + ops.sqrt(1 - alpha_bar_prev - sigma ** 2) * eps)
        if eta == 0.0 and noise is None:
            return {"sample": mean_pred, "pred_xstart": out["pred_xstart"]}  # sigma is exactly 0
        if noise is None:
            noise = ops.standard_normal(x.shape)
        sample = mean_pred + self._nonzero_mask(t, x.ndim) * sigma * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    # -- sampling loops ----------------------------------------------------------------------------

    def p_sample_loop(self, model, shape, noise=None, clip_denoised=True, denoised_fn=None,
                      cond_fn=None, model_kwargs=None, device=None, progress=False, rng=None):
        """DDPM-sample a batch of `shape` (N, F, C, H, W) over all steps of this process.

        Random numbers: `noise` is the initial x_T (drawn when None). Every draw, x_T included when
        `noise` is None, comes from `rng`:
          - None: `ops.standard_normal`, i.e. MindSpore's global seed (`ms.set_seed`);
          - one numpy Generator / RandomState: draws of the whole batch shape;
          - a list of k generators, k dividing N: row j gets the draw of generator j % k, made with
            shape shape[1:]. With one generator per sample, e.g. `[np.random.default_rng(seed + i)
            for i in ...]`, sample i depends only on its own seed whatever the batch size, and a
            classifier-free-guidance batch [z, z] (N = 2k) gets the same noise in both halves.
        `device` is accepted for signature compatibility and ignored. `progress` shows a tqdm bar
        in seconds per step. Returns the final sample (a Tensor).
        """
        final = None
        for sample in self.p_sample_loop_progressive(
                model, shape, noise=noise, clip_denoised=clip_denoised, denoised_fn=denoised_fn,
                cond_fn=cond_fn, model_kwargs=model_kwargs, device=device, progress=progress, rng=rng):
            final = sample
        return final["sample"]

    def p_sample_loop_progressive(self, model, shape, noise=None, clip_denoised=True, denoised_fn=None,
                                  cond_fn=None, model_kwargs=None, device=None, progress=False, rng=None):
        """Yield the `p_sample` dict of every step of `p_sample_loop`."""
        img = self._initial_noise(shape, noise, rng)
        for i in self._indices(progress):
            t = Tensor(np.full((shape[0],), i, dtype=np.int32))
            if i == self.num_timesteps - 1:
                self._compile_then_release(model, img, t, model_kwargs)
            out = self.p_sample(model, img, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn,
                                cond_fn=cond_fn, model_kwargs=model_kwargs,
                                noise=_standard_normal(shape, rng))
            yield out
            img = out["sample"]

    def ddim_sample_loop(self, model, shape, noise=None, clip_denoised=True, denoised_fn=None,
                         cond_fn=None, model_kwargs=None, device=None, progress=False, eta=0.0, rng=None):
        """DDIM-sample a batch of `shape`; same usage and random numbers as `p_sample_loop`
        (with eta=0 only x_T is random)."""
        final = None
        for sample in self.ddim_sample_loop_progressive(
                model, shape, noise=noise, clip_denoised=clip_denoised, denoised_fn=denoised_fn,
                cond_fn=cond_fn, model_kwargs=model_kwargs, device=device, progress=progress, eta=eta,
                rng=rng):
            final = sample
        return final["sample"]

    def ddim_sample_loop_progressive(self, model, shape, noise=None, clip_denoised=True, denoised_fn=None,
                                     cond_fn=None, model_kwargs=None, device=None, progress=False,
                                     eta=0.0, rng=None):
        """Yield the `ddim_sample` dict of every step of `ddim_sample_loop`."""
        img = self._initial_noise(shape, noise, rng)
        for i in self._indices(progress):
            t = Tensor(np.full((shape[0],), i, dtype=np.int32))
            if i == self.num_timesteps - 1:
                self._compile_then_release(model, img, t, model_kwargs)
            step_noise = None if eta == 0.0 else _standard_normal(shape, rng)
            out = self.ddim_sample(model, img, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn,
                                   cond_fn=cond_fn, model_kwargs=model_kwargs, eta=eta, noise=step_noise)
            yield out
            img = out["sample"]

    def _compile_then_release(self, model, x, t, model_kwargs):
        """Graph mode, a network Cell: compile its graph for this batch before the first step runs it,
        then return what the compile freed to the OS (`models.runtime.release_freed_heap`), so that the step's
        activations do not come on top of it: the sampling run's peak RSS, ~50 MB less for Latte-S/2.
        The step's own call then finds the graph compiled: its arguments go in as the call passes them,
        positionally (a Cell call binds keyword arguments to positions, and MindSpore keys a graph by
        how its arguments came: a class label given as `y=` compiled a second graph at the first step).
        Where setup_device's hook trims after every new compile, it is not trimmed twice."""
        if isinstance(model, ms.nn.Cell) and ms.get_context("mode") == ms.GRAPH_MODE:
            bound = inspect.signature(model.construct).bind(x, self._model_timesteps(t), **(model_kwargs or {}))
            model.compile(*bound.args, **bound.kwargs)
            from models.runtime import heap_released_after_compiles, release_freed_heap
            if not heap_released_after_compiles():
                release_freed_heap()

    @staticmethod
    def _initial_noise(shape, noise, rng):
        if not isinstance(shape, (tuple, list)):
            raise ValueError(f"shape must be a tuple such as (N, F, C, H, W), got {shape!r}")
        if noise is None:
            return _standard_normal(shape, rng)
        if tuple(noise.shape) != tuple(shape):
            raise ValueError(f"noise has shape {tuple(noise.shape)} but shape is {tuple(shape)}; pass "
                             "noise of the sample shape")
        return noise

    def _indices(self, progress):
        indices = list(range(self.num_timesteps))[::-1]
        if progress:
            from tqdm import tqdm  # lazy: only the sampler's command line needs it
            indices = tqdm(indices, unit="step", bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} "
                           "[{elapsed}<{remaining}, {rate_inv_fmt}]")
        return indices

    # -- training loss -----------------------------------------------------------------------------

    def _vb_terms_bpd(self, model_output, x_start, x_t, t, clip_denoised=True):
        """The variational-bound term of step t in bits per dim: KL(q(x_{t-1}|x_t,x_0) ||
        p(x_{t-1}|x_t)), or the decoder NLL of x_0 at t == 0. Returns a dict: output (N,),
        pred_xstart."""
        true_mean, _, true_log_variance_clipped = self.q_posterior_mean_variance(x_start, x_t, t)
        out = self._p_mean_variance_from_output(model_output, x_t, t, clip_denoised=clip_denoised)
        kl = normal_kl(true_mean, true_log_variance_clipped, out["mean"], out["log_variance"])
        kl = mean_flat(kl) / math.log(2.0)
        decoder_nll = -discretized_gaussian_log_likelihood(
            x_start, means=out["mean"], log_scales=0.5 * out["log_variance"])
        decoder_nll = mean_flat(decoder_nll) / math.log(2.0)
        # A Tensor choice, not a Python branch: graph-safe and no host sync.
        return {"output": ops.where(t == 0, decoder_nll, kl), "pred_xstart": out["pred_xstart"]}

    def training_losses(self, model, x_start, t, model_kwargs=None, noise=None):
        """Per-sample training losses at steps t for a batch x_start (N, F, C, H, W).

        `noise` is the Gaussian noise to remove (drawn when None). Returns a dict of (N,) Tensors:
        "loss", and for the default MSE loss "mse" and, with learned variances, "vb" (computed with
        the mean prediction detached so the bound only trains the variance). Tensor ops only: safe
        inside `ms.jit` under `ms.value_and_grad`.
        """
        if noise is None:
            noise = ops.standard_normal(x_start.shape)
        x_t = self.q_sample(x_start, t, noise=noise)
        terms = {}
        if self.loss_type in ("kl", "rescaled_kl"):
            model_output = self._call_model(model, x_t, t, model_kwargs)
            terms["loss"] = self._vb_terms_bpd(model_output, x_start, x_t, t, clip_denoised=False)["output"]
            if self.loss_type == "rescaled_kl":
                terms["loss"] = terms["loss"] * self.num_timesteps
            return terms

        model_output = self._call_model(model, x_t, t, model_kwargs)
        if self.model_var_type == "learned_range":
            C = x_t.shape[2]
            assert model_output.shape == (x_t.shape[0], x_t.shape[1], C * 2) + tuple(x_t.shape[3:])
            model_output, model_var_values = ops.split(model_output, C, 2)
            # Learn the variance with the bound, but don't let it move the mean prediction.
            frozen_out = ops.cat([ops.stop_gradient(model_output), model_var_values], 2)
            terms["vb"] = self._vb_terms_bpd(frozen_out, x_start, x_t, t, clip_denoised=False)["output"]
            if self.loss_type == "rescaled_mse":
                # Divide by 1000 for equivalence with the initial implementation.
                terms["vb"] = terms["vb"] * (self.num_timesteps / 1000.0)

        target = x_start if self.model_mean_type == "start_x" else noise
        assert model_output.shape == target.shape == x_start.shape
        terms["mse"] = mean_flat((target - model_output) ** 2)
        terms["loss"] = terms["mse"] + terms["vb"] if "vb" in terms else terms["mse"]
        return terms


class SpacedDiffusion(GaussianDiffusion):
    """A diffusion that keeps only `use_timesteps` of a base process (respace.py).

    The kept steps get betas 1 - abar_i / abar_prev so that the kept abar are unchanged; the network
    is still called with the original timestep, `timestep_map[i]`.
    """

    def __init__(self, use_timesteps, **kwargs):
        self.use_timesteps = set(use_timesteps)
        self.original_num_steps = len(kwargs["betas"])
        base_alphas_cumprod = np.cumprod(1.0 - np.array(kwargs["betas"], dtype=np.float64), axis=0)
        last_alpha_cumprod = 1.0
        new_betas, timestep_map = [], []
        for i, alpha_cumprod in enumerate(base_alphas_cumprod):
            if i in self.use_timesteps:
                new_betas.append(1 - alpha_cumprod / last_alpha_cumprod)
                last_alpha_cumprod = alpha_cumprod
                timestep_map.append(i)
        kwargs["betas"] = np.array(new_betas)
        super().__init__(timestep_map=timestep_map, **kwargs)


def create_diffusion(timestep_respacing, noise_schedule="linear", use_kl=False, sigma_small=False,
                     predict_xstart=False, learn_sigma=True, rescale_learned_sigmas=False,
                     diffusion_steps=1000):
    """The diffusion of DiT / Latte. `timestep_respacing`: "" or None keeps all `diffusion_steps`;
    "250" (even respacing), "10,15,20" (per section) or "ddim50" for fewer sampling steps."""
    betas = get_named_beta_schedule(noise_schedule, diffusion_steps)
    if use_kl:
        loss_type = "rescaled_kl"
    elif rescale_learned_sigmas:
        loss_type = "rescaled_mse"
    else:
        loss_type = "mse"
    if timestep_respacing is None or timestep_respacing == "":
        timestep_respacing = [diffusion_steps]
    if learn_sigma:
        var_type = "learned_range"
    else:
        var_type = "fixed_small" if sigma_small else "fixed_large"
    return SpacedDiffusion(
        use_timesteps=space_timesteps(diffusion_steps, timestep_respacing),
        betas=betas,
        model_mean_type="start_x" if predict_xstart else "epsilon",
        model_var_type=var_type,
        loss_type=loss_type,
    )
