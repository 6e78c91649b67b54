// CPU tree attention: flash-style online softmax over key blocks, one task per
// (batch, KV head, query block). All query heads that share a KV head form the rows of one task,
// so every K/V row is read (and converted from bf16) once per task and reused by G*Tq_block rows.
// Both matrix products use one 4x16 register-tile kernel: S^T = K * Q^T (K rows used in place,
// Q transposed once per task) and O += P * V.
#include "core/tree_attention.h"

#include <algorithm>
#include <vector>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "core/simd.h"

namespace mirror_rt {
namespace {

constexpr int MR = 4;             // rows per register tile
constexpr int NR = 16;            // columns per register tile (two 8-float vectors)
constexpr int KB = 64;            // keys per block
constexpr int kMaxRows = 192;     // rows (query heads x queries) per task, bounds the scratch
constexpr float kMasked = -1e30f; // finite "minus infinity": -ffast-math is on
constexpr float kLog2e = 1.4426950408889634f;

int round_up(int x, int m) { return (x + m - 1) / m * m; }

// Per-thread buffers. Rows (query heads x queries) are padded to Mp = multiple of 16 so that
// scores live transposed, st[key][row]: the softmax then runs across rows in whole vectors.
struct Scratch {
  std::vector<float> qt, kf, v, st, o, m, l;
  Scratch(int Mp, int D, int Dp)
      : qt(size_t(D) * Mp), kf(size_t(KB) * D), v(size_t(KB) * Dp, 0.f), st(size_t(KB) * Mp),
        o(size_t(Mp) * Dp), m(Mp), l(Mp) {}
};

// C[4][16] = (accumulate ? C : 0) + sum_k A[r*lda + k*ka] * B[k*ldb + 0:16]
__attribute__((always_inline)) inline void tile_4x16(int K, const float* A, int64_t lda, int64_t ka,
                                                     const float* B, int64_t ldb, float* C, int64_t ldc,
                                                     bool accumulate) {
  v8f c[MR][2];
  for (int r = 0; r < MR; ++r)
    for (int h = 0; h < 2; ++h) c[r][h] = accumulate ? load8(C + r * ldc + 8 * h) : v8f{};
  for (int k = 0; k < K; ++k) {
    const v8f b0 = load8(B + k * ldb), b1 = load8(B + k * ldb + 8);
    for (int r = 0; r < MR; ++r) {
      const float a = A[r * lda + k * ka];
      c[r][0] += a * b0;
      c[r][1] += a * b1;
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int h = 0; h < 2; ++h) store8(C + r * ldc + 8 * h, c[r][h]);
}

// D elements of one row, converted to fp32 and scaled.
inline void load_row(const void* base, int64_t off, DType dt, int D, float scale, float* dst) {
  if (dt == DType::kF32) {
    const float* p = static_cast<const float*>(base) + off;
    for (int d = 0; d < D; ++d) dst[d] = p[d] * scale;
  } else {
    const uint16_t* p = static_cast<const uint16_t*>(base) + off;
    for (int d = 0; d < D; ++d) dst[d] = bf16_to_f32(p[d]) * scale;
  }
}

struct Task {
  int b, kvh, q0, nq;
};

// One key block of N <= KB keys (rows kbase + j*ks of K and V). `mask` is null for prefix keys,
// else the packed words of query row q0 (row stride mask_si) and t0 the block's first tree node.
MIRROR_RT_CLONES
void attend_block(const TreeAttentionArgs& a, const Task& t, int Mp, int Dp, const void* K, const void* V,
                  int64_t kbase, int64_t vbase, int64_t ks, int64_t vs, int N, const uint32_t* mask, int t0,
                  Scratch& s) {
  const int D = a.D, G = a.Hq / a.Hkv;
  // Tree keys no query row of this task may see: skip the block, or their score tiles (trees are
  // sparse: a node sees only its ancestors).
  bool seen[KB];
  if (mask) {
    bool any = false;
    for (int j = 0; j < N; ++j) {
      const int node = t0 + j;
      uint32_t bit = 0;
      for (int i = 0; i < t.nq; ++i) bit |= mask[i * a.mask_si + (node >> 5)] >> (node & 31);
      seen[j] = bit & 1u;
      any |= seen[j];
    }
    if (!any) return;
  }
  // K and V rows as fp32: in place when stored as fp32 (and, for V, tiling evenly), else converted.
  const float* kp;
  int64_t ldk;
  if (a.dtype == DType::kF32) {
    kp = static_cast<const float*>(K) + kbase;
    ldk = ks;
  } else {
    for (int j = 0; j < N; ++j) load_row(K, kbase + j * ks, a.dtype, D, 1.0f, s.kf.data() + j * D);
    kp = s.kf.data();
    ldk = D;
  }
  const float* vp;
  int64_t ldv;
  if (a.dtype == DType::kF32 && D == Dp) {
    vp = static_cast<const float*>(V) + vbase;
    ldv = vs;
  } else {
    for (int j = 0; j < N; ++j) load_row(V, vbase + j * vs, a.dtype, D, 1.0f, s.v.data() + j * Dp);
    vp = s.v.data();
    ldv = Dp;
  }
  // st[j][r] = k_j . q_r (q pre-scaled by sm_scale * log2 e; qt holds q transposed, [D][Mp]).
  float* st = s.st.data();
  const int N4 = N & ~(MR - 1);
  for (int j = 0; j < N4; j += MR) {
    if (mask && !(seen[j] | seen[j + 1] | seen[j + 2] | seen[j + 3])) continue;  // masked below
    for (int r = 0; r < Mp; r += NR) tile_4x16(D, kp + j * ldk, ldk, 1, s.qt.data() + r, Mp, st + j * Mp + r, Mp, false);
  }
  for (int j = N4; j < N; ++j)  // ragged tail: one key at a time
    for (int r = 0; r < Mp; r += 8) {
      v8f acc{};
      for (int d = 0; d < D; ++d) acc += kp[j * ldk + d] * load8(s.qt.data() + d * Mp + r);
      store8(st + j * Mp + r, acc);
    }
  if (mask)
    for (int j = 0; j < N; ++j) {
      const int node = t0 + j;
      for (int i = 0; i < t.nq; ++i)
        if (!((mask[i * a.mask_si + (node >> 5)] >> (node & 31)) & 1u))
          for (int g = 0; g < G; ++g) st[j * Mp + i * G + g] = kMasked;
    }
  // Online softmax across the rows, 8 at a time (base 2).
  const v8f masked_half = v8f{} + 0.5f * kMasked, zero = v8f{};
  for (int r = 0; r < Mp; r += 8) {
    v8f mx = v8f{} + kMasked;
    for (int j = 0; j < N; ++j) {
      const v8f x = load8(st + j * Mp + r);
      mx = x > mx ? x : mx;
    }
    const v8f m_old = load8(s.m.data() + r), m_new = m_old > mx ? m_old : mx;
    v8f sum{};
    for (int j = 0; j < N; ++j) {
      const v8f x = load8(st + j * Mp + r);
      const v8f p = x > masked_half ? exp2_nonpos(x - m_new) : zero;
      store8(st + j * Mp + r, p);
      sum += p;
    }
    const v8f alpha = exp2_nonpos(m_old - m_new);  // ~0 while m_old is the sentinel (o, l are 0)
    store8(s.l.data() + r, load8(s.l.data() + r) * alpha + sum);
    store8(s.m.data() + r, m_new);
    for (int i = 0; i < 8; ++i) {
      if (alpha[i] == 1.0f) continue;
      float* orow = s.o.data() + (r + i) * Dp;
      for (int d = 0; d < Dp; ++d) orow[d] *= alpha[i];
    }
  }
  // o[r] += sum_j p[j][r] v_j
  for (int r = 0; r < Mp; r += MR)
    for (int n = 0; n < Dp; n += NR) tile_4x16(N, st + r, 1, Mp, vp + n, ldv, s.o.data() + r * Dp + n, Dp, true);
}

void run_task(const TreeAttentionArgs& a, const Task& t, Scratch& s) {
  const int D = a.D, Dp = round_up(D, NR), G = a.Hq / a.Hkv;
  const int M = t.nq * G, Mp = round_up(M, NR);
  const float qscale = a.sm_scale * kLog2e;
  float row[kMaxHeadDim];
  std::fill(s.qt.begin(), s.qt.begin() + size_t(D) * Mp, 0.f);
  for (int i = 0; i < t.nq; ++i)
    for (int g = 0; g < G; ++g) {
      load_row(a.q.data, t.b * a.q.sb + (t.q0 + i) * a.q.sl + (t.kvh * G + g) * a.q.sh, a.dtype, D, qscale, row);
      for (int d = 0; d < D; ++d) s.qt[size_t(d) * Mp + i * G + g] = row[d];
    }
  std::fill(s.o.begin(), s.o.begin() + size_t(Mp) * Dp, 0.f);
  std::fill(s.m.begin(), s.m.begin() + Mp, kMasked);
  std::fill(s.l.begin(), s.l.begin() + Mp, 0.f);

  const int n = a.cache_seqlens[t.b];
  for (int j0 = 0; j0 < n; j0 += KB)
    attend_block(a, t, Mp, Dp, a.k_cache.data, a.v_cache.data,
                 t.b * a.k_cache.sb + j0 * a.k_cache.sl + t.kvh * a.k_cache.sh,
                 t.b * a.v_cache.sb + j0 * a.v_cache.sl + t.kvh * a.v_cache.sh, a.k_cache.sl,
                 a.v_cache.sl, std::min(KB, n - j0), nullptr, 0, s);
  const uint32_t* mrow = a.mask_bits + t.b * a.mask_sb + t.q0 * a.mask_si;
  for (int j0 = 0; j0 < a.T; j0 += KB)
    attend_block(a, t, Mp, Dp, a.k_tree.data, a.v_tree.data,
                 t.b * a.k_tree.sb + j0 * a.k_tree.sl + t.kvh * a.k_tree.sh,
                 t.b * a.v_tree.sb + j0 * a.v_tree.sl + t.kvh * a.v_tree.sh, a.k_tree.sl,
                 a.v_tree.sl, std::min(KB, a.T - j0), mrow, j0, s);

  for (int i = 0; i < t.nq; ++i)
    for (int g = 0; g < G; ++g) {
      const int r = i * G + g;
      const float inv = s.l[r] > 0.f ? 1.0f / s.l[r] : 0.f;
      const float* orow = s.o.data() + r * Dp;
      const int64_t off = t.b * a.out_sb + (t.q0 + i) * a.out_sl + (t.kvh * G + g) * a.out_sh;
      if (a.dtype == DType::kF32) {
        float* dst = static_cast<float*>(a.out) + off;
        for (int d = 0; d < D; ++d) dst[d] = orow[d] * inv;
      } else {
        uint16_t* dst = static_cast<uint16_t*>(a.out) + off;
        for (int d = 0; d < D; ++d) dst[d] = f32_to_bf16(orow[d] * inv);
      }
    }
}

}  // namespace

void tree_attention(const TreeAttentionArgs& a) {
  const int G = a.Hq / a.Hkv;
#ifdef _OPENMP
  const int nth = a.num_threads > 0 ? a.num_threads : omp_get_max_threads();
#else
  const int nth = 1;
#endif
  // Query blocks: as few as the scratch allows (each K/V block is then read once per KV head),
  // but enough tasks to keep every thread busy when B * Hkv alone is too few.
  int nqb = (a.Tq * G + kMaxRows - 1) / kMaxRows;
  while (nth > 1 && a.B * a.Hkv * nqb < 2 * nth && (a.Tq + nqb) / (nqb + 1) >= 4) ++nqb;
  const int qb = (a.Tq + nqb - 1) / nqb;
  std::vector<Task> tasks;
  for (int b = 0; b < a.B; ++b)
    for (int h = 0; h < a.Hkv; ++h)
      for (int q0 = 0; q0 < a.Tq; q0 += qb) tasks.push_back({b, h, q0, std::min(qb, a.Tq - q0)});
  const int rows = round_up(qb * G, NR), threads = std::max(1, std::min<int>(nth, int(tasks.size())));
  std::vector<Scratch> scratch;
  scratch.reserve(threads);  // allocated here, so bad_alloc surfaces as an exception
  for (int i = 0; i < threads; ++i) scratch.emplace_back(rows, a.D, round_up(a.D, NR));
  const int ntasks = int(tasks.size());
  if (threads == 1) {
    for (const Task& t : tasks) run_task(a, t, scratch[0]);
    return;
  }
#ifdef _OPENMP
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
  for (int i = 0; i < ntasks; ++i) run_task(a, tasks[i], scratch[omp_get_thread_num()]);
#endif
}

void pack_tree_mask(const uint8_t* mask, int64_t sb, int64_t si, int64_t sj, int B, int Tq, int T,
                    uint32_t* bits, int W) {
  for (int b = 0; b < B; ++b)
    for (int i = 0; i < Tq; ++i) {
      uint32_t* row = bits + (int64_t(b) * Tq + i) * W;
      std::fill(row, row + W, 0u);
      const uint8_t* src = mask + b * sb + i * si;
      for (int j = 0; j < T; ++j)
        if (src[j * sj]) row[j >> 5] |= 1u << (j & 31);
    }
}

}  // namespace mirror_rt
