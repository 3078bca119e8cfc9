// Fused float32 CPU kernels for Latte's transformer blocks and for the VAE's im2col and GroupNorm (+ SiLU)
// (see models/cpu_kernels.py; the VAE layers in models/vae_layers.py).
//
// Each function is a MindSpore "aot" custom op: int f(nparam, params, ndims, shapes, dtypes, stream,
// extra), inputs first then outputs in `params`. They replace chains of 4-10 elementwise MindSpore ops
// (each a full pass over memory, several with broadcasts) by one pass: on MindSpore's CPU backend those
// chains cost as much as the matmuls around them. Built with -fopenmp-simd: the `omp simd` loops are
// vectorised, and each kernel runs on the calling thread (splitting them over OpenMP threads measured
// no faster, because MindSpore's matmuls use the cores, and it needed OMP_WAIT_POLICY=PASSIVE to not
// slow those down). No fast-math: exp is the polynomial below (about 1 ulp), the rest is IEEE float.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#if defined(__SSE__)
#include <xmmintrin.h>
#endif


namespace {

int64_t numel(int nd, const int64_t *shape) {
  int64_t n = 1;
  for (int i = 0; i < nd; i++) n *= shape[i];
  return n;
}

// exp(x) for float32, vectorisable (Cephes' expf polynomial after range reduction by ln 2).
inline float exp_approx(float x) {
  // std::min/max, not ternaries: from `x < -87 ? -87 : (x > 88 ? 88 : x)` GCC split the callers' loops
  // into the three ranges, computed every range's result for every lane and blended, so each vector
  // of SiLU/GELU also divided by 1 + exp(88) and made a denormal, a ~150-cycle microcode assist on
  // Intel cores: GroupNorm+SiLU 83 -> 13 ms, bias+GELU 62 -> 6 ms (4096 x 1536). Same values (fminf /
  // fmaxf would not vectorise: their NaN rule is not minps/maxps').
  x = std::max(-87.0f, std::min(x, 88.0f));
  float k = floorf(x * 1.44269504088896341f + 0.5f);
  float r = x - k * 0.693359375f;
  r = r + k * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  float y = p * r * r + r + 1.0f;
  int32_t bits = (static_cast<int32_t>(k) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return y * scale;
}

// Flush-to-zero and denormals-are-zero for one kernel's own arithmetic, the caller's MXCSR restored
// on return. For the softmax kernels below: with peaky attention (logits spread over more than ~87)
// most probabilities are below FLT_MIN, and each vector holding one took a ~150-cycle microcode
// assist in the normalisation, again in the backward's y * (dy - dot), and in the oneDNN batched
// matmuls fed with them: Latte's attention (6 heads x 256 tokens, logit std 32) ran 7.4 ms forward
// and 22 ms forward + backward instead of 2.4 / 8.1 ms. Values change only where IEEE would give a
// subnormal (|v| < 1.2e-38, now 0). MindSpore sets FTZ/DAZ on its kernel threads (mindrt's
// Worker::Run) but not on the thread that runs ops at cpu_threads=1, nor does torch by default.
struct FlushDenormals {
#if defined(__SSE__)
  unsigned saved = _mm_getcsr();
  FlushDenormals() { _mm_setcsr(saved | 0x8040u); }  // FTZ (bit 15) | DAZ (bit 6)
  ~FlushDenormals() { _mm_setcsr(saved); }
#endif
};

// GELU(tanh) = x * sigmoid(2u), u = sqrt(2/pi) * (x + 0.044715 x^3)
constexpr float kGeluA = 1.5957691216057308f;           // 2 * sqrt(2 / pi)
constexpr float kGeluAB = 1.5957691216057308f * 0.044715f;

}  // namespace

extern "C" {

// y = gelu_tanh(z + b); z (..., K), b (K,)
int bias_gelu_fwd(int, void **params, int *ndims, int64_t **shapes, const char **, void *, void *) {
  const float *z = static_cast<const float *>(params[0]);
  const float *b = static_cast<const float *>(params[1]);
  float *y = static_cast<float *>(params[2]);
  const int64_t k = shapes[1][0], m = numel(ndims[0], shapes[0]) / k;
  for (int64_t r = 0; r < m; r++) {
    const float *zr = z + r * k;
    float *yr = y + r * k;
#pragma omp simd
    for (int64_t j = 0; j < k; j++) {
      float x = zr[j] + b[j];
      float s = 1.0f / (1.0f + exp_approx(-x * (kGeluA + kGeluAB * x * x)));
      yr[j] = x * s;
    }
  }
  return 0;
}

// dz = dy * gelu'(z + b), db = sum over rows of dz; inputs z, b, dy
int bias_gelu_bwd(int, void **params, int *ndims, int64_t **shapes, const char **, void *, void *) {
  const float *z = static_cast<const float *>(params[0]);
  const float *b = static_cast<const float *>(params[1]);
  const float *dy = static_cast<const float *>(params[2]);
  float *dz = static_cast<float *>(params[3]);
  float *db = static_cast<float *>(params[4]);
  const int64_t k = shapes[1][0], m = numel(ndims[0], shapes[0]) / k;
  std::memset(db, 0, k * sizeof(float));
  for (int64_t r = 0; r < m; r++) {
    const float *zr = z + r * k, *dyr = dy + r * k;
    float *dzr = dz + r * k;
#pragma omp simd
    for (int64_t j = 0; j < k; j++) {
      float x = zr[j] + b[j], x2 = x * x;
      float s = 1.0f / (1.0f + exp_approx(-x * (kGeluA + kGeluAB * x2)));
      float g = dyr[j] * (s + x * s * (1.0f - s) * (kGeluA + 3.0f * kGeluAB * x2));
      dzr[j] = g;
      db[j] += g;
    }
  }
  return 0;
}

// The MLP's backward without a saved GELU output: inputs z, b, dy -> dz, db as bias_gelu_bwd, plus
// y = gelu_tanh(z + b) recomputed in the same pass (fc2's weight gradient needs it). So the forward
// keeps only z, not the (rows, 4D) activation as well.
int bias_gelu_bwd_recompute(int, void **params, int *ndims, int64_t **shapes, const char **, void *, void *) {
  const float *z = static_cast<const float *>(params[0]);
  const float *b = static_cast<const float *>(params[1]);
  const float *dy = static_cast<const float *>(params[2]);
  float *dz = static_cast<float *>(params[3]);
  float *db = static_cast<float *>(params[4]);
  float *y = static_cast<float *>(params[5]);
  const int64_t k = shapes[1][0], m = numel(ndims[0], shapes[0]) / k;
  std::memset(db, 0, k * sizeof(float));
  for (int64_t r = 0; r < m; r++) {
    const float *zr = z + r * k, *dyr = dy + r * k;
    float *dzr = dz + r * k, *yr = y + r * k;
#pragma omp simd
    for (int64_t j = 0; j < k; j++) {
      float x = zr[j] + b[j], x2 = x * x;
      float s = 1.0f / (1.0f + exp_approx(-x * (kGeluA + kGeluAB * x2)));
      float g = dyr[j] * (s + x * s * (1.0f - s) * (kGeluA + 3.0f * kGeluAB * x2));
      dzr[j] = g;
      db[j] += g;
      yr[j] = x * s;
    }
  }
  return 0;
}

// LayerNorm (no affine, eps 1e-6) then adaLN modulation: y = xhat * (1 + scale[n]) + shift[n].
// x (N, M, D), shift, scale (N, 1, D) -> y (N, M, D)
namespace {

inline void row_stats(const float *xr, int64_t d, float *mean, float *rstd) {
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < d; j++) sum += xr[j];
  const float mu = sum / d;
  float var = 0.0f;
#pragma omp simd reduction(+ : var)
  for (int64_t j = 0; j < d; j++) var += (xr[j] - mu) * (xr[j] - mu);
  *mean = mu;
  *rstd = 1.0f / std::sqrt(var / d + 1e-6f);
}

}  // namespace

int norm_modulate_fwd(int, void **params, int *, int64_t **shapes, const char **, void *, void *) {
  const float *x = static_cast<const float *>(params[0]);
  const float *shift = static_cast<const float *>(params[1]);
  const float *scale = static_cast<const float *>(params[2]);
  float *y = static_cast<float *>(params[3]);
  const int64_t n = shapes[0][0], m = shapes[0][1], d = shapes[0][2];
  for (int64_t r = 0; r < n * m; r++) {
    const float *xr = x + r * d, *sh = shift + (r / m) * d, *sc = scale + (r / m) * d;
    float *yr = y + r * d;
    float mean, rstd;
    row_stats(xr, d, &mean, &rstd);
#pragma omp simd
    for (int64_t j = 0; j < d; j++) yr[j] = (xr[j] - mean) * rstd * (1.0f + sc[j]) + sh[j];
  }
  return 0;
}

// inputs x, scale, dy -> dx (N, M, D), dshift, dscale (N, 1, D). The row statistics are recomputed
// (the row is read anyway) rather than kept from the forward pass.
int norm_modulate_bwd(int, void **params, int *, int64_t **shapes, const char **, void *, void *) {
  const float *x = static_cast<const float *>(params[0]);
  const float *scale = static_cast<const float *>(params[1]);
  const float *dy = static_cast<const float *>(params[2]);
  float *dx = static_cast<float *>(params[3]);
  float *dshift = static_cast<float *>(params[4]);
  float *dscale = static_cast<float *>(params[5]);
  const int64_t n = shapes[0][0], m = shapes[0][1], d = shapes[0][2];
  std::memset(dshift, 0, n * d * sizeof(float));
  std::memset(dscale, 0, n * d * sizeof(float));
  for (int64_t r = 0; r < n * m; r++) {
    const int64_t s = r / m;
    const float *xr = x + r * d, *dyr = dy + r * d, *sc = scale + s * d;
    float *dxr = dx + r * d, *acc_shift = dshift + s * d, *acc_scale = dscale + s * d;
    float mean, rstd;
    row_stats(xr, d, &mean, &rstd);
    float g_sum = 0.0f, gx_sum = 0.0f;
#pragma omp simd reduction(+ : g_sum, gx_sum)
    for (int64_t j = 0; j < d; j++) {
      float xhat = (xr[j] - mean) * rstd, g = dyr[j] * (1.0f + sc[j]);
      g_sum += g;
      gx_sum += g * xhat;
      acc_shift[j] += dyr[j];
      acc_scale[j] += dyr[j] * xhat;
    }
    const float g_mean = g_sum / d, gx_mean = gx_sum / d;
#pragma omp simd
    for (int64_t j = 0; j < d; j++) {
      float xhat = (xr[j] - mean) * rstd, g = dyr[j] * (1.0f + sc[j]);
      dxr[j] = rstd * (g - g_mean - xhat * gx_mean);
    }
  }
  return 0;
}

// out = x + gate[n] * (z + b); x, z (N, M, D), gate (N, 1, D), b (D,)
int gated_residual_fwd(int, void **params, int *, int64_t **shapes, const char **, void *, void *) {
  const float *x = static_cast<const float *>(params[0]);
  const float *gate = static_cast<const float *>(params[1]);
  const float *z = static_cast<const float *>(params[2]);
  const float *b = static_cast<const float *>(params[3]);
  float *out = static_cast<float *>(params[4]);
  const int64_t n = shapes[0][0], m = shapes[0][1], d = shapes[0][2];
  for (int64_t r = 0; r < n * m; r++) {
    const float *xr = x + r * d, *zr = z + r * d, *gt = gate + (r / m) * d;
    float *o = out + r * d;
#pragma omp simd
    for (int64_t j = 0; j < d; j++) o[j] = xr[j] + gt[j] * (zr[j] + b[j]);
  }
  return 0;
}

// inputs gate, z, b, dout -> dz = dout * gate[n], dgate (N, 1, D) = sum_m dout * (z + b), db (D,) = sum dz
int gated_residual_bwd(int, void **params, int *, int64_t **shapes, const char **, void *, void *) {
  const float *gate = static_cast<const float *>(params[0]);
  const float *z = static_cast<const float *>(params[1]);
  const float *b = static_cast<const float *>(params[2]);
  const float *dout = static_cast<const float *>(params[3]);
  float *dz = static_cast<float *>(params[4]);
  float *dgate = static_cast<float *>(params[5]);
  float *db = static_cast<float *>(params[6]);
  const int64_t n = shapes[1][0], m = shapes[1][1], d = shapes[1][2];
  std::memset(dgate, 0, n * d * sizeof(float));
  std::memset(db, 0, d * sizeof(float));
  for (int64_t r = 0; r < n * m; r++) {
    const int64_t s = r / m;
    const float *zr = z + r * d, *dr = dout + r * d, *gt = gate + s * d;
    float *dzr = dz + r * d, *acc_gate = dgate + s * d;
#pragma omp simd
    for (int64_t j = 0; j < d; j++) {
      float g = dr[j] * gt[j];
      dzr[j] = g;
      acc_gate[j] += dr[j] * (zr[j] + b[j]);
      db[j] += g;
    }
  }
  return 0;
}

// ---- attention layouts ------------------------------------------------------------------------
// The qkv projection gives rows (n, f, t) of [q | k | v], each [head][hd]. Spatial attention wants
// (n*F + f, head, t, hd), temporal (n*T + t, head, f, hd). `temporal` picks the layout; the index of
// row (n, f, t), head h in the batched layout is ((n, s) * H + h) * L + l with (s, l) = (f, t) or (t, f).
namespace {

inline int64_t batched_offset(int64_t n, int64_t f, int64_t t, int64_t h, int64_t F, int64_t T, int64_t H,
                              int64_t hd, bool temporal) {
  const int64_t s = temporal ? n * T + t : n * F + f, l = temporal ? f : t, L = temporal ? F : T;
  return ((s * H + h) * L + l) * hd;
}

// inputs qkv (N, F, T, 3D), b (3D,), shape (N, F, T, 1) -> q, k, v (B, H, L, hd); q is scaled by hd^-0.5
int qkv_split(void **params, int64_t **shapes, bool temporal) {
  const float *qkv = static_cast<const float *>(params[0]);
  const float *b = static_cast<const float *>(params[1]);
  float *out[3] = {static_cast<float *>(params[3]), static_cast<float *>(params[4]),
                   static_cast<float *>(params[5])};
  const int64_t N = shapes[0][0], F = shapes[0][1], T = shapes[0][2], D3 = shapes[0][3];
  const int64_t H = shapes[3][1], hd = shapes[3][3], D = D3 / 3;
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  for (int64_t r = 0; r < N * F * T; r++) {
    const int64_t n = r / (F * T), f = (r / T) % F, t = r % T;
    const float *row = qkv + r * D3;
    for (int which = 0; which < 3; which++) {
      const float mul = which == 0 ? scale : 1.0f;
      for (int64_t h = 0; h < H; h++) {
        const float *src = row + which * D + h * hd, *bias = b + which * D + h * hd;
        float *dst = out[which] + batched_offset(n, f, t, h, F, T, H, hd, temporal);
#pragma omp simd
        for (int64_t j = 0; j < hd; j++) dst[j] = (src[j] + bias[j]) * mul;
      }
    }
  }
  return 0;
}

// inputs dq, dk, dv (B, H, L, hd), shape (N, F, T, 1) -> dqkv (N, F, T, 3D), db (3D,)
int qkv_split_bwd(void **params, int64_t **shapes, bool temporal) {
  const float *grad[3] = {static_cast<const float *>(params[0]), static_cast<const float *>(params[1]),
                          static_cast<const float *>(params[2])};
  float *dqkv = static_cast<float *>(params[4]);
  float *db = static_cast<float *>(params[5]);
  const int64_t H = shapes[0][1], hd = shapes[0][3], D = H * hd, D3 = 3 * D;
  const int64_t N = shapes[3][0], F = shapes[3][1], T = shapes[3][2];
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  std::memset(db, 0, D3 * sizeof(float));
  for (int64_t r = 0; r < N * F * T; r++) {
    const int64_t n = r / (F * T), f = (r / T) % F, t = r % T;
    float *row = dqkv + r * D3;
    for (int which = 0; which < 3; which++) {
      const float mul = which == 0 ? scale : 1.0f;
      for (int64_t h = 0; h < H; h++) {
        const float *src = grad[which] + batched_offset(n, f, t, h, F, T, H, hd, temporal);
        float *dst = row + which * D + h * hd, *a = db + which * D + h * hd;
#pragma omp simd
        for (int64_t j = 0; j < hd; j++) {
          float g = src[j] * mul;
          dst[j] = g;
          a[j] += g;
        }
      }
    }
  }
  return 0;
}

// merge (forward == true): o (B, H, L, hd), shape (N, F, T, 1) -> out (N, F, T, D)
// split (forward == false): dout (N, F, T, D), shape -> (B, H, L, hd)
int heads_move(void **params, int64_t **shapes, bool temporal, bool merge) {
  const float *src = static_cast<const float *>(params[0]);
  float *dst = static_cast<float *>(params[2]);
  const int64_t N = shapes[1][0], F = shapes[1][1], T = shapes[1][2];
  const int64_t H = merge ? shapes[0][1] : shapes[2][1], hd = merge ? shapes[0][3] : shapes[2][3];
  const int64_t D = H * hd;
  for (int64_t r = 0; r < N * F * T; r++) {
    const int64_t n = r / (F * T), f = (r / T) % F, t = r % T;
    for (int64_t h = 0; h < H; h++) {
      const int64_t off = batched_offset(n, f, t, h, F, T, H, hd, temporal);
      const float *s = merge ? src + off : src + r * D + h * hd;
      float *d = merge ? dst + r * D + h * hd : dst + off;
      std::memcpy(d, s, hd * sizeof(float));
    }
  }
  return 0;
}

}  // namespace

int qkv_split_spatial(int, void **p, int *, int64_t **s, const char **, void *, void *) { return qkv_split(p, s, false); }
int qkv_split_temporal(int, void **p, int *, int64_t **s, const char **, void *, void *) { return qkv_split(p, s, true); }
int qkv_split_spatial_bwd(int, void **p, int *, int64_t **s, const char **, void *, void *) {
  return qkv_split_bwd(p, s, false);
}
int qkv_split_temporal_bwd(int, void **p, int *, int64_t **s, const char **, void *, void *) {
  return qkv_split_bwd(p, s, true);
}
int heads_merge_spatial(int, void **p, int *, int64_t **s, const char **, void *, void *) {
  return heads_move(p, s, false, true);
}
int heads_merge_temporal(int, void **p, int *, int64_t **s, const char **, void *, void *) {
  return heads_move(p, s, true, true);
}
int heads_split_spatial(int, void **p, int *, int64_t **s, const char **, void *, void *) {
  return heads_move(p, s, false, false);
}
int heads_split_temporal(int, void **p, int *, int64_t **s, const char **, void *, void *) {
  return heads_move(p, s, true, false);
}

// Softmax over the last axis; x (..., L)
int softmax_fwd(int, void **params, int *ndims, int64_t **shapes, const char **, void *, void *) {
  const float *x = static_cast<const float *>(params[0]);
  float *y = static_cast<float *>(params[1]);
  const int64_t l = shapes[0][ndims[0] - 1], rows = numel(ndims[0], shapes[0]) / l;
  FlushDenormals flush;
  for (int64_t r = 0; r < rows; r++) {
    const float *xr = x + r * l;
    float *yr = y + r * l;
    float mx = -INFINITY;
#pragma omp simd reduction(max : mx)
    for (int64_t j = 0; j < l; j++) mx = xr[j] > mx ? xr[j] : mx;
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < l; j++) {
      // 0 where exp underflows: exp_approx clamps at -87 and returns 1.6e-38 for any lower input,
      // and those (94 % of a row at logit std 80) made the P.V matmul's accumulators subnormal
      const float d = xr[j] - mx;
      float e = d < -87.0f ? 0.0f : exp_approx(d);
      yr[j] = e;
      sum += e;
    }
    const float inv = 1.0f / sum;
#pragma omp simd
    for (int64_t j = 0; j < l; j++) yr[j] *= inv;
  }
  return 0;
}

