"""The Stable Diffusion VAE (diffusers `AutoencoderKL`, the sd-vae-ft-mse architecture) in MindSpore.

Parameter names and shapes are exactly diffusers' state-dict keys with the current attention names
(`to_q`, `to_k`, `to_v`, `to_out.0`, weights (C, C)), so converted weights load with a plain copy.

    vae = AutoencoderKL()                          # sd-vae-ft-mse: (128, 256, 512, 512), 83.65 M params
    mean, std = vae.encode(img, micro_batch=8)     # img (N, 3, H, W) in [-1, 1]; unscaled posterior
    z = (mean + std * eps) * vae.scaling_factor    # what Latte trains on
    rec = vae.decode(z / vae.scaling_factor)       # (N, 3, H, W)

The pipeline only runs it forward (latents are cached once, frames decoded after sampling); the
demo's small VAE is trained with it (demo/train_vae.py, which adds its reconstruction and KL losses),
so every layer is differentiable, and there is no dropout (sd-vae-ft-mse has none). Encoder and decoder run compiled (`ms.jit`) whatever the context mode,
one graph per input shape (each new frame count compiles once, ~20 s at sd-vae-ft-mse size);
`micro_batch` bounds memory for long videos; on CPU a call never takes more than one 256 px frame
(`cpu_pixels_per_call`), so an encode or decode peaks at ~1.0-1.1 GB whatever the batch. On CPU, convolutions are im2col + one matmul (models/vae_layers.py); on GPU/Ascend
they are native.
"""
import os

import mindspore as ms
from mindspore import nn, ops

from models.dtypes import ms_dtype
from models.runtime import device_target
from models.vae_layers import Conv2d, GroupNorm, Linear



class ResnetBlock2D(nn.Cell):
    """norm1 -> SiLU -> conv1 -> norm2 -> SiLU -> conv2, plus the input (1x1 conv_shortcut when the
    channel count changes). diffusers' output_scale_factor is 1 in the VAE."""

    def __init__(self, in_channels, out_channels, groups, impl, dtype):
        super().__init__()
        self.norm1 = GroupNorm(groups, in_channels)
        self.conv1 = Conv2d(in_channels, out_channels, 3, padding=1, impl=impl, dtype=dtype)
        self.norm2 = GroupNorm(groups, out_channels)
        self.conv2 = Conv2d(out_channels, out_channels, 3, padding=1, impl=impl, dtype=dtype)
        self.has_shortcut = in_channels != out_channels
        if self.has_shortcut:
            self.conv_shortcut = Conv2d(in_channels, out_channels, 1, impl=impl, dtype=dtype)

    def construct(self, x):
        h = self.conv1(self.norm1.then_silu(x))
        h = self.conv2(self.norm2.then_silu(h))
        if self.has_shortcut:
            x = self.conv_shortcut(x)
        return x + h


class Attention(nn.Cell):
    """diffusers' single-head spatial self-attention of the VAE mid block: GroupNorm, q/k/v Linear
    over the H*W tokens, softmax(q k^T / sqrt(C)) in float32, `to_out.0` Linear, residual."""

    def __init__(self, channels, groups, dtype):
        super().__init__()
        self.group_norm = GroupNorm(groups, channels)
        self.to_q = Linear(channels, channels, dtype)
        self.to_k = Linear(channels, channels, dtype)
        self.to_v = Linear(channels, channels, dtype)
        self.to_out = nn.CellList([Linear(channels, channels, dtype)])  # `to_out.0` (to_out.1 is dropout)
        self.scale = channels ** -0.5
        self.dtype = dtype

    def construct(self, x):
        n, c, h, w = x.shape
        t = self.group_norm(x).reshape(n, c, h * w).transpose(0, 2, 1)  # (N, HW, C)
        q, k, v = self.to_q(t), self.to_k(t), self.to_v(t)
        scores = ops.bmm(q * self.scale, k.transpose(0, 2, 1)).astype(ms.float32)
        attn = ops.softmax(scores, -1).astype(v.dtype)
        out = self.to_out[0](ops.bmm(attn, v))
        return x + out.transpose(0, 2, 1).reshape(n, c, h, w).astype(x.dtype)


