// See quant_linear.h. Compiled without -ffast-math and with -ffp-contract=off (CMakeLists.txt): the
// compiler must not reorder or fuse a row's sum differently for different row counts. Per block of
// a weight row: its 32 values unpacked to fp32 once (without the scale), a 32-term fp32 dot product
// with each row of x, then the block's scale: y += d * dot (Q4_1: + m * sum(x's block)). x stays fp32
// (llama.cpp quantizes it to int8 first): then a row of x that differs in its last bit (attention
// computed for one token or for a window) moves the result by rounding only, as in the fp32 model,
// instead of flipping an int8 level, and greedy speculative decoding stays equal to AR's.
#include "core/quant_linear.h"

#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#define MIRROR_RT_AVX2 __attribute__((target("avx2,fma,f16c")))
#endif

namespace mirror_rt {
namespace {

std::atomic<bool> g_force_portable{false};

// Exact fp16 -> fp32 (subnormals, inf and NaN included).
inline float half_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (man << 13);
  } else if (exp != 0) {
    bits = sign | ((exp + 112) << 23) | (man << 13);
  } else if (man == 0) {
    bits = sign;
  } else {  // subnormal: value = man * 2^-24
    float f = float(man) * 5.9604644775390625e-8f;
    std::memcpy(&bits, &f, 4);
    bits |= sign;
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline uint16_t load_u16(const uint8_t* p) {
  uint16_t v;
  std::memcpy(&v, p, 2);
  return v;
}

// One chunk of at most 8 rows of x, with each 32-block's sum (Q4_1's offsets multiply it).
struct Chunk {
  const float* x;   // [rows, in], row stride x_stride
  const float* xs;  // [rows, in / 32] block sums
  int64_t rows;
  float* y;         // its first output row
};

template <QType T>
void rows_portable(const QuantLinearArgs& a, const Chunk& c, int64_t n0, int64_t n1) {
  const int64_t nb = a.in / kQuantBlock;
  const int bytes = quant_block_bytes(int(T));
  float w[kQuantBlock];
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = a.w + n * a.w_stride;
    for (int64_t m = 0; m < c.rows; ++m) {
      const float* x = c.x + m * a.x_stride;
      float acc = 0.0f, mins = 0.0f;
      for (int64_t b = 0; b < nb; ++b) {
        const uint8_t* blk = row + b * bytes;
        if constexpr (T == QType::kQ8_0) {
          const int8_t* q = reinterpret_cast<const int8_t*>(blk + 2);
          for (int i = 0; i < 32; ++i) w[i] = float(q[i]);
        } else {
          const uint8_t* qs = blk + (T == QType::kQ4_1 ? 4 : 2);
          const int off = T == QType::kQ4_0 ? 8 : 0;
          for (int i = 0; i < 16; ++i) w[i] = float((qs[i] & 0x0f) - off), w[i + 16] = float((qs[i] >> 4) - off);
        }
        float dot = 0.0f;
        for (int i = 0; i < 32; ++i) dot += w[i] * x[b * kQuantBlock + i];
        acc += half_to_float(load_u16(blk)) * dot;
        if constexpr (T == QType::kQ4_1) mins += half_to_float(load_u16(blk + 2)) * c.xs[m * nb + b];
      }
      float y = acc + mins;
      if (a.bias) y += a.bias[n];
      c.y[m * a.y_stride + n] = y;
    }
  }
}

#if defined(__x86_64__)

MIRROR_RT_AVX2 inline float hsum_avx2(__m256 v) {
  __m128 r = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  r = _mm_add_ps(r, _mm_movehl_ps(r, r));
  r = _mm_add_ss(r, _mm_movehdup_ps(r));
  return _mm_cvtss_f32(r);
}

// A block's 32 values (without its scale) as four vectors of 8 floats, in order.
template <QType T>
MIRROR_RT_AVX2 inline void unpack_block(const uint8_t* blk, __m256 w[4]) {
  if constexpr (T == QType::kQ8_0) {
    for (int j = 0; j < 4; ++j)
      w[j] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(blk + 2 + 8 * j))));
  } else {
    const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + (T == QType::kQ4_1 ? 4 : 2)));
    const __m128i mask = _mm_set1_epi8(0x0f);
    __m128i lo = _mm_and_si128(packed, mask), hi = _mm_and_si128(_mm_srli_epi16(packed, 4), mask);
    if constexpr (T == QType::kQ4_0) {
      lo = _mm_sub_epi8(lo, _mm_set1_epi8(8));
      hi = _mm_sub_epi8(hi, _mm_set1_epi8(8));
    }
    w[0] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(lo));
    w[1] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(lo, 8)));
    w[2] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(hi));
    w[3] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(hi, 8)));
  }
}