// inputs y (softmax output), dy -> dx = y * (dy - sum(dy * y))
int softmax_bwd(int, void **params, int *ndims, int64_t **shapes, const char **, void *, void *) {
  const float *y = static_cast<const float *>(params[0]);
  const float *dy = static_cast<const float *>(params[1]);
  float *dx = static_cast<float *>(params[2]);
  const int64_t l = shapes[0][ndims[0] - 1], rows = numel(ndims[0], shapes[0]) / l;
  FlushDenormals flush;
  for (int64_t r = 0; r < rows; r++) {
    const float *yr = y + r * l, *dyr = dy + r * l;
    float *dxr = dx + r * l;
    float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
    for (int64_t j = 0; j < l; j++) dot += dyr[j] * yr[j];
#pragma omp simd
    for (int64_t j = 0; j < l; j++) dxr[j] = yr[j] * (dyr[j] - dot);
  }
  return 0;
}

}  // extern "C"

// ---- VAE: convolution as im2col + matmul, GroupNorm (+ SiLU) ---------------------------------
// im2col: x (N, C, H, W) -> cols (N, k*k*C + 1, Ho, Wo); row (i*k + j)*C + c holds
// x[c, r*s + i - p, q*s + j - p] (zero outside the image), the last row is ones (it multiplies the
// bias column of the weight matrix). Two layouts are supported, the two the VAE uses: "same"
// (stride 1, p = (k - 1) / 2) and "down" (diffusers' Downsample2D: stride 2, zero pad 1 at the
// bottom and right only, i.e. p = 0 with out-of-range reads as zero).
namespace {

struct ConvGeometry {
  int64_t n, c, h, w, k, ho, wo, stride, pad;
};

ConvGeometry geometry(const int64_t *x_shape, const int64_t *cols_shape, bool down) {
  ConvGeometry g;
  g.n = x_shape[0], g.c = x_shape[1], g.h = x_shape[2], g.w = x_shape[3];
  g.ho = cols_shape[2], g.wo = cols_shape[3];
  g.k = static_cast<int64_t>(std::lround(std::sqrt(static_cast<double>((cols_shape[1] - 1) / g.c))));
  g.stride = down ? 2 : 1;
  g.pad = down ? 0 : (g.k - 1) / 2;
  return g;
}

// the im2col rows of output rows [r0, r1) of one image: (k*k*C + 1, (r1 - r0) * Wo), the last row
// ones. The whole-image im2col below and the banded conv (conv_band) both fill their columns here.
void im2col_rows(const float *x, float *cols, const ConvGeometry &g, int64_t r0, int64_t r1) {
  const int64_t band = (r1 - r0) * g.wo, rows = g.k * g.k * g.c + 1;
  // channel outermost: its input plane stays in cache while its k*k taps are written
  for (int64_t c = 0; c < g.c; c++) {
    const float *src = x + c * g.h * g.w;
    for (int64_t i = 0; i < g.k; i++) {
      for (int64_t j = 0; j < g.k; j++) {
        // output columns q whose input column q*s + j - p lies inside [0, W)
        int64_t q0 = 0, q1 = g.wo;
        while (q0 < g.wo && q0 * g.stride + j - g.pad < 0) q0++;
        while (q1 > q0 && (q1 - 1) * g.stride + j - g.pad >= g.w) q1--;
        float *dst = cols + ((i * g.k + j) * g.c + c) * band;
        for (int64_t r = r0; r < r1; r++) {
          float *d = dst + (r - r0) * g.wo;
          const int64_t y = r * g.stride + i - g.pad;
          if (y < 0 || y >= g.h) {
            std::memset(d, 0, g.wo * sizeof(float));
            continue;
          }
          for (int64_t q = 0; q < q0; q++) d[q] = 0.0f;
          for (int64_t q = q1; q < g.wo; q++) d[q] = 0.0f;
          const float *s = src + y * g.w + j - g.pad;
          if (g.stride == 1) {
            std::memcpy(d + q0, s + q0, (q1 - q0) * sizeof(float));
          } else {
#pragma omp simd
            for (int64_t q = q0; q < q1; q++) d[q] = s[q * g.stride];
          }
        }
      }
    }
  }
  float *ones = cols + (rows - 1) * band;
  for (int64_t q = 0; q < band; q++) ones[q] = 1.0f;
}

void im2col(const float *x, float *cols, const ConvGeometry &g) {
  const int64_t plane = g.ho * g.wo, rows = g.k * g.k * g.c + 1;
  for (int64_t n = 0; n < g.n; n++) im2col_rows(x + n * g.c * g.h * g.w, cols + n * rows * plane, g, 0, g.ho);
}

// the adjoint of im2col: dx[c, y, x] = sum over the taps that read it (the ones row has no input)
void col2im(const float *dcols, float *dx, const ConvGeometry &g) {
  const int64_t plane = g.ho * g.wo, rows = g.k * g.k * g.c + 1;
  std::memset(dx, 0, g.n * g.c * g.h * g.w * sizeof(float));
  for (int64_t n = 0; n < g.n; n++) {
    const float *in_n = dcols + n * rows * plane;
    for (int64_t i = 0; i < g.k; i++) {
      for (int64_t j = 0; j < g.k; j++) {
        int64_t q0 = 0, q1 = g.wo;
        while (q0 < g.wo && q0 * g.stride + j - g.pad < 0) q0++;
        while (q1 > q0 && (q1 - 1) * g.stride + j - g.pad >= g.w) q1--;
        for (int64_t c = 0; c < g.c; c++) {
          float *dst = dx + (n * g.c + c) * g.h * g.w;
          const float *src = in_n + ((i * g.k + j) * g.c + c) * plane;
          for (int64_t r = 0; r < g.ho; r++) {
            const int64_t y = r * g.stride + i - g.pad;
            if (y < 0 || y >= g.h) continue;
            float *d = dst + y * g.w + j - g.pad;
            const float *s = src + r * g.wo;
            if (g.stride == 1) {
#pragma omp simd
              for (int64_t q = q0; q < q1; q++) d[q] += s[q];
            } else {
              for (int64_t q = q0; q < q1; q++) d[q * g.stride] += s[q];
            }
          }
        }
      }
    }
  }
}

// GroupNorm (eps 1e-6, affine), optionally followed by SiLU. x (N, C, H, W); groups from the
// (N, G) shape carrier. Statistics in double over the group (up to millions of values).
struct GroupGeometry {
  int64_t n, c, hw, groups, cg;
};

GroupGeometry group_geometry(int64_t **shapes, int x_index, int carrier_index) {
  GroupGeometry g;
  g.n = shapes[x_index][0], g.c = shapes[x_index][1], g.hw = shapes[x_index][2] * shapes[x_index][3];
  g.groups = shapes[carrier_index][1], g.cg = g.c / g.groups;
  return g;
}

void group_stats(const float *x, int64_t count, float *mean, float *rstd) {
  double sum = 0.0;
  for (int64_t start = 0; start < count; start += 4096) {
    const int64_t end = start + 4096 < count ? start + 4096 : count;
    float part = 0.0f;
#pragma omp simd reduction(+ : part)
    for (int64_t e = start; e < end; e++) part += x[e];
    sum += part;
  }
  const float mu = static_cast<float>(sum / count);
  double var = 0.0;
  for (int64_t start = 0; start < count; start += 4096) {
    const int64_t end = start + 4096 < count ? start + 4096 : count;
    float part = 0.0f;
#pragma omp simd reduction(+ : part)
    for (int64_t e = start; e < end; e++) part += (x[e] - mu) * (x[e] - mu);
    var += part;
  }
  *mean = mu;
  *rstd = static_cast<float>(1.0 / std::sqrt(var / count + 1e-6));
}

// inputs x, gamma, beta, carrier (N, G) -> y
int group_norm(void **params, int64_t **shapes, bool silu) {
  const float *x = static_cast<const float *>(params[0]);
  const float *gamma = static_cast<const float *>(params[1]);
  const float *beta = static_cast<const float *>(params[2]);
  float *y = static_cast<float *>(params[4]);
  const GroupGeometry g = group_geometry(shapes, 0, 3);
  for (int64_t n = 0; n < g.n; n++) {
    for (int64_t grp = 0; grp < g.groups; grp++) {
      const int64_t offset = (n * g.c + grp * g.cg) * g.hw;
      float mean, rstd;
      group_stats(x + offset, g.cg * g.hw, &mean, &rstd);
      for (int64_t c = grp * g.cg; c < (grp + 1) * g.cg; c++) {
        const float a = rstd * gamma[c], b = beta[c] - mean * a;
        const float *xs = x + (n * g.c + c) * g.hw;
        float *ys = y + (n * g.c + c) * g.hw;
        if (silu) {
#pragma omp simd
          for (int64_t e = 0; e < g.hw; e++) {
            float z = xs[e] * a + b;
            ys[e] = z / (1.0f + exp_approx(-z));
          }
        } else {
#pragma omp simd
          for (int64_t e = 0; e < g.hw; e++) ys[e] = xs[e] * a + b;
        }
      }
    }
  }
  return 0;
}

// inputs x, gamma, beta, carrier, dy -> dx, dgamma, dbeta
int group_norm_backward(void **params, int64_t **shapes, bool silu) {
  const float *x = static_cast<const float *>(params[0]);
  const float *gamma = static_cast<const float *>(params[1]);
  const float *beta = static_cast<const float *>(params[2]);
  const float *dy = static_cast<const float *>(params[4]);
  float *dx = static_cast<float *>(params[5]);
  float *dgamma = static_cast<float *>(params[6]);
  float *dbeta = static_cast<float *>(params[7]);
  const GroupGeometry g = group_geometry(shapes, 0, 3);
  std::memset(dgamma, 0, g.c * sizeof(float));
  std::memset(dbeta, 0, g.c * sizeof(float));
  for (int64_t n = 0; n < g.n; n++) {
    for (int64_t grp = 0; grp < g.groups; grp++) {
      const int64_t offset = (n * g.c + grp * g.cg) * g.hw, count = g.cg * g.hw;
      float mean, rstd;
      group_stats(x + offset, count, &mean, &rstd);
      double sum_g = 0.0, sum_gx = 0.0;
      // pass 1: gradient w.r.t. the normalised value, kept in dx; the sums the backward needs
      for (int64_t c = grp * g.cg; c < (grp + 1) * g.cg; c++) {
        const float *xs = x + (n * g.c + c) * g.hw, *dys = dy + (n * g.c + c) * g.hw;
        float *gs = dx + (n * g.c + c) * g.hw;
        float dgam = 0.0f, dbet = 0.0f, sg = 0.0f, sgx = 0.0f;
#pragma omp simd reduction(+ : dgam, dbet, sg, sgx)
        for (int64_t e = 0; e < g.hw; e++) {
          float xhat = (xs[e] - mean) * rstd, dz = dys[e];
          if (silu) {
            float z = xhat * gamma[c] + beta[c], s = 1.0f / (1.0f + exp_approx(-z));
            dz = dz * (s + z * s * (1.0f - s));
          }
          dgam += dz * xhat;
          dbet += dz;
          float gval = dz * gamma[c];
          gs[e] = gval;
          sg += gval;
          sgx += gval * xhat;
        }
        dgamma[c] += dgam;
        dbeta[c] += dbet;
        sum_g += sg;
        sum_gx += sgx;
      }
      const float mean_g = static_cast<float>(sum_g / count), mean_gx = static_cast<float>(sum_gx / count);
      for (int64_t c = grp * g.cg; c < (grp + 1) * g.cg; c++) {
        const float *xs = x + (n * g.c + c) * g.hw;
        float *gs = dx + (n * g.c + c) * g.hw;
#pragma omp simd
        for (int64_t e = 0; e < g.hw; e++) {
          float xhat = (xs[e] - mean) * rstd;
          gs[e] = rstd * (gs[e] - mean_g - xhat * mean_gx);
        }
      }
    }
  }
  return 0;
}

}  // namespace

