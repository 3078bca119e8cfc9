"""Reading half of ingest: discovery, frame/video readers, the original transform, synthetic data."""
import os
import queue
import threading

import numpy as np
import pytest
from PIL import Image

from conftest import assert_f32_close
from ingest.readers import iter_frame_batches, open_reader, probe, read_frames, to_rgb8
from ingest.sources import EntryError, discover_entries, natural_key, sort_frame_files
from ingest.synthetic import make_bad_inputs, make_sky_dataset, render_sky_video, write_mp4, write_png16
from ingest.transforms import bilinear_matrix, center_crop_box, resize_bilinear, transform_frames


def _ingest_like_the_pipeline(entry, image_size, batch_size=4):
    """What the pipeline does with one entry: (status, reason, frames read)."""
    if entry.status != "ok":
        return entry.status, entry.reason, 0
    try:
        n, _, notes = probe(entry, image_size)
        count = 0
        for batch in iter_frame_batches(entry, batch_size, image_size):
            assert batch.shape[1:] == (3, image_size, image_size) and len(batch) <= batch_size
            count += len(batch)
        assert count == n
        return "ok", "; ".join(notes), count
    except EntryError as err:
        return "failed", str(err), 0


# ---------------------------------------------------------------- discovery


def test_discovers_nested_flat_and_video_entries_with_stable_sorted_ids(tmp_path):
    nested = make_sky_dataset(tmp_path / "sky", num_videos=2, clips_per_video=3, frames_per_clip=4,
                              size=(32, 48), layout="nested", seed=1, videos=1)
    flat = make_sky_dataset(tmp_path / "sky", num_videos=1, clips_per_video=2, frames_per_clip=4,
                            size=(32, 48), layout="flat", seed=2)
    entries = discover_entries(tmp_path / "sky")
    ids = [e.id for e in entries]
    assert sorted(ids) == sorted({**nested, **flat})
    assert ids == sorted(ids, key=natural_key)
    for e in entries:
        assert e.status == "ok" and e.kind == ("video" if e.id.endswith(".mp4") else "frames")
        assert e.source_size > 0
        if e.kind == "frames":
            assert e.num_files == {**nested, **flat}[e.id]
    # ids are relative to data_folder, so they do not depend on how the folder is reached
    os.symlink(tmp_path / "sky", tmp_path / "elsewhere")
    assert [e.id for e in discover_entries(tmp_path / "elsewhere")] == ids
    assert [e.id for e in discover_entries(str(tmp_path / "sky") + "/")] == ids


def test_nested_frame_numbers_continue_across_clip_folders(tmp_path):
    make_sky_dataset(tmp_path, num_videos=1, clips_per_video=2, frames_per_clip=3, size=(16, 16), seed=0)
    clip1, clip2 = discover_entries(tmp_path)
    number = lambda path: int(os.path.splitext(path)[0].rsplit("_", 1)[1])  # noqa: E731
    assert clip1.id.endswith("_1") and clip2.id.endswith("_2")
    assert [number(p) for p in clip2.frame_files] == [number(clip1.frame_files[-1]) + 1 + i for i in range(3)]


def test_frames_sort_by_integer_after_last_underscore():
    names = ["v_frames_00000100.jpg", "v_frames_9.jpg", "x_y_frames_10.png", "v_frames_00000046.jpg"]
    assert sort_frame_files(names) == ["v_frames_9.jpg", "x_y_frames_10.png", "v_frames_00000046.jpg",
                                       "v_frames_00000100.jpg"]


def test_frames_fall_back_to_natural_sort_when_a_name_has_no_trailing_integer():
    names = ["frame10.jpg", "frame9.jpg", "frame_1a.jpg", "frame100.jpg"]
    assert sort_frame_files(names) == ["frame9.jpg", "frame10.jpg", "frame100.jpg", "frame_1a.jpg"]


def test_non_image_and_hidden_files_are_ignored(tmp_path):
    folder = tmp_path / "clip"
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (8, 8)).save(folder / f"c_{i}.jpg")
    for junk in ("notes.txt", "labels.csv", ".DS_Store", "._c_0.jpg", "c_3.json"):
        (folder / junk).write_bytes(b"junk")
    (entry,) = discover_entries(tmp_path)
    assert [os.path.basename(p) for p in entry.frame_files] == ["c_0.jpg", "c_1.jpg", "c_2.jpg"]


