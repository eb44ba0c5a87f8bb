// The exact GELU, x/2 (1 + erf(x / sqrt 2)), for XLA:CPU, forward and backward, as XLA FFI custom calls.
//
// Why: XLA:CPU keeps erf(x / sqrt 2) of the whole [rows, mlp] activation from the forward for the backward, so
// a layer's GELU is three loops over it (erf; the GELU from it; the gradient from erf, x and the incoming
// gradient), 1.0 ms a layer inside the baseline's step on the 2-core Zen 4 (BENCHMARKS.md). Here the forward
// is one loop that writes only the GELU, and the backward one loop that recomputes erf and exp from x.
//
// erf is a rational approximation of the form Eigen's float erf has used (x clamped to [-4, 4], an odd degree-13
// polynomial over an even degree-8 one in x): within 4.2e-7 of the true erf and 4.8e-7 of XLA's on [-6, 6]. The gradient is
// dy (Phi(x) + x phi(x)), Phi(x) = (1 + erf(x / sqrt 2)) / 2, phi(x) = exp(-x^2 / 2) / sqrt(2 pi).
//
// Layout: x, dy, y and dx of any shape, float32, elementwise.

#include "common.h"

namespace {

using namespace lm_kernels;  // NOLINT: the shared helpers of common.h

constexpr int64_t kChunk = 8192;  // elements a task takes at a time

inline V16 Erf(V16 x) {
  const V16 limit = V16{} + 4.0f;
  x = x > limit ? limit : x;
  x = x < -limit ? -limit : x;
  const V16 x2 = x * x;
  V16 p = V16{} - 2.72614225801306e-10f;
  p = p * x2 + 2.77068142495902e-08f;
  p = p * x2 - 2.10102402082508e-06f;
  p = p * x2 - 5.69250639462346e-05f;
  p = p * x2 - 7.34990630326855e-04f;
  p = p * x2 - 2.95459980854025e-03f;
  p = p * x2 - 1.60960333262415e-02f;
  p = x * p;
  V16 q = V16{} - 1.45660718464996e-05f;
  q = q * x2 - 2.13374055278905e-04f;
  q = q * x2 - 1.68282697438203e-03f;
  q = q * x2 - 7.37332916720468e-03f;
  q = q * x2 - 1.42647390514189e-02f;
  return p / q;
}

constexpr float kSqrtHalf = 0.70710678118654752f;
constexpr float kInvSqrt2Pi = 0.39894228040143268f;

inline V16 Gelu(V16 x) { return 0.5f * x * (1.0f + Erf(x * kSqrtHalf)); }

inline V16 GeluGrad(V16 x, V16 dy) {
  const V16 cdf = 0.5f * (1.0f + Erf(x * kSqrtHalf));
  const V16 pdf = ExpNonpositive(-0.5f * x * x) * kInvSqrt2Pi;
  return dy * (cdf + x * pdf);
}

// f over [begin, end) of n elements: whole vectors, then the tail through a zero-padded vector.
template <typename F>
inline void Chunk(int64_t begin, int64_t end, const F& f) {
  int64_t i = begin;
  for (; i + kLanes <= end; i += kLanes) f(i, kLanes);
  if (i < end) f(i, end - i);
}

inline V16 LoadPartial(const float* p, int64_t count) {
  if (count == kLanes) return Load(p);
  V16 v = {};
  for (int64_t j = 0; j < count; ++j) v[j] = p[j];
  return v;
}

inline void StorePartial(float* p, V16 v, int64_t count) {
  if (count == kLanes) return Store(p, v);
  for (int64_t j = 0; j < count; ++j) p[j] = v[j];
}

ffi::Error GeluForward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::ResultBuffer<ffi::F32> y) {
  const int64_t n = x.element_count();
  const float* xp = x.typed_data();
  float* yp = y->typed_data();
  ParallelTiles(pool, (n + kChunk - 1) / kChunk, 0, [&](float*, int64_t tile) {
    Chunk(tile * kChunk, std::min(n, (tile + 1) * kChunk), [&](int64_t i, int64_t count) {
      StorePartial(yp + i, Gelu(LoadPartial(xp + i, count)), count);
    });
  });
  return ffi::Error::Success();
}

ffi::Error GeluBackward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                        ffi::ResultBuffer<ffi::F32> dx) {
  const int64_t n = x.element_count();
  if (dy.element_count() != n) return ffi::Error::InvalidArgument("lm gelu: x and dy differ in size");
  const float *xp = x.typed_data(), *gp = dy.typed_data();
  float* dxp = dx->typed_data();
  ParallelTiles(pool, (n + kChunk - 1) / kChunk, 0, [&](float*, int64_t tile) {
    Chunk(tile * kChunk, std::min(n, (tile + 1) * kChunk), [&](int64_t i, int64_t count) {
      StorePartial(dxp + i, GeluGrad(LoadPartial(xp + i, count), LoadPartial(gp + i, count)), count);
    });
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(LmGeluForward, GeluForward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(LmGeluBackward, GeluBackward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