extern "C" {

// input x -> cols
int im2col_same(int, void **p, int *, int64_t **s, const char **, void *, void *) {
  im2col(static_cast<const float *>(p[0]), static_cast<float *>(p[1]), geometry(s[0], s[1], false));
  return 0;
}
int im2col_down(int, void **p, int *, int64_t **s, const char **, void *, void *) {
  im2col(static_cast<const float *>(p[0]), static_cast<float *>(p[1]), geometry(s[0], s[1], true));
  return 0;
}
// inputs dcols, carrier (N, C, 1, 1) (it gives the Python side C for the output shape) -> dx (N, C, H, W)
int col2im_same(int, void **p, int *, int64_t **s, const char **, void *, void *) {
  col2im(static_cast<const float *>(p[0]), static_cast<float *>(p[2]), geometry(s[2], s[0], false));
  return 0;
}
int col2im_down(int, void **p, int *, int64_t **s, const char **, void *, void *) {
  col2im(static_cast<const float *>(p[0]), static_cast<float *>(p[2]), geometry(s[2], s[0], true));
  return 0;
}
int group_norm_fwd(int, void **p, int *, int64_t **s, const char **, void *, void *) { return group_norm(p, s, false); }
int group_norm_silu_fwd(int, void **p, int *, int64_t **s, const char **, void *, void *) {
  return group_norm(p, s, true);
}
int group_norm_bwd(int, void **p, int *, int64_t **s, const char **, void *, void *) {
  return group_norm_backward(p, s, false);
}
int group_norm_silu_bwd(int, void **p, int *, int64_t **s, const char **, void *, void *) {
  return group_norm_backward(p, s, true);
}

}  // extern "C"

