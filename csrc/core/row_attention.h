// Row-exact attention on CPU: the tree_attention contract (csrc/core/tree_attention.h), fp32 only,
// computed so that a query row's result depends on nothing but its own q and the keys it sees.
//
// Each (batch, query, head) lists the keys it sees in slot order (the committed prefix, then the
// tree nodes its mask bit allows), and runs the same scalar-order code over that list: scores,
// their max, exp, the sum, the weighted sum of values. The number of query rows in the call, the
// other rows' masks, where the prefix ends and the tree begins, and the thread count change
// nothing. So a token decoded alone (prefix p, one tree node) and the same token inside a verified
// window (prefix p - i, i + 1 chain nodes) give bitwise-equal outputs: with row-local linears after
// it, speculative decoding's logits equal autoregressive ones bit for bit, whatever rounding the
// linears do (int8 activations included).
#pragma once
#include "core/tree_attention.h"

namespace mirror_rt {

// Same arguments as tree_attention; a.dtype must be kF32 (the binding checks it). mask_bits may be
// nullptr: the tree nodes then form a causal chain (row i sees nodes 0 .. T - Tq + i).
void row_attention(const TreeAttentionArgs& a);

}  // namespace mirror_rt
