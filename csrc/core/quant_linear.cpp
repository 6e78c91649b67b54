// See quant_linear.h. Compiled without -ffast-math and with -ffp-contract=off (CMakeLists.txt): the
// compiler must not reorder or fuse a row's sum differently for different row counts. x is quantized
// per 32-block to int8 as llama.cpp does (quantize_x); per weight block and row of x, maddubs + madd
// give eight exact int32 partial dot products, and acc += (d_w * d_x) * lanes in fp32. A row of x
// decides its own result: with row-exact attention (csrc/core/row_attention.h) a token decoded
// alone and the same token inside a window get the same activations, so the int8 rounding cannot
// tell them apart and greedy speculative decoding equals AR's bit for bit.
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

// One chunk of at most 8 rows of x, quantized per 32-block to int8 (see quantize_x).
struct Chunk {
  const int8_t* qx;  // [rows, in] int8, row stride in
  const float* dx;   // [rows, in / 32] block scales
  const float* sx;   // [rows, in / 32] dx * (sum of the block's int8 values): Q4_1's offsets multiply it
  const int32_t* nx; // [rows, in / 32] the sum of the block's int8 values (Q4_0's offset of 8, packed)
  int64_t rows;
  float* y;          // its first output row
};

// The integer dot product of one weight block with one x block, as eight partial sums: lane k
// covers values 4k .. 4k+3 (the lanes of AVX2's maddubs + madd). Exact; only the lane split is fixed.
template <QType T>
inline void block_lanes_portable(const uint8_t* blk, const int8_t* y, int32_t lanes[8]) {
  int32_t w[32];
  if constexpr (T == QType::kQ8_0) {
    for (int i = 0; i < 32; ++i) w[i] = reinterpret_cast<const int8_t*>(blk + 2)[i];
  } else {
    const uint8_t* qs = blk + (T == QType::kQ4_1 ? 4 : 2);
    const int off = T == QType::kQ4_0 ? 8 : 0;
    for (int i = 0; i < 16; ++i) w[i] = (qs[i] & 0x0f) - off, w[i + 16] = (qs[i] >> 4) - off;
  }
  for (int k = 0; k < 8; ++k) {
    lanes[k] = 0;
    for (int i = 4 * k; i < 4 * k + 4; ++i) lanes[k] += w[i] * int32_t(y[i]);
  }
}

// The eight fp32 lanes summed as hsum_avx2 sums them.
inline float hsum_lanes(const float l[8]) {
  return ((l[0] + l[4]) + (l[2] + l[6])) + ((l[1] + l[5]) + (l[3] + l[7]));
}

// Per output feature and row: acc[k] = fma(d_w * d_x, float(lane k), acc[k]) over the blocks in
// order, then the lanes folded, then (Q4_1) the offsets' sum. Bitwise the AVX2 path's arithmetic.
template <QType T>
void rows_portable(const QuantLinearArgs& a, const Chunk& c, int64_t n0, int64_t n1) {
  const int64_t nb = a.in / kQuantBlock;
  const int bytes = quant_block_bytes(int(T));
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = a.w + n * a.w_stride;
    for (int64_t m = 0; m < c.rows; ++m) {
      float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0}, mins = 0.0f;
      for (int64_t b = 0; b < nb; ++b) {
        const uint8_t* blk = row + b * bytes;
        int32_t lanes[8];
        block_lanes_portable<T>(blk, c.qx + m * a.in + b * kQuantBlock, lanes);
        const float s = half_to_float(load_u16(blk)) * c.dx[m * nb + b];
        for (int k = 0; k < 8; ++k) acc[k] = std::fma(s, float(lanes[k]), acc[k]);
        if constexpr (T == QType::kQ4_1) mins += half_to_float(load_u16(blk + 2)) * c.sx[m * nb + b];
      }
      float y = hsum_lanes(acc) + mins;
      if (a.bias) y += a.bias[n];
      c.y[m * a.y_stride + n] = y;
    }
  }
}


// --- the packed layout (quant_linear.h): lanes are 8 output rows --------------------------------

template <QType T>
constexpr int packed_header() { return T == QType::kQ4_1 ? 32 : 16; }  // 8 fp16 d (and 8 fp16 m)

