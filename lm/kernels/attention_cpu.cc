// Fused causal / full self-attention for XLA:CPU, forward and backward, as XLA FFI custom calls.
//
// Why: at the short contexts CPU runs train on (64 tokens in the baseline), XLA:CPU runs attention as
// batched dots of small matrices plus ~20 separate ops per layer for the mask, the softmax and the
// [batch, length, heads, dim] <-> [batch, heads, length, dim] transposes (BENCHMARKS.md, "Where lm loses to
// PyTorch on the Zen 4"). Here each (batch, head) tile is computed in one call: scores, softmax and values for
// the forward; for the backward the probabilities are recomputed from the saved log-sum-exp (FlashAttention's
// backward, Dao et al. 2022). Every product is a small register-blocked matrix product (4 rows by 32 columns)
// that skips the blocks the causal mask zeroes. Inputs stay in the projections' [..., length, heads, head_dim]
// layout, gathered into the tile's own buffers, so no transpose of a whole activation is ever made. A tile
// holds its length x length scores (3 such buffers backward): `MAX_LENGTH` in attention.py bounds them.
//
// Layout: query [*batch, T, H, D], key and value [*batch, T, KV, D] (grouped-query attention when KV < H:
// head h reads key/value head h / (H / KV)), all float32 and row-major. Outputs: out [*batch, T, H, D] and
// lse [*batch, H, T] (the forward's log-sum-exp of each row's scaled scores; the backward's input). Any
// leading dimensions are flattened into one batch, which is how a vmap (`broadcast_all`) reaches here.
//
// Work is split over (batch, head) tiles forward and (batch, key/value head) tiles backward, claimed from an
// atomic counter by the calling thread and by tasks on XLA's intra-op thread pool (ffi::ThreadPool).

#include "common.h"

