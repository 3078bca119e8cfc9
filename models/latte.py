"""Latte: a latent diffusion transformer for video (Ma et al. 2024), in MindSpore.

A line-by-line port of the original `models/latte.py` (itself DiT with a temporal attention block
after every spatial one). Parameter names and shapes are exactly the PyTorch state-dict keys, so a
released checkpoint loads with a plain copy, and the outputs match the original to float32 rounding.

What differs is only *how* things are computed, for speed on CPU and graph-mode friendliness:
- the patch conv (kernel = stride = patch) is a reshape plus one matmul with the conv weight;
- adaLN modulation is computed once per sample and broadcast, instead of on a condition repeated
  for every frame / token (the rows are identical, so the result is too);
- activations stay (N, F, T, D): a temporal block permutes its q, k, v rather than rearranging x;
- the elementwise chains between the matmuls (bias + tanh GELU, LayerNorm + modulation, bias +
  gated residual, the q/k/v head layouts, softmax) are cells with hand-written backward passes, in
  two implementations with the same interface: fused C++ kernels on CPU in float32
  (`models/cpu_kernels.py`, one pass over memory each), plain MindSpore ops elsewhere
  (`models/plain_cells.py`; `fused_kernels=False` forces them). So the attention's and the MLP's
  last biases are added in the block's gated residual, and q is scaled inside the q/k/v split.

Compute dtype: `dtype=ms.float16 / ms.bfloat16` runs the matmuls in that dtype (for GPU/Ascend);
parameters, the residual stream, LayerNorm, softmax and the timestep embedding stay float32.
"""
import math

import numpy as np

import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common.initializer import Normal, XavierUniform, Zero, initializer

from models import cpu_kernels, dense_select, plain_cells
from models.runtime import device_target
from models.dtypes import device_dtype_problem, ms_dtype
from models.registry import MODEL_NAMES, variant_sizes

_matmul_nt = ops.MatMul(transpose_b=True)


#################################################################################
#                               Basic layers                                    #
#################################################################################

def _param(shape, init, name, requires_grad=True):
    return Parameter(initializer(init, shape, ms.float32), name=name, requires_grad=requires_grad)


