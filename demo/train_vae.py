"""Train the small sky autoencoder that the demo ships (`demo/sky_vae.safetensors`).

No pretrained VAE can be downloaded for the demo, and a randomly initialised one decodes to noise.
So the demo uses the SAME AutoencoderKL architecture as Stable Diffusion's VAE (models/vae.py) in a
tiny configuration, trained here on synthetic sky frames (ingest/synthetic.py) at the demo's 64 px:

    AutoencoderKL(block_out_channels=(16, 32, 64, 64), layers_per_block=1, norm_num_groups=8,
                  latent_channels=4)          # 8x downsampling: 64 px frames -> 4 x 8 x 8 latents

Reproduce the committed weights byte for byte (about 4 minutes on 2 idle CPU cores with the fused CPU
kernels of models/cpu_kernels.py; the plain-ops path computes slightly different bits):

    .venv/bin/python demo/train_vae.py --out demo/sky_vae.safetensors --preview outputs/vae_preview.png

Objective: L1 + MSE reconstruction of a sample of the posterior plus a tiny KL term (weight 1e-6, the
order of SD's), Adam with warmup and cosine decay, everything seeded (data, noise, init). After
training the latent space is standardised exactly, by folding an affine map into `quant_conv` and
its inverse into `post_quant_conv`: every latent channel then has mean 0 and std 1/0.18215 on sky
frames, so the usual `z * 0.18215` gives Latte unit-variance inputs as with the real SD VAE. The
file stores the constructor arguments (`models.read_metadata`), like a `latte convert` output.
"""
import argparse
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

VAE_CONFIG = dict(in_channels=3, out_channels=3, block_out_channels=[16, 32, 64, 64], layers_per_block=1,
                  latent_channels=4, norm_num_groups=8, scaling_factor=0.18215)
IMAGE_SIZE = 64
SOURCE_SIZE = (64, 96)  # what the demo's synthetic dataset renders, centre-cropped to 64x64 by ingest


