"""Classifier-free guidance as a Cell, so that the sampling loop treats it like the plain network.

The guided model is `net.forward_with_cfg(x, t, y, scale)`: the network plus the mixing of the
conditional and unconditional halves. As a Python lambda it ran the network's graph and then the
mixing op by op, and `GaussianDiffusion._compile_then_release` (which compiles a Cell before the
first step and hands the compile's freed heap back to the OS) skipped it; as a Cell it is one graph,
compiled before the first step like the unguided network.
"""
import mindspore as ms
from mindspore import nn

from models.latte import guidance_input, guidance_mix


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
        return guidance_mix(self.net(guidance_input(x), t, y), self.net.in_channels, self.scale)
