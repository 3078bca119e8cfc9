"""The demo end to end at a reduced size (demo/run_demo.py --quick, fixed seed): synthetic data,
`latte ingest`, `latte train`, `latte sample` as subprocesses; the sampled videos must look like the
synthetic skies on simple statistics, far closer than noise; and the shipped autoencoder must be
small, rebuildable from its file and reconstruct sky frames."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "demo"))

import run_demo  # noqa: E402
from run_demo import video_stats  # noqa: E402
from conftest import assert_f32_close  # noqa: E402

VAE = ROOT / "demo" / "sky_vae.safetensors"


def test_shipped_vae_is_small_and_rebuilds_from_its_own_metadata():
    from models import AutoencoderKL, load_weights, read_metadata

    assert VAE.stat().st_size <= 5 * 2 ** 20
    meta = read_metadata(VAE)
    assert meta["kind"] == "vae" and meta["config"]["block_out_channels"] == [16, 32, 64, 64]
    vae = AutoencoderKL(**meta["config"])
    load_weights(vae, VAE)  # strict: every parameter, no extra tensor
    assert vae.downscale == 8 and vae.latent_channels == 4


def test_shipped_vae_reconstructs_sky_frames_with_standardised_latents():
    import mindspore as ms

    from ingest.synthetic import render_sky_video
    from ingest.transforms import transform_frames
    from models import AutoencoderKL, load_weights, read_metadata

    vae = AutoencoderKL(**read_metadata(VAE)["config"])
    load_weights(vae, VAE)
    rng = np.random.default_rng(123)  # videos the autoencoder never saw
    x = np.concatenate([transform_frames(render_sky_video(rng, 2, (64, 96)), 64) for _ in range(4)])
    mean, _ = vae.encode(ms.Tensor(x))
    rec = vae.decode(mean).asnumpy()
    psnr = 10 * np.log10(4.0 / np.mean((rec - x) ** 2))  # signal range 2 ([-1, 1])
    assert psnr > 22, psnr  # 24.6 dB on held-out frames when trained
    # Latents scaled by 0.18215 are roughly standard normal, as Latte expects.
    z = mean.asnumpy() * 0.18215
    assert abs(z.mean()) < 0.5 and 0.5 < z.std() < 1.6, (z.mean(), z.std())


def test_video_stats_measure_colour_vertical_gradient_and_motion():
    video = np.zeros((1, 4, 16, 8, 3), np.uint8)
    video[..., 2] = 90
    video[..., 0] = (np.arange(16) * 16)[None, None, :, None]  # red rises by 1/16 per row: brightness 1/3 of it
    stats = video_stats(video)
    assert_f32_close(stats["colour_means"], [120 / 255, 0, 90 / 255])
    assert stats["vertical_gradient"][0] == pytest.approx(16 * 16 / 255 / 3, rel=1e-4)  # per frame height
    assert stats["frame_change"][0] == 0
    video[:, 1::2] = 255 - video[:, 1::2]  # every other frame inverted
    assert video_stats(video)["frame_change"][0] > 0.3


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return run_demo.run(tmp_path_factory.mktemp("demo") / "out", quick=True, seed=0)


@pytest.mark.slow
def test_demo_writes_every_output_it_reports(demo):
    assert len(list(demo["dataset"].rglob("*.jpg"))) == 8 * 2 * 24  # quick: 8 videos x 2 clips x 24 frames
    assert (demo["manifest"]).is_dir() and any(demo["manifest"].iterdir())
    assert demo["checkpoint"].name == "step_0000800.safetensors"
    assert demo["loss_png"].stat().st_size > 0 and demo["log"].stat().st_size > 0
    names = sorted(p.name for p in demo["samples"].iterdir())
    assert names == ["config.yaml", "grid.png"] + [f"sample_{i:03d}.{ext}" for i in range(8) for ext in ("gif", "mp4")]


@pytest.mark.slow
def test_demo_ends_with_a_preview_of_its_cache_and_its_psnr(demo):
    summary = json.loads((demo["preview"] / "preview.json").read_text())
    assert summary["psnr"] == pytest.approx(demo["preview_psnr"], abs=0.005)  # the printed number
    assert demo["preview_psnr"] > 20  # the sky autoencoder measured 24.4 dB on these skies
    assert (demo["preview"] / "grid.png").exists() and len(list(demo["preview"].glob("*_source_vs_decoded.gif"))) == 4
    assert demo["stats_png"].exists()


@pytest.mark.slow
def test_demo_samples_look_like_the_synthetic_skies_not_noise(demo):
    got, noise = demo["distance_samples"], demo["distance_noise"]
    print(demo["table"])
    # Closer to the data than uniform noise is, by far: colours and motion within 30% of noise's
    # distance, the gradient (noisier with 8 samples) within half.
    assert got["colour_means"] < 0.3 * noise["colour_means"], (got, noise)
    assert got["frame_change"] < 0.3 * noise["frame_change"], (got, noise)
    assert got["vertical_gradient"] < 0.5 * noise["vertical_gradient"], (got, noise)
    # and in absolute terms: a blue sky that brightens towards the horizon and changes slowly
    stats = video_stats(run_demo.read_gifs(demo["samples"]))
    assert stats["colour_means"][2] > stats["colour_means"][0] + 0.1
    assert stats["vertical_gradient"][0] > 0.05
    assert stats["frame_change"][0] < 0.1
