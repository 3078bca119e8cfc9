"""The one place that picks the device, execution mode and CPU threads.

Every command calls `setup_device` once, before any network is built, so that the same config key
means the same thing in `ingest`, `train` and `sample`.
"""
import os

os.environ.setdefault("GLOG_v", "3")  # MindSpore's C++ logs drown the progress bars otherwise
# Only effective when this module is imported before MindSpore (latte_cli sets it first too): the
# main thread otherwise busy-waits on the op queue, taking a core.
os.environ.setdefault("MS_DEV_HOST_BLOCKING_RUN", "1")

import mindspore as ms

DEVICE_TARGETS = ("CPU", "GPU", "Ascend")
MODES = ("graph", "pynative")

_configured = None


def setup_device(device_target="CPU", mode="graph", cpu_threads=1, seed=None):
    """Select the device and mode. `cpu_threads=1` is the default because on small (2-vCPU) hosts
    one intra-op thread measured faster than two; pass 0 to leave MindSpore's own choice."""
    global _configured
    if device_target not in DEVICE_TARGETS:
        raise ValueError(f"device_target {device_target!r} is not one of {', '.join(DEVICE_TARGETS)}")
    if mode not in MODES:
        raise ValueError(f"mode {mode!r} is not one of {', '.join(MODES)}")
    key = (device_target, mode, cpu_threads)
    if _configured is None:
        ms.set_device(device_target)
        if device_target == "CPU" and cpu_threads:
            try:
                ms.device_context.cpu.op_tuning.threads_num(int(cpu_threads))
            except RuntimeError:
                pass  # already fixed by an earlier call in this process; keep the first setting
        _configured = key
    ms.set_context(mode=ms.GRAPH_MODE if mode == "graph" else ms.PYNATIVE_MODE)
    if seed is not None:
        ms.set_seed(int(seed))
    return key


def device_target():
    """The device selected by `setup_device` (CPU when nothing has been set yet)."""
    return _configured[0] if _configured else "CPU"
