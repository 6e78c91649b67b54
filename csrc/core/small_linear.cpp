// See small_linear.h. Compiled without -ffast-math (CMakeLists.txt): the compiler must not
// reorder a row's sum differently for different row counts.
#include "core/small_linear.h"

#include <omp.h>

#include "core/simd.h"

namespace mirror_rt {
namespace {

static inline float hsum(v8f v) {
  return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
}

// Output features [n0, n1) for M rows; NB rows of w at a time give NB * M independent
// accumulator chains (hides the FMA latency when M is small) without changing any sum's order.
// Locality: the weight-prefetch hint (__builtin_prefetch's third argument); see prefetch_locality().
template <int M, int NB, int Locality>
MIRROR_RT_CLONES void block(const SmallLinearArgs& a, int64_t n0, int64_t n1) {
  const int64_t K = a.in, K8 = K & ~int64_t(7);
  int64_t n = n0;
  for (; n + NB <= n1; n += NB) {
    v8f acc[NB][M];
    for (int j = 0; j < NB; ++j)
      for (int m = 0; m < M; ++m) acc[j][m] = v8f{};
    for (int64_t k = 0; k < K8; k += 8) {
      // The next block's rows of w, one 32-byte step at a time: the hardware prefetcher alone
      // leaves the core waiting on memory once M > 1 rows give it work per byte (AMD EPYC, a
      // SmolLM2 pass's linears, 1 thread, 4 rows: 45.9 -> 36.2 ms; bench/RESULTS.md).
      for (int j = 0; j < NB; ++j) __builtin_prefetch(a.w + (n + NB + j) * a.w_stride + k, 0, Locality);
      v8f xv[M];
      for (int m = 0; m < M; ++m) xv[m] = load8(a.x + m * a.x_stride + k);
      for (int j = 0; j < NB; ++j) {
        const v8f wv = load8(a.w + (n + j) * a.w_stride + k);
        for (int m = 0; m < M; ++m) acc[j][m] += wv * xv[m];
      }
    }
    for (int j = 0; j < NB; ++j) {
      const float* w = a.w + (n + j) * a.w_stride;
      for (int m = 0; m < M; ++m) {
        const float* x = a.x + m * a.x_stride;
        float s = hsum(acc[j][m]);
        for (int64_t k = K8; k < K; ++k) s += w[k] * x[k];
        if (a.bias) s += a.bias[n + j];
        a.y[m * a.y_stride + n + j] = s;
      }
    }
  }
  if (n < n1) block<M, 1, Locality>(a, n, n1);  // the last n1 - n < NB features
}

// Which prefetch hint the measurements favour on this CPU, looked up once. Intel Xeon: T2
// (locality 1); NTA (0) halved the bandwidth at every row count there, as NTA lines skip L2 (2
// threads, 1 row: 35.0 ms with NTA, 15.8 with T2, 16.7 with no prefetch). AMD EPYC: NTA, as
// measured when the prefetch came in; T2 is unmeasured there, and Zen 4 documents T1/T2 as L2-only.
int prefetch_locality() {
  static const int locality = [] {
#if defined(__x86_64__) && defined(__GNUC__)
    __builtin_cpu_init();  // the loader may call us before the CPU model is set up
    return __builtin_cpu_is("amd") ? 0 : 1;
#else
    return 1;
#endif
  }();
  return locality;
}

template <int M, int NB>
void block_with_hint(const SmallLinearArgs& a, int64_t n0, int64_t n1) {
  if (prefetch_locality() == 0)
    block<M, NB, 0>(a, n0, n1);
  else
    block<M, NB, 1>(a, n0, n1);
}

template <int M>
void run(const SmallLinearArgs& a) {
  // Rows of w in flight: more streams keep more loads in flight, while the NB * M accumulators, M
  // rows of x and a row of w fit the 16 vector registers (2 rows with NB 8 spilled: 2 threads,
  // 30 SmolLM2-shaped layers, 15.2-19.9 ms against 14.7-15.2 with NB 4 on an Intel Xeon).
  constexpr int NB = M == 1 ? 8 : (M <= 4 ? 4 : (M <= 6 ? 2 : 1));
  // One contiguous share of the output features per thread, in whole blocks of NB. (64-feature
  // tasks left one of 2 threads idle for a third of a 192-feature projection: 2 threads, 30
  // SmolLM2-shaped layers, 1 row, 15.7 -> 14.4 ms on an Intel Xeon; bench/RESULTS.md.)
  const int64_t blocks = (a.out + NB - 1) / NB;
  const int64_t wanted = a.num_threads > 0 ? a.num_threads : omp_get_max_threads();
  const int threads = int(blocks < wanted ? blocks : wanted);
  if (threads <= 1 || a.out <= 64) {  // a fork costs more than 64 features' work
    block_with_hint<M, NB>(a, 0, a.out);
    return;
  }
#pragma omp parallel num_threads(threads)
  {
    // The team may be smaller than asked (nested regions, OMP_THREAD_LIMIT): share among those here.
    const int64_t team = omp_get_num_threads(), t = omp_get_thread_num();
    const int64_t n0 = blocks * t / team * NB, n1 = blocks * (t + 1) / team * NB;
    if (n0 < a.out) block_with_hint<M, NB>(a, n0, n1 < a.out ? n1 : a.out);
  }
}

}  // namespace

const char* small_linear_prefetch_hint() { return prefetch_locality() == 0 ? "nta" : "t2"; }

void small_linear_f32(const SmallLinearArgs& a) {
  switch (a.rows) {
    case 1: return run<1>(a);
    case 2: return run<2>(a);
    case 3: return run<3>(a);
    case 4: return run<4>(a);
    case 5: return run<5>(a);
    case 6: return run<6>(a);
    case 7: return run<7>(a);
    default: return run<8>(a);
  }
}

}  // namespace mirror_rt
