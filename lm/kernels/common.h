// What lm's XLA:CPU kernels share: a parallel loop over tiles on XLA's intra-op thread pool, and 16-float
// vectors. Header-only; each kernel's .cc includes it (lm/kernels/__init__.py builds with -I this folder).

#ifndef LM_KERNELS_COMMON_H_
#define LM_KERNELS_COMMON_H_

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace lm_kernels {

// Runs body(worker_scratch, tile) for tile in [0, n) on the caller and the pool's threads. The caller takes
// tiles too, so the call finishes even when every pool thread is busy (or the caller is one of them). It
// returns once every tile is done and every task that claimed one has finished; a task the pool starts
// later finds no tile left and touches nothing but the shared counters.
struct Work {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> active{0};
};

// Claims tiles until none is left. A task that starts after the last claim touches nothing but `work`.
template <typename Body>
void Drain(const std::shared_ptr<Work>& work, int64_t n, int64_t scratch_floats, const Body* body) {
  work->active.fetch_add(1, std::memory_order_acq_rel);
  int64_t tile = work->next.fetch_add(1, std::memory_order_acq_rel);
  if (tile < n) {
    std::vector<float> scratch(scratch_floats);
    for (; tile < n; tile = work->next.fetch_add(1, std::memory_order_acq_rel)) (*body)(scratch.data(), tile);
  }
  work->active.fetch_sub(1, std::memory_order_acq_rel);
}

template <typename Body>
void ParallelTiles(ffi::ThreadPool& pool, int64_t n, int64_t scratch_floats, const Body& body) {
  auto work = std::make_shared<Work>();
  const int64_t helpers = std::min<int64_t>(pool.num_threads() - 1, n - 1);
  for (int64_t i = 0; i < helpers; ++i) {
    pool.Schedule([work, n, scratch_floats, body_ptr = &body]() { Drain(work, n, scratch_floats, body_ptr); });
  }
  Drain(work, n, scratch_floats, &body);
  // Every tile is claimed; wait for the tasks still computing theirs.
  while (work->active.load(std::memory_order_acquire) != 0) std::this_thread::yield();
}

// Explicit vectors (GCC/Clang vector extensions): 16 floats, lowered to whatever the -march has (one
// AVX-512 register, two AVX ones, ...). `aligned(4)` makes loads and stores through the type unaligned.
typedef float V16 __attribute__((vector_size(64), aligned(4)));
constexpr int64_t kLanes = 16;

inline int64_t RoundUp(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

typedef int32_t I16 __attribute__((vector_size(64)));

inline V16 Load(const float* p) { return *reinterpret_cast<const V16*>(p); }
inline void Store(float* p, V16 x) { *reinterpret_cast<V16*>(p) = x; }

inline float Sum(V16 x) {
  float total = 0.0f;
  for (int i = 0; i < kLanes; ++i) total += x[i];
  return total;
}

// exp(x) for x <= 0, 16 at a time: Cephes' expf (x = n ln2 + r, exp(r) by a degree-6 polynomial, 2^n through
// the exponent bits), n rounded to nearest by the 1.5 * 2^23 trick. Within 2 ulp of expf on [-87, 0]; below
// -87 it returns exp(-87) ~ 2e-38, which adds nothing to a softmax whose largest term is 1.
inline V16 ExpNonpositive(V16 x) {
  const V16 lowest = V16{} - 87.0f;
  x = x < lowest ? lowest : x;
  const float magic = 12582912.0f;
  const V16 n = (x * 1.44269504088896341f + magic) - magic;
  V16 r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  const V16 r2 = r * r;
  V16 p = V16{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r2 + r + 1.0f;
  const I16 bits = (__builtin_convertvector(n, I16) + 127) << 23;
  return p * reinterpret_cast<const V16&>(bits);
}

}  // namespace lm_kernels

#endif  // LM_KERNELS_COMMON_H_