// The whole int32 dot of row r's block in a packed record with an x block y (Q4_0: nibbles - 8).
template <QType T>
int32_t packed_dot_portable(const uint8_t* rec, int r, const int8_t* y, int32_t ysum) {
  const uint8_t* p = rec + packed_header<T>();
  int32_t dot = 0;
  for (int c = 0; c < (T == QType::kQ8_0 ? 8 : 4); ++c)
    for (int i = 0; i < 4; ++i) {
      const uint8_t v = p[32 * c + 4 * r + i];
      if constexpr (T == QType::kQ8_0) dot += int32_t(int8_t(v)) * y[4 * c + i];
      else dot += int32_t(v & 0x0f) * y[4 * c + i] + int32_t(v >> 4) * y[16 + 4 * c + i];
    }
  return T == QType::kQ4_0 ? dot - 8 * ysum : dot;
}

template <QType T>
void packed_portable(const QuantLinearArgs& a, const Chunk& c, int64_t g0, int64_t g1) {
  const int64_t nb = a.in / kQuantBlock;
  const int64_t rec_bytes = kPackRows * quant_block_bytes(int(T));
  for (int64_t g = g0; g < g1; ++g) {
    const uint8_t* group = a.w + g * kPackRows * a.w_stride;
    for (int64_t m = 0; m < c.rows; ++m)
      for (int r = 0; r < kPackRows; ++r) {
        float acc = 0.0f, mins = 0.0f;
        for (int64_t b = 0; b < nb; ++b) {
          const uint8_t* rec = group + b * rec_bytes;
          const int64_t mb = m * nb + b;
          const int32_t p = packed_dot_portable<T>(rec, r, c.qx + m * a.in + b * kQuantBlock, c.nx[mb]);
          acc = std::fma(half_to_float(load_u16(rec + 2 * r)) * c.dx[mb], float(p), acc);
          if constexpr (T == QType::kQ4_1) mins = mins + half_to_float(load_u16(rec + 16 + 2 * r)) * c.sx[mb];
        }
        float y = acc + mins;
        if (a.bias) y = y + a.bias[g * kPackRows + r];
        c.y[m * a.y_stride + g * kPackRows + r] = y;
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

// A block's 32 values as bytes in order: Q8_0 signed, Q4_0 / Q4_1 the unsigned nibbles 0..15.
template <QType T>
MIRROR_RT_AVX2 inline __m256i block_bytes(const uint8_t* blk) {
  if constexpr (T == QType::kQ8_0) {
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 2));
  } else {
    const __m128i t = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + (T == QType::kQ4_1 ? 4 : 2)));
    return _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(t, 4), t), _mm256_set1_epi8(0x0f));
  }
}

// Eight int32 partial dot products (lane k: values 4k .. 4k+3) of a block with an x block y.
// c8: Q4_0's correction, the lanes of 8 * y (its nibbles are stored plus 8).
template <QType T>
MIRROR_RT_AVX2 inline __m256i block_lanes(__m256i w, __m256i y, __m256i c8) {
  const __m256i ones = _mm256_set1_epi16(1);
  if constexpr (T == QType::kQ8_0) {  // maddubs wants one unsigned side: |w| and y with w's sign
    return _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(y, w)), ones);
  } else if constexpr (T == QType::kQ4_0) {
    return _mm256_sub_epi32(_mm256_madd_epi16(_mm256_maddubs_epi16(w, y), ones), c8);
  } else {
    return _mm256_madd_epi16(_mm256_maddubs_epi16(w, y), ones);
  }
}

