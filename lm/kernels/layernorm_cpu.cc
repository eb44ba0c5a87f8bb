// LayerNorm for XLA:CPU, forward and backward, as XLA FFI custom calls.
//
// Why: XLA:CPU runs a LayerNorm's forward and backward as ~15 small kernels (two row reductions forward, two
// more and two column reductions backward, each split in two by XLA's tree-reduction rewrite, plus the
// elementwise loops): 0.45 ms for a [768, 128] norm on the 2-core Zen 4, where PyTorch's one kernel each way
// takes 0.18 ms (BENCHMARKS.md). Here each direction is one pass over row blocks.
//
// The arithmetic is flax's `nn.LayerNorm` (use_fast_variance): mean = E[x], var = max(0, E[x^2] - mean^2),
// y = (x - mean) * (rsqrt(var + eps) * scale) + bias. Backward, with xhat = (x - mean) rstd and g = dy scale:
// dx = rstd (g - E[g] - xhat E[g xhat]), dscale = sum over rows of dy xhat, dbias = sum over rows of dy.
//
// Layout: x [*batch, *rows, C], scale and bias [*batch, C], float32: the batch dimensions are those scale has
// besides C (none for a plain call; a vmap's, which `broadcast_all` gives every input), each with its own
// scale, bias and parameter gradients; the row dimensions are flattened. The forward also returns each row's
// mean and rstd ([*batch, *rows]), the backward's inputs. The column sums are accumulated per block of rows
// and added in block order, so the result does not depend on which thread ran which block.

#include "common.h"

namespace {

using namespace lm_kernels;  // NOLINT: the shared helpers of common.h

constexpr int64_t kRowsPerTile = 32;

// sum over c < C of f(c), 16 lanes at a time, the tail one by one.
template <typename F>
inline float RowSum(int64_t C, const F& f) {
  V16 acc = {};
  int64_t c = 0;
  for (; c + kLanes <= C; c += kLanes) acc += f(c);
  float total = Sum(acc);
  for (; c < C; ++c) total += f(c)[0];
  return total;
}

// Loads 16 floats at c, or the one at c (lane 0) for the tail, whose other lanes are zero.
struct Row {
  const float* p;
  int64_t C;
  V16 operator()(int64_t c) const {
    if (c + kLanes <= C) return Load(p + c);
    V16 one = {};
    one[0] = p[c];
    return one;
  }
};

struct Shape {
  int64_t batch = 1;  // the batch dimensions, flattened: each has its own scale and bias
  int64_t rows = 1;   // rows per batch entry
  int64_t C = 0;
  int64_t TilesPerBatch() const { return (rows + kRowsPerTile - 1) / kRowsPerTile; }
  // The rows [begin, end) of the flattened x that `tile` covers, and its batch entry.
  void Rows(int64_t tile, int64_t* b, int64_t* begin, int64_t* end) const {
    *b = tile / TilesPerBatch();
    const int64_t block = tile % TilesPerBatch();
    *begin = *b * rows + block * kRowsPerTile;
    *end = *b * rows + std::min(rows, (block + 1) * kRowsPerTile);
  }
};

void ForwardTile(const float* x, const float* scale, const float* bias, float* y, float* mean, float* rstd,
                 const Shape& shape, float eps, int64_t tile) {
  int64_t b, begin, end;
  shape.Rows(tile, &b, &begin, &end);
  const int64_t C = shape.C;
  scale += b * C;
  bias += b * C;
  for (int64_t i = begin; i < end; ++i) {
    const float* xi = x + i * C;
    const Row row{xi, C};
    const float mu = RowSum(C, row) / C;
    const float mu2 = RowSum(C, [&](int64_t c) { const V16 v = row(c); return v * v; }) / C;
    const float var = std::max(0.0f, mu2 - mu * mu);
    const float r = 1.0f / std::sqrt(var + eps);
    mean[i] = mu;
    rstd[i] = r;
    float* yi = y + i * C;
    int64_t c = 0;
    for (; c + kLanes <= C; c += kLanes) {
      Store(yi + c, (Load(xi + c) - mu) * (r * Load(scale + c)) + Load(bias + c));
    }
    for (; c < C; ++c) yi[c] = (xi[c] - mu) * (r * scale[c]) + bias[c];
  }
}

// One block of rows: dx, and the block's column sums of dy xhat and dy into partial[0, C) and partial[C, 2C).
void BackwardTile(const float* x, const float* scale, const float* mean, const float* rstd, const float* dy,
                  float* dx, float* partial, const Shape& shape, int64_t tile) {
  int64_t b, begin, end;
  shape.Rows(tile, &b, &begin, &end);
  const int64_t C = shape.C;
  scale += b * C;
  std::fill(partial, partial + 2 * C, 0.0f);
  float* gscale = partial;
  float* gbias = partial + C;
  for (int64_t i = begin; i < end; ++i) {
    const float* xi = x + i * C;
    const float* gi = dy + i * C;
    const float mu = mean[i], r = rstd[i];
    // E[g] and E[g xhat], g = dy scale, xhat = (x - mean) rstd.
    V16 acc_g = {}, acc_gx = {};
    float tail_g = 0.0f, tail_gx = 0.0f;
    int64_t c = 0;
    for (; c + kLanes <= C; c += kLanes) {
      const V16 g = Load(gi + c) * Load(scale + c);
      const V16 xhat = (Load(xi + c) - mu) * r;
      acc_g += g;
      acc_gx += g * xhat;
      Store(gscale + c, Load(gscale + c) + Load(gi + c) * xhat);
      Store(gbias + c, Load(gbias + c) + Load(gi + c));
    }
    for (; c < C; ++c) {
      const float g = gi[c] * scale[c], xhat = (xi[c] - mu) * r;
      tail_g += g;
      tail_gx += g * xhat;
      gscale[c] += gi[c] * xhat;
      gbias[c] += gi[c];
    }
    const float mean_g = (Sum(acc_g) + tail_g) / C;
    const float mean_gx = (Sum(acc_gx) + tail_gx) / C;
    float* dxi = dx + i * C;
    for (c = 0; c + kLanes <= C; c += kLanes) {
      const V16 xhat = (Load(xi + c) - mu) * r;
      Store(dxi + c, r * (Load(gi + c) * Load(scale + c) - mean_g - xhat * mean_gx));
    }
    for (; c < C; ++c) dxi[c] = r * (gi[c] * scale[c] - mean_g - (xi[c] - mu) * r * mean_gx);
  }
}

// x [*batch, *rows, C] and scale [*batch, C] -> Shape; bias must be scale's shape.
ffi::Error ReadShape(ffi::Buffer<ffi::F32>& x, ffi::Buffer<ffi::F32>& scale, Shape* shape) {
  auto xd = x.dimensions(), sd = scale.dimensions();
  bool ok = sd.size() >= 1 && xd.size() >= sd.size() && xd[xd.size() - 1] == sd[sd.size() - 1];
  for (size_t i = 0; ok && i + 1 < sd.size(); ++i) ok = xd[i] == sd[i];
  if (!ok) return ffi::Error::InvalidArgument("lm layernorm: x must be [*batch, ..., C] and scale [*batch, C]");
  shape->C = sd[sd.size() - 1];
  shape->batch = 1;
  for (size_t i = 0; i + 1 < sd.size(); ++i) shape->batch *= sd[i];
  shape->rows = 1;
  for (size_t i = sd.size() - 1; i + 1 < xd.size(); ++i) shape->rows *= xd[i];
  return ffi::Error::Success();
}

ffi::Error LayerNormForward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> scale,
                            ffi::Buffer<ffi::F32> bias, ffi::ResultBuffer<ffi::F32> y,
                            ffi::ResultBuffer<ffi::F32> mean, ffi::ResultBuffer<ffi::F32> rstd, float eps) {
  Shape shape;
  if (ffi::Error error = ReadShape(x, scale, &shape); error.failure()) return error;
  if (bias.element_count() != scale.element_count()) {
    return ffi::Error::InvalidArgument("lm layernorm: bias must be scale's shape");
  }
  const float *xp = x.typed_data(), *sp = scale.typed_data(), *bp = bias.typed_data();
  float *yp = y->typed_data(), *mp = mean->typed_data(), *rp = rstd->typed_data();
  ParallelTiles(pool, shape.batch * shape.TilesPerBatch(), 0, [&](float*, int64_t tile) {
    ForwardTile(xp, sp, bp, yp, mp, rp, shape, eps, tile);
  });
  return ffi::Error::Success();
}