class Linear(nn.Cell):
    """torch.nn.Linear: `weight` (out, in), `bias` (out,), zero bias. The weight is xavier-uniform
    (the original's `_basic_init`) unless `weight_init` says otherwise. Matmuls run in `dtype`;
    the result is returned in float32 so that residual streams, norms and softmax stay in full
    precision."""

    def __init__(self, in_features, out_features, dtype=ms.float32, weight_init=None):
        super().__init__()
        self.out_features = out_features
        self.weight = _param((out_features, in_features), weight_init or XavierUniform(), "weight")
        self.bias = _param((out_features,), Zero(), "bias")
        self.dtype = dtype
        self.cast = dtype != ms.float32
        self.dense = plain_cells.Dense()
        self.matmul_nt = _matmul_nt

    def use_sgemm(self):
        """Both products on oneDNN's sgemm (float32 CPU only: Latte calls this where dense_select says)."""
        self.dense, self.matmul_nt = cpu_kernels.SgemmDense(), cpu_kernels.SgemmMatMulNT()

    def construct(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        w, b = self.weight, self.bias
        if self.cast:
            x, w, b = x.astype(self.dtype), w.astype(self.dtype), b.astype(self.dtype)
        y = self.dense(x, w, b)
        if self.cast:
            y = y.astype(ms.float32)
        return y.reshape(shape[:-1] + (self.out_features,))

    def matmul(self, x):
        """x @ weight.T WITHOUT the bias, in the compute dtype, for a caller that adds the bias in its
        next op (qkv split, GELU, gated residual: one pass less over the output), in that dtype."""
        shape = x.shape
        x, w = x.reshape(-1, shape[-1]), self.weight
        if self.cast:
            x, w = x.astype(self.dtype), w.astype(self.dtype)
        return self.matmul_nt(x, w).reshape(shape[:-1] + (self.out_features,))


class SiLU(nn.Cell):
    def construct(self, x):
        return x * ops.sigmoid(x)


#################################################################################
#               Embedding Layers for Timesteps and Class Labels                 #
#################################################################################

class PatchEmbed(nn.Cell):
    """timm's PatchEmbed: a Conv2d with kernel = stride = patch, flattened to tokens. Expressed as
    patchify + one matmul with the same (D, C, p, p) weight, which is exactly that convolution."""

    def __init__(self, img_size, patch_size, in_chans, embed_dim, dtype=ms.float32):
        super().__init__()
        self.patch_size = patch_size
        self.grid_size = img_size // patch_size
        self.num_patches = self.grid_size ** 2
        self.embed_dim = embed_dim
        self.proj = nn.Cell()  # holds `proj.weight`/`proj.bias` under the conv's names
        # The original inits the conv "like nn.Linear": xavier on the (D, C*p*p) view.
        w = initializer(XavierUniform(), (embed_dim, in_chans * patch_size * patch_size), ms.float32)
        self.proj.weight = Parameter(w.init_data().reshape(embed_dim, in_chans, patch_size, patch_size),
                                     name="weight")
        self.proj.bias = _param((embed_dim,), Zero(), "bias")
        self.dtype = dtype
        self.cast = dtype != ms.float32
        self.dense = plain_cells.Dense()

    def use_sgemm(self):
        self.dense = cpu_kernels.SgemmDense()

    def construct(self, x):
        """(B, C, H, W) -> (B, T, D), T = (H/p)*(W/p) in row-major patch order."""
        b, c, h, w = x.shape
        p = self.patch_size
        gh, gw = h // p, w // p
        x = x.reshape(b, c, gh, p, gw, p).transpose(0, 2, 4, 1, 3, 5)  # (B, gh, gw, C, p, p)
        x = x.reshape(b * gh * gw, c * p * p)
        weight, bias = self.proj.weight.reshape(self.embed_dim, -1), self.proj.bias
        if self.cast:
            x, weight, bias = x.astype(self.dtype), weight.astype(self.dtype), bias.astype(self.dtype)
        x = self.dense(x, weight, bias)
        if self.cast:
            x = x.astype(ms.float32)
        return x.reshape(b, gh * gw, self.embed_dim)


class TimestepEmbedder(nn.Cell):
    """Embeds scalar timesteps into vector representations."""

    def __init__(self, hidden_size, frequency_embedding_size=256, dtype=ms.float32):
        super().__init__()
        self.mlp = nn.SequentialCell([
            Linear(frequency_embedding_size, hidden_size, dtype, Normal(0.02)),
            SiLU(),
            Linear(hidden_size, hidden_size, dtype, Normal(0.02)),
        ])
        self.frequency_embedding_size = frequency_embedding_size

        half = frequency_embedding_size // 2
        self.freqs = Tensor(timestep_frequencies(half), ms.float32)  # a graph constant

    @staticmethod
    def timestep_embedding(t, dim, max_period=10000, freqs=None):
        """Sinusoidal embeddings `[cos, sin]` of (N,) timesteps (may be fractional) -> (N, dim),
        in float32. `freqs` is `timestep_frequencies(dim // 2, max_period)`, computed if not given."""
        if freqs is None:
            freqs = Tensor(timestep_frequencies(dim // 2, max_period), ms.float32)
        args = t.astype(ms.float32)[:, None] * freqs[None]
        embedding = ops.cat([ops.cos(args), ops.sin(args)], axis=-1)
        if dim % 2:
            embedding = ops.cat([embedding, ops.zeros_like(embedding[:, :1])], axis=-1)
        return embedding

    def construct(self, t):
        t_freq = self.timestep_embedding(t, self.frequency_embedding_size, freqs=self.freqs)
        return self.mlp(t_freq)


def timestep_frequencies(half, max_period=10000):
    """exp(-ln(max_period) * i / half) for i < half, float32. The exponent is formed in float32 like
    the original (torch multiplies a float32 arange by the scalar); the exp itself is done in float64
    because MindSpore's float32 CPU exp is off by several ulp, which t up to 999 turns into 1e-3
    errors in the embedding."""
    exponent = np.float32(-math.log(max_period)) * np.arange(half, dtype=np.float32) / np.float32(half)
    return np.exp(exponent.astype(np.float64)).astype(np.float32)


class Embedding(nn.Cell):
    """torch.nn.Embedding with its parameter named `weight`."""

    def __init__(self, num_embeddings, embedding_dim):
        super().__init__()
        self.weight = _param((num_embeddings, embedding_dim), Normal(0.02), "weight")

    def construct(self, ids):
        return ops.gather(self.weight, ids, 0)


class LabelEmbedder(nn.Cell):
    """Embeds class labels; drops labels to the extra "null" row for classifier-free guidance."""

    def __init__(self, num_classes, hidden_size, dropout_prob):
        super().__init__()
        use_cfg_embedding = dropout_prob > 0
        self.embedding_table = Embedding(num_classes + int(use_cfg_embedding), hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def token_drop(self, labels, force_drop_ids=None):
        if force_drop_ids is None:
            drop_ids = ops.rand(labels.shape[0]) < self.dropout_prob
        else:
            drop_ids = force_drop_ids == 1
        return ops.where(drop_ids, ops.full_like(labels, self.num_classes), labels)

    def construct(self, labels, train, force_drop_ids=None):
        if (train and self.dropout_prob > 0) or force_drop_ids is not None:
            labels = self.token_drop(labels, force_drop_ids)
        return self.embedding_table(labels)


#################################################################################
#                                 Core Latte Model                              #
#################################################################################

class Attention(nn.Cell):
    """Multi-head self-attention with a fused qkv projection ("math" mode of the original). Returns
    the output projection WITHOUT its bias: the block adds it in its gated residual."""

    def __init__(self, dim, num_heads, dtype=ms.float32, enable_flash_attention=False, fused_kernels=False,
                 recompute=False):
        super().__init__()
        assert dim % num_heads == 0, f"hidden size {dim} is not divisible by {num_heads} heads"
        self.num_heads = num_heads
        self.qkv = Linear(dim, dim * 3, dtype)
        self.proj = Linear(dim, dim, dtype)
        self.dtype = dtype
        self.cast = dtype != ms.float32
        self.flash = enable_flash_attention
        self.bmm_qk = ops.BatchMatMul(transpose_b=True)
        self.bmm_pv = ops.BatchMatMul()
        cells = cpu_kernels if fused_kernels else plain_cells
        self.softmax = cells.Softmax()
        self.split_spatial = cells.QKVSplit(num_heads, temporal=False)
        self.split_temporal = cells.QKVSplit(num_heads, temporal=True)
        # Under recompute, MindSpore 2.10 reports a cycle in the gradient graph when both the split
        # and the merge kernel are in a recomputed block: the heads are then merged by a transpose.
        merge_cells = plain_cells if recompute else cells
        self.merge_spatial = merge_cells.HeadsMerge(num_heads, temporal=False)
        self.merge_temporal = merge_cells.HeadsMerge(num_heads, temporal=True)
        # Spatial attention's (B, H, T, T) probabilities are the largest tensor a block keeps for the
        # backward; the fused cell recomputes them there instead (temporal ones are 16x smaller: kept).
        self.attend_spatial = cpu_kernels.Attention() if fused_kernels and not recompute else None

    def construct(self, x, temporal=False):
        """x (N, F, T, D) -> (N, F*T, D). Spatial: attention over the T tokens of each frame;
        temporal: over the F frames at each token position. The original rearranges x to
        (N*T, F, D) around a temporal block; permuting q, k, v instead is the same attention
        without moving x (every other op in a block is per token)."""
        n, f, t, d = x.shape
        split, merge = ((self.split_temporal, self.merge_temporal) if temporal
                        else (self.split_spatial, self.merge_spatial))
        shape_ref = ops.zeros((n, f, t, 1), ms.float32)  # a tiny constant that carries (N, F, T)
        q, k, v = split(self.qkv.matmul(x), self.qkv.bias, shape_ref)  # (B, H, L, hd), q scaled by hd^-0.5
        if self.flash:
            out = ops.flash_attention_score(q.astype(self.dtype), k.astype(self.dtype), v.astype(self.dtype),
                                            self.num_heads, scalar_value=1.0, input_layout="BNSD")
            out = out.astype(ms.float32)
        elif self.cast:  # matmuls in the compute dtype, the softmax in float32
            attn = self.softmax(self.bmm_qk(q.astype(self.dtype), k.astype(self.dtype)).astype(ms.float32))
            out = self.bmm_pv(attn.astype(self.dtype), v.astype(self.dtype)).astype(ms.float32)
        elif self.attend_spatial is not None and not temporal:
            out = self.attend_spatial(q, k, v)
        else:
            out = self.bmm_pv(self.softmax(self.bmm_qk(q, k)), v)
        return self.proj.matmul(merge(out, shape_ref)).reshape(n, f * t, d)


class Mlp(nn.Cell):
    """timm Mlp: fc1 -> GELU(tanh) -> fc2. Returns fc2's output WITHOUT its bias: the block adds it in
    its gated residual."""

    def __init__(self, in_features, hidden_features, dtype=ms.float32, fused_kernels=False):
        super().__init__()
        self.fc1 = Linear(in_features, hidden_features, dtype)
        self.act = (cpu_kernels if fused_kernels else plain_cells).BiasGELU()
        self.fc2 = Linear(hidden_features, in_features, dtype)
        # fused: GELU and fc2's matmul in one cell whose backward recomputes the GELU output
        self.act_fc2 = cpu_kernels.BiasGELUProject() if fused_kernels else None

    def construct(self, x):
        z = self.fc1.matmul(x)
        if self.act_fc2 is not None:
            shape = z.shape
            out = self.act_fc2(z.reshape(-1, shape[-1]), self.fc1.bias, self.fc2.weight)
            return out.reshape(shape[:-1] + (self.fc2.out_features,))
        return self.fc2.matmul(self.act(z, self.fc1.bias))


class TransformerBlock(nn.Cell):
    """A Latte block with adaptive layer norm zero (adaLN-Zero) conditioning. Used for both the
    spatial and the temporal blocks: only which axis of x is attended over differs."""

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0, dtype=ms.float32, enable_flash_attention=False,
                 fused_kernels=False, recompute=False):
        super().__init__()
        self.attn = Attention(hidden_size, num_heads, dtype, enable_flash_attention, fused_kernels, recompute)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio), dtype, fused_kernels)
        # Zero-initialised: every block starts as the identity (adaLN-Zero).
        self.adaLN_modulation = nn.SequentialCell([SiLU(), Linear(hidden_size, 6 * hidden_size, dtype, Zero())])
        cells = cpu_kernels if fused_kernels else plain_cells
        self.norm_modulate = cells.NormModulate()
        self.gated_residual = cells.GatedResidual()
        if recompute:
            self.recompute()

    def construct(self, x, c, temporal=False):
        """x (N, F, T, D); c (N, D) is the condition of each sample, shared by all of its frames
        and tokens. The original repeats c per frame or token; modulating per sample is the same
        numbers. The attention's and the MLP's last biases are added in the gated residuals."""
        n, f, t, d = x.shape
        mod = self.adaLN_modulation(c).reshape(n, 1, 6 * d)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = ops.split(mod, d, axis=-1)
        x = x.reshape(n, f * t, d)
        h = self.norm_modulate(x, shift_msa, scale_msa).reshape(n, f, t, d)
        x = self.gated_residual(x, gate_msa, self.attn(h, temporal), self.attn.proj.bias)
        h = self.norm_modulate(x, shift_mlp, scale_mlp)
        x = self.gated_residual(x, gate_mlp, self.mlp(h), self.mlp.fc2.bias)
        return x.reshape(n, f, t, d)


class FinalLayer(nn.Cell):
    """The final layer of Latte: adaLN-modulated LayerNorm then a Linear to patch pixels."""

    def __init__(self, hidden_size, patch_size, out_channels, dtype=ms.float32, fused_kernels=False):
        super().__init__()
        # Both zero-initialised, so a fresh model predicts exactly 0.
        self.linear = Linear(hidden_size, patch_size * patch_size * out_channels, dtype, Zero())
        self.adaLN_modulation = nn.SequentialCell([SiLU(), Linear(hidden_size, 2 * hidden_size, dtype, Zero())])
        self.norm_modulate = (cpu_kernels if fused_kernels else plain_cells).NormModulate()

    def construct(self, x, c):
        """x (N, F, T, D), c (N, D) -> (N, F, T, p*p*C_out)."""
        n, f, t, d = x.shape
        shift, scale = ops.split(self.adaLN_modulation(c).reshape(n, 1, 2 * d), d, axis=-1)
        x = self.norm_modulate(x.reshape(n, f * t, d), shift, scale)
        return self.linear(x).reshape(n, f, t, -1)


class Latte(nn.Cell):
    """Diffusion model with a Transformer backbone over space and time.

    x (N, F, C, H, W) float32, t (N,) int timesteps, y (N,) int labels (extras=2 only)
    -> (N, F, 2C, H, W) when learn_sigma (eps then the variance interpolation v), else (N, F, C, H, W).
    extras: 1 unconditional, 2 class-conditional (the original's text mode 78 is not ported).

    A new model has the original's init for training from scratch, set where each layer is built:
    xavier-uniform Linear layers and patch conv with zero bias, N(0, 0.02) for the timestep MLP and
    the label table, zeros for every adaLN_modulation output layer and the final linear (so a fresh
    model predicts exactly 0). The random draws follow `mindspore.set_seed`.
    """

    def __init__(
        self,
        input_size=32,
        patch_size=2,
        in_channels=4,
        hidden_size=1152,
        depth=28,
        num_heads=16,
        mlp_ratio=4.0,
        num_frames=16,
        class_dropout_prob=0.1,
        num_classes=1000,
        learn_sigma=True,
        extras=1,
        dtype=ms.float32,
        use_recompute=False,
        enable_flash_attention=False,
        fused_kernels=None,
    ):
        super().__init__()
        if extras not in (1, 2):
            raise ValueError(f"extras={extras} is not supported: use 1 (unconditional) or 2 (class-conditional)")
        if depth % 2:
            raise ValueError(f"depth={depth} must be even: blocks alternate spatial, temporal")
        if input_size % patch_size:
            raise ValueError(f"input_size={input_size} is not a multiple of patch_size={patch_size}")
        dtype = ms_dtype(dtype)  # also takes "fp32" / "fp16" / "bf16"
        if enable_flash_attention:
            problem = device_dtype_problem(ms.get_context("device_target"), dtype, flash_attention=True)
            if problem:
                raise ValueError(problem)
        # The fused C++ kernels serve the CPU float32 path; None uses them wherever they apply.
        applies = device_target() == "CPU" and dtype == ms.float32 and not enable_flash_attention
        if fused_kernels and not applies:
            raise ValueError("fused_kernels=True needs the CPU device and dtype float32: leave it unset")
        self.fused_kernels = applies and fused_kernels is not False and cpu_kernels.available()
        self.learn_sigma = learn_sigma
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.patch_size = patch_size
        self.input_size = input_size
        self.num_heads = num_heads
        self.extras = extras
        self.num_frames = num_frames
        self.hidden_size = hidden_size

        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size, dtype)
        self.t_embedder = TimestepEmbedder(hidden_size, dtype=dtype)
        if extras == 2:
            self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)

        num_patches = self.x_embedder.num_patches
        # Fixed sin-cos tables: not trained, but part of the state dict like in the original.
        pos_embed = get_2d_sincos_pos_embed(hidden_size, int(num_patches ** 0.5))
        temp_embed = get_1d_sincos_temp_embed(hidden_size, num_frames)
        self.pos_embed = Parameter(Tensor(pos_embed[None], ms.float32), name="pos_embed", requires_grad=False)
        self.temp_embed = Parameter(Tensor(temp_embed[None], ms.float32), name="temp_embed", requires_grad=False)

        self.blocks = nn.CellList([
            TransformerBlock(hidden_size, num_heads, mlp_ratio, dtype, enable_flash_attention, self.fused_kernels,
                             use_recompute)
            for _ in range(depth)
        ])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels, dtype, self.fused_kernels)
        # Linear layers (and the fused GELU + fc2) on oneDNN's sgemm where it measured faster than
        # MindSpore's MatMul on this machine and thread count (models/dense_select.py; LATTE_DENSE forces).
        self.dense_impl = dense_select.choose() if self.fused_kernels else "mindspore"
        if self.dense_impl == "sgemm":
            for _, cell in self.cells_and_names():
                if isinstance(cell, (Linear, PatchEmbed, cpu_kernels.BiasGELUProject)):
                    cell.use_sgemm()

    def unpatchify(self, x):
        """(N, F, T, p*p*C) -> (N, F, C, H, W)."""
        n, f, t, _ = x.shape
        c, p = self.out_channels, self.patch_size
        h = w = self.input_size // p
        x = x.reshape(n, f, h, w, p, p, c).transpose(0, 1, 6, 2, 4, 3, 5)  # n f c h p w q
        return x.reshape(n, f, c, h * p, w * p)

    def construct(self, x, t, y=None):
        n, f, ch, hh, ww = x.shape
        if f != self.num_frames:
            raise ValueError(f"Latte was built for num_frames={self.num_frames} but got {f} frames: "
                             f"pass clips of that length or build the model with num_frames={f}")
        if ch != self.in_channels or hh != self.input_size or ww != self.input_size:
            raise ValueError(f"Latte expects (N, F, {self.in_channels}, {self.input_size}, {self.input_size}) "
                             f"latents, got {x.shape}: check in_channels and input_size (= image_size // 8)")
        x = self.x_embedder(x.reshape(n * f, ch, hh, ww))  # (N*F, T, D)
        t_d = x.shape[1] * x.shape[2]
        # x + pos_embed, as a bias add over (T*D): a broadcast `+` is slow on CPU (see models/plain_cells.py)
        x = ops.bias_add(x.reshape(n * f, t_d), self.pos_embed.reshape(t_d)).reshape(n, f, -1, self.hidden_size)
        c = self.t_embedder(t)  # (N, D)
        if self.extras == 2:
            if y is None:
                raise ValueError("this Latte is class-conditional (extras=2): pass labels y")
            c = c + self.y_embedder(y, self.training)

        # blocks[i] attends over the tokens of each frame, blocks[i+1] over the frames of each token.
        for i in range(0, len(self.blocks), 2):
            x = self.blocks[i](x, c)
            if i == 0:
                x = self._add_temp_embed(x)
            x = self.blocks[i + 1](x, c, temporal=True)

        x = self.final_layer(x, c)
        return self.unpatchify(x)

    def _add_temp_embed(self, x):
        """x (N, F, T, D) + temp_embed (1, F, D) broadcast over tokens, as a bias add over F*T*D
        (a broadcast `+` is slow on CPU, see models/plain_cells.py)."""
        n, f, t, d = x.shape
        table = plain_cells.expand_tokens(self.temp_embed.reshape(f, 1, d), t)  # (F, T, D)
        return ops.bias_add(x.reshape(n, f * t * d), table.reshape(-1)).reshape(n, f, t, d)

    def forward_with_cfg(self, x, t, y, cfg_scale):
        """Classifier-free guidance: the batch holds the conditional half then the unconditional
        half (y = null class). Both halves see the same input; guidance mixes the eps channels
        only, the learned variance channels are passed through."""
        return guidance_mix(self(guidance_input(x), t, y), self.in_channels, cfg_scale)


