"""Latte's elementwise chains in plain MindSpore ops: the counterparts of the fused C++ cells in
`models/cpu_kernels.py`, with the same interfaces, so that `models/latte.py` picks one module or the
other and each of its blocks has one `construct`. These run on GPU/Ascend, for float16/bfloat16, and
on CPU where the kernel library cannot be built (`Latte(fused_kernels=False)` forces them).

Two MindSpore CPU facts shape the ops below (measured on MindSpore 2.10):
- reductions (ReduceSum / ReduceMean) are ~10x slower than a matmul with a vector of ones;
- an elementwise op that broadcasts a computed tensor ((..., 1) over the last axis, or a per-sample
  (N, 1, D) over tokens) is slow, and in graph mode its output memory is never reused: the forward
  of Latte-S/2 grew to ~5 GB. Materialising the broadcast first with a rank-1 matmul against ones,
  then a same-shape op, is faster and keeps memory flat.
Autodiff would emit such reductions and broadcasts for every bias, adaLN modulation, LayerNorm and
softmax, so these cells carry a hand-written backward (`bprop`). The forward math is the original's.
Primitives are module constants: functional ops fail inside a graph-mode bprop.
"""
import mindspore as ms
from mindspore import nn, ops

_matmul = ops.MatMul()
_matmul_nt = ops.MatMul(transpose_b=True)
_matmul_tn = ops.MatMul(transpose_a=True)
_bmm = ops.BatchMatMul()


def sum_tokens(x):
    """(N, M, D) -> (N, 1, D), summed over the M axis."""
    return _bmm(ops.ones((x.shape[0], 1, x.shape[1]), x.dtype), x)


def expand_tokens(v, m):
    """(N, 1, D) -> (N, m, D), each sample's vector repeated for its m tokens."""
    return _bmm(ops.ones((v.shape[0], m, 1), v.dtype), v)


def sum_last(x):
    """(..., D) -> (..., 1), summed over the last axis."""
    d = x.shape[-1]
    return _matmul(x.reshape(-1, d), ops.ones((d, 1), x.dtype)).reshape(x.shape[:-1] + (1,))


def mean_last(x):
    return sum_last(x) * (1.0 / x.shape[-1])


def expand_last(v, d):
    """(..., 1) -> (..., d)."""
    return _matmul(v.reshape(-1, 1), ops.ones((1, d), v.dtype)).reshape(v.shape[:-1] + (d,))


def _sum_rows(dy):
    """(..., D) -> (D,): a bias gradient, as a matmul with ones."""
    d = dy.shape[-1]
    dy = dy.reshape(-1, d)
    return _matmul(ops.ones((1, dy.shape[0]), dy.dtype), dy).reshape(d)


class Dense(nn.Cell):
    """y = x @ w.T + b for 2-D x."""

    def construct(self, x, w, b):
        return ops.bias_add(_matmul_nt(x, w), b)

    def bprop(self, x, w, b, out, dout):
        return _matmul(dout, w), _matmul_tn(dout, x), _sum_rows(dout)


class BiasAdd(nn.Cell):
    """z + b for z (..., D) and a float32 b (D,), returned in float32. A float16/bfloat16 z is the
    output of a matmul in that compute dtype: the bias is added in that dtype too, as a Linear does."""

    def construct(self, z, b):
        if z.dtype == ms.float32:
            return ops.bias_add(z.reshape(-1, z.shape[-1]), b).reshape(z.shape)
        return ops.bias_add(z.reshape(-1, z.shape[-1]), b.astype(z.dtype)).reshape(z.shape).astype(ms.float32)

    def bprop(self, z, b, out, dout):
        if z.dtype == ms.float32:
            return dout, _sum_rows(dout)
        dout = dout.astype(z.dtype)
        return dout, _sum_rows(dout).astype(b.dtype)


_GELU_A = 1.5957691216057308  # 2 * sqrt(2 / pi)
_GELU_AB = _GELU_A * 0.044715


class GELUTanh(nn.Cell):
    """torch's GELU(approximate="tanh"), 0.5*x*(1 + tanh(sqrt(2/pi)*(x + 0.044715*x^3))), written
    with the identity 0.5*(1 + tanh(u)) = sigmoid(2u) (~10x faster than MindSpore's fused GELU on
    CPU). Returns (y, sigmoid, x^2): the closed-form backward reuses them, with fewer ops than
    autodiff through the chain."""

    def construct(self, x):
        x2 = x * x
        s = ops.sigmoid(x * (_GELU_A + _GELU_AB * x2))
        return x * s, s, x2

    def bprop(self, x, out, dout):
        _, s, x2 = out
        # d/dx [x * sigmoid(u)] = s + x * s * (1 - s) * du/dx, u = x * (A + AB * x^2)
        return (dout[0] * (s * (1 + x * (1 - s) * (_GELU_A + 3 * _GELU_AB * x2))),)


