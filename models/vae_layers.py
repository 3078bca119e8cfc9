"""Convolution, GroupNorm and Linear cells that are fast on MindSpore's CPU backend (for models/vae.py).

MindSpore's CPU `nn.Conv2d` runs at 0.3-1 GFLOP/s (oneDNN picks its reference kernel for NCHW) while
a large fp32 matmul reaches ~250-300, so on CPU a
convolution is im2col + ONE matmul with the (O, kh*kw*I) view of the weight. How the im2col is built
matters nearly as much as the matmul, because many CPU kernels are slow on 4-D tensors. Measured on
a (1, 128, 256, 256) activation: `ops.pad` 80-280 ms, a slice on two axes (`x[:, :, 1:-1, 1:-1]`)
150-370 ms, `ops.unfold` 600 ms, `ops.gather` im2col 150 ms, ReduceMean 60 ms; but a concat of zeros
on one axis 2-4 ms, a slice on the last axis 3-15 ms and a matrix-vector product with ones 5 ms.
Hence:
- the image is flattened row-major with a gap of zeros after every row and zero rows before and
  after, so that each kernel tap is ONE contiguous slice of the flat image (`conv_matmul`); the
  matmul then also yields `gap` junk columns per output row, dropped at the end (1-3 % extra FLOPs);
- the bias rides along as a row of ones in the im2col (no separate pass over the output);
- GroupNorm sums are matrix-vector products, and no broadcasting elementwise op touches a large
  tensor (each keeps a workspace ~4x the tensor alive: see GroupNorm); biases use BiasAdd.
GPU/Ascend use the native `ops.conv2d`; both paths hold the same Parameters `weight` (O, I, kh, kw)
and `bias` (O,), so a checkpoint loads into either.

On CPU in float32, when the fused kernels of `models/cpu_kernels.py` can be built, the im2col is one
C++ pass that writes the matrix (the slices and concats above cost as much as the matmul: 0.9 of
2.8 s for two 256 px frames through the sd-vae encoder), and GroupNorm (+ the SiLU after it) is one
kernel with an exact backward. `fused_kernels=False` on a layer keeps the plain path.
"""
import math

import mindspore as ms
from mindspore import Parameter, nn, ops
from mindspore.common.initializer import HeUniform, Uniform, initializer

from models import conv_select
from models import cpu_kernels as kernels
from models.runtime import device_target

CONV_IMPLS = ("auto", "matmul", "native")


def resolve_conv_impl(conv_impl):
    """"auto" -> "matmul" on CPU (im2col + matmul), "native" (ops.conv2d) on GPU/Ascend."""
    if conv_impl not in CONV_IMPLS:
        raise ValueError(f"conv_impl {conv_impl!r} is not one of {', '.join(CONV_IMPLS)}")
    if conv_impl == "auto":
        return "matmul" if device_target() == "CPU" else "native"
    return conv_impl


def _fused_kernels_apply(fused_kernels):
    """The fused CPU kernels: on CPU when built, unless a layer says fused_kernels=False."""
    return fused_kernels is not False and device_target() == "CPU" and kernels.available()


def _flat_rows(x, gap, front, back):
    """(N, C, H, W) -> (N, C, front + H * (W + gap) + back): rows laid end to end, each followed by
    `gap` zeros, with `front` / `back` zeros around the whole image. Two concats (one pass each)."""
    n, c, h, w = x.shape
    if gap:
        x = ops.concat([x, ops.zeros((n, c, h, gap), x.dtype)], 3)
    flat = x.reshape(n, c, h * (w + gap))
    if front and back:
        return ops.concat([ops.zeros((n, c, front), x.dtype), flat, ops.zeros((n, c, back), x.dtype)], 2)
    if back:
        return ops.concat([flat, ops.zeros((n, c, back), x.dtype)], 2)
    return flat


def weight_matrix(weight, bias):
    """(O, C, k, k) conv weight and (O,) bias -> the (O, k*k*C + 1) matrix that multiplies an im2col
    matrix: column (i*k + j)*C + c, the bias last (it meets the im2col's row of ones)."""
    o, c, k = weight.shape[0], weight.shape[1], weight.shape[2]
    return ops.concat([weight.transpose(0, 2, 3, 1).reshape(o, k * k * c), bias.reshape(o, 1)], 1)


