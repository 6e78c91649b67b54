// Tree attention on CPU: framework-free (raw pointers, element strides, no torch/pybind headers).
//
// Contract (= mirror_rt.ops.reference.tree_attention_ref): for batch b, query node i (one of the
// LAST Tq of the T tree nodes) and query head h, attend over
//   the committed prefix k_cache[b, 0:cache_seqlens[b], h / (Hq/Hkv)]   (always visible) and
//   the tree nodes k_tree[b, j, h / (Hq/Hkv)] for which mask bit (b, i, j) is set,
// softmax in fp32, output in the storage dtype. A row that sees nothing yields zeros.
#pragma once
#include <cstdint>

namespace mirror_rt {

enum class DType : int { kF32 = 0, kBF16 = 1 };  // bf16 travels as its uint16 bit pattern

constexpr int kMaxTreeNodes = 256;  // packed mask: one bit per tree node per query row
constexpr int kMaxHeadDim = 512;    // bounds a stack row buffer in the kernel

// A [B, L, H, D] tensor: element (b, l, h, d) lives at data + b*sb + l*sl + h*sh + d.
// The head dim must be contiguous (stride 1); the other strides are arbitrary (0 allowed).
struct Tensor4 {
  const void* data;
  int64_t sb, sl, sh;
};

struct TreeAttentionArgs {
  DType dtype;
  int B, Tq, T, S, Hq, Hkv, D;
  Tensor4 q;                       // [B, Tq, Hq, D]
  Tensor4 k_cache, v_cache;        // [B, S, Hkv, D]
  const int32_t* cache_seqlens;    // [B], each in [0, S]
  Tensor4 k_tree, v_tree;          // [B, T, Hkv, D]
  // [B, Tq, W] packed bits, words contiguous: node j of row i is bit (j % 32) of word j / 32.
  const uint32_t* mask_bits;
  int64_t mask_sb, mask_si;        // element strides of mask_bits along B and Tq; W >= ceil(T/32)
  void* out;                       // [B, Tq, Hq, D]
  int64_t out_sb, out_sl, out_sh;
  float sm_scale;
  int num_threads;                 // <= 0: OpenMP default
};

// Runs the whole op; inputs are assumed valid (the binding checks them).
void tree_attention(const TreeAttentionArgs& a);

// bool mask [B, Tq, T] (one byte per entry, arbitrary element strides) -> packed [B, Tq, W].
void pack_tree_mask(const uint8_t* mask, int64_t sb, int64_t si, int64_t sj, int B, int Tq, int T,
                    uint32_t* bits, int W);

}  // namespace mirror_rt