class BiasGELU(nn.Cell):
    """gelu_tanh(z + b) for z (..., K) and b (K,): fc1's bias add and the activation."""

    def __init__(self):
        super().__init__()
        self.bias_add = BiasAdd()
        self.gelu = GELUTanh()

    def construct(self, z, b):
        return self.gelu(self.bias_add(z, b))[0]


class _LayerNormModulate(nn.Cell):
    """NormModulate's math; also returns the normalised x and 1/std (expanded to x's shape), which
    the backward reuses."""

    def __init__(self, eps):
        super().__init__()
        self.eps = eps

    def construct(self, x, shift, scale):
        m, d = x.shape[1], x.shape[2]
        xc = x - expand_last(mean_last(x), d)
        rstd = expand_last(ops.rsqrt(mean_last(xc * xc) + self.eps), d)
        xhat = xc * rstd
        return xhat * expand_tokens(1 + scale, m) + expand_tokens(shift, m), xhat, rstd

    def bprop(self, x, shift, scale, out, dout):
        _, xhat, rstd = out
        dy = dout[0]
        m, d = x.shape[1], x.shape[2]
        g = dy * expand_tokens(1 + scale, m)  # gradient w.r.t. xhat; then the LayerNorm backward
        dx = rstd * (g - expand_last(mean_last(g), d) - xhat * expand_last(mean_last(g * xhat), d))
        return dx, sum_tokens(dy), sum_tokens(dy * xhat)


class NormModulate(nn.Cell):
    """layer_norm(x) * (1 + scale) + shift for x (N, M, D) and per-sample shift, scale (N, 1, D):
    LayerNorm without affine (eps 1e-6) then adaLN modulation."""

    def __init__(self, eps=1e-6):
        super().__init__()
        self.norm_modulate = _LayerNormModulate(eps)

    def construct(self, x, shift, scale):
        return self.norm_modulate(x, shift, scale)[0]


class _GatedAdd(nn.Cell):
    """x + gate * y for x, y (N, M, D) and a per-sample gate (N, 1, D)."""

    def construct(self, x, gate, y):
        return x + expand_tokens(gate, y.shape[1]) * y

    def bprop(self, x, gate, y, out, dout):
        return dout, sum_tokens(dout * y), dout * expand_tokens(gate, y.shape[1])


class GatedResidual(nn.Cell):
    """x + gate * (z + b) for x, z (N, M, D), a per-sample gate (N, 1, D) and z's bias b (D,): the
    adaLN-Zero gated residual, with the bias of the projection that made z."""

    def __init__(self):
        super().__init__()
        self.bias_add = BiasAdd()
        self.gated_add = _GatedAdd()

    def construct(self, x, gate, z, b):
        return self.gated_add(x, gate, self.bias_add(z, b))


class Softmax(nn.Cell):
    """Softmax over the last axis."""

    def construct(self, x):
        return ops.softmax(x, axis=-1)

    def bprop(self, x, out, dout):
        return (out * (dout - expand_last(sum_last(dout * out), out.shape[-1])),)


class QKVSplit(nn.Cell):
    """The fused qkv projection's rows (N, F, T, 3D) plus its bias -> q, k, v as (B, H, L, hd), with
    (B, L) = (N*F, T) for spatial and (N*T, F) for temporal attention; q comes out scaled by
    hd^-0.5. `shape_ref` is an (N, F, T, ...) tensor that only carries the shape."""

    def __init__(self, num_heads, temporal):
        super().__init__()
        self.num_heads = num_heads
        self.temporal = temporal
        self.bias_add = BiasAdd()

    def construct(self, qkv, b, shape_ref):
        n, f, t = shape_ref.shape[0], shape_ref.shape[1], shape_ref.shape[2]
        head_dim = qkv.shape[-1] // 3 // self.num_heads
        qkv = self.bias_add(qkv, b).reshape(n, f, t, 3, self.num_heads, head_dim)
        if self.temporal:
            qkv = qkv.transpose(3, 0, 2, 4, 1, 5)  # (3, N, T, H, F, hd)
            s, l = t, f
        else:
            qkv = qkv.transpose(3, 0, 1, 4, 2, 5)  # (3, N, F, H, T, hd)
            s, l = f, t
        q, k, v = ops.unstack(qkv.reshape(3, n * s, self.num_heads, l, head_dim), 0)  # StridedSlice: 20x slower
        return q * (head_dim ** -0.5), k, v


class HeadsMerge(nn.Cell):
    """Attention output (B, H, L, hd) -> (N, F, T, H*hd): the heads back side by side in token order,
    undoing QKVSplit's permutation."""

    def __init__(self, num_heads, temporal):
        super().__init__()
        self.num_heads = num_heads
        self.temporal = temporal

    def construct(self, o, shape_ref):
        n, f, t = shape_ref.shape[0], shape_ref.shape[1], shape_ref.shape[2]
        heads, l, head_dim = o.shape[1], o.shape[2], o.shape[3]
        o = o.reshape(n, -1, heads, l, head_dim)
        o = o.transpose(0, 3, 1, 2, 4) if self.temporal else o.transpose(0, 1, 3, 2, 4)
        return o.reshape(n, f, t, heads * head_dim)