// NB weight rows at a time give NB * M independent FMA chains (hiding the FMA latency when M is
// small) without changing the order of any (n, m) sum.
template <QType T, int M, int NB>
MIRROR_RT_AVX2 void rows_avx2(const QuantLinearArgs& a, const Chunk& c, int64_t n0, int64_t n1) {
  const int64_t nb = a.in / kQuantBlock;
  constexpr int bytes = T == QType::kQ8_0 ? 34 : (T == QType::kQ4_0 ? 18 : 20);
  int64_t n = n0;
  for (; n + NB <= n1; n += NB) {
    const uint8_t* rows[NB];
    for (int j = 0; j < NB; ++j) rows[j] = a.w + (n + j) * a.w_stride;
    __m256 acc[NB][M];
    float mins[NB][M];
    for (int j = 0; j < NB; ++j)
      for (int m = 0; m < M; ++m) acc[j][m] = _mm256_setzero_ps(), mins[j][m] = 0.0f;
    for (int64_t b = 0; b < nb; ++b) {
      for (int j = 0; j < NB; ++j) {
        const uint8_t* blk = rows[j] + b * bytes;
        __m256 w[4];
        unpack_block<T>(blk, w);
        const __m256 d = _mm256_set1_ps(_cvtsh_ss(load_u16(blk)));
        const float mw = T == QType::kQ4_1 ? _cvtsh_ss(load_u16(blk + 2)) : 0.0f;
        for (int m = 0; m < M; ++m) {
          const float* x = c.x + m * a.x_stride + b * kQuantBlock;
          __m256 dot = _mm256_mul_ps(w[0], _mm256_loadu_ps(x));
          dot = _mm256_fmadd_ps(w[1], _mm256_loadu_ps(x + 8), dot);
          dot = _mm256_fmadd_ps(w[2], _mm256_loadu_ps(x + 16), dot);
          dot = _mm256_fmadd_ps(w[3], _mm256_loadu_ps(x + 24), dot);
          acc[j][m] = _mm256_fmadd_ps(d, dot, acc[j][m]);
          if constexpr (T == QType::kQ4_1) mins[j][m] += mw * c.xs[m * nb + b];
        }
      }
    }
    for (int j = 0; j < NB; ++j)
      for (int m = 0; m < M; ++m) {
        float y = hsum_avx2(acc[j][m]) + mins[j][m];
        if (a.bias) y += a.bias[n + j];
        c.y[m * a.y_stride + n + j] = y;
      }
  }
  if constexpr (NB > 1) {
    if (n < n1) rows_avx2<T, M, 1>(a, c, n, n1);  // the last n1 - n < NB features
  }
}

template <QType T>
void rows_avx2_any(const QuantLinearArgs& a, const Chunk& c, int64_t n0, int64_t n1) {
  switch (c.rows) {
    case 1: return rows_avx2<T, 1, 4>(a, c, n0, n1);
    case 2: return rows_avx2<T, 2, 2>(a, c, n0, n1);
    case 3: return rows_avx2<T, 3, 2>(a, c, n0, n1);
    case 4: return rows_avx2<T, 4, 2>(a, c, n0, n1);
    case 5: return rows_avx2<T, 5, 1>(a, c, n0, n1);
    case 6: return rows_avx2<T, 6, 1>(a, c, n0, n1);
    case 7: return rows_avx2<T, 7, 1>(a, c, n0, n1);
    default: return rows_avx2<T, 8, 1>(a, c, n0, n1);
  }
}

bool cpu_has_avx2() {
  static const bool ok = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  }();
  return ok;
}
#else
bool cpu_has_avx2() { return false; }
#endif

bool use_avx2() { return cpu_has_avx2() && !g_force_portable.load(std::memory_order_relaxed); }

template <QType T>
void rows_any(const QuantLinearArgs& a, const Chunk& c, int64_t n0, int64_t n1, bool avx2) {
#if defined(__x86_64__)
  if (avx2) return rows_avx2_any<T>(a, c, n0, n1);
#endif
  (void)avx2;
  rows_portable<T>(a, c, n0, n1);
}

void rows_typed(const QuantLinearArgs& a, const Chunk& c, int64_t n0, int64_t n1, bool avx2) {
  switch (a.type) {
    case QType::kQ8_0: return rows_any<QType::kQ8_0>(a, c, n0, n1, avx2);
    case QType::kQ4_0: return rows_any<QType::kQ4_0>(a, c, n0, n1, avx2);
    case QType::kQ4_1: return rows_any<QType::kQ4_1>(a, c, n0, n1, avx2);
  }
}

// Weight bytes each chunk of rows reads before the next chunk reads them again (past 8 rows of x).
constexpr int64_t kTileBytes = 128 * 1024;