// NB weight rows at a time give NB * M independent accumulators (hiding latency when M is small)
// without changing the order of any (n, m) sum.
template <QType T, int M, int NB>
MIRROR_RT_AVX2 void rows_avx2(const QuantLinearArgs& a, const Chunk& c, int64_t n0, int64_t n1) {
  const int64_t nb = a.in / kQuantBlock;
  constexpr int bytes = T == QType::kQ8_0 ? 34 : (T == QType::kQ4_0 ? 18 : 20);
  const __m256i ones = _mm256_set1_epi16(1), eights = _mm256_set1_epi8(8);
  int64_t n = n0;
  for (; n + NB <= n1; n += NB) {
    const uint8_t* rows[NB];
    for (int j = 0; j < NB; ++j) rows[j] = a.w + (n + j) * a.w_stride;
    __m256 acc[NB][M];
    float mins[NB][M];
    for (int j = 0; j < NB; ++j)
      for (int m = 0; m < M; ++m) acc[j][m] = _mm256_setzero_ps(), mins[j][m] = 0.0f;
    for (int64_t b = 0; b < nb; ++b) {
      __m256i y[M], c8[M];
      for (int m = 0; m < M; ++m) {
        y[m] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c.qx + m * a.in + b * kQuantBlock));
        if constexpr (T == QType::kQ4_0) c8[m] = _mm256_madd_epi16(_mm256_maddubs_epi16(eights, y[m]), ones);
        else c8[m] = _mm256_setzero_si256();
      }
      for (int j = 0; j < NB; ++j) {
        const uint8_t* blk = rows[j] + b * bytes;
        const __m256i w = block_bytes<T>(blk);
        const float dw = _cvtsh_ss(load_u16(blk));
        const float mw = T == QType::kQ4_1 ? _cvtsh_ss(load_u16(blk + 2)) : 0.0f;
        for (int m = 0; m < M; ++m) {
          const __m256 p = _mm256_cvtepi32_ps(block_lanes<T>(w, y[m], c8[m]));
          acc[j][m] = _mm256_fmadd_ps(_mm256_set1_ps(dw * c.dx[m * nb + b]), p, acc[j][m]);
          if constexpr (T == QType::kQ4_1) mins[j][m] += mw * c.sx[m * nb + b];
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

// The packed layout, M rows of x: per block, the 8 rows' dots in the lanes of one vector. Q4: the
// low and high nibbles of piece c pair with x values 4c.. and 16 + 4c..; eight maddubs (each lane
// at most 2 * 15 * 127) summed in int16 stay below 32767, then one madd. Q8_0: maddubs per piece.
// How far ahead of the record being read the packed kernel asks for weight bytes: at one row the
// hardware prefetcher alone left Q4_1 at 60% of fp32 streaming on Zen 1, 73% with this (2048 was
// the best of 512, 1024, 2048).
constexpr int64_t kPrefetchBytes = 2048;

template <QType T, int M>
MIRROR_RT_AVX2 void packed_avx2(const QuantLinearArgs& a, const Chunk& c, int64_t g0, int64_t g1) {
  const int64_t nb = a.in / kQuantBlock;
  constexpr int64_t rec_bytes = kPackRows * (T == QType::kQ8_0 ? 34 : (T == QType::kQ4_0 ? 18 : 20));
  const __m256i ones = _mm256_set1_epi16(1), low = _mm256_set1_epi8(0x0f);
  for (int64_t g = g0; g < g1; ++g) {
    const uint8_t* rec = a.w + g * kPackRows * a.w_stride;
    __m256 acc[M], mins[M];
    for (int m = 0; m < M; ++m) acc[m] = _mm256_setzero_ps(), mins[m] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; ++b, rec += rec_bytes) {
      for (int64_t o = 0; o < rec_bytes; o += 64)  // a hint only: never faults past the weight's end
        _mm_prefetch(reinterpret_cast<const char*>(rec) + kPrefetchBytes + o, _MM_HINT_T0);
      const uint8_t* p = rec + packed_header<T>();
      const int8_t* y0 = c.qx + b * kQuantBlock;
      __m256i dot[M];
      if constexpr (T == QType::kQ8_0) {
        for (int m = 0; m < M; ++m) dot[m] = _mm256_setzero_si256();
        for (int k = 0; k < 8; ++k) {
          const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 32 * k));
          const __m256i aw = _mm256_sign_epi8(w, w);
          for (int m = 0; m < M; ++m) {
            int32_t piece;
            std::memcpy(&piece, y0 + m * a.in + 4 * k, 4);
            const __m256i yk = _mm256_sign_epi8(_mm256_set1_epi32(piece), w);
            dot[m] = _mm256_add_epi32(dot[m], _mm256_madd_epi16(_mm256_maddubs_epi16(aw, yk), ones));
          }
        }
      } else {
        __m256i s16[M];
        for (int m = 0; m < M; ++m) s16[m] = _mm256_setzero_si256();
        for (int k = 0; k < 4; ++k) {
          const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 32 * k));
          const __m256i lo = _mm256_and_si256(v, low), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
          for (int m = 0; m < M; ++m) {
            int32_t plo, phi;
            std::memcpy(&plo, y0 + m * a.in + 4 * k, 4);
            std::memcpy(&phi, y0 + m * a.in + 16 + 4 * k, 4);
            s16[m] = _mm256_add_epi16(s16[m], _mm256_add_epi16(_mm256_maddubs_epi16(lo, _mm256_set1_epi32(plo)),
                                                               _mm256_maddubs_epi16(hi, _mm256_set1_epi32(phi))));
          }
        }
        for (int m = 0; m < M; ++m) {
          dot[m] = _mm256_madd_epi16(s16[m], ones);
          if constexpr (T == QType::kQ4_0) dot[m] = _mm256_sub_epi32(dot[m], _mm256_set1_epi32(8 * c.nx[m * nb + b]));
        }
      }
      const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(rec)));
      for (int m = 0; m < M; ++m)
        acc[m] = _mm256_fmadd_ps(_mm256_mul_ps(d, _mm256_set1_ps(c.dx[m * nb + b])), _mm256_cvtepi32_ps(dot[m]), acc[m]);
      if constexpr (T == QType::kQ4_1) {
        const __m256 mw = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(rec + 16)));
        for (int m = 0; m < M; ++m) mins[m] = _mm256_add_ps(mins[m], _mm256_mul_ps(mw, _mm256_set1_ps(c.sx[m * nb + b])));
      }
    }
    for (int m = 0; m < M; ++m) {
      __m256 y = _mm256_add_ps(acc[m], mins[m]);
      if (a.bias) y = _mm256_add_ps(y, _mm256_loadu_ps(a.bias + g * kPackRows));
      _mm256_storeu_ps(c.y + m * a.y_stride + g * kPackRows, y);
    }
  }
}

