// See row_attention.h. One task per (batch, query row, query head); its keys are gathered as
// pointers in slot order and every loop below runs over that list from its first entry, so the
// arithmetic of a row is a function of its visible keys alone. The flash-style kernel in
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

// q . k over D values, eight lanes then a fixed pairwise fold.
inline float dot(const float* q, const float* k, int D) {
  v8f acc{};
  int d = 0;
  for (; d + 8 <= D; d += 8) acc += load8(q + d) * load8(k + d);
  float s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
  for (; d < D; ++d) s += q[d] * k[d];
  return s;
}

// The keys (and values) one row sees, in slot order.
struct Visible {
  std::vector<const float*> k, v;
  std::vector<float> p;  // scores, then probabilities; padded to a multiple of 8
};

MIRROR_RT_CLONES void one_row(const TreeAttentionArgs& a, int b, int i, int h, Visible& vis) {
  const int G = a.Hq / a.Hkv, hk = h / G, D = a.D;
  const float* qrow = static_cast<const float*>(a.q.data) + b * a.q.sb + i * a.q.sl + h * a.q.sh;
  float* out = static_cast<float*>(a.out) + b * a.out_sb + i * a.out_sl + h * a.out_sh;
  vis.k.clear();
  vis.v.clear();
  const float* kc = static_cast<const float*>(a.k_cache.data) + b * a.k_cache.sb + hk * a.k_cache.sh;
  const float* vc = static_cast<const float*>(a.v_cache.data) + b * a.v_cache.sb + hk * a.v_cache.sh;
  for (int j = 0; j < a.cache_seqlens[b]; ++j) {
    vis.k.push_back(kc + j * a.k_cache.sl);
    vis.v.push_back(vc + j * a.v_cache.sl);
  }
  const float* kt = static_cast<const float*>(a.k_tree.data) + b * a.k_tree.sb + hk * a.k_tree.sh;
  const float* vt = static_cast<const float*>(a.v_tree.data) + b * a.v_tree.sb + hk * a.v_tree.sh;
  const uint32_t* bits = a.mask_bits ? a.mask_bits + b * a.mask_sb + i * a.mask_si : nullptr;
  const int last = a.T - a.Tq + i;  // without a mask: a causal chain, row i sees nodes [0, last]
  for (int j = 0; j < a.T; ++j)
    if (bits ? (bits[j / 32] >> (j % 32) & 1u) : j <= last) {
      vis.k.push_back(kt + j * a.k_tree.sl);
      vis.v.push_back(vt + j * a.v_tree.sl);
    }
  const int n = int(vis.k.size());
  if (n == 0) {
    std::fill(out, out + D, 0.0f);
    return;
  }
  const int n8 = (n + 7) / 8 * 8;
  vis.p.resize(n8);
  float* p = vis.p.data();
  float mx = -3.0e38f;
  for (int j = 0; j < n; ++j) {
    p[j] = dot(qrow, vis.k[j], D) * a.sm_scale;
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
  float acc[kMaxHeadDim];
  std::fill(acc, acc + D, 0.0f);
  for (int j = 0; j < n; ++j) {
    const float pj = p[j], *v = vis.v[j];
    int d = 0;
    for (; d + 8 <= D; d += 8) store8(acc + d, load8(acc + d) + pj * load8(v + d));
    for (; d < D; ++d) acc[d] += pj * v[d];
  }
  const float inv = 1.0f / l;
  for (int d = 0; d < D; ++d) out[d] = acc[d] * inv;
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
    Visible vis;
#pragma omp for schedule(static)
    for (int64_t t = 0; t < tasks; ++t) {
      const int h = int(t % a.Hq), i = int(t / a.Hq % a.Tq), b = int(t / (int64_t(a.Hq) * a.Tq));
      one_row(a, b, i, h, vis);
    }
  }
}

}  // namespace mirror_rt