// ---- Winograd minimal filtering for 3x3 stride-1 "same" convolutions (Lavin & Gray 2016) -------
// F(m x m, 3x3) turns each (m+2) x (m+2) input tile into A2 = (m+2)^2 planes, multiplies plane by
// plane (A2 batched matmuls (O, C) x (C, tiles), done by MindSpore's matmul), then folds each plane
// stack back to an m x m output tile: 9 m^2 / (m+2)^2 the multiplications of the direct conv
// (m=2: 2.25x fewer, m=4: 4x). Three kernels per tile size:
//   winograd{m}_weight: w (O, C, 3, 3) -> U (A2, O, C),                 U = G w G^T
//   winograd{m}_input:  x (N, C, H, W) -> V (A2, C, N*T),  T = ceil(H/m) * ceil(W/m), V = B^T d B
//   winograd{m}_output: M (A2, O, N*T), b (O,), x (N, C, H, W) (shape only) -> y (N, O, H, W),
//                       y = A^T M A + b, cropped to H x W
// Each transform is fused: a tile is read once, transformed in registers and written once.
namespace {

template <int M> struct Wino;

// G in double: wino_weight computes U = G w G^T in double and rounds once (G's 1/6, 16/15 ... are not
// binary fractions; float G and a float t rounded three times, measured 1.5x the error in U)
template <> struct Wino<2> {
  static constexpr int A = 4;
  static constexpr float BT[4][4] = {{1, 0, -1, 0}, {0, 1, 1, 0}, {0, -1, 1, 0}, {0, 1, 0, -1}};
  static constexpr double G[4][3] = {{1, 0, 0}, {0.5, 0.5, 0.5}, {0.5, -0.5, 0.5}, {0, 0, 1}};
  static constexpr float AT[2][4] = {{1, 1, 1, 0}, {0, 1, -1, -1}};
};

// Interpolation points 0, 1, -1, 1/2, -2 and infinity (Barabasz et al. 2020, "Error analysis and
// improving the accuracy of Winograd convolution for deep neural networks": the most accurate set
// of five for F(4, 3)), not Lavin & Gray's 0, +-1, +-2: with those F(4x4) deviated 1.0-1.6e-5 from
// the direct conv on the VAE's shapes, over conv_select's 5e-6 limit; a float32 model of this kernel
// (same transforms and order, 512 channels) gives 4.3e-6 for this set against 1.1e-5, and 1.2e-5 for
// the symmetric 0, +-1, +-1/2. AT (powers of the points) and BT (Toom-Cook, each row scaled to coprime
// integers) are exact in float32; the fractions go into G, which is applied in double.
template <> struct Wino<4> {
  static constexpr int A = 6;
  static constexpr float BT[6][6] = {{2, -3, -4, 3, 2, 0}, {0, 2, -1, -5, -2, 0}, {0, 2, -5, 1, 2, 0},
                                     {0, 2, 1, -2, -1, 0},   {0, 1, -2, -1, 2, 0}, {0, 2, -3, -4, 3, 2}};
  static constexpr double G[6][3] = {{1.0 / 2, 0, 0},
                                     {-1.0 / 6, -1.0 / 6, -1.0 / 6},
                                     {-1.0 / 6, 1.0 / 6, -1.0 / 6},
                                     {16.0 / 15, 8.0 / 15, 4.0 / 15},
                                     {1.0 / 30, -1.0 / 15, 2.0 / 15},
                                     {0, 0, 1.0 / 2}};
  static constexpr float AT[4][6] = {{1, 1, 1, 1, 1, 0}, {0, 1, -1, 0.5f, -2, 0}, {0, 1, 1, 0.25f, 4, 0},
                                     {0, 1, -1, 0.125f, -8, 1}};
};

// A block of kWeightBlock (o, c) filters at a time, filter index innermost: the loops vectorise and
// each of the A2 planes of U is written as one contiguous run. (One filter at a time wrote A2 strided
// streams: 24 ms for a 512 x 512 layer's F(2x2) transform, 61 ms for F(4x4), as long as the
// 32 x 32 conv itself, on every call.)
constexpr int64_t kWeightBlock = 64;

template <int M>
void wino_weight(const float *w, float *u, int64_t o, int64_t c) {
  using W = Wino<M>;
  constexpr int A = W::A;
  const int64_t plane = o * c;
  double g[9][kWeightBlock], t[A][3][kWeightBlock];  // the block's filters, then G g
  for (int64_t b0 = 0; b0 < plane; b0 += kWeightBlock) {
    const int64_t nb = std::min(kWeightBlock, plane - b0);
    for (int64_t q = 0; q < nb; q++)
      for (int k = 0; k < 9; k++) g[k][q] = w[(b0 + q) * 9 + k];
    for (int a = 0; a < A; a++)
      for (int j = 0; j < 3; j++) {
#pragma omp simd
        for (int64_t q = 0; q < nb; q++) t[a][j][q] = W::G[a][0] * g[j][q] + W::G[a][1] * g[3 + j][q] + W::G[a][2] * g[6 + j][q];
      }
    for (int a = 0; a < A; a++)
      for (int b = 0; b < A; b++) {
        float *dst = u + (a * A + b) * plane + b0;
#pragma omp simd
        for (int64_t q = 0; q < nb; q++)
          dst[q] = static_cast<float>(t[a][0][q] * W::G[b][0] + t[a][1][q] * W::G[b][1] + t[a][2][q] * W::G[b][2]);
      }
  }
}

// Tiles of one row of tiles are transformed together, tile index innermost, so that each of the A2
// output planes is written as one contiguous run (and the loops over tiles vectorise).
template <int M>
void wino_input(const float *x, float *v, int64_t n, int64_t c, int64_t h, int64_t w) {
  using W = Wino<M>;
  constexpr int A = W::A;
  const int64_t th = (h + M - 1) / M, tw = (w + M - 1) / M, tiles = th * tw, cols = n * tiles;
  const int64_t pw = tw * M + 2;  // padded row: 1 zero left, the row, zeros to the last tile's end
  float *rows = new float[A * pw];
  float *d = new float[A * A * tw];  // (A, A, tw): the tiles of one tile row, then transformed in place
  for (int64_t b = 0; b < n; b++) {
    for (int64_t ch = 0; ch < c; ch++) {
      const float *src = x + (b * c + ch) * h * w;
      float *dst = v + ch * cols + b * tiles;
      for (int64_t ty = 0; ty < th; ty++) {
        for (int i = 0; i < A; i++) {  // the A input rows of this tile row, zero padded
          float *r = rows + i * pw;
          const int64_t y = ty * M + i - 1;
          std::memset(r, 0, pw * sizeof(float));
          if (y >= 0 && y < h) std::memcpy(r + 1, src + y * w, w * sizeof(float));
        }
        for (int i = 0; i < A; i++) {  // row transform: t[a][i] = sum_j BT[a][j] * d[i][j] (per column)
          const float *r = rows + i * pw;
          for (int a = 0; a < A; a++) {
            float *out = d + (i * A + a) * tw;
#pragma omp simd
            for (int64_t t = 0; t < tw; t++) {
              float s = 0.0f;
              for (int j = 0; j < A; j++) s += W::BT[a][j] * r[t * M + j];
              out[t] = s;
            }
          }
        }
        for (int a = 0; a < A; a++) {  // column transform: V[a'][a] = sum_i BT[a'][i] * t[i][a]
          for (int a2 = 0; a2 < A; a2++) {
            float *out = dst + (a2 * A + a) * c * cols + ty * tw;
#pragma omp simd
            for (int64_t t = 0; t < tw; t++) {
              float s = 0.0f;
              for (int i = 0; i < A; i++) s += W::BT[a2][i] * d[(i * A + a) * tw + t];
              out[t] = s;
            }
          }
        }
      }
    }
  }
  delete[] rows;
  delete[] d;
}

template <int M>
void wino_output(const float *m, const float *bias, float *y, int64_t n, int64_t o, int64_t h, int64_t w) {
  using W = Wino<M>;
  constexpr int A = W::A;
  const int64_t th = (h + M - 1) / M, tw = (w + M - 1) / M, tiles = th * tw, cols = n * tiles;
  float *t = new float[M * A * tw];    // (M, A, tw): A^T applied down the columns
  float *out = new float[M * M * tw];  // (M, M, tw)
  for (int64_t b = 0; b < n; b++) {
    for (int64_t oc = 0; oc < o; oc++) {
      const float *src = m + oc * cols + b * tiles;
      float *dst = y + (b * o + oc) * h * w;
      const float bo = bias[oc];
      for (int64_t ty = 0; ty < th; ty++) {
        for (int r = 0; r < M; r++) {
          for (int a = 0; a < A; a++) {
            float *tr = t + (r * A + a) * tw;
#pragma omp simd
            for (int64_t q = 0; q < tw; q++) {
              float s = 0.0f;
              for (int i = 0; i < A; i++) s += W::AT[r][i] * src[(i * A + a) * o * cols + ty * tw + q];
              tr[q] = s;
            }
          }
          for (int s2 = 0; s2 < M; s2++) {
            float *orow = out + (r * M + s2) * tw;
#pragma omp simd
            for (int64_t q = 0; q < tw; q++) {
              float s = bo;
              for (int a = 0; a < A; a++) s += W::AT[s2][a] * t[(r * A + a) * tw + q];
              orow[q] = s;
            }
          }
        }
        for (int r = 0; r < M; r++) {  // scatter the tiles' rows into the image, cropped
          const int64_t yy = ty * M + r;
          if (yy >= h) break;
          float *drow = dst + yy * w;
          for (int64_t q = 0; q < tw; q++)
            for (int s2 = 0; s2 < M; s2++) {
              const int64_t xx = q * M + s2;
              if (xx < w) drow[xx] = out[(r * M + s2) * tw + q];
            }
        }
      }
    }
  }
  delete[] t;
  delete[] out;
}

}  // namespace

