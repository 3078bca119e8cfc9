"""Classifier-free guidance as a Cell, so that the sampling loop treats it like the plain network.

The guided model is `net.forward_with_cfg(x, t, y, scale)`: the network plus the mixing of the
conditional and unconditional halves. As a Python lambda it ran the network's graph and then the
mixing op by op, and `GaussianDiffusion._compile_then_release` (which compiles a Cell before the
first step and hands the compile's freed heap back to the OS) skipped it; as a Cell it is one graph,
compiled before the first step like the unguided network.
"""
import mindspore as ms
from mindspore import nn, ops


class GuidedLatte(nn.Cell):
    """`net` under classifier-free guidance at `scale`: call it with the [conditional, null-class]
    batch as `net.forward_with_cfg` would be called."""

    def __init__(self, net, scale):
        super().__init__(auto_prefix=False)  # net's parameters keep their names
        self.net = net
        # a constant Tensor rather than a float: the compile cache's cell digest covers constant
        # tensors' values, so a graph compiled for one scale is never loaded for another
        self.scale = ms.Tensor(float(scale), ms.float32)

    def construct(self, x, t, y):
        # Latte.forward_with_cfg's arithmetic, step for step (tests/test_sampler.py compares the two):
        # that method calls `self(...)`, which MindSpore cannot compile inside another Cell's graph.
        half = x[: x.shape[0] // 2]
        model_out = self.net(ops.cat([half, half], axis=0), t, y)
        channels = self.net.in_channels
        eps, rest = model_out[:, :, :channels], model_out[:, :, channels:]
        cond_eps, uncond_eps = ops.split(eps, eps.shape[0] // 2, axis=0)
        half_eps = uncond_eps + self.scale * (cond_eps - uncond_eps)
        return ops.cat([ops.cat([half_eps, half_eps], axis=0), rest], axis=2)