def test_data_folder_problems_are_one_line_errors_before_any_work(tmp_path):
    for bad, words in [(tmp_path / "missing", "does not exist"), (tmp_path / "file.txt", "is not a folder"),
                       (tmp_path / "empty", "holds no frame folders")]:
        if bad.name == "file.txt":
            bad.write_text("x")
        elif bad.name == "empty":
            bad.mkdir()
            (bad / "sub").mkdir()
        with pytest.raises(ValueError, match=words) as info:
            discover_entries(bad)
        assert "\n" not in str(info.value) and str(bad) in str(info.value)


def test_exclude_keeps_the_cache_folder_out_of_discovery(tmp_path):
    make_sky_dataset(tmp_path, num_videos=1, clips_per_video=1, frames_per_clip=2, size=(16, 16))
    (tmp_path / "cache" / "chunks").mkdir(parents=True)
    assert "cache/chunks" in [e.id for e in discover_entries(tmp_path)]
    assert "cache/chunks" not in [e.id for e in discover_entries(tmp_path, exclude=[tmp_path / "cache"])]


# ---------------------------------------------------------------- transform


def _torch_bilinear_naive(img, out_h, out_w):
    """PyTorch's upsample_bilinear2d (align_corners=False), one output pixel at a time."""
    in_h, in_w = img.shape

    def source(dst, in_size, out_size):
        src = (in_size / out_size) * (dst + 0.5) - 0.5
        src = max(src, 0.0)
        i0 = int(src)
        return i0, i0 + 1 if i0 < in_size - 1 else i0, src - i0

    out = np.zeros((out_h, out_w), np.float64)
    for y in range(out_h):
        y0, y1, ly = source(y, in_h, out_h)
        for x in range(out_w):
            x0, x1, lx = source(x, in_w, out_w)
            out[y, x] = ((1 - ly) * ((1 - lx) * img[y0, x0] + lx * img[y0, x1])
                         + ly * ((1 - lx) * img[y1, x0] + lx * img[y1, x1]))
    return out


def test_bilinear_resize_matches_known_pytorch_values():
    down = resize_bilinear(np.arange(16, dtype=np.float32).reshape(4, 4), 2, 2)
    assert_f32_close(down, [[2.5, 4.5], [10.5, 12.5]])
    up = resize_bilinear(np.array([[0, 1], [2, 3]], np.float32), 4, 4)
    assert_f32_close(up, [[0, 0.25, 0.75, 1], [0.5, 0.75, 1.25, 1.5], [1.5, 1.75, 2.25, 2.5], [2, 2.25, 2.75, 3]])


@pytest.mark.parametrize("in_hw,out_hw", [((7, 7), (5, 5)), ((5, 5), (11, 11)), ((9, 6), (4, 13)), ((3, 3), (3, 3))])
def test_bilinear_resize_matches_naive_pytorch_formula(in_hw, out_hw):
    img = np.random.default_rng(0).random(in_hw).astype(np.float32)
    expect = _torch_bilinear_naive(img.astype(np.float64), *out_hw)
    assert_f32_close(resize_bilinear(img, *out_hw), expect)
    assert_f32_close(resize_bilinear(img[None, None], *out_hw)[0, 0], expect)
    m_h, m_w = bilinear_matrix(in_hw[0], out_hw[0]), bilinear_matrix(in_hw[1], out_hw[1])
    assert_f32_close(m_h @ img @ m_w.T, expect)


def test_center_crop_rounds_like_torchvision():
    assert center_crop_box(7, 12) == (0, 2, 7)  # int(round(2.5)) == 2 (half to even)
    assert center_crop_box(7, 10) == (0, 2, 7)  # int(round(1.5)) == 2
    assert center_crop_box(13, 6) == (4, 0, 6)  # int(round(3.5)) == 4
    assert center_crop_box(5, 5) == (0, 0, 5)


@pytest.mark.parametrize("hw,size", [((7, 12), 5), ((13, 6), 9), ((8, 8), 8), ((4, 6), 10)])
def test_transform_equals_the_original_crop_resize_normalize(hw, size):
    frames = np.random.default_rng(1).integers(0, 256, (2, *hw, 3), dtype=np.uint8)
    out = transform_frames(frames, size)
    assert out.shape == (2, 3, size, size) and out.dtype == np.float32
    side = min(hw)  # torchvision's center_crop_using_short_edge, written out independently
    top, left = int(round((hw[0] - side) / 2.0)), int(round((hw[1] - side) / 2.0))
    for n in range(2):
        for c in range(3):
            crop = frames[n, top:top + side, left:left + side, c].astype(np.float64) / 255.0
            expect = (_torch_bilinear_naive(crop, size, size) - 0.5) / 0.5
            assert_f32_close(out[n, c], expect, scale=1.0)  # values in [-1, 1]
    assert -1.0 <= out.min() and out.max() <= 1.0