def sky_frames(num_videos, frames_per_video, seed):
    """float32 (N, 3, 64, 64) frames in [-1, 1] from synthetic sky videos, through the same centre
    crop and normalisation that `latte ingest` applies (and a JPEG round trip, as the demo data is
    stored as JPEG)."""
    import io

    from PIL import Image

    from ingest.synthetic import render_sky_video
    from ingest.transforms import transform_frames

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(num_videos):
        video = render_sky_video(rng, frames_per_video, SOURCE_SIZE)
        frames = []
        for frame in video:
            buf = io.BytesIO()
            Image.fromarray(frame).save(buf, format="JPEG", quality=90)
            frames.append(np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB")))
        out.append(transform_frames(np.stack(frames), IMAGE_SIZE))
    return np.concatenate(out)


def make_trainable(vae):
    """Unfreeze the VAE (models/vae.py freezes it: it is an inference module)."""
    for p in vae.get_parameters():
        p.requires_grad = True


def build_trainer(vae, lr_schedule, kl_weight):
    """A compiled step: loss of one batch, gradients, Adam update; returns the reconstruction loss."""
    import mindspore as ms
    from mindspore import nn, ops

    params = vae.trainable_params()
    optimizer = nn.Adam(params, learning_rate=ms.Tensor(lr_schedule, ms.float32))

    def loss_fn(x, eps):
        moments = vae.quant_conv(vae.encoder(x))
        mean, logvar = ops.chunk(moments, 2, 1)
        logvar = ops.clamp(logvar, -30.0, 20.0)
        z = mean + ops.exp(0.5 * logvar) * eps
        rec = vae.decoder(vae.post_quant_conv(z))
        diff = rec - x
        rec_loss = ops.abs(diff).mean() + (diff * diff).mean()
        kl = 0.5 * (mean * mean + ops.exp(logvar) - 1.0 - logvar).sum() / x.shape[0]
        return rec_loss + kl_weight * kl, rec_loss

    grad_fn = ms.value_and_grad(loss_fn, None, optimizer.parameters, has_aux=True)

    @ms.jit
    def step(x, eps):
        (loss, rec), grads = grad_fn(x, eps)
        return ops.depend(rec, optimizer(grads))

    return step


def standardise_latents(vae, frames, micro_batch=64):
    """Fold z' = (z - m) * k / s into quant_conv and z = z' * s / k + m into post_quant_conv, with
    m, s the per-channel mean and std of the posterior mean over `frames` and k = 1 / scaling_factor.
    Decoding is unchanged (exactly, up to float rounding); the encoder's latents become standardised."""
    import mindspore as ms

    means = []
    for i in range(0, len(frames), micro_batch):
        mean, _ = vae.encode(ms.Tensor(frames[i:i + micro_batch]))
        means.append(mean.asnumpy())
    z = np.concatenate(means).astype(np.float64)  # (N, C, h, w)
    m = z.mean(axis=(0, 2, 3))
    s = z.std(axis=(0, 2, 3))
    k = 1.0 / vae.scaling_factor
    c = vae.latent_channels
    a = k / s  # z' = a * (z - m)

    qw = vae.quant_conv.weight.asnumpy().astype(np.float64)  # (2C, 2C, 1, 1), out rows: mean then logvar
    qb = vae.quant_conv.bias.asnumpy().astype(np.float64)
    qw[:c] *= a[:, None, None, None]
    qb[:c] = (qb[:c] - m) * a
    qb[c:] += 2.0 * np.log(a)  # std scales by a, so logvar moves by 2 log a
    pw = vae.post_quant_conv.weight.asnumpy().astype(np.float64)  # (C, C, 1, 1), input z
    pb = vae.post_quant_conv.bias.asnumpy().astype(np.float64)
    pb = pb + pw[:, :, 0, 0] @ m
    pw = pw / a[None, :, None, None]
    for param, value in ((vae.quant_conv.weight, qw), (vae.quant_conv.bias, qb),
                         (vae.post_quant_conv.weight, pw), (vae.post_quant_conv.bias, pb)):
        param.set_data(ms.Tensor(value.astype(np.float32)))
    return m, s


def save_preview(vae, frames, path):
    """A PNG: top row originals, bottom row decode(encode(x)) of 8 frames."""
    import mindspore as ms
    from PIL import Image

    x = frames[:8]
    mean, _ = vae.encode(ms.Tensor(x))
    rec = vae.decode(mean).asnumpy()
    to_u8 = lambda a: (np.clip(a, -1, 1) * 127.5 + 127.5 + 0.5).astype(np.uint8).transpose(0, 2, 3, 1)
    top, bottom = np.concatenate(list(to_u8(x)), 1), np.concatenate(list(to_u8(rec)), 1)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(np.concatenate([top, bottom], 0)).resize((8 * 128, 256), Image.NEAREST).save(path)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Train the demo's tiny sky AutoencoderKL on synthetic frames.")
    parser.add_argument("--out", default="demo/sky_vae.safetensors", help="weights file to write")
    parser.add_argument("--steps", type=int, default=700, help="optimizer steps")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (cosine to 5%%)")
    parser.add_argument("--kl_weight", type=float, default=1e-6)
    parser.add_argument("--videos", type=int, default=160, help="synthetic training videos")
    parser.add_argument("--frames", type=int, default=24, help="frames per training video")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cpu_threads", type=int, default=2)
    parser.add_argument("--dtype", choices=("fp16", "fp32"), default="fp16", help="stored weight dtype")
    parser.add_argument("--preview", default="", help="also write a PNG of originals over reconstructions")
    args = parser.parse_args(argv)

    from models.runtime import setup_device
    setup_device("CPU", "graph", args.cpu_threads, seed=args.seed)
    import mindspore as ms
    from models.convert import save_weights
    from models.vae import AutoencoderKL

    t0 = time.time()
    frames = sky_frames(args.videos, args.frames, args.seed)
    held_out = sky_frames(8, 8, args.seed + 1)[::8]  # 8 frames of unseen videos, for the report
    print(f"{len(frames)} training frames rendered in {time.time() - t0:.0f}s", flush=True)

    vae = AutoencoderKL(**VAE_CONFIG, jit=False)
    make_trainable(vae)
    # Start with a near-deterministic posterior (std ~0.02, not ~1): with unit noise on tiny initial
    # means the decoder sees mostly noise and the reconstruction stalls for hundreds of steps.
    c = VAE_CONFIG["latent_channels"]
    bias = vae.quant_conv.bias.asnumpy()
    bias[c:] = -8.0
    vae.quant_conv.bias.set_data(ms.Tensor(bias))
    warmup = max(1, args.steps // 20)
    lr = [args.lr * min(1.0, (i + 1) / warmup) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * i / args.steps)))
          for i in range(args.steps)]
    step = build_trainer(vae, lr, args.kl_weight)

    rng = np.random.default_rng([args.seed, 1])
    t0, ema = time.time(), None
    for i in range(args.steps):
        idx = rng.integers(0, len(frames), args.batch_size)
        eps = rng.standard_normal((args.batch_size, VAE_CONFIG["latent_channels"], IMAGE_SIZE // 8,
                                   IMAGE_SIZE // 8), dtype=np.float32)
        rec = float(step(ms.Tensor(frames[idx]), ms.Tensor(eps)).asnumpy())
        ema = rec if ema is None else 0.95 * ema + 0.05 * rec
        if i % 25 == 0 or i == args.steps - 1:
            print(f"step {i + 1}/{args.steps}  L1+MSE {rec:.4f} (smoothed {ema:.4f})  {time.time() - t0:.0f}s", flush=True)

    for p in vae.get_parameters():
        p.requires_grad = False
    vae.set_train(False)
    eval_vae = AutoencoderKL(**VAE_CONFIG)  # the inference module (compiled encode/decode)
    for name, p in eval_vae.parameters_dict().items():
        p.set_data(ms.Tensor(vae.parameters_dict()[name].asnumpy()))
    m, s = standardise_latents(eval_vae, frames[::4])
    print(f"latent channel means {np.round(m, 3).tolist()}, stds {np.round(s, 3).tolist()} -> standardised")
    mean, _ = eval_vae.encode(ms.Tensor(held_out))
    rec = eval_vae.decode(mean).asnumpy()
    print(f"held-out frames: L1 {np.abs(rec - held_out).mean():.4f}, PSNR "
          f"{10 * np.log10(4.0 / np.mean((rec - held_out) ** 2)):.1f} dB (range [-1, 1])")

    state = {name: p.asnumpy() for name, p in eval_vae.parameters_dict().items()}
    metadata = {"kind": "vae", "config": VAE_CONFIG, "variant": None,
                "source": f"demo/train_vae.py --steps {args.steps} --seed {args.seed}"}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    save_weights(args.out, state, "safetensors", args.dtype, metadata)
    print(f"wrote {args.out} ({os.path.getsize(args.out) / 2**20:.2f} MB) in {time.time() - t0:.0f}s of training")
    if args.preview:
        save_preview(eval_vae, held_out, args.preview)
        print(f"wrote {args.preview} (originals above, reconstructions below)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
