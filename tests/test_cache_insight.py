"""Seeing inside a cache: `latte cache stats` (per-channel moments, unit-variance scale factor, histogram),
`latte cache preview` (decode back through the store's VAE, PSNR against the source), and class labels
at ingest carried through `latte train` to `latte sample --class_labels`.

Data: synthetic sky clips of 32x32 px in two class folders (UCF-101 layout), ingested in-process through
the demo's sky autoencoder (4x4 latents), so every test here runs in seconds."""
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

import cache_store
import latte_cli
from cache_store.stats import compute_stats, recorded_stats
from ingest import cache_stats, cli, pipeline, preview
from ingest.sources import apply_labels, discover_entries, read_label_csv
from ingest.synthetic import make_sky_dataset
from models.config import ConfigError, build_config

ROOT = Path(__file__).resolve().parents[1]
# matplotlib 3.9 calls pyparsing names that newer pyparsing deprecates: noise, not ours
pytestmark = pytest.mark.filterwarnings("ignore:.*deprecated - use:DeprecationWarning")
VAE = ROOT / "demo" / "sky_vae.safetensors"
CLASSES = ("clouds", "dusk")


def ingest(data, cache, *more):
    cfg = cli.parse_args(["-c", str(ROOT / "demo" / "ingest.yaml"), "--data_folder", str(data),
                               "--cache_folder", str(cache), "--vae_weights", str(VAE), "--image_size", "32",
                               "--micro_batch", "8", "--mode", "pynative", "--progress", "false", *more])
    return pipeline.run_ingest(cfg, environ={})


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Two classes x 2 clips of 8 frames, one folder per class: <data>/<class>/<video>/frame_<n>.jpg."""
    data = tmp_path_factory.mktemp("labelled") / "data"
    for k, name in enumerate(CLASSES):
        make_sky_dataset(data / name, num_videos=2, clips_per_video=1, frames_per_clip=8, size=(32, 40),
                         layout="flat", seed=k + 1)
    return data


@pytest.fixture(scope="module")
def cache(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("labelled_cache") / "cache"
    ingest(corpus, out, "--labels", "folder")
    return out


# ------------------------------------------------------------------------------------------------
# labels at ingest
# ------------------------------------------------------------------------------------------------

def test_labels_folder_records_class_names_in_settings_and_a_label_column(cache):
    store = cache_store.open(cache)
    assert store.settings["class_names"] == list(CLASSES)
    rows = store.entries().to_pylist()
    assert len(rows) == 4 and all(r["status"] == "ok" for r in rows)
    assert {r["id"]: r["label"] for r in rows} == {r["id"]: CLASSES.index(r["id"].split("/")[0]) for r in rows}
    assert store.verify() == []


def test_labels_csv_skips_unlisted_entries_with_the_reason(corpus, tmp_path):
    ids = sorted(e.id for e in discover_entries(corpus))
    csv = tmp_path / "labels.csv"
    csv.write_text("id,label\n" + "".join(f"{i},{'b' if k % 2 else 'a'}\n" for k, i in enumerate(ids[:3])))
    ingest(corpus, tmp_path / "cache", "--labels", str(csv))
    store = cache_store.open(tmp_path / "cache")
    rows = store.rows()
    assert store.settings["class_names"] == ["a", "b"]
    assert [rows[i]["label"] for i in ids[:3]] == [0, 1, 0]
    assert rows[ids[3]]["status"] == "skipped" and rows[ids[3]]["label"] is None
    assert f"no label in {csv}" in rows[ids[3]]["reason"]


def test_labels_folder_skips_entries_outside_a_class_folder(corpus, tmp_path):
    entries = discover_entries(corpus) + discover_entries(corpus / "dusk")  # second list: ids without a class
    labelled, names = apply_labels(entries, "folder")
    assert names == list(CLASSES)
    loose = [e for e in labelled if "/" not in e.id]
    assert loose and all(e.status == "skipped" and "no class folder" in e.reason for e in loose)


@pytest.mark.parametrize("text, message", [
    ("name,class\nx,y\n", "needs a header row with columns id,label"),
    ("id,label\nx,\n", "line 2: empty id or label"),
    ("id,label\nx,a\nx,b\n", "labelled both 'a' and 'b'"),
])
def test_a_bad_labels_csv_is_a_one_line_error(tmp_path, text, message):
    path = tmp_path / "labels.csv"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        read_label_csv(path)


def test_labels_that_are_neither_folder_nor_csv_are_a_config_error(corpus, tmp_path):
    with pytest.raises(ConfigError, match="'labels' is 'classes.txt'"):
        ingest(corpus, tmp_path / "c", "--labels", "classes.txt")


# ------------------------------------------------------------------------------------------------
# stats
# ------------------------------------------------------------------------------------------------

def _all_latents(store):
    rows = sorted((r for r in store.rows().values() if r["status"] == "ok"), key=lambda r: r["id"])
    return [store.read_entry(r["id"]) for r in rows]


def test_stats_equal_a_direct_numpy_computation_whatever_the_chunk_size(cache):
    store = cache_store.open(cache)
    a = compute_stats(store, chunk_frames=3, seed=5)["summary"]
    b = compute_stats(store, chunk_frames=64, seed=5)["summary"]
    latents = _all_latents(store)
    mean = np.concatenate([m for m, _ in latents]).astype(np.float64)
    per_channel = np.moveaxis(mean, 1, 0).reshape(mean.shape[1], -1)
    np.testing.assert_allclose(a["posterior_mean"]["mean"], per_channel.mean(axis=1), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(a["posterior_mean"]["std"], per_channel.std(axis=1), rtol=1e-6)
    # the samples draw eps per entry, so chunking changes nothing but the summation order
    np.testing.assert_allclose(a["sample"]["std"], b["sample"]["std"], rtol=1e-6)
    rngs = [np.random.default_rng([5, k]) for k in range(len(latents))]
    samples = np.concatenate([m + s * r.standard_normal(m.shape, dtype=np.float32)
                              for (m, s), r in zip(latents, rngs)]).astype(np.float64)
    assert a["scale_factor"] == pytest.approx(1.0 / samples.std(), rel=1e-6)
    assert a["frame_counts"] == {"min": 8, "max": 8, "mean": 8.0, "median": 8.0, "p10": 8.0, "p90": 8.0}
    assert a["entries"] == 4 and a["frames"] == 32 and a["posterior_mean"]["outside_histogram"] == 0


def test_stats_read_at_most_chunk_frames_at_a_time(cache, monkeypatch):
    store = cache_store.open(cache)
    seen = []
    original = store.read_clip
    monkeypatch.setattr(store, "read_clip", lambda i, start, n, stride=1: seen.append(n) or original(i, start, n))
    compute_stats(store, chunk_frames=3)
    assert max(seen) == 3 and sum(seen) == 32  # every frame once, never more than a chunk in memory


def test_cache_stats_command_records_stats_and_writes_the_histogram(cache, tmp_path, capsys):
    png = tmp_path / "hist.png"
    assert latte_cli.main(["cache", "stats", str(cache), "--output", str(png), "--progress", "false"]) == 0
    out = capsys.readouterr().out
    recorded = recorded_stats(cache_store.open(cache))
    assert f"scale factor for unit variance {recorded['scale_factor']:.5f}" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    store = cache_store.open(cache)
    assert store.verify() == [] and store.settings["class_names"] == list(CLASSES)  # settings untouched


def test_train_scale_factor_auto_uses_the_recorded_stats(cache, tmp_path):
    from trainer.config import TrainConfig
    from trainer.data import TrainData

    def data(scale):
        cfg = build_config(TrainConfig, ({"cache_folder": str(cache), "num_frames": 4, "sample_stride": 1,
                                          "scale_factor": scale}, "in the test"))
        return TrainData(cfg, say=lambda m: None)

    assert data("").scale == pytest.approx(0.18215)  # the default stays SD's
    assert data("0.5").scale == 0.5
    bare = tmp_path / "bare"
    shutil.copytree(cache, bare)
    doc = json.loads((bare / "zarr.json").read_text())
    doc["attributes"]["latte_cache"].pop("stats", None)
    (bare / "zarr.json").write_text(json.dumps(doc))
    with pytest.raises(ConfigError, match=r"run `latte cache stats"):
        build = build_config(TrainConfig, ({"cache_folder": str(bare), "num_frames": 4, "scale_factor": "auto"}, ""))
        TrainData(build, say=lambda m: None)
    cache_stats.main([str(cache), "--progress", "false"])
    assert data("auto").scale == pytest.approx(recorded_stats(cache_store.open(cache))["scale_factor"])


def test_cache_stats_and_preview_help_list_every_key(capsys):
    import dataclasses

    for module, schema in ((cache_stats, cache_stats.StatsConfig), (preview, preview.PreviewConfig)):
        with pytest.raises(SystemExit):
            module.main(["--help"])
        text = capsys.readouterr().out
        assert all(f"--{f.name}" in text for f in dataclasses.fields(schema)), schema


def test_cache_stats_errors_are_one_line(tmp_path, capsys):
    assert latte_cli.main(["cache", "stats", str(tmp_path / "nope"), "--progress", "false"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("latte cache stats: error:") and "no such latent cache" in err[0]
    assert latte_cli.main(["cache", "stats", str(tmp_path), "--chunk_frame", "2"]) == 2
    assert "did you mean 'chunk_frames'" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# preview
# ------------------------------------------------------------------------------------------------

def test_preview_decodes_entries_and_reports_psnr_against_the_source(cache, tmp_path, capsys):
    out = tmp_path / "preview"
    rc = latte_cli.main(["cache", "preview", str(cache), "--vae_weights", str(VAE), "--num", "2", "--max_frames", "4",
                         "--output_folder", str(out), "--progress", "false"])
    assert rc == 0
    text = capsys.readouterr().out
    summary = json.loads((out / "preview.json").read_text())
    assert len(summary["entries"]) == 2
    for r in summary["entries"]:
        # the sky VAE reconstructs these clips at ~18-25 dB; decoding the wrong thing (scaled latents,
        # another entry, noise) lands below 12 dB
        assert r["psnr"] > 15, r
        assert f"{r['id']}: 4 frames decoded, PSNR {r['psnr']:.2f} dB" in text
        assert all(Path(f).stat().st_size > 0 for f in r["files"])
        assert any(f.endswith("_source_vs_decoded.gif") for f in r["files"])
    mses = [10 ** (-r["psnr"] / 10) for r in summary["entries"]]
    assert summary["psnr"] == pytest.approx(10 * math.log10(1 / np.mean(mses)), rel=1e-9)  # pooled MSE
    assert f"overall reconstruction PSNR: {summary['psnr']:.2f} dB" in text
    from PIL import Image
    grid = Image.open(out / "grid.png")
    assert grid.size == (2 + 4 * 34, 2 + 4 * 34)  # 2 x (source, decoded) rows x 4 frames of 32 px, 2 px gaps


def test_preview_psnr_is_computed_on_what_the_vae_decodes(cache, tmp_path):
    """The same number from first principles: decode the stored mean, compare with the source frames."""
    import mindspore as ms

    from ingest.readers import read_frames
    from models import AutoencoderKL, load_weights

    store = cache_store.open(cache)
    cfg = build_config(preview.PreviewConfig, ({"cache_folder": str(cache), "vae_weights": str(VAE), "num": 1,
                                                "max_frames": 3, "save_mp4": False, "output_folder": str(tmp_path),
                                                "progress": False}, "in the test"))
    result = preview.preview(cfg)["entries"][0]
    row = store.rows()[result["id"]]
    vae = AutoencoderKL(**store.settings["vae_config"])
    load_weights(vae, str(VAE))
    decoded = vae.decode(ms.Tensor(store.read_clip(row["id"], 0, 3)[0])).asnumpy()
    entry, _ = preview.source_entry(row, 1)
    src = read_frames(entry, [0, 1, 2], 32)
    mse = np.mean(np.square(np.clip(decoded * 0.5 + 0.5, 0, 1) - np.clip(src * 0.5 + 0.5, 0, 1), dtype=np.float64))
    assert result["psnr"] == pytest.approx(10 * math.log10(1 / mse), rel=1e-4)


def test_preview_refuses_a_vae_with_another_sha256(cache, tmp_path, capsys):
    other = tmp_path / "other_vae.safetensors"
    other.write_bytes(VAE.read_bytes() + b" ")
    rc = latte_cli.main(["cache", "preview", str(cache), "--vae_weights", str(other), "--output_folder",
                         str(tmp_path / "p"), "--progress", "false"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "sha256" in err[0] and "pass the VAE the cache was ingested with" in err[0]
    assert not (tmp_path / "p").exists()


def test_preview_of_entries_whose_source_is_gone_decodes_without_psnr(corpus, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(corpus / "clouds", data)
    ingest(data, tmp_path / "cache")
    shutil.rmtree(data)
    out = tmp_path / "preview"
    assert preview.main([str(tmp_path / "cache"), "--vae_weights", str(VAE), "--num", "1", "--max_frames", "2",
                         "--output_folder", str(out), "--progress", "false", "--save_mp4", "false"]) == 0
    text = capsys.readouterr().out
    assert "no PSNR (source" in text and "is not at the recorded path" in text and "overall" not in text
    assert len(list(out.glob("*.gif"))) == 1 and not list(out.glob("*_source_vs_decoded.gif"))


def test_preview_unknown_entry_is_a_one_line_error(cache, tmp_path, capsys):
    assert preview.main([str(cache), "--vae_weights", str(VAE), "--entries", "nope", "--output_folder",
                         str(tmp_path)]) == 2
    assert "entry 'nope' is not in the cache" in capsys.readouterr().err


def test_entry_choice_is_seeded_and_spread_over_the_store():
    rows = [{"id": f"e{i:02d}", "status": "ok"} for i in range(20)]
    a = [r["id"] for r in preview.choose_entries(rows, [], 4, seed=3)]
    assert a == [r["id"] for r in preview.choose_entries(rows, [], 4, seed=3)]
    positions = [int(i[1:]) for i in a]
    assert len(a) == 4 and np.diff(positions).min() >= 4  # one per quarter of the store


# ------------------------------------------------------------------------------------------------
# a labelled cache, trained tiny and sampled with classifier-free guidance
# ------------------------------------------------------------------------------------------------

TRAIN = {"num_frames": 4, "sample_stride": 1, "model_name": "Latte-S/2", "hidden_size": 32, "depth": 2,
         "num_heads": 2, "batch_size": 2, "train_steps": 2, "ckpt_every": 2, "log_every": 1, "warmup_steps": 0,
         "learning_rate": 1e-3, "mode": "pynative", "progress": False, "num_workers": 1, "cpu_threads": 1}


def test_train_on_a_labelled_cache_takes_num_classes_from_it_and_refuses_a_mismatch(cache, tmp_path):
    from trainer.config import TrainConfig
    from trainer.train import train

    cfg = build_config(TrainConfig, ({**TRAIN, "cache_folder": str(cache), "num_classes": 3,
                                      "output_folder": str(tmp_path / "bad")}, "in the test"))
    with pytest.raises(ConfigError, match=r"num_classes is 3 but .* labelled with 2 classes \(clouds, dusk\)"):
        train(cfg)


@pytest.fixture(scope="module")
def trained(cache, tmp_path_factory):
    from trainer.config import TrainConfig
    from trainer.train import train

    out = tmp_path_factory.mktemp("labelled_run")
    cfg = build_config(TrainConfig, ({**TRAIN, "cache_folder": str(cache), "output_folder": str(out)}, "in the test"))
    assert train(cfg) == 0
    return out, cfg


def test_checkpoint_of_a_labelled_run_carries_the_class_names(trained):
    from models import read_metadata

    out, cfg = trained
    assert cfg.num_classes == 2  # 0 on a labelled cache means: from the cache
    meta = read_metadata(out / "checkpoints" / "step_0000002.safetensors")
    assert meta["class_names"] == list(CLASSES) and meta["config"]["num_classes"] == 2
    assert meta["scale_factor"] == pytest.approx(0.18215)


def test_sample_with_guidance_takes_class_names_or_indices(trained, tmp_path):
    import yaml

    from sampler.sample import main as sample_main

    out, _ = trained
    argv = ["-c", str(ROOT / "configs" / "inference" / "tiny.yaml"), "--checkpoint", str(out), "--vae", str(VAE),
            "--output_folder", str(tmp_path), "--sampling_steps", "2", "--num_samples", "3", "--mode", "pynative",
            "--progress", "False", "--save_mp4", "False", "--guidance_scale", "4", "--class_labels", "dusk,0"]
    assert sample_main(argv) == 0
    (folder,) = tmp_path.iterdir()
    loaded = yaml.safe_load((folder / "config.yaml").read_text())["loaded"]
    assert loaded["labels"] == [1, 0, 1] and loaded["class_names"] == ["dusk", "clouds", "dusk"]
    assert len(list(folder.glob("sample_*.gif"))) == 3
    with pytest.raises(ConfigError, match=r"class_labels 'rain' is neither a class name nor an index: its classes "
                                          r"are clouds, dusk"):
        sample_main(argv[:-1] + ["rain"])


def test_cache_stats_takes_a_config_file_and_the_cache_after_it(cache, tmp_path):
    config = tmp_path / "stats.yaml"
    config.write_text(f"output: {tmp_path / 'from_config.png'}\nrecord: false\nprogress: false\n")
    before = (cache / "zarr.json").read_bytes()
    assert latte_cli.main(["cache", "stats", "-c", str(config), str(cache), "--chunk_frames", "5"]) == 0
    assert (tmp_path / "from_config.png").exists()
    assert (cache / "zarr.json").read_bytes() == before  # record: false leaves the store alone
