// y = x @ W^T for a few rows of fp32 x against W kept in GGUF's block formats (Q8_0, Q4_0, Q4_1):
// a decoding step streams 4-7x fewer weight bytes than with fp32 W. x is quantized per 32-block to
// int8 (d = max|x| / 127, llama.cpp's rule) and each block's dot product runs in integers. The sums
// run in the same order for every row count and thread count, so row m's result does not depend
// on which rows come with it (a token decoded alone equals the same token inside a window).
#pragma once
#include <cstdint>

namespace mirror_rt {

// GGML's type ids, as GGUF files store them.
enum class QType : int { kQ4_0 = 2, kQ4_1 = 3, kQ8_0 = 8 };

constexpr int kQuantBlock = 32;         // values per block, every type
constexpr int kQuantLinearMaxRows = 8;  // rows of x per pass over the weight (more rows: chunks of 8)

// Bytes of one block: Q8_0 fp16 d + 32 int8; Q4_0 fp16 d + 16 nibble bytes; Q4_1 fp16 d, fp16 m + 16.
// 0 for an unknown type id.
int quant_block_bytes(int type);

struct QuantLinearArgs {
  const float* x;      // [rows, in], row stride x_stride (floats), contiguous along in
  int64_t rows, in, x_stride;
  const uint8_t* w;    // [out, in / 32 blocks], row stride w_stride (bytes)
  int64_t out, w_stride;
  QType type;
  const float* bias;   // [out] or nullptr
  float* y;            // [rows, out], row stride y_stride (floats)
  int64_t y_stride;
  int num_threads;     // <= 0: OpenMP's default
  bool packed = false; // w in the 8-row interleaved layout (below); out a multiple of 8
};

// The 8-row interleaved layout ("packed"): the same bytes as [out, in / 32 blocks] rows, reordered
// within each group of 8 rows so that one pass reads a block of all 8 rows with a few vector loads
// and the kernel's lanes are output rows (no per-row scale broadcast, no horizontal sum). Group g
// (rows 8g .. 8g+7) keeps its 8 rows' bytes in place; block b of the group is a record of
// 8 * block_bytes bytes: the 8 rows' fp16 d, then (Q4_1) their 8 fp16 m, then the payloads (16
// nibble bytes for Q4, 32 int8 for Q8_0) as 4-byte pieces: piece c of rows 0..7, then piece c + 1.
// mirror_rt/ops/quant.py (pack_rows8, unpack_rows8) converts; dequantize_rows reads it too.
constexpr int kPackRows = 8;

// The arithmetic, per output row n and row m of x, over blocks b in order: row-major layout, eight
// int32 lane dots per block folded into eight fp32 lanes (hsum at the end); packed layout, the
// block's whole int32 dot p (Q4_0: minus 8 * the x block's sum), acc = fma(d_w * d_x, p, acc).
// Q4_1 adds sum_b m_w * (d_x * sum of the x block) at the end. The portable path is bitwise AVX2's.
// rows >= 1 (prefill included: chunks of 8 rows over cache-sized tiles of W), in a multiple of
// kQuantBlock; the binding checks every argument.
void quant_linear(const QuantLinearArgs& a);

// out[i, :] = W[ids[i], :] dequantized to fp32 (ids nullptr: rows 0..n-1); in a multiple of 32.
// The embedding lookup of a quantized embedding, and the tiles of the large-T GEMM path.
void dequantize_rows(const uint8_t* w, int64_t w_stride, QType type, int64_t in, const int64_t* ids,
                     int64_t n, float* out, int64_t out_stride, int num_threads, bool packed = false);

// dst = src [out, in / 32 blocks] (row-major, row stride row_bytes) in the packed layout; out a
// multiple of 8. dst and src must not overlap.
void pack_rows8(const uint8_t* src, uint8_t* dst, int64_t out, int64_t row_bytes, QType type);

// out[i, :] = the blocks of row ids[i] of w (row-major or packed) in the row-major layout;
// out [n, w_stride] bytes, contiguous. Row selection without unpacking the whole weight.
void take_rows(const uint8_t* w, int64_t w_stride, QType type, const int64_t* ids, int64_t n, uint8_t* out,
               bool packed);

// "avx2" or "portable": the path quant_linear takes on this CPU. force_portable(true) makes it take
// the portable one (tests compare both).
const char* quant_linear_isa();
void quant_linear_force_portable(bool on);

}  // namespace mirror_rt