class Downsample2D(nn.Cell):
    """Pad (left 0, right 1, top 0, bottom 1), then a stride-2 3x3 conv without padding (the conv
    does the padding itself: padding="down")."""

    def __init__(self, channels, impl, dtype):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, stride=2, padding="down", impl=impl, dtype=dtype)

    def construct(self, x):
        return self.conv(x)


class Upsample2D(nn.Cell):
    """Nearest-neighbour x2, then a 3x3 conv."""

    def __init__(self, channels, impl, dtype):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, padding=1, impl=impl, dtype=dtype)

    def construct(self, x):
        n, c, h, w = x.shape
        # each pixel twice along W (stack on a new last axis), then each row twice (concat rows);
        # 1.5x faster on CPU than one BroadcastTo of a (n, c, h, 1, w, 1) view
        x = ops.stack([x, x], 4).reshape(n, c, h, 2 * w)
        x = ops.concat([x, x], 3).reshape(n, c, 2 * h, 2 * w)
        return self.conv(x)


class DownEncoderBlock2D(nn.Cell):
    def __init__(self, in_channels, out_channels, num_layers, groups, add_downsample, impl, dtype):
        super().__init__()
        self.resnets = nn.CellList([ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels,
                                                  groups, impl, dtype) for i in range(num_layers)])
        self.add_downsample = add_downsample
        if add_downsample:
            self.downsamplers = nn.CellList([Downsample2D(out_channels, impl, dtype)])

    def construct(self, x):
        for resnet in self.resnets:
            x = resnet(x)
        if self.add_downsample:
            x = self.downsamplers[0](x)
        return x


class UpDecoderBlock2D(nn.Cell):
    def __init__(self, in_channels, out_channels, num_layers, groups, add_upsample, impl, dtype):
        super().__init__()
        self.resnets = nn.CellList([ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels,
                                                  groups, impl, dtype) for i in range(num_layers)])
        self.add_upsample = add_upsample
        if add_upsample:
            self.upsamplers = nn.CellList([Upsample2D(out_channels, impl, dtype)])

    def construct(self, x):
        for resnet in self.resnets:
            x = resnet(x)
        if self.add_upsample:
            x = self.upsamplers[0](x)
        return x


class UNetMidBlock2D(nn.Cell):
    """resnet -> attention -> resnet, at the lowest resolution."""

    def __init__(self, channels, groups, impl, dtype):
        super().__init__()
        self.attentions = nn.CellList([Attention(channels, groups, dtype)])
        self.resnets = nn.CellList([ResnetBlock2D(channels, channels, groups, impl, dtype) for _ in range(2)])

    def construct(self, x):
        x = self.resnets[0](x)
        x = self.attentions[0](x)
        return self.resnets[1](x)


class Encoder(nn.Cell):
    def __init__(self, in_channels, out_channels, block_out_channels, layers_per_block, groups, impl, dtype):
        super().__init__()
        self.conv_in = Conv2d(in_channels, block_out_channels[0], 3, padding=1, impl=impl, dtype=dtype)
        blocks, prev = [], block_out_channels[0]
        for i, ch in enumerate(block_out_channels):
            last = i == len(block_out_channels) - 1
            blocks.append(DownEncoderBlock2D(prev, ch, layers_per_block, groups, not last, impl, dtype))
            prev = ch
        self.down_blocks = nn.CellList(blocks)
        self.mid_block = UNetMidBlock2D(block_out_channels[-1], groups, impl, dtype)
        self.conv_norm_out = GroupNorm(groups, block_out_channels[-1])
        self.conv_out = Conv2d(block_out_channels[-1], 2 * out_channels, 3, padding=1, impl=impl, dtype=dtype)

    def construct(self, x):
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(self.conv_norm_out.then_silu(x))


class Decoder(nn.Cell):
    def __init__(self, in_channels, out_channels, block_out_channels, layers_per_block, groups, impl, dtype):
        super().__init__()
        rev = list(reversed(block_out_channels))
        self.conv_in = Conv2d(in_channels, rev[0], 3, padding=1, impl=impl, dtype=dtype)
        self.mid_block = UNetMidBlock2D(rev[0], groups, impl, dtype)
        blocks, prev = [], rev[0]
        for i, ch in enumerate(rev):
            last = i == len(rev) - 1
            blocks.append(UpDecoderBlock2D(prev, ch, layers_per_block + 1, groups, not last, impl, dtype))
            prev = ch
        self.up_blocks = nn.CellList(blocks)
        self.conv_norm_out = GroupNorm(groups, rev[-1])
        self.conv_out = Conv2d(rev[-1], out_channels, 3, padding=1, impl=impl, dtype=dtype)

    def construct(self, z):
        x = self.conv_in(z)
        x = self.mid_block(x)
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(self.conv_norm_out.then_silu(x))