ffi::Error LayerNormBackward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> scale,
                             ffi::Buffer<ffi::F32> mean, ffi::Buffer<ffi::F32> rstd, ffi::Buffer<ffi::F32> dy,
                             ffi::ResultBuffer<ffi::F32> dx, ffi::ResultBuffer<ffi::F32> dscale,
                             ffi::ResultBuffer<ffi::F32> dbias) {
  Shape shape;
  if (ffi::Error error = ReadShape(x, scale, &shape); error.failure()) return error;
  const int64_t C = shape.C, per_batch = shape.TilesPerBatch(), tiles = shape.batch * per_batch;
  std::vector<float> partials(tiles * 2 * C);
  const float *xp = x.typed_data(), *sp = scale.typed_data(), *mp = mean.typed_data(), *rp = rstd.typed_data(),
              *gp = dy.typed_data();
  float* dxp = dx->typed_data();
  ParallelTiles(pool, tiles, 0, [&](float*, int64_t tile) {
    BackwardTile(xp, sp, mp, rp, gp, dxp, partials.data() + tile * 2 * C, shape, tile);
  });
  float *dsp = dscale->typed_data(), *dbp = dbias->typed_data();
  std::fill(dsp, dsp + shape.batch * C, 0.0f);
  std::fill(dbp, dbp + shape.batch * C, 0.0f);
  for (int64_t tile = 0; tile < tiles; ++tile) {
    const float* part = partials.data() + tile * 2 * C;
    float* ds = dsp + tile / per_batch * C;
    float* db = dbp + tile / per_batch * C;
    for (int64_t c = 0; c < C; ++c) {
      ds[c] += part[c];
      db[c] += part[C + c];
    }
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(LmLayerNormForward, LayerNormForward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("eps"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(LmLayerNormBackward, LayerNormBackward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
