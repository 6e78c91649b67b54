#include "core/branch_tree.h"

#include <algorithm>

namespace mirror_rt {
namespace {

// Node `node` with `parent` (-1: none): its mask row is the parent's row plus its own bit.
void add_node(BranchTreeBuffers& b, int node, int64_t token, int parent) {
  uint32_t* row = b.mask + int64_t(node) * b.W;
  if (parent >= 0)
    std::copy(b.mask + int64_t(parent) * b.W, b.mask + int64_t(parent + 1) * b.W, row);
  else
    std::fill(row, row + b.W, 0u);
  row[node >> 5] |= 1u << (node & 31);
  b.tokens[node] = token;
  b.parents[node] = parent;
  b.positions[node] = parent >= 0 ? b.positions[parent] + 1 : 0;
}

}  // namespace

int build_branch_tree(const int64_t* window, int gamma, const int64_t* exit_ids, int kappa,
                      int max_branches, BranchTreeBuffers buf, int32_t* branch_pos,
                      int32_t* branch_rank) {
  int nb = 0;
  for (int i = 0; i <= gamma; ++i)
    for (int r = 0; r < kappa; ++r) {
      if (max_branches >= 0 && nb >= max_branches) break;
      const int64_t v = exit_ids[i * kappa + r];
      if (v < 0) continue;                                 // a hole: no branch chosen here
      if (i < gamma && v == window[i]) continue;           // that branch IS the window
      branch_pos[nb] = i;
      branch_rank[nb] = r;
      ++nb;
    }
  if (gamma + nb > buf.capacity) return -1;
  for (int k = 0; k < gamma; ++k) add_node(buf, k, window[k], k - 1);
  for (int k = 0; k < nb; ++k) {
    const int i = branch_pos[k], node = gamma + k;
    add_node(buf, node, exit_ids[i * kappa + branch_rank[k]], i - 1);  // parent w_i, or -1 at i = 0
    buf.branch_tip[k] = node;
  }
  return nb;
}

int extend_branch_tree(const int64_t* new_tokens, int nb, int n_new, int T, BranchTreeBuffers buf) {
  if (int64_t(T) + int64_t(nb) * n_new > buf.capacity) return -1;
  for (int k = 0; k < nb; ++k)
    for (int s = 0; s < n_new; ++s) {
      add_node(buf, T, new_tokens[int64_t(k) * n_new + s], buf.branch_tip[k]);
      buf.branch_tip[k] = T++;
    }
  return T;
}

}  // namespace mirror_rt