template <QType T>
void packed_avx2_any(const QuantLinearArgs& a, const Chunk& c, int64_t g0, int64_t g1) {
  switch (c.rows) {
    case 1: return packed_avx2<T, 1>(a, c, g0, g1);
    case 2: return packed_avx2<T, 2>(a, c, g0, g1);
    case 3: return packed_avx2<T, 3>(a, c, g0, g1);
    case 4: return packed_avx2<T, 4>(a, c, g0, g1);
    case 5: return packed_avx2<T, 5>(a, c, g0, g1);
    case 6: return packed_avx2<T, 6>(a, c, g0, g1);
    case 7: return packed_avx2<T, 7>(a, c, g0, g1);
    default: return packed_avx2<T, 8>(a, c, g0, g1);
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

// Output features [n0, n1) (packed: multiples of 8) for the chunk's rows.
template <QType T>
void rows_any(const QuantLinearArgs& a, const Chunk& c, int64_t n0, int64_t n1, bool avx2) {
#if defined(__x86_64__)
  if (avx2 && a.packed) return packed_avx2_any<T>(a, c, n0 / kPackRows, n1 / kPackRows);
  if (avx2) return rows_avx2_any<T>(a, c, n0, n1);
#endif
  (void)avx2;
  if (a.packed) return packed_portable<T>(a, c, n0 / kPackRows, n1 / kPackRows);
  rows_portable<T>(a, c, n0, n1);
}

void rows_typed(const QuantLinearArgs& a, const Chunk& c, int64_t n0, int64_t n1, bool avx2) {
  switch (a.type) {
    case QType::kQ8_0: return rows_any<QType::kQ8_0>(a, c, n0, n1, avx2);
    case QType::kQ4_0: return rows_any<QType::kQ4_0>(a, c, n0, n1, avx2);
    case QType::kQ4_1: return rows_any<QType::kQ4_1>(a, c, n0, n1, avx2);
  }
}

// x's rows quantized the way llama.cpp quantizes activations (quantize_row_q8_0): per 32-block,
// d = max|x| / 127 and q = round(x / d). Each row's blocks alone decide its values.
struct QuantizedX {
  std::vector<int8_t> q;
  std::vector<float> d, s;
  std::vector<int32_t> n;
};

// One 32-block of x: q = round(x * (1 / d)) with halves away from zero (std::round), d = max|x| / 127.
// Returns the sum of q.
int quantize_block_portable(const float* x, int8_t* q, float* d_out) {
  float amax = 0.0f;
  for (int i = 0; i < kQuantBlock; ++i) amax = std::max(amax, std::fabs(x[i]));
  const float d = amax / 127.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
  int sum = 0;
  for (int i = 0; i < kQuantBlock; ++i) sum += q[i] = int8_t(std::round(x[i] * id));
  *d_out = d;
  return sum;
}

#if defined(__x86_64__)
// The same in AVX2, bitwise: round half away from zero as trunc(v) + sign(v) * (|v - trunc(v)| >= 0.5).
MIRROR_RT_AVX2 int quantize_block_avx2(const float* x, int8_t* q, float* d_out) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  __m256 v[4], m = _mm256_setzero_ps();
  for (int j = 0; j < 4; ++j) v[j] = _mm256_loadu_ps(x + 8 * j), m = _mm256_max_ps(m, _mm256_andnot_ps(sign, v[j]));
  __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
  h = _mm_max_ps(h, _mm_movehl_ps(h, h));
  h = _mm_max_ss(h, _mm_movehdup_ps(h));
  const float d = _mm_cvtss_f32(h) / 127.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
  __m256i n[4], total = _mm256_setzero_si256();
  for (int j = 0; j < 4; ++j) {
    const __m256 t = _mm256_mul_ps(v[j], _mm256_set1_ps(id));
    const __m256 tr = _mm256_round_ps(t, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
    const __m256 half = _mm256_cmp_ps(_mm256_andnot_ps(sign, _mm256_sub_ps(t, tr)), _mm256_set1_ps(0.5f), _CMP_GE_OQ);
    const __m256 step = _mm256_and_ps(half, _mm256_or_ps(_mm256_and_ps(t, sign), _mm256_set1_ps(1.0f)));
    n[j] = _mm256_cvtps_epi32(_mm256_add_ps(tr, step));
    total = _mm256_add_epi32(total, n[j]);
  }
  // int32 -> int8 in order (packs interleave 128-bit lanes; the permutation undoes it)
  const __m256i packed = _mm256_packs_epi16(_mm256_packs_epi32(n[0], n[1]), _mm256_packs_epi32(n[2], n[3]));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(q),
                      _mm256_permutevar8x32_epi32(packed, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
  __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(total), _mm256_extracti128_si256(total, 1));
  s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4e));
  s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xb1));
  *d_out = d;
  return _mm_cvtsi128_si32(s4);
}
#endif

