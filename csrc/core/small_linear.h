// y = x @ w^T (+ bias) for a few rows of x: the target's verification pass and the draft's steps
// on a CPU, where a GEMM of 2-8 rows costs 1.5-2x a one-row GEMV (bench/RESULTS.md). Streams
// each row of w once for all rows of x. Row m's result does not depend on how many rows come
// with it, nor on the thread count: each (m, n) is summed in the same order every time.
#pragma once
#include <cstdint>

namespace mirror_rt {

constexpr int kSmallLinearMaxRows = 8;

struct SmallLinearArgs {
  const float* x;     // [rows, in], row stride x_stride, contiguous along in
  int64_t rows, in, x_stride;
  const float* w;     // [out, in], row stride w_stride, contiguous along in
  int64_t out, w_stride;
  const float* bias;  // [out] or nullptr
  float* y;           // [rows, out], row stride y_stride, contiguous along out
  int64_t y_stride;
  int num_threads;    // <= 0: OpenMP's default
};

// rows must be in [1, kSmallLinearMaxRows]; the binding checks every argument.
void small_linear_f32(const SmallLinearArgs& a);

// The weight-prefetch hint chosen for this CPU: "nta" (AMD) or "t2" (others); see small_linear.cpp.
const char* small_linear_prefetch_hint();

}  // namespace mirror_rt
