// Host-side tiling of the AscendC kernels: plain C++ (no CANN headers), so that it is compiled
// into mirror_rt._C as well and unit-tested on CPU (tests/test_ascend_tiling.py). The kernels
// include it too, with MIRROR_RT_TILING_FN defined as `__aicore__ inline`.
//
// tree_attention on an AI core (vector unit) mirrors the CPU kernel: a task is
// (batch, KV head, query block); its rows are the G = Hq/Hkv query heads x q_block queries that
// share the KV head; keys stream through the unified buffer (UB) kv_block rows at a time with an
// online softmax. Tasks are split over block_dim cores, the first (num_tasks % block_dim) cores
// taking one extra.
#pragma once
#include <cstdint>

#ifndef MIRROR_RT_TILING_FN
#define MIRROR_RT_TILING_FN inline
#endif

namespace mirror_rt {
namespace ascend {

constexpr uint32_t kUbAlign = 32;            // UB transfers and vector ops work on 32-byte blocks
constexpr uint32_t kMaxTreeNodes = 256;      // packed mask limit, as on CPU
constexpr uint32_t kMaxRowsPerTask = 64;     // bounds the score tile rows x kv_block
constexpr uint32_t kDefaultUbBytes = 192 * 1024;  // Atlas A2 (910B) AIV unified buffer
constexpr uint32_t kDefaultCores = 40;            // 910B AIV cores; the launcher passes the real count

struct TreeAttentionTiling {
  uint32_t B, Tq, T, S, Hq, Hkv, D;
  uint32_t elem_bytes;    // 4 (fp32) or 2 (bf16) storage
  uint32_t group;         // Hq / Hkv
  uint32_t d_pad;         // D rounded up to 16 elements (32 B of bf16; 64 B of fp32)
  uint32_t mask_words;    // ceil(T / 32) int32 words per mask row
  uint32_t q_block;       // queries per task
  uint32_t num_q_blocks;  // ceil(Tq / q_block)
  uint32_t rows;          // group * q_block
  uint32_t kv_block;      // keys per UB tile (multiple of 16)
  uint32_t num_tasks;     // B * Hkv * num_q_blocks
  uint32_t block_dim;     // cores launched (<= num_tasks)
  uint32_t ub_bytes;      // UB bytes one core uses
  float sm_scale;
};

MIRROR_RT_TILING_FN uint32_t round_up(uint32_t x, uint32_t m) { return (x + m - 1) / m * m; }
MIRROR_RT_TILING_FN uint32_t ceil_div(uint32_t x, uint32_t m) { return (x + m - 1) / m; }

// UB bytes of one core: double-buffered K and V tiles in storage dtype, their fp32 copies, the
// fp32 query rows, score tile, output accumulator, running max/sum and mask rows, and a
// kv_block x d_pad fp32 scratch for products.
MIRROR_RT_TILING_FN uint32_t tree_attention_ub_bytes(uint32_t rows, uint32_t q_block, uint32_t kv_block,
                                                     uint32_t d_pad, uint32_t elem_bytes, uint32_t mask_words) {
  const uint32_t tile_store = round_up(kv_block * d_pad * elem_bytes, kUbAlign);
  const uint32_t tile_f32 = kv_block * d_pad * 4;
  uint32_t bytes = 2 * 2 * tile_store;                         // K, V x double buffer
  bytes += (elem_bytes == 4 ? 0 : 2 * tile_f32);               // bf16 -> fp32 copies
  bytes += tile_f32;                                           // product scratch
  bytes += 2 * rows * d_pad * 4;                               // q rows, output accumulator
  bytes += round_up(rows * kv_block * 4, kUbAlign);            // scores / probabilities
  bytes += 2 * round_up(rows * 4, kUbAlign) + kUbAlign;        // running max, sum; rescale factor
  bytes += round_up(q_block * mask_words * 4, kUbAlign);       // packed mask rows
  return bytes;
}

// Returns 0 and fills *t, or a nonzero code: 1 bad shape, 2 T beyond the mask limit,
// 3 bad dtype size, 4 no tile fits ub_bytes.
MIRROR_RT_TILING_FN int make_tree_attention_tiling(uint32_t B, uint32_t Tq, uint32_t T, uint32_t S,
                                                   uint32_t Hq, uint32_t Hkv, uint32_t D,
                                                   uint32_t elem_bytes, float sm_scale,
                                                   uint32_t num_cores, uint32_t ub_bytes,
                                                   TreeAttentionTiling* t) {
  if (B == 0 || Tq == 0 || Hq == 0 || Hkv == 0 || D == 0 || Hq % Hkv != 0 || Tq > T || num_cores == 0) return 1;
  if (T > kMaxTreeNodes) return 2;
  if (elem_bytes != 2 && elem_bytes != 4) return 3;
  t->B = B; t->Tq = Tq; t->T = T; t->S = S; t->Hq = Hq; t->Hkv = Hkv; t->D = D;
  t->elem_bytes = elem_bytes;
  t->group = Hq / Hkv;
  t->d_pad = round_up(D, 16);
  t->mask_words = ceil_div(T, 32);
  t->sm_scale = sm_scale;
  if (t->group > kMaxRowsPerTask) return 4;
  // Largest query block within the row cap; then smaller while cores would sit idle.
  uint32_t qb = kMaxRowsPerTask / t->group;
  qb = qb < Tq ? qb : Tq;
  while (qb > 1 && B * Hkv * ceil_div(Tq, qb) < num_cores) qb = ceil_div(qb, 2);
  // Largest key tile that fits, then fewer queries.
  for (;;) {
    uint32_t kv = 128;
    while (kv > 16 && tree_attention_ub_bytes(t->group * qb, qb, kv, t->d_pad, elem_bytes, t->mask_words) > ub_bytes)
      kv /= 2;
    const uint32_t used = tree_attention_ub_bytes(t->group * qb, qb, kv, t->d_pad, elem_bytes, t->mask_words);
    if (used <= ub_bytes) {
      t->kv_block = kv;
      t->ub_bytes = used;
      break;
    }
    if (qb == 1) return 4;
    qb = ceil_div(qb, 2);
  }
  t->q_block = qb;
  t->num_q_blocks = ceil_div(Tq, qb);
  t->rows = t->group * qb;
  t->num_tasks = B * Hkv * t->num_q_blocks;
  t->block_dim = t->num_tasks < num_cores ? t->num_tasks : num_cores;
  return 0;
}

// Tasks of core `core`: [*begin, *begin + *count). Task id = (b * Hkv + kvh) * num_q_blocks + qb.
MIRROR_RT_TILING_FN void core_task_range(const TreeAttentionTiling& t, uint32_t core, uint32_t* begin,
                                         uint32_t* count) {
  const uint32_t base = t.num_tasks / t.block_dim, extra = t.num_tasks % t.block_dim;
  *begin = core * base + (core < extra ? core : extra);
  *count = base + (core < extra ? 1 : 0);
}

// The branch-tree ops are tiny (<= 256 nodes) and sequential: one core, whole tree in UB.
struct BranchTreeTiling {
  uint32_t gamma, kappa, max_branches, capacity, mask_words, ub_bytes;
};

// Returns 0, or 1 for bad sizes, 4 when the tree does not fit ub_bytes.
MIRROR_RT_TILING_FN int make_branch_tree_tiling(uint32_t gamma, uint32_t kappa, int32_t max_branches,
                                                uint32_t capacity, uint32_t ub_bytes, BranchTreeTiling* t) {
  if (kappa == 0 || capacity == 0) return 1;
  const uint32_t all = (gamma + 1) * kappa;
  t->gamma = gamma;
  t->kappa = kappa;
  t->max_branches = (max_branches < 0 || uint32_t(max_branches) > all) ? all : uint32_t(max_branches);
  t->capacity = capacity;
  t->mask_words = ceil_div(capacity, 32);
  // tokens (int64), positions (int64), parents (int32), mask rows, window + exit ids (int64),
  // branch pos/rank/tip (int32)
  t->ub_bytes = round_up(capacity * 8, kUbAlign) * 2 + round_up(capacity * 4, kUbAlign) +
                round_up(capacity * t->mask_words * 4, kUbAlign) + round_up((gamma + all) * 8, kUbAlign) +
                3 * round_up(all * 4, kUbAlign);
  return t->ub_bytes <= ub_bytes ? 0 : 4;
}

}  // namespace ascend
}  // namespace mirror_rt
