"""Synthetic Sky-Timelapse-like data for tests and the demo, and a corpus of bad inputs.

`make_sky_dataset` writes procedurally generated sky time-lapses in the real layouts: a vertical sky
gradient (deep blue to pale at the horizon, hue varying per video, some at dusk with an orange
horizon), clouds made of smooth value noise drifting sideways over time, a brightness that rises or
falls through the video, and sometimes a dark ground silhouette. Each video is rendered in one
vectorised numpy pass (a few hundred 64-128 px frames take well under a second to render).

`make_bad_inputs` writes one case of every kind of bad input the ingest pipeline must survive and
returns what each entry should end as.
"""
import os
import zlib
import struct

import numpy as np
from PIL import Image

from ingest.transforms import resize_bilinear

_ID_CHARS = np.array(list("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"))


def _value_noise(rng, h, w, cell):
    """Smooth noise in [0, 1]: a random grid of one value per `cell` pixels, bilinearly upsampled."""
    grid = rng.random((max(2, h // cell + 2), max(2, w // cell + 2)), dtype=np.float32)
    return resize_bilinear(grid, h, w)


def _smoothstep(lo, hi, x):
    t = np.clip((x - lo) / (hi - lo), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def render_sky_video(rng, num_frames, size):
    """One synthetic time-lapse: uint8 (num_frames, H, W, 3), RGB."""
    h, w = size
    t = np.arange(num_frames, dtype=np.float32)
    y = (np.arange(h, dtype=np.float32) / max(h - 1, 1))[:, None, None]  # 0 at the top

    dusk = rng.random() < 0.3
    zenith = np.array([0.10, 0.30, 0.75], np.float32) + rng.normal(0, 0.06, 3).astype(np.float32)
    horizon = (np.array([0.98, 0.62, 0.35], np.float32) if dusk else
               np.array([0.78, 0.88, 0.97], np.float32)) + rng.normal(0, 0.04, 3).astype(np.float32)
    gamma = rng.uniform(0.8, 2.0)
    sky = zenith * (1 - y ** gamma) + horizon * y ** gamma  # (h, 1, 3)

    # clouds: a noise field wider than the frame; frame t looks at columns [speed * t, speed * t + w)
    speed = rng.uniform(0.3, 1.5) * rng.choice([-1, 1]) * w / 64
    span = int(np.ceil(abs(speed) * num_frames)) + w + 2
    field = (0.55 * _value_noise(rng, h, span, max(4, w // 3)) + 0.3 * _value_noise(rng, h, span, max(2, w // 8))
             + 0.15 * _value_noise(rng, h, span, max(1, w // 20)))
    offset = (t * speed) % (span - w - 1) if speed > 0 else (span - w - 1) + t * speed
    offset = np.clip(offset, 0, span - w - 1.001)
    o = offset.astype(np.int64)
    frac = (offset - o)[:, None, None]
    cols = o[:, None] + np.arange(w)[None, :]  # (T, w)
    noise = (1 - frac) * field[:, cols].transpose(1, 0, 2) + frac * field[:, cols + 1].transpose(1, 0, 2)
    cover = rng.uniform(0.35, 0.65) + 0.05 * np.sin(t / max(num_frames, 1) * np.pi * 2)[:, None, None]
    alpha = _smoothstep(cover, cover + 0.2, noise) * (1 - 0.6 * y[None, :, :, 0])  # thinner low down
    shade = 0.75 + 0.25 * (1 - y[None, :, :, 0]) * noise  # lit from above
    cloud_tint = np.array([1.0, 0.8, 0.7] if dusk else [1.0, 1.0, 1.0], np.float32)
    img = sky[None] * (1 - alpha[..., None]) + (shade[..., None] * cloud_tint) * alpha[..., None]

    # brightness rising (dawn) or falling (dusk) through the video
    slope = rng.uniform(0.15, 0.45) * (-1 if dusk or rng.random() < 0.4 else 1)
    img = img * (1 + slope * (t / max(num_frames - 1, 1) - 0.5))[:, None, None, None]

    if rng.random() < 0.6:  # dark ground: a wobbly silhouette along the bottom
        top = h * (1 - rng.uniform(0.08, 0.22)) + (h * 0.05) * (_value_noise(rng, 1, w, max(2, w // 6))[0] - 0.5)
        ground = (np.arange(h)[:, None] >= top[None, :])[None, :, :, None]
        img = np.where(ground, np.array([0.06, 0.08, 0.05], np.float32) * (1 + 0.3 * noise[..., None]), img)

    img = img + rng.normal(0, 0.008, img.shape).astype(np.float32)  # sensor noise, so JPEGs look real
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


def _video_name(rng):
    return "".join(rng.choice(_ID_CHARS, 11))


def write_mp4(path, frames, fps=25):
    """Write uint8 RGB frames (T, H, W, 3) as an H.264 (or MPEG-4 part 2) yuv420p mp4 with PyAV."""
    import av  # a test extra: only synthetic data needs an encoder

    h, w = frames.shape[1:3]
    if h % 2 or w % 2:
        raise ValueError(f"video size {w}x{h} must be even for yuv420p: pick an even size")
    with av.open(os.fspath(path), "w") as container:
        try:
            stream = container.add_stream("libx264", rate=fps)
        except Exception:  # ffmpeg builds without x264
            stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")))
        container.mux(stream.encode())


def make_sky_dataset(root, num_videos=4, clips_per_video=2, frames_per_clip=24, size=(64, 96),
                     layout="nested", seed=0, videos=0, quality=90):
    """Write a synthetic Sky Timelapse under `root` and return {entry id: number of frames}.

    layout "nested": `<root>/<video>/<video>_<k>/<video>_frames_<8 digits>.jpg`, k from 1, frame
    numbers continuing across a video's clips (not restarting at 0, as in the real data).
    layout "flat": `<root>/<video>/<video>_frames_<8 digits>.jpg` (one folder per video).
    `videos`: also write that many mp4 files `<root>/<video>.mp4` of clips_per_video * frames_per_clip
    frames each (needs PyAV)."""
    if layout not in ("nested", "flat"):
        raise ValueError(f"layout {layout!r} is not one of nested, flat")
    rng = np.random.default_rng(seed)
    os.makedirs(root, exist_ok=True)
    expected = {}
    total = clips_per_video * frames_per_clip
    for _ in range(num_videos):
        name = _video_name(rng)
        frames = render_sky_video(rng, total, size)
        first = int(rng.integers(1, 60))
        for k in range(clips_per_video):
            rel = f"{name}/{name}_{k + 1}" if layout == "nested" else name
            folder = os.path.join(root, rel)
            os.makedirs(folder, exist_ok=True)
            for i in range(frames_per_clip):
                n = k * frames_per_clip + i
                Image.fromarray(frames[n]).save(os.path.join(folder, f"{name}_frames_{first + n:08d}.jpg"),
                                                quality=quality)
            expected[rel] = expected.get(rel, 0) + frames_per_clip
    for _ in range(videos):
        name = _video_name(rng)
        write_mp4(os.path.join(root, f"{name}.mp4"), render_sky_video(rng, total, size))
        expected[f"{name}.mp4"] = total
    return expected


def write_png16(path, values):
    """Write uint16 values (H, W) or (H, W, 3) as a 16-bit PNG. Pillow writes 16-bit grayscale but not
    48-bit RGB, so RGB chunks are written by hand (filter 0 on every row)."""
    values = np.asarray(values, np.uint16)
    if values.ndim == 2:
        Image.fromarray(values).save(path)
        return
    h, w, _ = values.shape
    raw = b"".join(b"\x00" + values[i].astype(">u2").tobytes() for i in range(h))

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
                + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def _frames_folder(root, rel, frames, ext=".jpg", mode=None):
    folder = os.path.join(root, rel)
    os.makedirs(folder, exist_ok=True)
    paths = []
    for i, frame in enumerate(frames):
        path = os.path.join(folder, f"clip_frames_{i:08d}{ext}")
        img = Image.fromarray(frame)
        (img.convert(mode) if mode else img).save(path)
        paths.append(path)
    return paths


def make_bad_inputs(root, size=(48, 64), num_frames=6, seed=0):
    """Write every bad-input case under `root`, plus one good folder and (with PyAV) one good video.
    Returns {entry id: (status, a fragment of the expected reason)}, status "ok" for entries that are
    read after a conversion or upscale noted in the reason.

    Tests run as root, where chmod 000 does not stop reads, so "unreadable" is simulated by what root
    cannot read either: a dangling symlink where a frame should be, and a FIFO named like a frame."""
    rng = np.random.default_rng(seed)
    h, w = size
    frames = render_sky_video(rng, num_frames, size)
    expect = {}

    _frames_folder(root, "good", frames)
    expect["good"] = ("ok", "")

    paths = _frames_folder(root, "corrupt_jpeg", frames)
    with open(paths[2], "wb") as f:
        f.write(b"\xff\xd8 this is not really a JPEG " * 4)
    expect["corrupt_jpeg"] = ("failed", "frame 2")

    paths = _frames_folder(root, "truncated_jpeg", frames)
    data = open(paths[3], "rb").read()
    with open(paths[3], "wb") as f:
        f.write(data[: len(data) // 2])
    expect["truncated_jpeg"] = ("failed", "frame 3")

    os.makedirs(os.path.join(root, "empty"))
    expect["empty"] = ("skipped", "empty folder")

    os.makedirs(os.path.join(root, "only_text"))
    for name in ("notes.txt", "labels.csv"):
        with open(os.path.join(root, "only_text", name), "w") as f:
            f.write("not a frame\n")
    expect["only_text"] = ("skipped", "no image or video files")

    small = render_sky_video(rng, 1, (h - 8, w - 16))[0]
    _frames_folder(root, "mixed_sizes", [frames[0], frames[1], small, frames[3]])
    expect["mixed_sizes"] = ("failed", f"frame 2 ('clip_frames_00000002.jpg') is {w - 16}x{h - 8}, "
                                       f"the first frame is {w}x{h}")

    _frames_folder(root, "grayscale", frames, ".png", mode="L")
    expect["grayscale"] = ("ok", "converted from L")
    _frames_folder(root, "rgba", frames, ".png", mode="RGBA")
    expect["rgba"] = ("ok", "converted from RGBA")
    _frames_folder(root, "palette", frames, ".png", mode="P")
    expect["palette"] = ("ok", "converted from P")
    os.makedirs(os.path.join(root, "gray16"))
    for i, frame in enumerate(frames):
        write_png16(os.path.join(root, "gray16", f"f_{i}.png"), frame[..., 1].astype(np.uint16) * 257)
    expect["gray16"] = ("ok", "converted from I;16")
    os.makedirs(os.path.join(root, "rgb16"))
    for i, frame in enumerate(frames):
        write_png16(os.path.join(root, "rgb16", f"f_{i}.png"), frame.astype(np.uint16) * 257)
    expect["rgb16"] = ("ok", "")

    _frames_folder(root, "tiny", render_sky_video(rng, 3, (12, 16)))
    expect["tiny"] = ("ok", "upscaled from 16x12")

    _frames_folder(root, "dangling_frame", frames[:3])
    os.symlink(os.path.join(root, "does_not_exist.jpg"), os.path.join(root, "dangling_frame", "clip_frames_00000003.jpg"))
    expect["dangling_frame"] = ("failed", "broken symlink")

    _frames_folder(root, "fifo_frame", frames[:3])
    os.mkfifo(os.path.join(root, "fifo_frame", "clip_frames_00000003.jpg"))
    expect["fifo_frame"] = ("failed", "not a regular file")

    # a directory named like a frame is a folder, not a frame: here an empty one, so skipped
    _frames_folder(root, "dir_named_like_frame", frames[:3])
    os.makedirs(os.path.join(root, "dir_named_like_frame", "clip_frames_00000009.jpg"))
    expect["dir_named_like_frame"] = ("ok", "")
    expect["dir_named_like_frame/clip_frames_00000009.jpg"] = ("skipped", "empty folder")

    # a link back to its own parent: must be reported, not followed forever
    _frames_folder(root, "loop", frames[:3])
    os.symlink("..", os.path.join(root, "loop", "back"))
    expect["loop"] = ("ok", "")
    expect["loop/back"] = ("skipped", "symlink loop")
    os.symlink("self_link", os.path.join(root, "self_link"))
    expect["self_link"] = ("skipped", "symlink loop")

    _frames_folder(root, "天空_ü", frames)
    expect["天空_ü"] = ("ok", "")

    with open(os.path.join(root, "not_a_video.mp4"), "w") as f:
        f.write("this is a text file with a video extension\n")
    expect["not_a_video.mp4"] = ("failed", "not a readable video")
    open(os.path.join(root, "zero_bytes.avi"), "wb").close()
    expect["zero_bytes.avi"] = ("failed", "not a readable video")
    os.symlink(os.path.join(root, "gone.mp4"), os.path.join(root, "dangling.mp4"))
    expect["dangling.mp4"] = ("failed", "broken symlink")

    try:
        import av  # noqa: F401
    except ImportError:
        return expect
    write_mp4(os.path.join(root, "good.mp4"), frames)
    expect["good.mp4"] = ("ok", "")
    write_mp4(os.path.join(root, "truncated.mp4"), render_sky_video(rng, 30, size))
    with open(os.path.join(root, "truncated.mp4"), "r+b") as f:
        f.truncate(os.path.getsize(os.path.join(root, "truncated.mp4")) * 2 // 3)
    expect["truncated.mp4"] = ("failed", "not a readable video")
    write_mp4(os.path.join(root, "天空_ü.mp4"), frames)
    expect["天空_ü.mp4"] = ("ok", "")
    return expect
