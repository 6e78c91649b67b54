// See quant_linear.h. Compiled without -ffast-math and with -ffp-contract=off (CMakeLists.txt): the
// compiler must not reorder or fuse a row's sum differently for different row counts. The AVX2
// path follows ggml-cpu's ggml_vec_dot_q4_0_q8_0 / q4_1_q8_1 / q8_0_q8_0 (per block: unpack the
// weight's 32 values to bytes, _mm256_maddubs_epi16 + _mm256_madd_epi16 against the int8 row of x,
// one FMA of the block's scale into eight fp32 lanes), with the weight block unpacked once for all
// rows of x.
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

// x's rows quantized to int8, one scale d (and for Q4_1 the block's d * sum(q)) per 32 values.
// Kept per calling thread: the draft may run beside the target on another thread.
struct QuantizedRows {
  std::vector<int8_t> q;   // [rows, in]
  std::vector<float> d, s; // [rows, in / 32]
};

// One block: d = max|x| / 127, q = round-half-even(x / d). The AVX2 path computes the same values.
void quantize_block_portable(const float* x, int8_t* q, float* d, float* s) {
  float amax = 0.0f;
  for (int i = 0; i < kQuantBlock; ++i) amax = std::fmax(amax, std::fabs(x[i]));
  const float dd = amax / 127.0f, id = dd != 0.0f ? 1.0f / dd : 0.0f;
  int sum = 0;
  for (int i = 0; i < kQuantBlock; ++i) {
    q[i] = int8_t(std::nearbyint(x[i] * id));
    sum += q[i];
  }
  *d = dd;
  *s = dd * float(sum);
}

// Rows of x quantized (q [rows, in], d and s [rows, in / 32]): one chunk of at most 8 rows.
struct Chunk {
  const int8_t* q;
  const float *d, *s;
  int64_t rows;
  float* y;  // its first output row
};

template <QType T>
void rows_portable(const QuantLinearArgs& a, const Chunk& c, int64_t n0, int64_t n1) {
  const int64_t nb = a.in / kQuantBlock;
  const int bytes = quant_block_bytes(int(T));
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = a.w + n * a.w_stride;
    for (int64_t m = 0; m < c.rows; ++m) {
      const int8_t* xq_row = c.q + m * a.in;
      const float *xd = c.d + m * nb, *xs = c.s + m * nb;
      float acc = 0.0f, mins = 0.0f;
      for (int64_t b = 0; b < nb; ++b) {
        const uint8_t* blk = row + b * bytes;
        const int8_t* xb = xq_row + b * kQuantBlock;
        const float dw = half_to_float(load_u16(blk));
        int sum = 0;
        if constexpr (T == QType::kQ8_0) {
          const int8_t* qw = reinterpret_cast<const int8_t*>(blk + 2);
          for (int i = 0; i < 32; ++i) sum += qw[i] * xb[i];
        } else {
          const uint8_t* qs = blk + (T == QType::kQ4_1 ? 4 : 2);
          const int off = T == QType::kQ4_0 ? 8 : 0;
          for (int i = 0; i < 16; ++i)
            sum += ((qs[i] & 0x0f) - off) * xb[i] + ((qs[i] >> 4) - off) * xb[i + 16];
        }
        acc += (dw * xd[b]) * float(sum);
        if constexpr (T == QType::kQ4_1) mins += half_to_float(load_u16(blk + 2)) * xs[b];
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

// 16 bytes of nibbles -> 32 bytes: low nibbles are values 0..15, high nibbles 16..31.
MIRROR_RT_AVX2 inline __m256i unpack_nibbles(const uint8_t* p) {
  const __m128i lo = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m256i both = _mm256_set_m128i(_mm_srli_epi16(lo, 4), lo);
  return _mm256_and_si256(both, _mm256_set1_epi8(0x0f));
}

// Eight int32 pair sums of unsigned bytes u times signed bytes s, as floats.
MIRROR_RT_AVX2 inline __m256 dot_us8(__m256i u, __m256i s) {
  const __m256i pairs = _mm256_maddubs_epi16(u, s);
  return _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
}

MIRROR_RT_AVX2 void quantize_block_avx2(const float* x, int8_t* q, float* d, float* s) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  __m256 v[4], amax = _mm256_setzero_ps();
  for (int j = 0; j < 4; ++j) {
    v[j] = _mm256_loadu_ps(x + 8 * j);
    amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v[j]));
  }
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  const float dd = _mm_cvtss_f32(m) / 127.0f, id = dd != 0.0f ? 1.0f / dd : 0.0f;
  const __m256 scale = _mm256_set1_ps(id);
  __m256i i[4];
  for (int j = 0; j < 4; ++j)
    i[j] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v[j], scale), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  const __m256i total = _mm256_add_epi32(_mm256_add_epi32(i[0], i[1]), _mm256_add_epi32(i[2], i[3]));
  __m128i t = _mm_add_epi32(_mm256_castsi256_si128(total), _mm256_extracti128_si256(total, 1));
  t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0x4e));
  t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0xb1));
  // packs works within 128-bit lanes; the permute puts the 32 bytes back in order.
  __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(i[0], i[1]), _mm256_packs_epi32(i[2], i[3]));
  p = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(q), p);
  *d = dd;
  *s = dd * float(_mm_cvtsi128_si32(t));
}