extern "C" {

int winograd2_weight(int, void **p, int *, int64_t **s, const char **, void *, void *) {
  wino_weight<2>(static_cast<const float *>(p[0]), static_cast<float *>(p[1]), s[0][0], s[0][1]);
  return 0;
}
int winograd4_weight(int, void **p, int *, int64_t **s, const char **, void *, void *) {
  wino_weight<4>(static_cast<const float *>(p[0]), static_cast<float *>(p[1]), s[0][0], s[0][1]);
  return 0;
}
int winograd2_input(int, void **p, int *, int64_t **s, const char **, void *, void *) {
  wino_input<2>(static_cast<const float *>(p[0]), static_cast<float *>(p[1]), s[0][0], s[0][1], s[0][2], s[0][3]);
  return 0;
}
int winograd4_input(int, void **p, int *, int64_t **s, const char **, void *, void *) {
  wino_input<4>(static_cast<const float *>(p[0]), static_cast<float *>(p[1]), s[0][0], s[0][1], s[0][2], s[0][3]);
  return 0;
}
// inputs M (A2, O, N*T), b (O,), x (N, C, H, W) -> y (N, O, H, W)
int winograd2_output(int, void **p, int *, int64_t **s, const char **, void *, void *) {
  wino_output<2>(static_cast<const float *>(p[0]), static_cast<const float *>(p[1]), static_cast<float *>(p[3]),
                 s[2][0], s[1][0], s[2][2], s[2][3]);
  return 0;
}
int winograd4_output(int, void **p, int *, int64_t **s, const char **, void *, void *) {
  wino_output<4>(static_cast<const float *>(p[0]), static_cast<const float *>(p[1]), static_cast<float *>(p[3]),
                 s[2][0], s[1][0], s[2][2], s[2][3]);
  return 0;
}

}  // extern "C"

// ---- VAE: Winograd convolution a band of tiles at a time (no full-size transform buffer) ---------
// winograd{m}_fused: x (N, C, H, W), w (O, C, 3, 3), b (O,) -> y (N, O, H, W).
// The separate kernels above need V (A2, C, N*T) and M (A2, O, N*T) for the whole batch at once:
// 16x the input and 16x the output for F(2x2) (268 MB + 134 MB for the decoder's 256 -> 128
// channel conv at 256 px), which set the VAE's peak memory. Here a band of tile rows (~256 tiles)
// is input-transformed into a small V, multiplied plane by plane (A2 GEMMs (O, C) x (C, band)),
// and output-transformed straight into y: the working memory is A2 * (C + O) * band floats (a few
// MB), and V and M stay in cache between the steps. The GEMM is oneDNN's sgemm, which MindSpore
// itself ships (libdnnl, found with dlsym once models/cpu_kernels.py has made it global), each call
// sequential (no threadpool); where it cannot be found a plain blocked loop does the same sums
// (slower, same rounding class). The independent (image, band) work items are split over the intra-op
// thread count (latte_set_threads, from runtime.setup_device's cpu_threads): each worker has its own
// scratch and each band's arithmetic is the same whichever worker does it, so the output is
// bit-identical for any thread count. (These kernels are nearly all of the VAE's work: on one core,
// `--cpu_threads 8` would leave seven idle.)
#include <dlfcn.h>

