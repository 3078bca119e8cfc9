"""`latte sample`: denoise videos with a trained Latte, decode them with the VAE, write GIF/MP4/PNG.

    folder = sampler.main(["-c", "configs/inference/sky.yaml", "--checkpoint", PATH])   # the command
    z = sample_latents(net, diffusion, num_samples, seed, ...)    # (N, F, C, h, w), reproducible per sample
    videos = decode_latents(vae, z, scale_factor)                 # uint8 (N, F, H, W, 3)

`models.video_io` writes the GIF (Pillow), MP4 (PyAV) and PNG grids. MindSpore is imported on first use.
"""
from sampler.config import SampleConfig
from sampler.sample import (decode_latents, load_latte, load_vae, main, release_network, sample,
                            sample_latents, write_videos)

__all__ = ["SampleConfig", "main", "sample", "sample_latents", "decode_latents", "load_latte", "load_vae",
           "release_network",
           "write_videos"]