class AutoencoderKL(nn.Cell):
    """diffusers' AutoencoderKL (inference). Constructor defaults are sd-vae-ft-mse.

    conv_impl: "auto" (im2col+matmul on CPU, native conv on GPU/Ascend), "matmul" or "native".
    dtype: compute dtype of convs and matmuls, a MindSpore dtype or "fp32" / "fp16" / "bf16" (fp32 on
      CPU, where fp16 is slower and bf16 matmul is missing; fp16/bf16 for GPU/Ascend). GroupNorm
      statistics and the attention softmax stay float32; outputs are float32.
    jit: compile encoder and decoder with ms.jit (default). False runs them in the context's mode.
    """

    def __init__(self, in_channels=3, out_channels=3, block_out_channels=(128, 256, 512, 512),
                 layers_per_block=2, latent_channels=4, norm_num_groups=32, scaling_factor=0.18215,
                 conv_impl="auto", dtype=ms.float32, jit=True):
        super().__init__()
        dtype = ms_dtype(dtype)
        block_out_channels = tuple(int(c) for c in block_out_channels)
        bad = [c for c in block_out_channels if c % norm_num_groups]
        if bad:
            raise ValueError(f"block_out_channels {bad} are not divisible by norm_num_groups={norm_num_groups}")
        self.block_out_channels = block_out_channels
        self.latent_channels = latent_channels
        self.scaling_factor = scaling_factor
        self.downscale = 2 ** (len(block_out_channels) - 1)
        self.dtype = dtype
        self.encoder = Encoder(in_channels, latent_channels, block_out_channels, layers_per_block,
                               norm_num_groups, conv_impl, dtype)
        self.decoder = Decoder(latent_channels, out_channels, block_out_channels, layers_per_block,
                               norm_num_groups, conv_impl, dtype)
        self.quant_conv = Conv2d(2 * latent_channels, 2 * latent_channels, 1, impl=conv_impl, dtype=dtype)
        self.post_quant_conv = Conv2d(latent_channels, latent_channels, 1, impl=conv_impl, dtype=dtype)
        # Frozen: Latte never trains the VAE (a training script may switch these back on).
        for p in self.get_parameters():
            p.requires_grad = False
        self._encode_fn = self._encode_graph
        self._decode_fn = self._decode_graph
        if jit:
            self._encode_fn = ms.jit(self._encode_graph)
            self._decode_fn = ms.jit(self._decode_graph)

    # ---- the compiled bodies ---------------------------------------------------------------------
    def _encode_graph(self, x):
        return self.quant_conv(self.encoder(x.astype(self.dtype))).astype(ms.float32)

    def _decode_graph(self, z):
        return self.decoder(self.post_quant_conv(z.astype(self.dtype))).astype(ms.float32)

    # ---- public API ------------------------------------------------------------------------------
    # On CPU one compiled call holds at most this many output pixels' worth of frames (one 256 px
    # frame; always at least one frame). There the convolution kernels go through a batch frame by
    # frame anyway, so a bigger call is no faster, while its activations grow with every frame: a
    # 4-frame encode peaked at 3.0 GB against 1.6 GB for one frame. None: no cap.
    cpu_pixels_per_call = 256 * 256

    def frames_per_call(self, n, micro_batch, pixels):
        """Frames per compiled call for a batch of n frames of `pixels` output pixels each."""
        frames = n if micro_batch is None else min(micro_batch, n)
        if self.cpu_pixels_per_call and device_target() == "CPU":
            frames = min(frames, max(1, self.cpu_pixels_per_call // pixels))
        return frames

    def _chunked(self, fn, x, micro_batch, what, pixels):
        if x.ndim != 4:
            raise ValueError(f"{what}: expected an (N, C, H, W) tensor, got shape {tuple(x.shape)}")
        if micro_batch is not None and micro_batch < 1:
            raise ValueError(f"micro_batch={micro_batch} must be a positive number of frames (or None)")
        n = x.shape[0]
        micro_batch = self.frames_per_call(n, micro_batch, pixels)
        if micro_batch >= n:
            return fn(x)
        return ops.concat([fn(x[i:i + micro_batch]) for i in range(0, n, micro_batch)], 0)

    def encode_moments(self, img, micro_batch=None):
        """quant_conv(encoder(img)): (N, 2*latent, H/8, W/8), mean then logvar on channels."""
        h, w = img.shape[-2:]
        if h % self.downscale or w % self.downscale:
            raise ValueError(f"image size {h}x{w} is not a multiple of {self.downscale}: crop or resize it")
        return self._chunked(self._encode_fn, img, micro_batch, "encode", h * w)

    @staticmethod
    def moments_to_mean_std(moments):
        """diffusers' DiagonalGaussianDistribution: logvar clamped to [-30, 20], std = exp(logvar/2)."""
        mean, logvar = ops.chunk(moments, 2, 1)
        logvar = ops.clamp(logvar, -30.0, 20.0)
        return mean, ops.exp(0.5 * logvar)

    def encode(self, img, micro_batch=None):
        """img (N, 3, H, W) in [-1, 1] -> (mean, std) of the posterior, unscaled, each (N, 4, H/8, W/8)."""
        return self.moments_to_mean_std(self.encode_moments(img, micro_batch))

    def decode(self, z, micro_batch=None):
        """Unscaled latents (N, 4, h, w) -> images (N, 3, 8h, 8w), nominally in [-1, 1] (not clipped)."""
        if z.ndim != 4:
            raise ValueError(f"decode: expected an (N, C, H, W) tensor, got shape {tuple(z.shape)}")
        return self._chunked(self._decode_fn, z, micro_batch, "decode", z.shape[2] * z.shape[3] * self.downscale ** 2)

    def construct(self, img):
        """Reconstruction from the posterior mean (deterministic), as one graph-friendly body."""
        mean, _ = ops.chunk(self._encode_graph(img), 2, 1)
        return self._decode_graph(mean)


# ------------------------------------------------------------------------------------------------
# loading: the one way ingest, the trainer and the sampler get a VAE
# ------------------------------------------------------------------------------------------------

CONFIG_KEYS = ("in_channels", "out_channels", "block_out_channels", "layers_per_block", "latent_channels",
               "norm_num_groups")
TORCH_SUFFIXES = (".bin", ".pt", ".pth")


def downscale_of(config):
    """Pixels per latent: each encoder level but the last halves the size (8 for the SD VAE's four)."""
    return 2 ** (len(config.get("block_out_channels", (128, 256, 512, 512))) - 1)


def vae_config(path, what="vae", default=None):
    """AutoencoderKL kwargs of a converted VAE weights file: its `latte convert` metadata, else
    `default` (else the SD VAE's defaults, {}). ValueError naming `what` (the config key) and the fix."""
    from models.convert import read_metadata

    if path.endswith(TORCH_SUFFIXES):
        raise ValueError(f"{what} {path} is a PyTorch file: convert it first with `latte convert --kind vae "
                         f"--source {path} --target sd-vae-ft-mse.ckpt` and pass the .ckpt")
    if not os.path.isfile(path):
        raise ValueError(f"{what} {path} not found: check the path, or convert the SD VAE with "
                         f"`latte convert --kind vae` and pass the result")
    meta = read_metadata(path)
    if meta.get("kind", "vae") != "vae":
        raise ValueError(f"{what} {path} holds {meta['kind']} weights, not a VAE: pass the VAE weights "
                         f"(`latte convert --kind vae`)")
    return {k: v for k, v in (meta.get("config") or default or {}).items() if k in CONFIG_KEYS}


def load_vae(path, dtype="fp32", config=None, what="vae"):
    """The AutoencoderKL of a converted weights file, loaded strictly and in eval mode. `config`
    (from `vae_config`) skips reading the metadata again. ValueError on a missing or wrong file."""
    from models.convert import load_weights

    config = vae_config(path, what) if config is None else config
    vae = AutoencoderKL(**config, dtype=dtype)
    load_weights(vae, path)
    vae.set_train(False)
    return vae