# ---------------------------------------------------------------- readers


def test_reads_frame_folders_and_mp4_in_bounded_batches(tmp_path):
    expected = make_sky_dataset(tmp_path, num_videos=1, clips_per_video=1, frames_per_clip=10,
                                size=(32, 48), seed=3, videos=1)
    for entry in discover_entries(tmp_path):
        assert probe(entry, 16) == (10, (32, 48), [])
        sizes = [b.shape for b in iter_frame_batches(entry, 4, 16)]
        assert sizes == [(4, 3, 16, 16), (4, 3, 16, 16), (2, 3, 16, 16)], entry.id
        strided = list(iter_frame_batches(entry, 4, 16, stride=3))  # frames 0, 3, 6, 9
        assert [len(b) for b in strided] == [4]
        full = np.concatenate(list(iter_frame_batches(entry, 4, 16)))
        np.testing.assert_array_equal(strided[0], full[[0, 3, 6, 9]])
        assert full.dtype == np.float32 and -1 <= full.min() and full.max() <= 1
        assert expected[entry.id] == 10


def test_reader_never_asks_for_more_than_one_batch_of_frames(tmp_path, monkeypatch):
    make_sky_dataset(tmp_path, num_videos=1, clips_per_video=1, frames_per_clip=3, size=(16, 16), videos=1)
    video = next(e for e in discover_entries(tmp_path) if e.kind == "video")
    with open_reader(video) as reader:
        cls = type(reader)
    asked = []
    original = cls.read
    monkeypatch.setattr(cls, "read", lambda self, idx: asked.append(len(list(idx))) or original(self, idx))
    assert sum(len(b) for b in iter_frame_batches(video, 2, 8)) == 3
    assert asked == [2, 1]


def test_video_frames_come_back_in_order_and_match_the_source(tmp_path):
    levels = np.arange(12) * 20
    frames = np.broadcast_to(levels[:, None, None, None], (12, 32, 32, 3)).astype(np.uint8)
    write_mp4(tmp_path / "ramp.mp4", frames)
    (entry,) = discover_entries(tmp_path)
    out = read_frames(entry, [7, 1, 11], image_size=32)
    np.testing.assert_allclose((out.mean(axis=(1, 2, 3)) + 1) * 127.5, levels[[7, 1, 11]], atol=3)


def test_frames_and_video_of_the_same_clip_decode_alike(tmp_path):
    frames = render_sky_video(np.random.default_rng(0), 6, (48, 64))
    write_mp4(tmp_path / "a.mp4", frames)
    (tmp_path / "a").mkdir()
    for i, f in enumerate(frames):
        Image.fromarray(f).save(tmp_path / "a" / f"a_frames_{i}.png")
    folder, video = discover_entries(tmp_path)
    from_png, from_mp4 = read_frames(folder, range(6), 32), read_frames(video, range(6), 32)
    assert_f32_close(from_png, transform_frames(frames, 32), scale=1.0)  # another batch: another BLAS call
    assert np.abs(from_png - from_mp4).mean() < 0.06  # lossy H.264 only (a few grey levels)


def test_batch_iterator_runs_in_a_background_thread(tmp_path):
    make_sky_dataset(tmp_path, num_videos=1, clips_per_video=1, frames_per_clip=5, size=(16, 24), videos=1)
    for entry in discover_entries(tmp_path):
        q = queue.Queue()
        worker = threading.Thread(target=lambda: [q.put(b) for b in iter_frame_batches(entry, 2, 16)] + [q.put(None)])
        worker.start()
        got = []
        while (batch := q.get(timeout=600)) is not None:  # a bound for a hung thread, not a speed
            got.append(batch)
        worker.join(10)
        np.testing.assert_array_equal(np.concatenate(got), np.concatenate(list(iter_frame_batches(entry, 2, 16))))


