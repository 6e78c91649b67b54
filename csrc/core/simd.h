// Small vector helpers for the CPU kernels (GCC/Clang vector extensions, no intrinsics headers):
// the same source compiles to SSE2 in the baseline clone and AVX2+FMA in the x86-64-v3 clone.
#pragma once
#include <cstdint>
#include <cstring>

#if !defined(__GNUC__)
#error "mirror_rt's CPU kernels use GCC/Clang vector extensions"
#endif

namespace mirror_rt {

typedef float v8f __attribute__((vector_size(32)));

static inline v8f load8(const float* p) { v8f v; std::memcpy(&v, p, sizeof v); return v; }
static inline void store8(float* p, v8f v) { std::memcpy(p, &v, sizeof v); }

// Hot functions get two bodies (baseline and x86-64-v3) picked once at load time by an ifunc,
// so the wheel stays runnable on any x86-64 yet uses AVX2/FMA where present.
#if defined(__x86_64__) && !defined(MIRROR_RT_NO_CLONES)
#define MIRROR_RT_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define MIRROR_RT_CLONES
#endif

static inline float bf16_to_f32(uint16_t h) {
  uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Round to nearest even, NaN stays NaN (quiet).
static inline uint16_t f32_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}

typedef int32_t v8i __attribute__((vector_size(32)));

// 2^x for x <= 0, eight lanes at once. Rounds x to n + f with f in (-0.5, 0.5], a degree-6
// Taylor polynomial for 2^f (relative error ~1e-7), then adds n to the exponent bits. x is
// clamped to -125 so the exponent never underflows into garbage; callers that need an exact 0
// (masked scores) select it themselves.
static inline v8f exp2_nonpos(v8f x) {
  const v8f lo = v8f{} - 125.0f;
  x = x < lo ? lo : x;
  const v8i n = __builtin_convertvector(x - 0.5f, v8i);  // truncation == round-half-down for x <= 0
  const v8f f = x - __builtin_convertvector(n, v8f);
  v8f p = v8f{} + 1.5403530393381608e-4f;
  p = p * f + 1.3333558146428443e-3f;
  p = p * f + 9.618129107628477e-3f;
  p = p * f + 5.550410866482158e-2f;
  p = p * f + 2.402265069591007e-1f;
  p = p * f + 6.931471805599453e-1f;
  p = p * f + 1.0f;
  return (v8f)((v8i)p + (n << 23));  // same-size vector casts reinterpret the bits
}

}  // namespace mirror_rt
