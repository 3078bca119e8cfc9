"""The original PyTorch Latte, written from ../shared/reference/README.md, as the benches' peer.

Not the original repository's code: a compact torch version of what the reference describes
(adaLN-Zero blocks alternating spatial / temporal attention, timestep + class embedding, patch conv,
final layer, unpatchify). `bench/check_torch_latte.py` proves it equal to the original's oracle
outputs (../shared/reference/oracle/latte_tiny_*.pt/.npz), so timing it times the original model.
Needs torch only (the `bench` extra).
"""
import math

import numpy as np
import torch
from torch import nn


def sincos_1d(dim, positions):
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    out = np.einsum("m,d->md", positions.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_2d(dim, grid):
    """MAE's 2-D table: half the channels from the column index, half from the row index."""
    h, w = np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32))
    return np.concatenate([sincos_1d(dim // 2, h), sincos_1d(dim // 2, w)], axis=1)


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden, freq=256):
        super().__init__()
        self.freq = freq
        self.mlp = nn.Sequential(nn.Linear(freq, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t):
        half = self.freq // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
        args = t[:, None].float() * freqs[None]
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))


class LabelEmbedder(nn.Module):
    def __init__(self, num_classes, hidden):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, hidden)  # the extra row: the null class

    def forward(self, y):
        return self.embedding_table(y)


class PatchEmbed(nn.Module):
    def __init__(self, patch, channels, hidden):
        super().__init__()
        self.proj = nn.Conv2d(channels, hidden, patch, stride=patch)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attn = (q * (d // self.heads) ** -0.5) @ k.transpose(-2, -1)
        out = attn.softmax(dim=-1) @ v
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class Block(nn.Module):
    def __init__(self, dim, heads, mlp_ratio=4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x, c):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    def __init__(self, dim, patch, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch * patch * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class Latte(nn.Module):
    """x (N, F, C, H, W), t (N,), y (N,) or None -> (N, F, out_channels, H, W)."""

    def __init__(self, input_size=32, patch_size=2, in_channels=4, hidden_size=384, depth=12, num_heads=6,
                 mlp_ratio=4.0, num_frames=16, num_classes=0, learn_sigma=True):
        super().__init__()
        self.patch, self.in_channels = patch_size, in_channels
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size) if num_classes else None
        grid = input_size // patch_size
        self.register_buffer("pos_embed", torch.from_numpy(sincos_2d(hidden_size, grid)).float()[None])
        self.register_buffer("temp_embed",
                             torch.from_numpy(sincos_1d(hidden_size, np.arange(num_frames))).float()[None])
        self.blocks = nn.ModuleList([Block(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)

    def unpatchify(self, x, h, w):
        p, c = self.patch, self.out_channels
        x = x.reshape(x.shape[0], h // p, w // p, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, h, w)

    def forward(self, x, t, y=None):
        n, f, _, h, w = x.shape
        x = self.x_embedder(x.reshape(n * f, *x.shape[2:])) + self.pos_embed
        tokens, d = x.shape[1], x.shape[2]
        c = self.t_embedder(t)
        if self.y_embedder is not None and y is not None:
            c = c + self.y_embedder(y)
        c_spatial = c.repeat_interleave(f, dim=0)
        c_temporal = c.repeat_interleave(tokens, dim=0)
        for i in range(0, len(self.blocks), 2):
            x = self.blocks[i](x, c_spatial)
            x = x.reshape(n, f, tokens, d).transpose(1, 2).reshape(n * tokens, f, d)
            if i == 0:
                x = x + self.temp_embed
            x = self.blocks[i + 1](x, c_temporal)
            x = x.reshape(n, tokens, f, d).transpose(1, 2).reshape(n * f, tokens, d)
        x = self.unpatchify(self.final_layer(x, c_spatial), h, w)
        return x.reshape(n, f, self.out_channels, h, w)


def load_state(model, path):
    """A torch.save'd state dict or a released checkpoint ({"ema": ...} / {"model": ...})."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and ("ema" in state or "model" in state):
        state = state.get("ema", state.get("model"))
    model.load_state_dict(state)
    return model


class TrainStep:
    """One training step of the original recipe on torch: DiT's loss (MSE on epsilon + the
    variational bound term of the learned variance, 1000 linear betas), AdamW (lr 1e-4, wd 0),
    gradient clipping to `clip` and an EMA update, as bench/bench_train.py's peer. The loss's
    arithmetic is a few passes over a 16x4x32x32 tensor: the network is what is timed."""

    def __init__(self, model, clip=0.1, ema_decay=0.9999):
        betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
        alphas = torch.cumprod(1 - betas, 0)
        prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas[:-1]])
        post_var = betas * (1 - prev) / (1 - alphas)
        f = lambda v: v.float()  # noqa: E731
        self.sqrt_a, self.sqrt_1ma = f(alphas.sqrt()), f((1 - alphas).sqrt())
        self.recip_a, self.recipm1_a = f((1 / alphas).sqrt()), f((1 / alphas - 1).sqrt())
        self.c1, self.c2 = f(betas * prev.sqrt() / (1 - alphas)), f((1 - prev) * (1 - betas).sqrt() / (1 - alphas))
        self.log_var_clipped = f(torch.log(torch.cat([post_var[1:2], post_var[1:]])))
        self.log_beta = f(torch.log(betas))
        self.model, self.clip, self.decay = model, clip, ema_decay
        self.opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0)
        self.ema = [p.detach().clone() for p in model.parameters()]

    def loss(self, x0, t, noise):
        g = lambda a: a[t].view(-1, 1, 1, 1, 1)  # noqa: E731
        xt = g(self.sqrt_a) * x0 + g(self.sqrt_1ma) * noise
        out = self.model(xt, t)
        eps, v = out.chunk(2, dim=2)
        mse = ((eps - noise) ** 2).mean(dim=(1, 2, 3, 4))
        frac = (v + 1) / 2
        log_var = frac * g(self.log_beta) + (1 - frac) * g(self.log_var_clipped)
        x0_pred = g(self.recip_a) * xt - g(self.recipm1_a) * eps.detach()
        mean_pred = g(self.c1) * x0_pred + g(self.c2) * xt
        mean_true = g(self.c1) * x0 + g(self.c2) * xt
        log_true = g(self.log_var_clipped)
        kl = 0.5 * (-1 + log_var - log_true + torch.exp(log_true - log_var)
                    + (mean_true - mean_pred) ** 2 * torch.exp(-log_var))
        vb = kl.mean(dim=(1, 2, 3, 4)) / math.log(2.0)  # DiT: x num_timesteps / 1000 = 1
        return (mse + vb).mean()

    def __call__(self, x0, t, noise):
        self.opt.zero_grad(set_to_none=True)
        loss = self.loss(x0, t, noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.opt.step()
        with torch.no_grad():
            for e, p in zip(self.ema, self.model.parameters()):
                e.mul_(self.decay).add_(p.detach(), alpha=1 - self.decay)
        return float(loss.detach())