namespace {

using namespace lm_kernels;  // NOLINT: the shared helpers of common.h

struct Dims {
  int64_t batch = 1;  // the leading dimensions, flattened
  int64_t length = 0;
  int64_t heads = 0;
  int64_t kv_heads = 0;
  int64_t head_dim = 0;
};

// The register block of `Gemm`: rows [i0, i0 + R) by NV vectors of columns from n0, over k in [k0, k1).
// R and NV are compile-time constants so that the R x NV accumulators stay in registers.
template <int R, int NV>
inline void Block(const float* A, int64_t lda, const float* B, int64_t ldb, float* C, int64_t ldc, int64_t i0,
                  int64_t n0, int64_t k0, int64_t k1, bool accumulate) {
  V16 c[R][NV];
  for (int r = 0; r < R; ++r) {
    for (int v = 0; v < NV; ++v) {
      c[r][v] = accumulate ? *reinterpret_cast<const V16*>(C + (i0 + r) * ldc + n0 + v * kLanes) : V16{};
    }
  }
  for (int64_t k = k0; k < k1; ++k) {
    V16 b[NV];
    for (int v = 0; v < NV; ++v) b[v] = *reinterpret_cast<const V16*>(B + k * ldb + n0 + v * kLanes);
    for (int r = 0; r < R; ++r) {
      const float a = A[(i0 + r) * lda + k];
      for (int v = 0; v < NV; ++v) c[r][v] += a * b[v];
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int v = 0; v < NV; ++v) *reinterpret_cast<V16*>(C + (i0 + r) * ldc + n0 + v * kLanes) = c[r][v];
  }
}

template <int R>
inline void Row(const float* A, int64_t lda, const float* B, int64_t ldb, float* C, int64_t ldc, int64_t i0,
                int64_t n1, int64_t k0, int64_t k1, bool accumulate) {
  int64_t n0 = 0;
  for (; n0 + 2 * kLanes <= n1; n0 += 2 * kLanes) Block<R, 2>(A, lda, B, ldb, C, ldc, i0, n0, k0, k1, accumulate);
  for (; n0 < n1; n0 += kLanes) Block<R, 1>(A, lda, B, ldb, C, ldc, i0, n0, k0, k1, accumulate);
}

// C[i, n] (=, or += when `accumulate`) sum over k in krange(i0, i1) of A[i, k] B[k, n], for the rows i of
// [0, M) in blocks of 4 (i0, i1 the block's rows) and the columns n < ncols(i0, i1), a multiple of 16.
// A: row-major with `lda`; B: row-major with `ldb`; C: row-major with `ldc`. The ranges let a causal
// product skip the blocks that the mask zeroes.
template <typename KRange, typename NCols>
void Gemm(int64_t M, const float* A, int64_t lda, const float* B, int64_t ldb, float* C, int64_t ldc,
          const KRange& krange, const NCols& ncols, bool accumulate) {
  for (int64_t i0 = 0; i0 < M; i0 += 4) {
    const int64_t rows = std::min<int64_t>(4, M - i0);
    const auto [k0, k1] = krange(i0, i0 + rows);
    const int64_t n1 = ncols(i0, i0 + rows);
    switch (rows) {
      case 4: Row<4>(A, lda, B, ldb, C, ldc, i0, n1, k0, k1, accumulate); break;
      case 3: Row<3>(A, lda, B, ldb, C, ldc, i0, n1, k0, k1, accumulate); break;
      case 2: Row<2>(A, lda, B, ldb, C, ldc, i0, n1, k0, k1, accumulate); break;
      default: Row<1>(A, lda, B, ldb, C, ldc, i0, n1, k0, k1, accumulate);
    }
  }
}

// The padded sizes of a tile: lengths and head dimensions rounded up to the vector width, padding zero.
struct Tile {
  int64_t T, D, Tp, Dp;
  explicit Tile(const Dims& dims, int64_t D_)
      : T(dims.length), D(D_), Tp(RoundUp(dims.length, kLanes)), Dp(RoundUp(D_, kLanes)) {}
  // Columns a causal block of rows [i0, i1) sees: keys [0, i1), rounded up to whole vectors.
  int64_t SeenCols(int64_t i1, bool causal) const { return causal ? RoundUp(i1, kLanes) : Tp; }
};

// Copies rows [T, D] with row stride `stride` into a dense [rows, Dp] block (zero padded), or its transpose
// [Dp, Tp] when `transpose`.
inline void Gather(const float* src, int64_t stride, const Tile& t, float* dst, bool transpose) {
  if (transpose) {
    std::fill(dst, dst + t.Dp * t.Tp, 0.0f);
    for (int64_t j = 0; j < t.T; ++j) {
      for (int64_t d = 0; d < t.D; ++d) dst[d * t.Tp + j] = src[j * stride + d];
    }
  } else {
    std::fill(dst, dst + t.Tp * t.Dp, 0.0f);
    for (int64_t j = 0; j < t.T; ++j) std::copy(src + j * stride, src + j * stride + t.D, dst + j * t.Dp);
  }
}

inline void Scatter(const float* src, const Tile& t, float* dst, int64_t stride) {
  for (int64_t i = 0; i < t.T; ++i) std::copy(src + i * t.Dp, src + i * t.Dp + t.D, dst + i * stride);
}

// The largest of scale * s[0, seen). s[seen, RoundUp(seen)) is overwritten.
inline float RowMax(float* s, int64_t seen, float scale) {
  const int64_t end = RoundUp(seen, kLanes);
  std::fill(s + seen, s + end, -INFINITY);
  V16 m = V16{} - INFINITY;
  for (int64_t j = 0; j < end; j += kLanes) {
    const V16 x = Load(s + j);
    m = x > m ? x : m;
  }
  float best = -INFINITY;
  for (int i = 0; i < kLanes; ++i) best = std::max(best, m[i]);
  return best * scale;  // scale > 0
}

// Probabilities of a row from its raw scores s[0, Tp): exp(scale s - shift) for the keys the row sees
// ([0, seen)), 0 for the others (causal mask, padding). Returns the row's sum.
inline float RowProbabilities(float* s, int64_t seen, int64_t Tp, float scale, float shift) {
  const int64_t end = RoundUp(seen, kLanes);
  for (int64_t j = 0; j < end; j += kLanes) {
    const V16 x = Load(s + j) * scale - shift;
    Store(s + j, ExpNonpositive(x > 0.0f ? V16{} : x));
  }
  std::fill(s + seen, s + Tp, 0.0f);
  V16 total = {};
  for (int64_t j = 0; j < end; j += kLanes) total += Load(s + j);
  return Sum(total);
}

// One (batch b, head h) tile of the forward. kD: the head dimension when known at compile time (0: dims.head_dim).
template <int kD>
void ForwardTile(const float* q, const float* k, const float* v, float* out, float* lse, const Dims& dims,
                 int64_t b, int64_t h, bool causal, float scale, float* scratch) {
  const Tile t(dims, kD ? kD : dims.head_dim);
  const int64_t q_stride = dims.heads * t.D, kv_stride = dims.kv_heads * t.D;
  const int64_t kvh = h / (dims.heads / dims.kv_heads);
  float* qq = scratch;             // [Tp, Dp]
  float* kt = qq + t.Tp * t.Dp;    // [Dp, Tp]
  float* vv = kt + t.Dp * t.Tp;    // [Tp, Dp]
  float* s = vv + t.Tp * t.Dp;     // [T, Tp]: scores, then probabilities
  float* o = s + t.T * t.Tp;       // [T, Dp]
  Gather(q + b * t.T * q_stride + h * t.D, q_stride, t, qq, false);
  Gather(k + b * t.T * kv_stride + kvh * t.D, kv_stride, t, kt, true);
  Gather(v + b * t.T * kv_stride + kvh * t.D, kv_stride, t, vv, false);
  auto all_d = [&](int64_t, int64_t) { return std::pair<int64_t, int64_t>(0, t.Dp); };
  auto seen = [&](int64_t, int64_t i1) { return t.SeenCols(i1, causal); };
  Gemm(t.T, qq, t.Dp, kt, t.Tp, s, t.Tp, all_d, seen, false);
  float* row_lse = lse + (b * dims.heads + h) * t.T;
  for (int64_t i = 0; i < t.T; ++i) {
    float* si = s + i * t.Tp;
    const int64_t n = causal ? i + 1 : t.T;
    const float m = RowMax(si, n, scale);
    const float l = RowProbabilities(si, n, t.Tp, scale, m);
    const float inv = 1.0f / l;
    for (int64_t j = 0; j < RoundUp(n, kLanes); j += kLanes) Store(si + j, Load(si + j) * inv);
    row_lse[i] = m + std::log(l);
  }
  auto keys_seen = [&](int64_t, int64_t i1) { return std::pair<int64_t, int64_t>(0, causal ? i1 : t.T); };
  auto all_dp = [&](int64_t, int64_t) { return t.Dp; };
  Gemm(t.T, s, t.Tp, vv, t.Dp, o, t.Dp, keys_seen, all_dp, false);
  Scatter(o, t, out + b * t.T * q_stride + h * t.D, q_stride);
}

// Writes the transpose of a [T, Tp] block into [Tp, T].
inline void Transpose(const float* src, const Tile& t, float* dst) {
  for (int64_t i = 0; i < t.T; ++i) {
    for (int64_t j = 0; j < t.Tp; ++j) dst[j * t.T + i] = src[i * t.Tp + j];
  }
}

// One (batch b, key/value head kvh) tile of the backward: every query head of the group, so that the key and
// value gradients are summed in the tile and written once.
template <int kD>
void BackwardTile(const float* q, const float* k, const float* v, const float* out, const float* lse,
                  const float* dout, float* dq, float* dk, float* dv, const Dims& dims, int64_t b, int64_t kvh,
                  bool causal, float scale, float* scratch) {
  const Tile t(dims, kD ? kD : dims.head_dim);
  const int64_t q_stride = dims.heads * t.D, kv_stride = dims.kv_heads * t.D;
  const int64_t group = dims.heads / dims.kv_heads;
  const int64_t TD = t.Tp * t.Dp, TT = t.Tp * t.Tp;
  float* kt = scratch;     // [Dp, Tp]
  float* vt = kt + TD;     // [Dp, Tp]
  float* kk = vt + TD;     // [Tp, Dp]
  float* gk = kk + TD;     // [Tp, Dp]: key gradient
  float* gv = gk + TD;     // [Tp, Dp]: value gradient
  float* qq = gv + TD;     // [Tp, Dp]
  float* go = qq + TD;     // [Tp, Dp]: the output's gradient
  float* gq = go + TD;     // [Tp, Dp]: the query's gradient
  float* p = gq + TD;      // [Tp, Tp]: probabilities
  float* ds = p + TT;      // [Tp, Tp]: the output's gradient through values, then the scores' gradient
  float* tr = ds + TT;     // [Tp, Tp]: a transpose of p or ds
  const float* kb = k + b * t.T * kv_stride + kvh * t.D;
  const float* vb = v + b * t.T * kv_stride + kvh * t.D;
  Gather(kb, kv_stride, t, kt, true);
  Gather(vb, kv_stride, t, vt, true);
  Gather(kb, kv_stride, t, kk, false);
  std::fill(gk, gk + 2 * TD, 0.0f);
  auto all_d = [&](int64_t, int64_t) { return std::pair<int64_t, int64_t>(0, t.Dp); };
  auto seen = [&](int64_t, int64_t i1) { return t.SeenCols(i1, causal); };
  auto keys_seen = [&](int64_t, int64_t i1) { return std::pair<int64_t, int64_t>(0, causal ? i1 : t.T); };
  // Key j is seen by the queries i >= j (causal): rows [j0, j1) of a transposed product sum over i >= j0.
  auto queries_seeing = [&](int64_t j0, int64_t) { return std::pair<int64_t, int64_t>(causal ? j0 : 0, t.T); };
  auto all_dp = [&](int64_t, int64_t) { return t.Dp; };
  for (int64_t h = kvh * group; h < (kvh + 1) * group; ++h) {
    const int64_t offset = b * t.T * q_stride + h * t.D;
    Gather(q + offset, q_stride, t, qq, false);
    Gather(dout + offset, q_stride, t, go, false);
    Gemm(t.T, qq, t.Dp, kt, t.Tp, p, t.Tp, all_d, seen, false);
    Gemm(t.T, go, t.Dp, vt, t.Tp, ds, t.Tp, all_d, seen, false);
    const float* row_lse = lse + (b * dims.heads + h) * t.T;
    for (int64_t i = 0; i < t.T; ++i) {
      const float* oi = out + offset + i * q_stride;
      const float* gi = go + i * t.Dp;
      float delta = 0.0f;
#pragma omp simd reduction(+ : delta)
      for (int64_t d = 0; d < t.D; ++d) delta += gi[d] * oi[d];
      const int64_t n = causal ? i + 1 : t.T;
      float* pi = p + i * t.Tp;
      float* si = ds + i * t.Tp;
      RowProbabilities(pi, n, t.Tp, scale, row_lse[i]);
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) si[j] = pi[j] * (si[j] - delta) * scale;
      std::fill(si + n, si + t.Tp, 0.0f);
    }
    Transpose(p, t, tr);
    Gemm(t.Tp, tr, t.T, go, t.Dp, gv, t.Dp, queries_seeing, all_dp, true);
    Transpose(ds, t, tr);
    Gemm(t.Tp, tr, t.T, qq, t.Dp, gk, t.Dp, queries_seeing, all_dp, true);
    Gemm(t.T, ds, t.Tp, kk, t.Dp, gq, t.Dp, keys_seen, all_dp, false);
    Scatter(gq, t, dq + offset, q_stride);
  }
  Scatter(gk, t, dk + b * t.T * kv_stride + kvh * t.D, kv_stride);
  Scatter(gv, t, dv + b * t.T * kv_stride + kvh * t.D, kv_stride);
}

