"""What a run leaves beside its checkpoints: the JSONL log and the loss-curve PNG.

`log.jsonl` has one line per logged step (`{"step", "loss", "mse", "vb", "grad_norm", "lr",
"step_time", "samples_per_s", ...}`) and one per validation (`{"step", "val_loss"}`). On resume the
lines past the checkpoint's step are cut, so the log reads as one uninterrupted run.

The curve is drawn with matplotlib: loss against step on a log scale (a diffusion loss falls fast and
then creeps, which a linear axis flattens), the training loss as a faint line with its moving average
on top, validation points in orange. The figure is rendered by the Agg canvas directly, without
pyplot: no display is needed and no process-wide backend is switched under the caller.
"""
import json
import math
import os

import numpy as np

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


def plot_losses(records, path, title="Latte training loss", size=(900, 540)):
    """Draw train (and validation) loss against step to a PNG of `size` pixels; returns False when
    there is nothing to draw yet. The file is replaced atomically (a reader never sees half a PNG)."""
    fig = loss_figure(records, title, size)
    if fig is None:
        return False
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=fig.dpi, format="png")
    os.replace(tmp, path)
    return True


def loss_figure(records, title="Latte training loss", size=(900, 540), dpi=100):
    """The matplotlib Figure of `plot_losses` (on an Agg canvas), or None when there is nothing to draw."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, MaxNLocator, NullFormatter

    train = [(r["step"], r["loss"]) for r in records if "loss" in r and r["loss"] > 0 and math.isfinite(r["loss"])]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r and r["val_loss"] > 0]
    if not train and not val:
        return None
    fig = Figure(figsize=(size[0] / dpi, size[1] / dpi), dpi=dpi)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if train:
        steps, values = zip(*train)
        k = max(1, len(train) // 50)
        if len(train) > 1:
            ax.plot(steps, values, color="tab:blue", alpha=0.3, lw=0.8, label="train loss")
        smooth = np.convolve(values, np.ones(k) / k, mode="valid")
        ax.plot(steps[k - 1:], smooth, color="tab:blue", lw=2, marker="o" if len(train) == 1 else None,
                label=f"train loss, moving mean of {k} logs" if k > 1 else "train loss")
    if val:
        steps, values = zip(*val)
        ax.plot(steps, values, color="tab:orange", lw=2, marker="o", ms=5, label="validation loss")
    ax.set_yscale("log")
    # short plain labels (0.2, 0.5, 1): a run's loss often spans a decade or less, where log-axis
    # defaults label only a tick or two, in scientific notation. Minor ticks are labelled only while
    # they fit (up to two decades).
    plain = FuncFormatter(lambda v, _: f"{v:.3g}")
    ax.yaxis.set_major_formatter(plain)
    losses = [v for _, v in train + val]
    ax.yaxis.set_minor_formatter(plain if max(losses) / min(losses) <= 100 else NullFormatter())
    ax.tick_params(axis="y", which="minor", labelsize=8)
    ax.xaxis.set_major_locator(MaxNLocator(nbins=8, steps=[1, 2, 5, 10], integer=True))  # 0, 200, 400: never 404
    first, last = min(s for s, _ in train + val), max(s for s, _ in train + val)
    if last - first < 2:  # one step logged so far: a span of integers, not ticks at 4.8, 4.9, ...
        ax.set_xlim(first - 1, last + 1)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (log scale)")
    ax.set_title(title)
    ax.grid(True, which="major", alpha=0.4)
    ax.grid(True, which="minor", alpha=0.15)
    ax.legend(loc="upper right")
    fig.tight_layout()
    return fig
