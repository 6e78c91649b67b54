// Mirror-SD's batched rollout tree (DESIGN.md §1 step 3), framework-free.
//
// Node order: the window chain w_1..w_gamma (nodes 0..gamma-1), then one root per branch
// (nodes gamma..gamma+nb-1), then each rollout step appends n_new nodes per branch
// (branch-major, token-minor). Node ids are topological (parent < child).
// Per node: token, parent (-1 = hangs directly off the committed prefix), position = depth below
// the committed prefix (w_1 and the branches at i = 0 are 0; RoPE position = committed_len + it),
// and a packed mask row (W words, bit j of the row: the node may attend to node j = its ancestors
// and itself).
#pragma once
#include <cstdint>

namespace mirror_rt {

struct BranchTreeBuffers {
  int capacity, W;        // nodes the buffers hold; mask words per row (W * 32 >= capacity)
  int64_t* tokens;        // [capacity]
  int32_t* parents;       // [capacity]
  int64_t* positions;     // [capacity]
  uint32_t* mask;         // [capacity, W]
  int32_t* branch_tip;    // [max branches]: current deepest node of each branch
};

// Branches are (i, v) for i = 0..gamma and v = exit_ids[i][r], r = 0..kappa-1 (position-major,
// rank-minor), skipping v == window[i] (that branch is the window itself) and v < 0 (a hole: the
// caller chose no branch there), keeping the first max_branches (< 0: all). Writes
// branch_pos[k] = i, branch_rank[k] = r and the tree into `buf`.
// Returns the number of branches, or -1 when gamma + branches exceeds buf.capacity.
int build_branch_tree(const int64_t* window, int gamma, const int64_t* exit_ids, int kappa,
                      int max_branches, BranchTreeBuffers buf, int32_t* branch_pos,
                      int32_t* branch_rank);

// Appends new_tokens[k][0..n_new) to branch k (a chain under its tip) for every branch, starting
// at node T. Returns the new node count, or -1 when it would exceed buf.capacity.
int extend_branch_tree(const int64_t* new_tokens, int nb, int n_new, int T, BranchTreeBuffers buf);

}  // namespace mirror_rt
