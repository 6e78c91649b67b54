// See row_attention.h. One task per (batch, query row, query head); its keys are numbered in slot
// order (the prefix, then the tree nodes it sees) and every loop below runs over them from the
// first, so the arithmetic of a row is a function of its visible keys alone. The flash-style kernel in
// tree_attention.cpp blocks keys from the prefix's end and shares blocks among rows: faster for
// many rows, but a row's rounding there depends on the call.
#include "core/row_attention.h"

#include <algorithm>
#include <vector>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "core/simd.h"

namespace mirror_rt {
namespace {

constexpr float kLog2e = 1.4426950408889634f;

// q . k over D values: eight lanes, then a fixed fold (lanes k and k + 4, then pairs, then the two).
template <int D>
inline float dot(const float* q, const float* k, int d_rt) {
  const int n = D > 0 ? D : d_rt;
  v8f acc{};
  int d = 0;
  for (; d + 8 <= n; d += 8) acc += load8(q + d) * load8(k + d);
  v8f s = acc + __builtin_shuffle(acc, v8i{4, 5, 6, 7, 0, 1, 2, 3});
  s = s + __builtin_shuffle(s, v8i{2, 3, 0, 1, 6, 7, 4, 5});
  float r = s[0] + s[1];
  for (; d < n; ++d) r += q[d] * k[d];
  return r;
}

// Where one row's keys are: the first `prefix` in the cache, then the listed tree nodes (nodes
// nullptr: a chain, tree nodes 0, 1, 2, ... with no list to build).
struct Keys {
  const float *kc, *vc, *kt, *vt;
  int64_t csl, tsl;
  int prefix;
  const int* nodes;
  int64_t node(int j) const { return nodes ? nodes[j - prefix] : j - prefix; }
  const float* k(int j) const { return j < prefix ? kc + j * csl : kt + node(j) * tsl; }
  const float* v(int j) const { return j < prefix ? vc + j * csl : vt + node(j) * tsl; }
};

struct Scratch {
  std::vector<int> nodes;
  std::vector<float> p;  // scores, then probabilities; padded to a multiple of 8
};

// D > 0: the head size known at compile time (accumulators in registers); 0: any, from a.D.
template <int D>
MIRROR_RT_CLONES void one_row(const TreeAttentionArgs& a, int b, int i, int h, Scratch& sc) {
  const int G = a.Hq / a.Hkv, hk = h / G, Dn = D > 0 ? D : a.D;
  const float* qrow = static_cast<const float*>(a.q.data) + b * a.q.sb + i * a.q.sl + h * a.q.sh;
  float* out = static_cast<float*>(a.out) + b * a.out_sb + i * a.out_sl + h * a.out_sh;
  sc.nodes.clear();
  const uint32_t* bits = a.mask_bits ? a.mask_bits + b * a.mask_sb + i * a.mask_si : nullptr;
  if (bits)
    for (int j = 0; j < a.T; ++j)
      if (bits[j / 32] >> (j % 32) & 1u) sc.nodes.push_back(j);
  const int seen = bits ? int(sc.nodes.size()) : a.T - a.Tq + i + 1;  // a chain: row i sees nodes 0 .. T - Tq + i
  const Keys keys{static_cast<const float*>(a.k_cache.data) + b * a.k_cache.sb + hk * a.k_cache.sh,
                  static_cast<const float*>(a.v_cache.data) + b * a.v_cache.sb + hk * a.v_cache.sh,
                  static_cast<const float*>(a.k_tree.data) + b * a.k_tree.sb + hk * a.k_tree.sh,
                  static_cast<const float*>(a.v_tree.data) + b * a.v_tree.sb + hk * a.v_tree.sh,
                  a.k_cache.sl, a.k_tree.sl, a.cache_seqlens[b], bits ? sc.nodes.data() : nullptr};
  const int n = keys.prefix + seen;
  if (n == 0) {
    std::fill(out, out + Dn, 0.0f);
    return;
  }
  const int n8 = (n + 7) / 8 * 8;
  sc.p.resize(n8);
  float* p = sc.p.data();
  float mx = -3.0e38f;
  for (int j = 0; j < n; ++j) {
    p[j] = dot<D>(qrow, keys.k(j), Dn) * a.sm_scale;
    mx = std::max(mx, p[j]);
  }
  std::fill(p + n, p + n8, mx);
  v8f sum{};
  for (int j = 0; j < n8; j += 8) {
    v8f e = exp2_nonpos((load8(p + j) - mx) * kLog2e);
    store8(p + j, e);
    if (j + 8 <= n) sum += e;
  }
  float l = ((sum[0] + sum[4]) + (sum[1] + sum[5])) + ((sum[2] + sum[6]) + (sum[3] + sum[7]));
  for (int j = n / 8 * 8; j < n; ++j) l += p[j];
  if constexpr (D > 0) {
    v8f acc[D / 8] = {};
    for (int j = 0; j < n; ++j) {
      const float pj = p[j], *v = keys.v(j);
      for (int c = 0; c < D / 8; ++c) acc[c] += pj * load8(v + 8 * c);
    }
    const float inv = 1.0f / l;
    for (int c = 0; c < D / 8; ++c) store8(out + 8 * c, acc[c] * inv);
  } else {
    float acc[kMaxHeadDim];
    std::fill(acc, acc + Dn, 0.0f);
    for (int j = 0; j < n; ++j) {
      const float pj = p[j], *v = keys.v(j);
      int d = 0;
      for (; d + 8 <= Dn; d += 8) store8(acc + d, load8(acc + d) + pj * load8(v + d));
      for (; d < Dn; ++d) acc[d] += pj * v[d];
    }
    const float inv = 1.0f / l;
    for (int d = 0; d < Dn; ++d) out[d] = acc[d] * inv;
  }
}

}  // namespace

void row_attention(const TreeAttentionArgs& a) {
  const int64_t tasks = int64_t(a.B) * a.Tq * a.Hq;
  // Threads only change which rows a core takes, never a row's arithmetic.
  int64_t keys = 0;
  for (int b = 0; b < a.B; ++b) keys += a.cache_seqlens[b] + a.T;
  const int64_t work = keys * a.Tq * a.Hq * a.D;
  int threads = 1;
#ifdef _OPENMP
  threads = a.num_threads > 0 ? a.num_threads : omp_get_max_threads();
#endif
  if (work < (1 << 16)) threads = 1;
#pragma omp parallel num_threads(threads) if (threads > 1)
  {
    Scratch sc;
#pragma omp for schedule(dynamic, 4)
    for (int64_t t = 0; t < tasks; ++t) {
      const int h = int(t % a.Hq), i = int(t / a.Hq % a.Tq), b = int(t / (int64_t(a.Hq) * a.Tq));
      if (a.D == 64) one_row<64>(a, b, i, h, sc);
      else if (a.D == 128) one_row<128>(a, b, i, h, sc);
      else one_row<0>(a, b, i, h, sc);
    }
  }
}

}  // namespace mirror_rt