// Reads [*batch, T, heads, D] and checks key/value against the query; an error names the mismatch.
ffi::Error ReadDims(ffi::Buffer<ffi::F32>& q, ffi::Buffer<ffi::F32>& k, ffi::Buffer<ffi::F32>& v, Dims* dims) {
  auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions();
  if (qd.size() < 3 || kd.size() != qd.size() || vd.size() != qd.size()) {
    return ffi::Error::InvalidArgument("lm attention: query, key and value must be [*batch, length, heads, dim]");
  }
  const size_t r = qd.size();
  for (size_t i = 0; i < r; ++i) {
    if (kd[i] != vd[i] || (i != r - 2 && kd[i] != qd[i])) {
      return ffi::Error::InvalidArgument("lm attention: key and value must match the query but for the heads");
    }
  }
  dims->batch = 1;
  for (size_t i = 0; i + 3 < r; ++i) dims->batch *= qd[i];
  dims->length = qd[r - 3];
  dims->heads = qd[r - 2];
  dims->kv_heads = kd[r - 2];
  dims->head_dim = qd[r - 1];
  if (dims->kv_heads == 0 || dims->heads % dims->kv_heads) {
    return ffi::Error::InvalidArgument("lm attention: the query heads must be a multiple of the key/value heads");
  }
  return ffi::Error::Success();
}

