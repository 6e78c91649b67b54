// AscendC build/extend of Mirror-SD's rollout tree: the algorithm of csrc/core/branch_tree.cpp
// on one AI core's scalar unit, straight on global memory (<= 256 nodes: a few microseconds,
// and it saves two host round trips per draft step on an NPU lane).
// WRITTEN AGAINST THE CANN AscendC API, NEVER COMPILED OR RUN (no CANN toolkit / NPU in our CI).
#define MIRROR_RT_TILING_FN __aicore__ inline
#include "kernel_operator.h"
#include "tiling.h"

using namespace AscendC;
using mirror_rt::ascend::BranchTreeTiling;

namespace {

struct Tree {
  GlobalTensor<int64_t> tokens, positions;
  GlobalTensor<int32_t> parents, tips;
  GlobalTensor<uint32_t> mask;
  uint32_t words;

  __aicore__ inline void AddNode(uint32_t node, int64_t token, int32_t parent) {
    for (uint32_t w = 0; w < words; ++w)
      mask.SetValue(node * words + w, parent >= 0 ? mask.GetValue(parent * words + w) : 0u);
    mask.SetValue(node * words + node / 32, mask.GetValue(node * words + node / 32) | (1u << (node % 32)));
    tokens.SetValue(node, token);
    parents.SetValue(node, parent);
    positions.SetValue(node, parent >= 0 ? positions.GetValue(parent) + 1 : 0);
  }
};

__aicore__ inline void LoadTiling(GM_ADDR src, BranchTreeTiling* t) {
  auto* s = reinterpret_cast<__gm__ uint32_t*>(src);
  auto* d = reinterpret_cast<uint32_t*>(t);
  for (uint32_t i = 0; i < sizeof(BranchTreeTiling) / 4; ++i) d[i] = s[i];
}

__aicore__ inline Tree Bind(GM_ADDR tokens, GM_ADDR parents, GM_ADDR positions, GM_ADDR mask, GM_ADDR tips,
                            uint32_t words) {
  Tree tr;
  tr.tokens.SetGlobalBuffer((__gm__ int64_t*)tokens);
  tr.parents.SetGlobalBuffer((__gm__ int32_t*)parents);
  tr.positions.SetGlobalBuffer((__gm__ int64_t*)positions);
  tr.mask.SetGlobalBuffer((__gm__ uint32_t*)mask);
  tr.tips.SetGlobalBuffer((__gm__ int32_t*)tips);
  tr.words = words;
  return tr;
}

// Scalar stores go through the AI core's data cache: write it back before the host reads.
__aicore__ inline void FlushScalarWrites(GlobalTensor<int32_t>& any) {
  DataCacheCleanAndInvalid<int32_t, CacheLine::ENTIRE_DATA_CACHE, DcciDst::CACHELINE_OUT>(any);
}

}  // namespace

// counts[0] <- number of branches (or -1 when the capacity is too small). Same node order and
// skip rule as the CPU op: window chain, then branch roots (position-major, rank-minor).
extern "C" __global__ __aicore__ void mirror_build_branch_tree(GM_ADDR window, GM_ADDR exit_ids, GM_ADDR tokens,
                                                              GM_ADDR parents, GM_ADDR positions, GM_ADDR mask,
                                                              GM_ADDR branch_pos, GM_ADDR branch_rank, GM_ADDR tips,
                                                              GM_ADDR counts, GM_ADDR tiling) {
  BranchTreeTiling t;
  LoadTiling(tiling, &t);
  GlobalTensor<int64_t> w, e;
  GlobalTensor<int32_t> bpos, brank, cnt;
  w.SetGlobalBuffer((__gm__ int64_t*)window);
  e.SetGlobalBuffer((__gm__ int64_t*)exit_ids);
  bpos.SetGlobalBuffer((__gm__ int32_t*)branch_pos);
  brank.SetGlobalBuffer((__gm__ int32_t*)branch_rank);
  cnt.SetGlobalBuffer((__gm__ int32_t*)counts);
  Tree tr = Bind(tokens, parents, positions, mask, tips, t.mask_words);
  uint32_t nb = 0;
  for (uint32_t i = 0; i <= t.gamma; ++i)
    for (uint32_t r = 0; r < t.kappa && nb < t.max_branches; ++r) {
      if (i < t.gamma && e.GetValue(i * t.kappa + r) == w.GetValue(i)) continue;
      bpos.SetValue(nb, int32_t(i));
      brank.SetValue(nb, int32_t(r));
      ++nb;
    }
  if (t.gamma + nb > t.capacity) {
    cnt.SetValue(0, -1);
    return;
  }
  for (uint32_t k = 0; k < t.gamma; ++k) tr.AddNode(k, w.GetValue(k), int32_t(k) - 1);
  for (uint32_t k = 0; k < nb; ++k) {
    const int32_t i = bpos.GetValue(k);
    tr.AddNode(t.gamma + k, e.GetValue(i * t.kappa + brank.GetValue(k)), i - 1);
    tr.tips.SetValue(k, int32_t(t.gamma + k));
  }
  cnt.SetValue(0, int32_t(nb));
  FlushScalarWrites(cnt);
}

// counts = [num_nodes, num_branches, n_new] in, counts[0] <- new node count (or -1: capacity).
extern "C" __global__ __aicore__ void mirror_extend_branch_tree(GM_ADDR new_tokens, GM_ADDR tokens, GM_ADDR parents,
                                                               GM_ADDR positions, GM_ADDR mask, GM_ADDR tips,
                                                               GM_ADDR counts, GM_ADDR tiling) {
  BranchTreeTiling t;
  LoadTiling(tiling, &t);
  GlobalTensor<int64_t> nt;
  GlobalTensor<int32_t> cnt;
  nt.SetGlobalBuffer((__gm__ int64_t*)new_tokens);
  cnt.SetGlobalBuffer((__gm__ int32_t*)counts);
  Tree tr = Bind(tokens, parents, positions, mask, tips, t.mask_words);
  int32_t T = cnt.GetValue(0);
  const int32_t nb = cnt.GetValue(1), n_new = cnt.GetValue(2);
  if (T + nb * n_new > int32_t(t.capacity)) {
    cnt.SetValue(0, -1);
    return;
  }
  for (int32_t k = 0; k < nb; ++k)
    for (int32_t s = 0; s < n_new; ++s) {
      tr.AddNode(T, nt.GetValue(k * n_new + s), tr.tips.GetValue(k));
      tr.tips.SetValue(k, T++);
    }
  cnt.SetValue(0, T);
  FlushScalarWrites(cnt);
}