// Output features [n0, n1) for every row of x: chunks of up to 8 rows, each the same code whatever
// the row count, over tiles of the weight small enough to stay in cache while every chunk reads it.
void features(const QuantLinearArgs& a, const float* xs, int64_t n0, int64_t n1, bool avx2) {
  const int64_t nb = a.in / kQuantBlock;
  const int64_t tile = a.rows <= kQuantLinearMaxRows ? n1 - n0 : std::max<int64_t>(1, kTileBytes / a.w_stride);
  for (int64_t t0 = n0; t0 < n1; t0 += tile) {
    const int64_t t1 = std::min(n1, t0 + tile);
    for (int64_t r = 0; r < a.rows; r += kQuantLinearMaxRows) {
      const Chunk c{a.x + r * a.x_stride, xs + r * nb, std::min<int64_t>(kQuantLinearMaxRows, a.rows - r),
                    a.y + r * a.y_stride};
      rows_typed(a, c, t0, t1, avx2);
    }
  }
}

// Splitting the output rows over threads pays only past this many weight bytes: a fork and join
// costs a few microseconds, about what one core takes to stream this much.
constexpr int64_t kForkBytes = 48 * 1024;

int team_size(int64_t work_bytes, int64_t units, int num_threads) {
  const int64_t wanted = num_threads > 0 ? num_threads : omp_get_max_threads();
  if (work_bytes < kForkBytes) return 1;
  return int(units < wanted ? units : wanted);
}

}  // namespace

int quant_block_bytes(int type) {
  switch (QType(type)) {
    case QType::kQ8_0: return 34;
    case QType::kQ4_0: return 18;
    case QType::kQ4_1: return 20;
  }
  return 0;
}

const char* quant_linear_isa() { return use_avx2() ? "avx2" : "portable"; }
void quant_linear_force_portable(bool on) { g_force_portable.store(on); }

void quant_linear(const QuantLinearArgs& a) {
  const bool avx2 = use_avx2();
  const int64_t nb = a.in / kQuantBlock;
  // Q4_1's offsets multiply each block's sum of x: summed once per call, in a fixed order.
  static thread_local std::vector<float> sums;  // per calling thread: the draft may run beside the target
  if (a.type == QType::kQ4_1) {
    sums.resize(size_t(a.rows * nb));
    for (int64_t m = 0; m < a.rows; ++m)
      for (int64_t b = 0; b < nb; ++b) {
        const float* x = a.x + m * a.x_stride + b * kQuantBlock;
        float s = 0.0f;
        for (int i = 0; i < kQuantBlock; ++i) s += x[i];
        sums[size_t(m * nb + b)] = s;
      }
  }
  const float* xs = sums.data();
  const int64_t chunks = (a.rows + kQuantLinearMaxRows - 1) / kQuantLinearMaxRows;
  const int threads = team_size(a.out * a.w_stride * chunks, a.out, a.num_threads);
  if (threads <= 1) return features(a, xs, 0, a.out, avx2);
#pragma omp parallel num_threads(threads)
  {
    // The team may be smaller than asked (nested regions, OMP_THREAD_LIMIT): share among those here.
    const int64_t team = omp_get_num_threads(), t = omp_get_thread_num();
    features(a, xs, a.out * t / team, a.out * (t + 1) / team, avx2);
  }
}

void dequantize_rows(const uint8_t* w, int64_t w_stride, QType type, int64_t in, const int64_t* ids, int64_t n,
                     float* out, int64_t out_stride, int num_threads) {
  const int64_t nb = in / kQuantBlock;
  const int bytes = quant_block_bytes(int(type));
  const int threads = team_size(n * w_stride, n, num_threads);
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
  for (int64_t i = 0; i < n; ++i) {
    const uint8_t* row = w + (ids ? ids[i] : i) * w_stride;
    float* y = out + i * out_stride;
    for (int64_t b = 0; b < nb; ++b) {
      const uint8_t* blk = row + b * bytes;
      float* yb = y + b * kQuantBlock;
      const float d = half_to_float(load_u16(blk));
      if (type == QType::kQ8_0) {
        const int8_t* q = reinterpret_cast<const int8_t*>(blk + 2);
        for (int j = 0; j < 32; ++j) yb[j] = float(q[j]) * d;
      } else if (type == QType::kQ4_0) {
        for (int j = 0; j < 16; ++j) {
          yb[j] = float((blk[2 + j] & 0x0f) - 8) * d;
          yb[j + 16] = float((blk[2 + j] >> 4) - 8) * d;
        }
      } else {
        const float mn = half_to_float(load_u16(blk + 2));
        for (int j = 0; j < 16; ++j) {
          yb[j] = float(blk[4 + j] & 0x0f) * d + mn;
          yb[j + 16] = float(blk[4 + j] >> 4) * d + mn;
        }
      }
    }
  }
}

}  // namespace mirror_rt