template <int kD>
void Forward(ffi::ThreadPool& pool, const float* q, const float* k, const float* v, float* out, float* lse,
             const Dims& dims, bool causal, float scale) {
  const int64_t Tp = RoundUp(dims.length, kLanes), Dp = RoundUp(dims.head_dim, kLanes);
  ParallelTiles(pool, dims.batch * dims.heads, 4 * Tp * Dp + Tp * Tp, [&](float* scratch, int64_t tile) {
    ForwardTile<kD>(q, k, v, out, lse, dims, tile / dims.heads, tile % dims.heads, causal, scale, scratch);
  });
}

template <int kD>
void Backward(ffi::ThreadPool& pool, const float* q, const float* k, const float* v, const float* out,
              const float* lse, const float* dout, float* dq, float* dk, float* dv, const Dims& dims, bool causal,
              float scale) {
  const int64_t Tp = RoundUp(dims.length, kLanes), Dp = RoundUp(dims.head_dim, kLanes);
  ParallelTiles(pool, dims.batch * dims.kv_heads, 8 * Tp * Dp + 3 * Tp * Tp, [&](float* scratch, int64_t tile) {
    BackwardTile<kD>(q, k, v, out, lse, dout, dq, dk, dv, dims, tile / dims.kv_heads, tile % dims.kv_heads,
                     causal, scale, scratch);
  });
}