def test_pixel_formats_are_converted_to_8bit_rgb():
    gray16 = Image.fromarray(np.array([[0, 128, 129, 257 * 100, 65535]], np.uint16))
    assert gray16.mode.startswith("I")
    np.testing.assert_array_equal(to_rgb8(gray16)[0, :, 0], [0, 0, 1, 100, 255])  # /257, not clipped
    rgba = Image.fromarray(np.array([[[10, 20, 30, 0]]], np.uint8), "RGBA")
    np.testing.assert_array_equal(to_rgb8(rgba), [[[10, 20, 30]]])  # alpha dropped, colour kept
    gray = Image.fromarray(np.array([[7, 200]], np.uint8), "L")
    np.testing.assert_array_equal(to_rgb8(gray), [[[7, 7, 7], [200, 200, 200]]])


# ---------------------------------------------------------------- bad input


def test_every_bad_input_ends_as_expected_and_the_rest_are_read(tmp_path):
    expected = make_bad_inputs(tmp_path)
    entries = discover_entries(tmp_path)
    assert sorted(e.id for e in entries) == sorted(expected)
    for entry in entries:
        status, reason, count = _ingest_like_the_pipeline(entry, image_size=32)
        want_status, want_reason = expected[entry.id]
        assert (status, want_reason in reason) == (want_status, True), (entry.id, status, reason)
        assert "\n" not in reason
        if status == "ok":
            assert count > 0


def test_16bit_pngs_decode_to_the_original_8bit_values(tmp_path):
    frames = render_sky_video(np.random.default_rng(2), 3, (24, 32))
    for name, values in [("rgb16", frames.astype(np.uint16) * 257), ("gray16", frames[..., 1].astype(np.uint16) * 257)]:
        (tmp_path / name).mkdir()
        for i, v in enumerate(values):
            write_png16(tmp_path / name / f"f_{i}.png", v)
    gray16, rgb16 = discover_entries(tmp_path)
    with open_reader(rgb16) as reader:
        np.testing.assert_array_equal(reader.read(range(3)), frames)
    with open_reader(gray16) as reader:
        np.testing.assert_array_equal(reader.read(range(3)), np.repeat(frames[..., 1:2], 3, axis=3))


def test_symlink_loops_do_not_hang(tmp_path):
    deep = tmp_path / "a" / "b" / "c"
    deep.mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(deep / "f_1.jpg")
    os.symlink(tmp_path / "a", deep / "to_a")
    os.symlink(tmp_path, tmp_path / "a" / "to_root")
    os.symlink("me", tmp_path / "me")
    result = []
    worker = threading.Thread(target=lambda: result.append(discover_entries(tmp_path)), daemon=True)
    worker.start()
    worker.join(20)
    assert result, "discovery did not finish"
    got = {e.id: (e.status, e.reason) for e in result[0]}
    assert got["a/b/c"] == ("ok", "")
    assert got["a/b/c/to_a"][0] == got["a/to_root"][0] == got["me"][0] == "skipped"
    assert "symlink loop" in got["a/b/c/to_a"][1] and "data folder itself" in got["a/to_root"][1]


def test_non_utf8_names_fail_cleanly_and_unicode_names_work(tmp_path):
    root = os.fsencode(tmp_path)
    for name in (b"bad\xff", "天空_ü".encode()):
        os.makedirs(os.path.join(root, name))
        Image.new("RGB", (8, 8)).save(os.path.join(root, name, b"f_1.jpg").decode("utf-8", "surrogateescape"))
    got = {e.id: e for e in discover_entries(tmp_path)}
    assert got["天空_ü"].status == "ok"
    (bad,) = [e for i, e in got.items() if i != "天空_ü"]
    assert bad.status == "failed" and "not valid UTF-8" in bad.reason
    assert "\\udcff" in bad.reason  # printable and safe to write to a manifest


# ---------------------------------------------------------------- synthetic data


def test_synthetic_sky_is_deterministic_and_drifts_smoothly():
    a = render_sky_video(np.random.default_rng(5), 8, (32, 48))
    b = render_sky_video(np.random.default_rng(5), 8, (32, 48))
    np.testing.assert_array_equal(a, b)
    assert a.shape == (8, 32, 48, 3) and a.dtype == np.uint8
    step = np.abs(np.diff(a.astype(np.float32), axis=0)).mean()
    far = np.abs(a[-1].astype(np.float32) - a[0]).mean()
    assert 0 < step < far  # consecutive frames are close, the clip as a whole changes
    assert a.std() > 5  # not a flat colour