#include <atomic>
#include <memory>
#include <mutex>
#include <system_error>
#include <thread>
#include <vector>

namespace {

std::atomic<int> g_band_threads{1};  // set by latte_set_threads; 1 until models/cpu_kernels.py sets it

// work(worker, item) for every item in [0, items), over min(threads, items) workers (this thread is
// worker 0). Items are taken from a shared counter, so an uneven machine still keeps every worker busy;
// a thread that cannot be started leaves its share to the others.
template <class Work>
void for_each_item(int64_t items, int workers, Work &&work) {
  std::atomic<int64_t> next{0};
  auto loop = [&](int worker) {
    for (int64_t i = next.fetch_add(1); i < items; i = next.fetch_add(1)) work(worker, i);
  };
  std::vector<std::thread> pool;
  for (int k = 1; k < workers; k++) {
    try {
      pool.emplace_back(loop, k);
    } catch (const std::system_error &) {
      break;
    }
  }
  loop(0);
  for (auto &t : pool) t.join();
}

int band_workers(int64_t items) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(g_band_threads.load(), items)));
}

std::unique_ptr<float[]> scratch(int64_t count) { return std::unique_ptr<float[]>(new float[count]); }

// The Winograd convolution's big buffers, kept between calls and grown to the largest request. The
// weight transform U and a band's V and M were fresh 5-40 MB allocations per call, which the kernel
// maps as zero-filled 4 KB pages one fault at a time: 55k faults and 0.15-0.2 s of system time per
// encoded 256 px frame (perf -e page-faults: wino_weight, band_input and the GEMM's writes). One set
// for the process (the largest, a 512-channel F(4x4) conv's: ~75 MB, held for the process' life): a
// call that finds it taken (MindSpore may run two convs at once) allocates its own as before.
class Reused {
 public:
  float *get(int64_t count) {
    if (count > size_) {
      data_.reset();  // the old one first: never both alive
      data_.reset(new float[count]);
      size_ = count;
    }
    return data_.get();
  }

 private:
  std::unique_ptr<float[]> data_;
  int64_t size_ = 0;
};
struct WinoBuffers {
  std::mutex busy;
  Reused u, v, m;
} g_wino_buffers;

using SgemmFn = int (*)(char, char, int64_t, int64_t, int64_t, float, const float *, int64_t, const float *,
                        int64_t, float, float *, int64_t, void *);

SgemmFn find_sgemm() {
  static SgemmFn fn = nullptr;  // looked up until found (models/cpu_kernels.py makes libdnnl global first)
  if (!fn) fn = reinterpret_cast<SgemmFn>(dlsym(RTLD_DEFAULT, "dnnl_threadpool_interop_sgemm"));
  return fn;
}

// C (m, n) = A (m, k) x B (k, n), all row-major and dense
void gemm_nn(int64_t m, int64_t n, int64_t k, const float *a, const float *b, float *c) {
  SgemmFn sgemm = find_sgemm();
  if (sgemm && sgemm('N', 'N', m, n, k, 1.0f, a, k, b, n, 0.0f, c, n, nullptr) == 0) return;
  for (int64_t i = 0; i < m; i++) {
    float *ci = c + i * n;
    std::memset(ci, 0, n * sizeof(float));
    for (int64_t p = 0; p < k; p++) {
      const float av = a[i * k + p];
      const float *bp = b + p * n;
#pragma omp simd
      for (int64_t j = 0; j < n; j++) ci[j] += av * bp[j];
    }
  }
}

// V (A2, C, band) of the tile rows [ty0, ty1) of image plane stack `x` (C, H, W), channels [c0, c1)
template <int M>
void band_input(const float *x, float *v, int64_t c, int64_t h, int64_t w, int64_t ty0, int64_t ty1,
                float *rows, float *d, int64_t c0, int64_t c1) {
  using W = Wino<M>;
  constexpr int A = W::A;
  const int64_t tw = (w + M - 1) / M, pw = tw * M + 2, band = (ty1 - ty0) * tw;
  for (int64_t ch = c0; ch < c1; ch++) {
    const float *src = x + ch * h * w;
    float *dst = v + ch * band;
    for (int64_t ty = ty0; ty < ty1; ty++) {
      for (int i = 0; i < A; i++) {
        float *r = rows + i * pw;
        const int64_t y = ty * M + i - 1;
        std::memset(r, 0, pw * sizeof(float));
        if (y >= 0 && y < h) std::memcpy(r + 1, src + y * w, w * sizeof(float));
      }
      for (int i = 0; i < A; i++) {
        const float *r = rows + i * pw;
        for (int a = 0; a < A; a++) {
          float *out = d + (i * A + a) * tw;
#pragma omp simd
          for (int64_t t = 0; t < tw; t++) {
            float s = 0.0f;
            for (int j = 0; j < A; j++) s += W::BT[a][j] * r[t * M + j];
            out[t] = s;
          }
        }
      }
      for (int a = 0; a < A; a++) {
        for (int a2 = 0; a2 < A; a2++) {
          float *out = dst + (a2 * A + a) * c * band + (ty - ty0) * tw;
#pragma omp simd
          for (int64_t t = 0; t < tw; t++) {
            float s = 0.0f;
            for (int i = 0; i < A; i++) s += W::BT[a2][i] * d[(i * A + a) * tw + t];
            out[t] = s;
          }
        }
      }
    }
  }
}

// y rows of the tile rows [ty0, ty1) from M (A2, O, band), plus the bias, output channels [o0, o1)
template <int M>
void band_output(const float *m, const float *bias, float *y, int64_t o, int64_t h, int64_t w, int64_t ty0,
                 int64_t ty1, float *t, float *out, int64_t o0, int64_t o1) {
  using W = Wino<M>;
  constexpr int A = W::A;
  const int64_t tw = (w + M - 1) / M, band = (ty1 - ty0) * tw;
  for (int64_t oc = o0; oc < o1; oc++) {
    const float *src = m + oc * band;
    float *dst = y + oc * h * w;
    const float bo = bias[oc];
    for (int64_t ty = ty0; ty < ty1; ty++) {
      const int64_t off = (ty - ty0) * tw;
      for (int r = 0; r < M; r++) {
        for (int a = 0; a < A; a++) {
          float *tr = t + (r * A + a) * tw;
#pragma omp simd
          for (int64_t q = 0; q < tw; q++) {
            float s = 0.0f;
            for (int i = 0; i < A; i++) s += W::AT[r][i] * src[(i * A + a) * o * band + off + q];
            tr[q] = s;
          }
        }
        for (int s2 = 0; s2 < M; s2++) {
          float *orow = out + (r * M + s2) * tw;
#pragma omp simd
          for (int64_t q = 0; q < tw; q++) {
            float s = bo;
            for (int a = 0; a < A; a++) s += W::AT[s2][a] * t[(r * A + a) * tw + q];
            orow[q] = s;
          }
        }
      }
      for (int r = 0; r < M; r++) {
        const int64_t yy = ty * M + r;
        if (yy >= h) break;
        float *drow = dst + yy * w;
        for (int64_t q = 0; q < tw; q++)
          for (int s2 = 0; s2 < M; s2++) {
            const int64_t xx = q * M + s2;
            if (xx < w) drow[xx] = out[(r * M + s2) * tw + q];
          }
      }
    }
  }
}

constexpr int64_t kBandTiles = 256;  // tiles per band: GEMMs wide enough for sgemm, V and M a few MB

