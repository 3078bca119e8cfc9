"""What a run leaves beside its checkpoints: the JSONL log and the loss-curve PNG.

`log.jsonl` has one line per logged step (`{"step", "loss", "mse", "vb", "grad_norm", "lr",
"step_time", "samples_per_s", ...}`) and one per validation (`{"step", "val_loss"}`). On resume the
lines past the checkpoint's step are cut, so the log reads as one uninterrupted run.

The curve is drawn with Pillow (matplotlib is not a dependency): log-scale loss against step, the
training loss as a faint line with its moving average on top, validation points in orange.
"""
import json
import math
import os

import numpy as np
from PIL import Image, ImageDraw

LOG_NAME, PLOT_NAME = "log.jsonl", "loss.png"


class JsonlLog:
    def __init__(self, output_folder, resume_step=None):
        self.path = os.path.join(output_folder, LOG_NAME)
        if resume_step is None:
            open(self.path, "w").close()
        else:
            self.truncate_after(resume_step)
        self._file = open(self.path, "a")

    def truncate_after(self, step):
        kept = [line for line in read_log(self.path) if line.get("step", 0) <= step]
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(json.dumps(line) + "\n" for line in kept)
        os.replace(tmp, self.path)

    def write(self, record):
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self):
        self._file.close()


def read_log(path):
    """The records of a log.jsonl; a torn last line (killed mid-write) is ignored."""
    if not os.path.exists(path):
        return []
    out = []
    with open(path) as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
    return out


def _ticks(lo, hi):
    """Log-scale tick values between lo and hi: decades, else 1-2-5, else 1..9 steps (at least 3)."""
    for mantissas in ((1,), (1, 2, 5), tuple(range(1, 10))):
        ticks = [m * 10.0 ** e for e in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
                 for m in mantissas if lo <= m * 10.0 ** e <= hi]
        if len(ticks) >= 3:
            return ticks
    return ticks or [lo, hi]


def plot_losses(records, path, title="Latte training loss", size=(900, 540)):
    """Draw train (and validation) loss against step to a PNG; returns False when there is nothing
    to draw yet."""
    train = [(r["step"], r["loss"]) for r in records if "loss" in r and r["loss"] > 0 and math.isfinite(r["loss"])]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r and r["val_loss"] > 0]
    if not train and not val:
        return False
    steps = [s for s, _ in train + val]
    values = [v for _, v in train + val]
    x0, x1 = min(steps), max(max(steps), min(steps) + 1)
    y0, y1 = min(values) * 0.9, max(values) * 1.1
    w, h = size
    left, right, top, bottom = 80, 20, 40, 50
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)

    def px(step, value):
        u = (step - x0) / (x1 - x0)
        v = (math.log(value) - math.log(y0)) / (math.log(y1) - math.log(y0))
        return left + u * (w - left - right), h - bottom - v * (h - top - bottom)

    draw.rectangle([left, top, w - right, h - bottom], outline="black")
    for v in _ticks(y0, y1):
        _, y = px(x0, v)
        draw.line([left - 5, y, w - right, y], fill=(225, 225, 225))
        draw.line([left - 5, y, left, y], fill="black")
        draw.text((5, y - 6), f"{v:.3g}", fill="black")
    for k in range(6):
        step = x0 + (x1 - x0) * k / 5
        x, _ = px(step, y0)
        draw.line([x, h - bottom, x, h - bottom + 5], fill="black")
        draw.text((x - 15, h - bottom + 8), f"{int(round(step))}", fill="black")
    draw.text((w // 2 - 20, h - 20), "step", fill="black")
    draw.text((left, 12), title + " (log scale)", fill="black")

    if len(train) > 1:
        draw.line([px(s, v) for s, v in train], fill=(170, 190, 230), width=1)
        k = max(1, len(train) // 50)
        smooth = np.convolve([v for _, v in train], np.ones(k) / k, mode="valid")
        draw.line([px(train[i + k - 1][0], v) for i, v in enumerate(smooth)], fill=(30, 80, 200), width=2)
    for s, v in val:
        x, y = px(s, v)
        draw.ellipse([x - 4, y - 4, x + 4, y + 4], fill=(240, 130, 20))
    if len(val) > 1:
        draw.line([px(s, v) for s, v in val], fill=(240, 130, 20), width=2)
    draw.text((w - 220, top + 8), "train loss (avg)", fill=(30, 80, 200))
    if val:
        draw.text((w - 220, top + 24), "validation loss", fill=(240, 130, 20))
    tmp = path + ".tmp.png"
    img.save(tmp)
    os.replace(tmp, path)
    return True