// NB weight rows at a time give NB * M independent FMA chains (hiding the FMA latency when M is
// small) without changing the order of any (n, m) sum.
template <QType T, int M, int NB>
MIRROR_RT_AVX2 void rows_avx2(const QuantLinearArgs& a, const Chunk& c, int64_t n0, int64_t n1) {
  const int64_t nb = a.in / kQuantBlock;
  constexpr int bytes = T == QType::kQ8_0 ? 34 : (T == QType::kQ4_0 ? 18 : 20);
  const float *xd = c.d, *xs = c.s;
  int64_t n = n0;
  for (; n + NB <= n1; n += NB) {
    const uint8_t* rows[NB];
    for (int j = 0; j < NB; ++j) rows[j] = a.w + (n + j) * a.w_stride;
    __m256 acc[NB][M];
    float mins[NB][M];
    for (int j = 0; j < NB; ++j)
      for (int m = 0; m < M; ++m) acc[j][m] = _mm256_setzero_ps(), mins[j][m] = 0.0f;
    for (int64_t b = 0; b < nb; ++b) {
      __m256i xv[M];
      for (int m = 0; m < M; ++m)
        xv[m] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c.q + m * a.in + b * kQuantBlock));
      for (int j = 0; j < NB; ++j) {
        const uint8_t* blk = rows[j] + b * bytes;
        const float dw = _cvtsh_ss(load_u16(blk));
        if constexpr (T == QType::kQ4_1) {
          const __m256i wu = unpack_nibbles(blk + 4);  // unsigned 0..15: maddubs' first operand as is
          const float mw = _cvtsh_ss(load_u16(blk + 2));
          for (int m = 0; m < M; ++m) {
            acc[j][m] = _mm256_fmadd_ps(_mm256_set1_ps(dw * xd[m * nb + b]), dot_us8(wu, xv[m]), acc[j][m]);
            mins[j][m] += mw * xs[m * nb + b];
          }
        } else {  // signed weights: maddubs takes |w| and x with w's signs
          const __m256i wq = T == QType::kQ8_0 ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 2))
                                               : _mm256_sub_epi8(unpack_nibbles(blk + 2), _mm256_set1_epi8(8));
          const __m256i wu = _mm256_sign_epi8(wq, wq);
          for (int m = 0; m < M; ++m)
            acc[j][m] = _mm256_fmadd_ps(_mm256_set1_ps(dw * xd[m * nb + b]),
                                        dot_us8(wu, _mm256_sign_epi8(xv[m], wq)), acc[j][m]);
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
void features(const QuantLinearArgs& a, const QuantizedRows& xq, int64_t n0, int64_t n1, bool avx2) {
  const int64_t nb = a.in / kQuantBlock;
  const int64_t tile = a.rows <= kQuantLinearMaxRows ? n1 - n0 : std::max<int64_t>(1, kTileBytes / a.w_stride);
  for (int64_t t0 = n0; t0 < n1; t0 += tile) {
    const int64_t t1 = std::min(n1, t0 + tile);
    for (int64_t r = 0; r < a.rows; r += kQuantLinearMaxRows) {
      const Chunk c{xq.q.data() + r * a.in, xq.d.data() + r * nb, xq.s.data() + r * nb,
                    std::min<int64_t>(kQuantLinearMaxRows, a.rows - r), a.y + r * a.y_stride};
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
  static thread_local QuantizedRows xq;
  xq.q.resize(size_t(a.rows * a.in));
  xq.d.resize(size_t(a.rows * nb));
  xq.s.resize(size_t(a.rows * nb));
  for (int64_t m = 0; m < a.rows; ++m)
    for (int64_t b = 0; b < nb; ++b) {
      const float* x = a.x + m * a.x_stride + b * kQuantBlock;
      int8_t* q = xq.q.data() + m * a.in + b * kQuantBlock;
#if defined(__x86_64__)
      if (avx2) {
        quantize_block_avx2(x, q, &xq.d[m * nb + b], &xq.s[m * nb + b]);
        continue;
      }
#endif
      quantize_block_portable(x, q, &xq.d[m * nb + b], &xq.s[m * nb + b]);
    }
  const int64_t chunks = (a.rows + kQuantLinearMaxRows - 1) / kQuantLinearMaxRows;
  const int threads = team_size(a.out * a.w_stride * chunks, a.out, a.num_threads);
  if (threads <= 1) return features(a, xq, 0, a.out, avx2);
  const QuantizedRows& shared = xq;  // the team reads the calling thread's buffers
#pragma omp parallel num_threads(threads)
  {
    // The team may be smaller than asked (nested regions, OMP_THREAD_LIMIT): share among those here.
    const int64_t team = omp_get_num_threads(), t = omp_get_thread_num();
    features(a, shared, a.out * t / team, a.out * (t + 1) / team, avx2);
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