template <int M>
void wino_fused(const float *x, const float *wt, const float *bias, float *y, int64_t n, int64_t c, int64_t o,
                int64_t h, int64_t w) {
  constexpr int A = Wino<M>::A;
  constexpr int A2 = A * A;
  // U = G w G^T here rather than as a graph tensor: MindSpore's runtime may compute every layer's
  // (weight-only) transform ahead of its conv and hold them all (16/9 of the weights for F(2x2))
  std::unique_lock<std::mutex> kept(g_wino_buffers.busy, std::try_to_lock);
  std::unique_ptr<float[]> u_own, v_own, m_own;  // when another call holds the kept buffers
  auto buffer = [&](Reused &reused, std::unique_ptr<float[]> &own, int64_t count) {
    if (kept.owns_lock()) return reused.get(count);
    own = scratch(count);
    return own.get();
  };
  float *u = buffer(g_wino_buffers.u, u_own, A2 * o * c);
  wino_weight<M>(wt, u, o, c);
  const int64_t th = (h + M - 1) / M, tw = (w + M - 1) / M, pw = tw * M + 2;
  const int64_t band_rows = std::max<int64_t>(1, std::min<int64_t>(th, kBandTiles / tw));
  const int64_t max_band = band_rows * tw, bands = (th + band_rows - 1) / band_rows;
  // per worker: V, M of one band (worker 0's the kept ones, see Reused) and the transforms' row
  // buffers (a few hundred KB)
  struct Scratch {
    float *v = nullptr, *mm = nullptr;
    std::unique_ptr<float[]> v_own, mm_own, rows, d, t, out;
  };
  const int workers = band_workers(n * bands);
  std::vector<Scratch> per(workers);
  for (int k = 0; k < workers; k++) {
    Scratch &s = per[k];
    if (k == 0) {
      s.v = buffer(g_wino_buffers.v, v_own, A2 * c * max_band);
      s.mm = buffer(g_wino_buffers.m, m_own, A2 * o * max_band);
    } else {
      s.v_own = scratch(A2 * c * max_band), s.mm_own = scratch(A2 * o * max_band);
      s.v = s.v_own.get(), s.mm = s.mm_own.get();
    }
    s.rows = scratch(A * pw), s.d = scratch(A * A * tw), s.t = scratch(M * A * tw), s.out = scratch(M * M * tw);
  }
  if (n * bands >= g_band_threads.load()) {  // enough bands: one band per work item
    for_each_item(n * bands, workers, [&](int worker, int64_t item) {
      Scratch &s = per[worker];
      const int64_t b = item / bands, ty0 = (item % bands) * band_rows;
      const int64_t ty1 = std::min(th, ty0 + band_rows), band = (ty1 - ty0) * tw;
      band_input<M>(x + b * c * h * w, s.v, c, h, w, ty0, ty1, s.rows.get(), s.d.get(), 0, c);
      for (int a2 = 0; a2 < A2; a2++)
        gemm_nn(o, band, c, u + a2 * o * c, s.v + a2 * c * band, s.mm + a2 * o * band);
      band_output<M>(s.mm, bias, y + b * o * h * w, o, h, w, ty0, ty1, s.t.get(), s.out.get(), 0, o);
    });
  } else {
    // Fewer bands than threads (the 32 x 32, 512-channel layers are one band): split each band's
    // steps instead, input channels, then the A2 GEMMs, then output channels, sharing worker 0's V
    // and M. Every value is computed by the same loop or the same GEMM call as above.
    const int split = std::min(g_band_threads.load(), A2);
    std::vector<Scratch> rowbufs(split);
    for (auto &s : rowbufs)
      s.rows = scratch(A * pw), s.d = scratch(A * A * tw), s.t = scratch(M * A * tw), s.out = scratch(M * M * tw);
    float *v = per[0].v, *mm = per[0].mm;
    for (int64_t b = 0; b < n; b++) {
      for (int64_t ty0 = 0; ty0 < th; ty0 += band_rows) {
        const int64_t ty1 = std::min(th, ty0 + band_rows), band = (ty1 - ty0) * tw;
        for_each_item(split, split, [&](int worker, int64_t part) {
          band_input<M>(x + b * c * h * w, v, c, h, w, ty0, ty1, rowbufs[worker].rows.get(),
                        rowbufs[worker].d.get(),
                        c * part / split, c * (part + 1) / split);
        });
        for_each_item(A2, split, [&](int, int64_t a2) {
          gemm_nn(o, band, c, u + a2 * o * c, v + a2 * c * band, mm + a2 * o * band);
        });
        for_each_item(split, split, [&](int worker, int64_t part) {
          band_output<M>(mm, bias, y + b * o * h * w, o, h, w, ty0, ty1, rowbufs[worker].t.get(),
                         rowbufs[worker].out.get(), o * part / split, o * (part + 1) / split);
        });
      }
    }
  }
}

}  // namespace

extern "C" {

// inputs x (N, C, H, W), w (O, C, 3, 3), b (O,) -> y (N, O, H, W)
int winograd2_fused(int, void **p, int *, int64_t **s, const char **, void *, void *) {
  wino_fused<2>(static_cast<const float *>(p[0]), static_cast<const float *>(p[1]), static_cast<const float *>(p[2]),
                static_cast<float *>(p[3]), s[0][0], s[0][1], s[1][0], s[0][2], s[0][3]);
  return 0;
}
int winograd4_fused(int, void **p, int *, int64_t **s, const char **, void *, void *) {
  wino_fused<4>(static_cast<const float *>(p[0]), static_cast<const float *>(p[1]), static_cast<const float *>(p[2]),
                static_cast<float *>(p[3]), s[0][0], s[0][1], s[1][0], s[0][2], s[0][3]);
  return 0;
}
// 1 when the GEMM is oneDNN's sgemm, 0 when it is the plain loop (for the bench's report)
int winograd_sgemm_found() { return find_sgemm() != nullptr; }
// Workers for the banded VAE convolutions (winograd{m}_fused, conv_band_*); below 1 means 1.
// models/cpu_kernels.py calls it with runtime.setup_device's intra-op thread count.
void latte_set_threads(int threads) { g_band_threads.store(std::max(1, threads)); }
int latte_get_threads() { return g_band_threads.load(); }

}  // extern "C"

// ---- VAE: im2col convolution a band of output rows at a time ---------------------------------------
// conv_band_{same,down}: x (N, C, H, W), w (O, C, k, k), b (O,) -> y (N, O, Ho, Wo) (Ho, Wo = H, W for "same", H/2, W/2 for "down"). The same sums as im2col_* + one matmul, but
// the im2col matrix of only ~256 output pixels exists at a time ((k*k*C + 1) x band floats, <= 10 MB)
// instead of the whole (N, k*k*C + 1, Ho*Wo) one (151 MB for a 256-channel 128 x 128 conv, 604 MB
// for the decoder's 256-channel 256 x 256 one), and each band's GEMM writes straight into y's rows.
namespace {

// C (m, n) with row pitch ldc = A (m, k) x B (k, n)
void gemm_nn_ld(int64_t m, int64_t n, int64_t k, const float *a, const float *b, float *c, int64_t ldc) {
  SgemmFn sgemm = find_sgemm();
  if (sgemm && sgemm('N', 'N', m, n, k, 1.0f, a, k, b, n, 0.0f, c, ldc, nullptr) == 0) return;
  for (int64_t i = 0; i < m; i++) {
    float *ci = c + i * ldc;
    std::memset(ci, 0, n * sizeof(float));
    for (int64_t p = 0; p < k; p++) {
      const float av = a[i * k + p];
      const float *bp = b + p * n;
#pragma omp simd
      for (int64_t j = 0; j < n; j++) ci[j] += av * bp[j];
    }
  }
}

int conv_band(void **params, int64_t **shapes, bool down) {
  const float *x = static_cast<const float *>(params[0]);
  const float *wt = static_cast<const float *>(params[1]);
  const float *bias = static_cast<const float *>(params[2]);
  float *y = static_cast<float *>(params[3]);
  ConvGeometry g;
  g.n = shapes[0][0], g.c = shapes[0][1], g.h = shapes[0][2], g.w = shapes[0][3];
  g.ho = down ? g.h / 2 : g.h, g.wo = down ? g.w / 2 : g.w;
  g.k = shapes[1][2];
  const int64_t o = shapes[1][0], rows = g.k * g.k * g.c + 1;
  // the (O, k*k*C + 1) weight matrix of vae_layers.weight_matrix (column (i*k + j)*C + c, bias last),
  // built here rather than as a graph tensor (see wino_fused)
  float *wm = new float[o * rows];
  for (int64_t oc = 0; oc < o; oc++) {
    for (int64_t c = 0; c < g.c; c++)
      for (int64_t t = 0; t < g.k * g.k; t++) wm[oc * rows + t * g.c + c] = wt[(oc * g.c + c) * g.k * g.k + t];
    wm[oc * rows + rows - 1] = bias[oc];
  }
  g.stride = down ? 2 : 1;
  g.pad = down ? 0 : (g.k - 1) / 2;
  const int64_t band_rows = std::max<int64_t>(1, std::min<int64_t>(g.ho, kBandTiles / g.wo));
  const int64_t bands = (g.ho + band_rows - 1) / band_rows;
  const int workers = band_workers(g.n * bands);
  std::vector<std::unique_ptr<float[]>> cols(workers);  // one band's im2col matrix per worker
  for (auto &buf : cols) buf = scratch(rows * band_rows * g.wo);
  for_each_item(g.n * bands, workers, [&](int worker, int64_t item) {
    const int64_t n = item / bands, r0 = (item % bands) * band_rows, r1 = std::min(g.ho, r0 + band_rows);
    float *yn = y + n * o * g.ho * g.wo;
    im2col_rows(x + n * g.c * g.h * g.w, cols[worker].get(), g, r0, r1);
    gemm_nn_ld(o, (r1 - r0) * g.wo, rows, wm, cols[worker].get(), yn + r0 * g.wo, g.ho * g.wo);
  });
  delete[] wm;
  return 0;
}

}  // namespace

extern "C" {

int conv_band_same(int, void **p, int *, int64_t **s, const char **, void *, void *) { return conv_band(p, s, false); }
int conv_band_down(int, void **p, int *, int64_t **s, const char **, void *, void *) { return conv_band(p, s, true); }

}  // extern "C"

// ---- Latte: the Linear layers' matmuls on oneDNN's sgemm (models/dense_select.py) --------------------
// MindSpore's CPU MatMul ran Latte-S/2's block matmuls at ~0.7x torch's speed (bench_train
// --block_matmuls); oneDNN's sgemm, which MindSpore itself ships (libdnnl), ran them 1.1-1.3x faster
// than MatMul on one thread. These kernels are a Linear's forward and backward on that sgemm:
// y = x w^T (+ b), dx = dy w, dw = dy^T x, db = column sums of dy. Single-threaded (nullptr threadpool),
// so with more intra-op threads MindSpore's threaded MatMul may win: dense_select measures which.
// Where sgemm cannot be found the plain loop below gives the same sums (slow; dense_select then never
// picks this path, see dense_sgemm_found).
// At more than one intra-op thread (latte_set_threads) the sgemm gets a threadpool (DensePool below):
// MindSpore's libdnnl is built for oneDNN's threadpool runtime, where a null pool means one thread.
#include <time.h>