void quantize_x(const QuantLinearArgs& a, QuantizedX& qx, bool avx2) {
  const int64_t nb = a.in / kQuantBlock;
  qx.q.resize(size_t(a.rows * a.in));
  qx.d.resize(size_t(a.rows * nb));
  qx.s.resize(size_t(a.rows * nb));
  qx.n.resize(size_t(a.rows * nb));
  for (int64_t m = 0; m < a.rows; ++m)
    for (int64_t b = 0; b < nb; ++b) {
      const float* x = a.x + m * a.x_stride + b * kQuantBlock;
      int8_t* q = qx.q.data() + m * a.in + b * kQuantBlock;
      float* d = qx.d.data() + m * nb + b;
#if defined(__x86_64__)
      const int sum = avx2 ? quantize_block_avx2(x, q, d) : quantize_block_portable(x, q, d);
#else
      const int sum = quantize_block_portable(x, q, d);
#endif
      qx.s[size_t(m * nb + b)] = *d * float(sum);
      qx.n[size_t(m * nb + b)] = sum;
    }
}

// Weight bytes each chunk of rows reads before the next chunk reads them again (past 8 rows of x).
constexpr int64_t kTileBytes = 128 * 1024;

// Output features [n0, n1) for every row of x: chunks of up to 8 rows, each the same code whatever
// the row count, over tiles of the weight small enough to stay in cache while every chunk reads it.
void features(const QuantLinearArgs& a, const QuantizedX& qx, int64_t n0, int64_t n1, bool avx2) {
  const int64_t nb = a.in / kQuantBlock;
  const int64_t unit = a.packed ? kPackRows : 1;  // a tile holds whole groups of the packed layout
  const int64_t tile = a.rows <= kQuantLinearMaxRows ? n1 - n0 : std::max<int64_t>(1, kTileBytes / a.w_stride / unit) * unit;
  for (int64_t t0 = n0; t0 < n1; t0 += tile) {
    const int64_t t1 = std::min(n1, t0 + tile);
    for (int64_t r = 0; r < a.rows; r += kQuantLinearMaxRows) {
      const Chunk c{qx.q.data() + r * a.in, qx.d.data() + r * nb, qx.s.data() + r * nb, qx.n.data() + r * nb,
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
  static thread_local QuantizedX mine;  // per calling thread: the draft may run beside the target
  const QuantizedX& qx = mine;          // the team's threads must read the caller's, not their own
  quantize_x(a, mine, avx2);
  const int64_t chunks = (a.rows + kQuantLinearMaxRows - 1) / kQuantLinearMaxRows;
  const int threads = team_size(a.out * a.w_stride * chunks, a.packed ? a.out / kPackRows : a.out, a.num_threads);
  if (threads <= 1) return features(a, qx, 0, a.out, avx2);
#pragma omp parallel num_threads(threads)
  {
    // The team may be smaller than asked (nested regions, OMP_THREAD_LIMIT): share among those here.
    const int64_t team = omp_get_num_threads(), t = omp_get_thread_num();
    const int64_t unit = a.packed ? kPackRows : 1, units = a.out / unit;  // packed: whole groups each
    features(a, qx, units * t / team * unit, units * (t + 1) / team * unit, avx2);
  }
}

namespace {
// Row n's block b of a packed weight, copied back to the row-major block format.
void unpack_block(const uint8_t* w, int64_t w_stride, int bytes, int64_t n, int64_t b, uint8_t* blk) {
  const int r = int(n % kPackRows), header = bytes == 20 ? 4 : 2, payload = bytes - header;
  const uint8_t* rec = w + (n / kPackRows) * kPackRows * w_stride + b * kPackRows * bytes;
  std::memcpy(blk, rec + 2 * r, 2);
  if (header == 4) std::memcpy(blk + 2, rec + 16 + 2 * r, 2);
  const uint8_t* p = rec + 8 * header;
  for (int c = 0; c < payload / 4; ++c) std::memcpy(blk + header + 4 * c, p + 32 * c + 4 * r, 4);
}
}  // namespace

void pack_rows8(const uint8_t* src, uint8_t* dst, int64_t out, int64_t row_bytes, QType type) {
  const int bytes = quant_block_bytes(int(type)), header = type == QType::kQ4_1 ? 4 : 2, payload = bytes - header;
  const int64_t nb = row_bytes / bytes;
  for (int64_t g = 0; g < out / kPackRows; ++g)
    for (int64_t b = 0; b < nb; ++b) {
      uint8_t* rec = dst + g * kPackRows * row_bytes + b * kPackRows * bytes;
      for (int r = 0; r < kPackRows; ++r) {
        const uint8_t* blk = src + (g * kPackRows + r) * row_bytes + b * bytes;
        std::memcpy(rec + 2 * r, blk, 2);
        if (header == 4) std::memcpy(rec + 16 + 2 * r, blk + 2, 2);
        for (int c = 0; c < payload / 4; ++c) std::memcpy(rec + 8 * header + 32 * c + 4 * r, blk + header + 4 * c, 4);
      }
    }
}

void take_rows(const uint8_t* w, int64_t w_stride, QType type, const int64_t* ids, int64_t n, uint8_t* out,
               bool packed) {
  const int bytes = quant_block_bytes(int(type));
  for (int64_t i = 0; i < n; ++i) {
    uint8_t* row = out + i * w_stride;
    if (!packed) {
      std::memcpy(row, w + ids[i] * w_stride, size_t(w_stride));
      continue;
    }
    for (int64_t b = 0; b < w_stride / bytes; ++b) unpack_block(w, w_stride, bytes, ids[i], b, row + b * bytes);
  }
}

void dequantize_rows(const uint8_t* w, int64_t w_stride, QType type, int64_t in, const int64_t* ids, int64_t n,
                     float* out, int64_t out_stride, int num_threads, bool packed) {
  const int64_t nb = in / kQuantBlock;
  const int bytes = quant_block_bytes(int(type));
  const int threads = team_size(n * w_stride, n, num_threads);
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
  for (int64_t i = 0; i < n; ++i) {
    const int64_t id = ids ? ids[i] : i;
    const uint8_t* row = w + id * w_stride;
    float* y = out + i * out_stride;
    uint8_t copy[34];
    for (int64_t b = 0; b < nb; ++b) {
      const uint8_t* blk = row + b * bytes;
      if (packed) unpack_block(w, w_stride, bytes, id, b, copy), blk = copy;
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