ffi::Error AttentionForward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                            ffi::Buffer<ffi::F32> v, ffi::ResultBuffer<ffi::F32> out,
                            ffi::ResultBuffer<ffi::F32> lse, bool causal, float scale) {
  Dims dims;
  if (ffi::Error error = ReadDims(q, k, v, &dims); error.failure()) return error;
  const float *qp = q.typed_data(), *kp = k.typed_data(), *vp = v.typed_data();
  float *op = out->typed_data(), *lp = lse->typed_data();
  switch (dims.head_dim) {
    case 32: Forward<32>(pool, qp, kp, vp, op, lp, dims, causal, scale); break;
    case 64: Forward<64>(pool, qp, kp, vp, op, lp, dims, causal, scale); break;
    case 128: Forward<128>(pool, qp, kp, vp, op, lp, dims, causal, scale); break;
    default: Forward<0>(pool, qp, kp, vp, op, lp, dims, causal, scale);
  }
  return ffi::Error::Success();
}

ffi::Error AttentionBackward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                             ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::F32> out, ffi::Buffer<ffi::F32> lse,
                             ffi::Buffer<ffi::F32> dout, ffi::ResultBuffer<ffi::F32> dq,
                             ffi::ResultBuffer<ffi::F32> dk, ffi::ResultBuffer<ffi::F32> dv, bool causal,
                             float scale) {
  Dims dims;
  if (ffi::Error error = ReadDims(q, k, v, &dims); error.failure()) return error;
  const float *qp = q.typed_data(), *kp = k.typed_data(), *vp = v.typed_data(), *op = out.typed_data(),
              *lp = lse.typed_data(), *gp = dout.typed_data();
  float *dqp = dq->typed_data(), *dkp = dk->typed_data(), *dvp = dv->typed_data();
  switch (dims.head_dim) {
    case 32: Backward<32>(pool, qp, kp, vp, op, lp, gp, dqp, dkp, dvp, dims, causal, scale); break;
    case 64: Backward<64>(pool, qp, kp, vp, op, lp, gp, dqp, dkp, dvp, dims, causal, scale); break;
    case 128: Backward<128>(pool, qp, kp, vp, op, lp, gp, dqp, dkp, dvp, dims, causal, scale); break;
    default: Backward<0>(pool, qp, kp, vp, op, lp, gp, dqp, dkp, dvp, dims, causal, scale);
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(LmAttentionForward, AttentionForward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("causal")
                                  .Attr<float>("scale"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(LmAttentionBackward, AttentionBackward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("causal")
                                  .Attr<float>("scale"));
