"""Writing videos: GIF (Pillow), MP4 (PyAV, H.264 when the ffmpeg build has it) and a PNG grid of
frames. Frames are uint8 RGB arrays (F, H, W, 3). Shared by `latte sample` and `latte cache preview`
(ingest), which must not import each other, so it lives at the bottom layer."""
import math
import os

import numpy as np
from PIL import Image


def to_uint8(video):
    """float frames in [-1, 1] (F, 3, H, W) -> uint8 (F, H, W, 3), rounded like the original's
    `((x * 0.5 + 0.5) * 255).add_(0.5).clamp_(0, 255)`."""
    x = (np.asarray(video, np.float32) * 0.5 + 0.5) * 255.0 + 0.5
    return np.clip(x, 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)


def write_gif(path, frames, fps=8):
    """An endlessly looping GIF. GIF delays are in 1/100 s, so fps is approximate (8 fps -> 120 ms)."""
    images = [Image.fromarray(np.ascontiguousarray(f)) for f in frames]
    images[0].save(path, save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0,
                   optimize=False)


def mp4_available():
    try:
        import av  # noqa: F401
    except ImportError:
        return False
    return True


def write_mp4(path, frames, fps=8):
    """H.264 yuv420p MP4 (MPEG-4 part 2 on ffmpeg builds without x264). yuv420p needs even sizes, so
    an odd width/height is padded by one edge pixel."""
    import av

    frames = np.asarray(frames)
    h, w = frames.shape[1:3]
    if h % 2 or w % 2:
        frames = np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
        h, w = frames.shape[1:3]
    with av.open(os.fspath(path), "w") as container:
        try:
            stream = container.add_stream("libx264", rate=fps)
            stream.options = {"crf": "18"}  # near lossless: these videos are small
        except Exception:  # noqa: BLE001  (ffmpeg without x264: av raises several kinds)
            stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")))
        container.mux(stream.encode())


def write_grid(path, images, columns=None, pad=2):
    """A PNG of images (N, H, W, 3) in a grid, `pad` white pixels between them."""
    images = np.asarray(images)
    n, h, w, _ = images.shape
    columns = columns or min(n, max(1, math.ceil(math.sqrt(n))))
    rows = math.ceil(n / columns)
    grid = np.full((rows * (h + pad) + pad, columns * (w + pad) + pad, 3), 255, np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, columns)
        grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + c * (w + pad):pad + c * (w + pad) + w] = img
    Image.fromarray(grid).save(path)


def side_by_side(left, right, pad=2):
    """Two uint8 videos (F, H, W, 3) of equal frame count -> one (F, H, W1 + pad + W2, 3), white gap."""
    left, right = np.asarray(left), np.asarray(right)
    gap = np.full((left.shape[0], left.shape[1], pad, 3), 255, np.uint8)
    return np.concatenate([left, gap, right], axis=2)