def guidance_input(x):
    """Classifier-free guidance's network input: the conditional half's latents for both halves."""
    half = x[: x.shape[0] // 2]
    return ops.cat([half, half], axis=0)


def guidance_mix(model_out, in_channels, cfg_scale):
    """Classifier-free guidance's output: eps = uncond + scale * (cond - uncond) for both halves, the
    learned variance channels passed through. Functions rather than methods, so that a Cell around
    Latte (sampler/guided.py) compiles the same arithmetic: forward_with_cfg calls `self(...)`, which
    MindSpore cannot compile inside another Cell's graph."""
    eps, rest = model_out[:, :, :in_channels], model_out[:, :, in_channels:]
    cond_eps, uncond_eps = ops.split(eps, eps.shape[0] // 2, axis=0)
    half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
    eps = ops.cat([half_eps, half_eps], axis=0)
    return ops.cat([eps, rest], axis=2)


#################################################################################
#                   Sine/Cosine Positional Embedding Functions                  #
#################################################################################
# https://github.com/facebookresearch/mae/blob/main/util/pos_embed.py

def get_1d_sincos_temp_embed(embed_dim, length):
    pos = np.arange(0, length, dtype=np.float64)[:, None]
    return get_1d_sincos_pos_embed_from_grid(embed_dim, pos)


def get_2d_sincos_pos_embed(embed_dim, grid_size):
    """(grid_size*grid_size, embed_dim) table; the first half of the channels encode the row."""
    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.meshgrid(grid_w, grid_h)  # here w goes first
    grid = np.stack(grid, axis=0).reshape([2, 1, grid_size, grid_size])
    return get_2d_sincos_pos_embed_from_grid(embed_dim, grid)


def get_2d_sincos_pos_embed_from_grid(embed_dim, grid):
    assert embed_dim % 2 == 0
    emb_h = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[0])  # (H*W, D/2)
    emb_w = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[1])  # (H*W, D/2)
    return np.concatenate([emb_h, emb_w], axis=1)


def get_1d_sincos_pos_embed_from_grid(embed_dim, pos):
    """embed_dim: output dimension per position; pos: positions, any shape -> (M, embed_dim)."""
    assert embed_dim % 2 == 0
    omega = np.arange(embed_dim // 2, dtype=np.float64)
    omega /= embed_dim / 2.0
    omega = 1.0 / 10000 ** omega  # (D/2,)
    out = np.einsum("m,d->md", pos.reshape(-1), omega)  # (M, D/2), outer product
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


#################################################################################
#                                   Latte Configs                               #
#################################################################################

def _constructor(name):
    sizes = variant_sizes(name)

    def build(**kwargs):
        return Latte(**sizes, **kwargs)

    build.__name__ = build.__qualname__ = name.replace("Latte-", "Latte_").replace("/", "_")
    return build


# The original's Latte_XL_2 ... Latte_S_8, one per variant of models.registry.
LATTE_MODELS = {name: _constructor(name) for name in MODEL_NAMES}