#include <functional>

namespace {

// oneDNN's threadpool interface (include/dnnl_threadpool_iface.hpp, unchanged through oneDNN 3.x): the
// sgemm calls it through this vtable, so the declaration order is the ABI.
struct ThreadpoolIface {
  virtual int get_num_threads() const = 0;
  virtual bool get_in_parallel() const = 0;
  virtual void parallel_for(int n, const std::function<void(int, int)> &fn) = 0;
  virtual uint64_t get_flags() const = 0;  // 0: synchronous, parallel_for returns when every fn has run
  virtual ~ThreadpoolIface() {}
};

std::atomic<int64_t> g_dense_pool_splits{0};  // parallel_for calls so far (dense_pool_splits: for tests)

// for_each_item's workers (threads started per call, the calling thread is worker 0) behind that
// interface. get_in_parallel, true on every thread while it runs an item, tells oneDNN not to nest a
// parallel_for inside one of ours.
class DensePool final : public ThreadpoolIface {
 public:
  explicit DensePool(int threads) : threads_(threads) {}
  int get_num_threads() const override { return threads_; }
  bool get_in_parallel() const override { return in_parallel_; }
  void parallel_for(int n, const std::function<void(int, int)> &fn) override {
    g_dense_pool_splits.fetch_add(1);
    for_each_item(n, std::min(threads_, n), [&](int, int64_t i) {
      in_parallel_ = true;
      fn(static_cast<int>(i), n);
      in_parallel_ = false;
    });
  }
  uint64_t get_flags() const override { return 0; }

 private:
  int threads_;
  static thread_local bool in_parallel_;
};
thread_local bool DensePool::in_parallel_ = false;

// row-major C (m, n) = op(A) op(B) + beta C, op = transpose when ta/tb is 'T' (oneDNN's convention)
void dense_gemm(char ta, char tb, int64_t m, int64_t n, int64_t k, const float *a, int64_t lda, const float *b,
                int64_t ldb, float beta, float *c, int64_t ldc) {
  SgemmFn sgemm = find_sgemm();
  const int threads = g_band_threads.load();
  DensePool pool(threads);
  if (sgemm && sgemm(ta, tb, m, n, k, 1.0f, a, lda, b, ldb, beta, c, ldc, threads > 1 ? &pool : nullptr) == 0) return;
  for (int64_t i = 0; i < m; i++) {
    float *ci = c + i * ldc;
    for (int64_t j = 0; j < n; j++) ci[j] = beta == 0.0f ? 0.0f : beta * ci[j];
    for (int64_t p = 0; p < k; p++) {
      const float av = ta == 'T' ? a[p * lda + i] : a[i * lda + p];
      for (int64_t j = 0; j < n; j++) ci[j] += av * (tb == 'T' ? b[j * ldb + p] : b[p * ldb + j]);
    }
  }
}

// Rows of the weight gradient's reduction per sgemm call. dW = dy^T x sums over all M = 4096 tokens;
// handed to oneDNN as one call, the two largest of Latte-S/2's (384->1536, 1536->384) ran at 61-73
// GFLOP/s against 95-109 for the same shapes' forward; as 512-row slices accumulated into dW (beta = 1)
// they ran 3-21 % faster (three interleaved runs, best of 6-10 each, AVX-512 host, one thread, load
// 9-13; 256 rows about the same, 1024-2048 less), the smaller two within +-2 %. The sums are the same
// products in another order.
constexpr int64_t kWeightGradRows = 512;

// dw (n, k) = dy (m, n)^T x (m, k), the reduction over m in kWeightGradRows slices
void dense_weight_grad(int64_t m, int64_t n, int64_t k, const float *dy, const float *x, float *dw) {
  if (m == 0) std::memset(dw, 0, n * k * sizeof(float));
  for (int64_t r = 0; r < m; r += kWeightGradRows) {
    const int64_t rows = std::min(kWeightGradRows, m - r);
    dense_gemm('T', 'N', n, k, rows, dy + r * n, n, x + r * k, k, r ? 1.0f : 0.0f, dw, k);
  }
}

}  // namespace

extern "C" {

// x (M, K), w (N, K) -> y (M, N) = x w^T
int dense_nt(int, void **p, int *, int64_t **s, const char **, void *, void *) {
  const int64_t m = s[0][0], k = s[0][1], n = s[1][0];
  dense_gemm('N', 'T', m, n, k, static_cast<const float *>(p[0]), k, static_cast<const float *>(p[1]), k, 0.0f,
             static_cast<float *>(p[2]), n);
  return 0;
}

// x (M, K), w (N, K), b (N,) -> y (M, N) = x w^T + b (y starts as b's rows, then beta = 1)
int dense_bias_nt(int, void **p, int *, int64_t **s, const char **, void *, void *) {
  const int64_t m = s[0][0], k = s[0][1], n = s[1][0];
  const float *b = static_cast<const float *>(p[2]);
  float *y = static_cast<float *>(p[3]);
  for (int64_t i = 0; i < m; i++) std::memcpy(y + i * n, b, n * sizeof(float));
  dense_gemm('N', 'T', m, n, k, static_cast<const float *>(p[0]), k, static_cast<const float *>(p[1]), k, 1.0f, y, n);
  return 0;
}

// dy (M, N), w (N, K) -> dx (M, K) = dy w
int dense_nn(int, void **p, int *, int64_t **s, const char **, void *, void *) {
  const int64_t m = s[0][0], n = s[0][1], k = s[1][1];
  dense_gemm('N', 'N', m, k, n, static_cast<const float *>(p[0]), n, static_cast<const float *>(p[1]), k, 0.0f,
             static_cast<float *>(p[2]), k);
  return 0;
}

// dy (M, N), x (M, K) -> dw (N, K) = dy^T x
int dense_tn(int, void **p, int *, int64_t **s, const char **, void *, void *) {
  const int64_t m = s[0][0], n = s[0][1], k = s[1][1];
  dense_weight_grad(m, n, k, static_cast<const float *>(p[0]), static_cast<const float *>(p[1]),
                    static_cast<float *>(p[2]));
  return 0;
}

// x (M, K), w (N, K), dy (M, N) -> dx (M, K), dw (N, K), db (N,): a Linear's whole backward in one op
int dense_bias_bwd(int, void **p, int *, int64_t **s, const char **, void *, void *) {
  const int64_t m = s[0][0], k = s[0][1], n = s[1][0];
  const float *x = static_cast<const float *>(p[0]), *w = static_cast<const float *>(p[1]);
  const float *dy = static_cast<const float *>(p[2]);
  float *db = static_cast<float *>(p[5]);
  dense_gemm('N', 'N', m, k, n, dy, n, w, k, 0.0f, static_cast<float *>(p[3]), k);
  dense_weight_grad(m, n, k, dy, x, static_cast<float *>(p[4]));
  std::memset(db, 0, n * sizeof(float));
  for (int64_t i = 0; i < m; i++) {
    const float *row = dy + i * n;
#pragma omp simd
    for (int64_t j = 0; j < n; j++) db[j] += row[j];
  }
  return 0;
}

// 1 when the Dense kernels run on oneDNN's sgemm, 0 when on the plain loop
int dense_sgemm_found() { return find_sgemm() != nullptr; }

// how many times the sgemm split a product over DensePool's workers (0 at one thread)
int64_t dense_pool_splits() { return g_dense_pool_splits.load(); }

}  // extern "C"

// ---- The fp32 FMA peak of one core, for bench/bench_train.py's per-GEMM share of peak ------------------
// GFLOP per CPU-second of independent fused multiply-adds held in registers (enough chains to cover the
// FMA latency on every unit): the ceiling any sgemm on this core works against, which a measured
// matmul (itself one of the libraries compared) cannot give.
extern "C" double dense_fma_peak_gflops(int64_t iters) {
#if defined(__AVX512F__)
  using Vec = float __attribute__((vector_size(64)));
  constexpr int kChains = 12;  // 2 FMA units x 4-cycle latency, with room
#elif defined(__AVX__)
  using Vec = float __attribute__((vector_size(32)));
  constexpr int kChains = 10;  // 16 ymm registers
#else
  using Vec = float __attribute__((vector_size(16)));
  constexpr int kChains = 10;
#endif
  constexpr int kLanes = sizeof(Vec) / sizeof(float);
  Vec acc[kChains], mul, add;
  for (int l = 0; l < kLanes; l++) {
    mul[l] = 0.999999f;
    add[l] = 1e-7f;
  }
  for (int c = 0; c < kChains; c++)
    for (int l = 0; l < kLanes; l++) acc[c][l] = 1.0f + 1e-3f * c;
  timespec t0, t1;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t0);
  for (int64_t i = 0; i < iters; i++) {
#pragma GCC unroll 12
    for (int c = 0; c < kChains; c++) acc[c] = acc[c] * mul + add;  // contracted to one FMA (-march=native)
  }
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t1);
  float sink = 0.0f;
  for (int c = 0; c < kChains; c++)
    for (int l = 0; l < kLanes; l++) sink += acc[c][l];
  volatile float keep = sink;  // the chains' results are used, so the loop is not removed
  (void)keep;
  const double seconds = (t1.tv_sec - t0.tv_sec) + 1e-9 * (t1.tv_nsec - t0.tv_nsec);
  return 2.0 * kLanes * kChains * static_cast<double>(iters) / seconds / 1e9;
}