def conv_matmul(x, weight, bias, stride, padding):
    """k x k convolution of x (N, C, H, W) as one im2col + one matmul (see the module doc).

    stride 1, symmetric `padding` p: with row pitch P = W + gap (gap >= p zeros after each row, which
    serve as the right padding of one row AND the left padding of the next) and p*P + p zeros in
    front, the input of output pixel (r, c) under tap (i, j) sits at flat[(r + i) * P + c + j]. So tap
    (i, j) is the slice [i*P + j, i*P + j + ho*P): every output row at width P, of which the first wo
    columns are real.
    stride 2 (diffusers' Downsample2D: pad bottom/right by 1, 3x3, stride 2): x[2r+i, 2c+j] lies in the
    (i%2, j%2) even/odd sub-grid at (r + i//2, c + j//2), so each tap is a slice of one of the four
    flattened sub-grids; the bottom/right padding is their zero gap and tail.
    """
    n, c, h, w = x.shape
    o, k = weight.shape[0], weight.shape[2]
    taps = []
    if stride == 1:
        p = padding
        gap = max(p, k - 1 - p)
        pitch = w + gap
        ho, wo = h + 2 * p - k + 1, w + 2 * p - k + 1
        flat = _flat_rows(x, gap, p * pitch + p, p * pitch + k - 1 - p)
        for i in range(k):
            for j in range(k):
                taps.append(ops.narrow(flat, 2, i * pitch + j, ho * pitch))
    else:
        # x[2r+a, 2c+b] for a, b in {0, 1}: even/odd rows by a reshape, even/odd columns by a strided slice
        ho, wo = h // 2, w // 2
        pitch = wo + 1
        pairs = x.reshape(n, c, ho, 2 * w)
        grids = []
        for a in range(2):
            rows = ops.narrow(pairs, 3, a * w, w)
            grids.append([_flat_rows(rows[:, :, :, b::2], 1, 0, pitch + 1) for b in range(2)])
        for i in range(k):
            for j in range(k):
                taps.append(ops.narrow(grids[i % 2][j % 2], 2, (i // 2) * pitch + j // 2, ho * pitch))
    taps.append(ops.ones((n, 1, ho * pitch), x.dtype))  # multiplies the bias column
    cols = ops.concat(taps, 1)  # (N, k*k*C + 1, ho*pitch), row (i*k + j)*C + channel
    y = ops.matmul(weight_matrix(weight, bias), cols).reshape(n, o, ho, pitch)
    return ops.narrow(y, 3, 0, wo)


class Conv2d(nn.Cell):
    """torch.nn.Conv2d (square kernel, bias) with torch's default init, computing in `dtype` and
    returning that dtype. `impl`: "matmul" (im2col + one matmul, for CPU) or "native" (ops.conv2d).
    Supported: stride 1 with symmetric `padding`, and stride 2 with padding="down" = diffusers'
    Downsample2D (zero pad 1 at the bottom and right, then a valid 3x3 conv)."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, impl="auto",
                 dtype=ms.float32, fused_kernels=None):
        super().__init__()
        if stride == 2 and (padding != "down" or kernel_size != 3):
            raise ValueError(f"Conv2d stride 2 supports only kernel_size=3, padding='down' "
                             f"(got kernel_size={kernel_size}, padding={padding!r})")
        if stride not in (1, 2):
            raise ValueError(f"Conv2d stride {stride} is not supported: use 1 or 2")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.k, self.stride, self.padding = kernel_size, stride, padding
        self.impl = resolve_conv_impl(impl)
        self.dtype = dtype
        self.cast = dtype != ms.float32
        fan_in = in_channels * kernel_size * kernel_size
        # torch: kaiming_uniform(a=sqrt(5)) == U(-1/sqrt(fan_in), 1/sqrt(fan_in)), same bound for bias.
        self.weight = Parameter(initializer(HeUniform(math.sqrt(5)),
                                            (out_channels, in_channels, kernel_size, kernel_size),
                                            ms.float32), name="weight")
        self.bias = Parameter(initializer(Uniform(1 / math.sqrt(fan_in)), (out_channels,), ms.float32),
                              name="bias")
        # the fused im2col covers the two layouts the VAE uses: "same" 3x3 and the stride-2 downsample
        fits = stride == 2 or (kernel_size > 1 and kernel_size % 2 == 1 and padding == kernel_size // 2)
        self.fused_kernels = (self.impl == "matmul" and dtype == ms.float32 and fits and _fused_kernels_apply(fused_kernels))
        if self.fused_kernels:
            self.band_conv = kernels.BandConv(kernel_size, down=stride == 2)
        self.selected = conv_select.applies(kernel_size, stride, padding, self.fused_kernels)
        if self.selected:  # 3x3 stride 1: im2col, Winograd or native, measured per machine and shape
            self.select = conv_select.SelectedConv()

    def construct(self, x):
        if self.stride == 2 and (x.shape[2] % 2 or x.shape[3] % 2):
            raise ValueError(f"Conv2d stride 2: input size {x.shape[2]}x{x.shape[3]} must be even")
        w, b = self.weight, self.bias
        if self.cast:
            x, w, b = x.astype(self.dtype), w.astype(self.dtype), b.astype(self.dtype)
        if self.impl == "native":
            if self.stride == 2:
                x = ops.pad(x, (0, 1, 0, 1))
                y = ops.conv2d(x, w, None, 2, "valid", 0)
            elif self.padding:
                y = ops.conv2d(x, w, None, 1, "pad", self.padding)
            else:
                y = ops.conv2d(x, w, None, 1, "valid", 0)
            return ops.bias_add(y, b)
        if self.selected:
            return self.select(x, w, b)
        if self.fused_kernels:  # im2col + matmul a band of rows at a time (no whole im2col matrix)
            return self.band_conv(x, w, b)
        if self.k == 1 and self.stride == 1 and self.padding == 0:
            n, c, h, wd = x.shape
            y = ops.bias_add(ops.matmul(w.reshape(self.out_channels, c), x.reshape(n, c, h * wd)), b)
            return y.reshape(n, self.out_channels, h, wd)
        return conv_matmul(x, w, b, self.stride, self.padding)


class GroupNorm(nn.Cell):
    """torch.nn.GroupNorm with affine `weight`/`bias` (nn.GroupNorm names them gamma/beta).

    Two-pass statistics (mean, then mean of squared deviations: as exact as torch) in float32 whatever
    the input dtype; the result comes back in the input dtype. Written around two CPU facts:
    - sums are matrix-vector products with a ones vector: ReduceMean/ReduceSum are ~10x slower;
    - no broadcasting elementwise op touches the big tensor: on CPU each such op (x - mean with mean
      (N, C, 1, 1)) keeps a workspace of ~4x the tensor alive for the graph's lifetime (measured:
      +130 MB per op at 128x256x256, 5.5 GB for one 256 px VAE encode). Per-(sample, channel)
      constants are applied with BiasAdd and an inference-mode BatchNorm over the (1, N*C, H*W) view,
      which is exactly (d / sqrt(var + eps)) * gamma + beta per channel; its backward is written out.
    On CPU in float32 the fused kernel (`models/cpu_kernels.py`) does the same in two passes.
    """

    def __init__(self, num_groups, num_channels, eps=1e-6, fused_kernels=None):
        super().__init__()
        if num_channels % num_groups:
            raise ValueError(f"GroupNorm: {num_channels} channels are not divisible by {num_groups} groups")
        self.groups, self.channels, self.eps = num_groups, num_channels, eps
        self.weight = Parameter(initializer("ones", (num_channels,), ms.float32), name="weight")
        self.bias = Parameter(initializer("zeros", (num_channels,), ms.float32), name="bias")
        self.fused_kernels = eps == 1e-6 and _fused_kernels_apply(fused_kernels)  # the kernel's eps is fixed
        self.plain = _GroupNormOps(num_groups, eps)
        if self.fused_kernels:
            self.kernel = kernels.GroupNormAct(silu=False)
            self.kernel_silu = kernels.GroupNormAct(silu=True)

    def then_silu(self, x):
        """silu(self(x)), in one kernel where the fused path applies."""
        if self.fused_kernels and x.dtype == ms.float32:
            return self.kernel_silu(x, self.weight, self.bias, ops.zeros((x.shape[0], self.groups), ms.float32))
        return silu(self.construct(x))  # construct, not self(): a Cell cannot call itself in graph mode

    def construct(self, x):
        if self.fused_kernels and x.dtype == ms.float32:
            return self.kernel(x, self.weight, self.bias, ops.zeros((x.shape[0], self.groups), ms.float32))
        if x.dtype != ms.float32:
            return self.plain(x.astype(ms.float32), self.weight, self.bias).astype(x.dtype)
        return self.plain(x, self.weight, self.bias)


class _GroupNormOps(nn.Cell):
    """GroupNorm from MindSpore ops (float32 x). The forward applies the statistics through an
    inference-mode BatchNorm (see GroupNorm), whose own gradient would treat mean and variance as
    constants; `bprop` is the exact GroupNorm gradient instead, so the layer can be trained."""

    def __init__(self, groups, eps):
        super().__init__()
        self.groups, self.eps = groups, eps
        self.mean = ops.ReduceMean(keep_dims=True)  # primitives: functional ops fail in a graph bprop
        self.sum = ops.ReduceSum()
        self.rsqrt = ops.Rsqrt()

    def construct(self, x, gamma, beta):
        shape = x.shape
        n, c, g = shape[0], shape[1], self.groups
        per_channel = x.reshape(1, n * c, -1, 1)  # 4-D: what every backend's BatchNorm accepts
        count = per_channel.shape[2] * (c // g)
        ones = ops.ones((count, 1), ms.float32)

        def to_channels(stat):  # (n*g, 1) -> (n*c,)
            return ops.broadcast_to(stat, (n * g, c // g)).reshape(n * c)

        mean = ops.matmul(x.reshape(n * g, count), ones) / count
        d = ops.bias_add(per_channel, -to_channels(mean))
        var = ops.matmul(ops.square(d).reshape(n * g, count), ones) / count
        y = ops.batch_norm(d, ops.zeros((n * c,), ms.float32), to_channels(var), ops.tile(gamma, (n,)),
                           ops.tile(beta, (n,)), False, 0.1, self.eps)
        return y.reshape(shape)

    def bprop(self, x, gamma, beta, out, dout):
        n, c = x.shape[0], x.shape[1]
        xg = x.reshape(n, self.groups, -1)
        d = xg - self.mean(xg, 2)
        rstd = self.rsqrt(self.mean(d * d, 2) + self.eps)
        xhat = (d * rstd).reshape(n, c, -1)
        dy = dout.reshape(n, c, -1)
        dgamma = self.sum(dy * xhat, (0, 2))
        dbeta = self.sum(dy, (0, 2))
        g = (dy * gamma.reshape(1, c, 1)).reshape(n, self.groups, -1)
        xh = xhat.reshape(n, self.groups, -1)
        dx = rstd * (g - self.mean(g, 2) - xh * self.mean(g * xh, 2))
        return dx.reshape(x.shape), dgamma, dbeta


def silu(x):
    return x * ops.sigmoid(x)


class Linear(nn.Cell):
    """torch.nn.Linear (`weight` (out, in), `bias` (out,), torch's default init), computing in `dtype`
    and returning that dtype."""

    def __init__(self, in_features, out_features, dtype=ms.float32):
        super().__init__()
        self.out_features = out_features
        self.dtype = dtype
        self.cast = dtype != ms.float32
        self.weight = Parameter(initializer(HeUniform(math.sqrt(5)), (out_features, in_features), ms.float32),
                                name="weight")
        self.bias = Parameter(initializer(Uniform(1 / math.sqrt(in_features)), (out_features,), ms.float32),
                              name="bias")
        self.matmul = ops.MatMul(transpose_b=True)

    def construct(self, x):
        shape = x.shape
        w, b = self.weight, self.bias
        if self.cast:
            x, w, b = x.astype(self.dtype), w.astype(self.dtype), b.astype(self.dtype)
        y = ops.bias_add(self.matmul(x.reshape(-1, shape[-1]), w), b)
        return y.reshape(shape[:-1] + (self.out_features,))
