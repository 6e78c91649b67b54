// See decoder_layer.h. The small ops (norms, rotary, SiLU, residuals) are scalar loops over one row
// at a time: a few thousand values a row, next to the weight streams of the products.
#include "core/decoder_layer.h"

#include <cmath>
#include <vector>

#include "core/row_attention.h"

namespace mirror_rt {
namespace {

struct Scratch {
  std::vector<float> h, qkv, attn, gu, act, y;
};

// out = weight * (x / rms(x)), as Hugging Face's LlamaRMSNorm in fp32.
void rms_norm(const float* x, const float* weight, int n, float eps, float* out) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int i = 0;
  for (; i + 8 <= n; i += 8)
    for (int k = 0; k < 8; ++k) acc[k] += x[i + k] * x[i + k];
  float ss = ((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7]));
  for (; i < n; ++i) ss += x[i] * x[i];
  const float r = 1.0f / std::sqrt(ss / float(n) + eps);
  for (int j = 0; j < n; ++j) out[j] = weight[j] * (x[j] * r);
}

// x * cos + rotate_half(x) * sin for one head (rotate_half(x) = [-x2, x1]).
void rope(float* x, const float* cos, const float* sin, int d) {
  const int half = d / 2;
  for (int i = 0; i < half; ++i) {
    const float x1 = x[i], x2 = x[i + half];
    x[i] = x1 * cos[i] + (-x2) * sin[i];
    x[i + half] = x2 * cos[i + half] + x1 * sin[i + half];
  }
}

void product(const QuantMatrix& m, const float* x, int rows, float* y, int threads) {
  QuantLinearArgs a{x, rows, m.in, m.in, m.w, m.out, m.in / kQuantBlock * quant_block_bytes(int(m.type)), m.type,
                    m.bias, y, m.out, threads, m.packed};
  quant_linear(a);
}

}  // namespace

void decoder_layer_step(const DecoderLayerWeights& w, const DecoderLayerStep& s) {
  static thread_local Scratch sc;  // per calling thread: the draft's layers may run beside the target's
  const int T = s.T, H = w.hidden, D = w.head_dim, Hq = w.heads, Hkv = w.kv_heads, I = w.intermediate;
  const int qkv_w = (Hq + 2 * Hkv) * D;
  sc.h.resize(size_t(T) * H);
  sc.qkv.resize(size_t(T) * qkv_w);
  sc.attn.resize(size_t(T) * Hq * D);
  sc.gu.resize(size_t(T) * 2 * I);
  sc.act.resize(size_t(T) * I);
  sc.y.resize(size_t(T) * H);

  for (int t = 0; t < T; ++t) rms_norm(s.x + size_t(t) * H, w.input_norm, H, w.eps, sc.h.data() + size_t(t) * H);
  product(w.qkv, sc.h.data(), T, sc.qkv.data(), s.num_threads);
  for (int t = 0; t < T; ++t) {
    float* row = sc.qkv.data() + size_t(t) * qkv_w;
    for (int h = 0; h < Hq + Hkv; ++h) rope(row + h * D, s.cos + size_t(t) * D, s.sin + size_t(t) * D, D);
    const int64_t slot = s.write_slot + t;
    std::copy(row + Hq * D, row + (Hq + Hkv) * D, s.k_cache + slot * Hkv * D);
    std::copy(row + (Hq + Hkv) * D, row + qkv_w, s.v_cache + slot * Hkv * D);
  }
  TreeAttentionArgs a{};
  a.dtype = DType::kF32;
  a.B = 1; a.Tq = T; a.T = int(s.nodes); a.S = int(s.S); a.Hq = Hq; a.Hkv = Hkv; a.D = D;
  const int64_t kv_row = int64_t(Hkv) * D;
  a.q = Tensor4{sc.qkv.data(), 0, qkv_w, D};
  a.k_cache = Tensor4{s.k_cache, 0, kv_row, D};
  a.v_cache = Tensor4{s.v_cache, 0, kv_row, D};
  a.k_tree = Tensor4{s.k_cache + s.prefix * kv_row, 0, kv_row, D};
  a.v_tree = Tensor4{s.v_cache + s.prefix * kv_row, 0, kv_row, D};
  const int32_t prefix = int32_t(s.prefix);
  a.cache_seqlens = &prefix;
  a.mask_bits = s.mask_bits;
  a.mask_sb = 0; a.mask_si = s.mask_words;
  a.out = sc.attn.data();
  a.out_sb = 0; a.out_sl = int64_t(Hq) * D; a.out_sh = D;
  a.sm_scale = float(std::pow(double(D), -0.5));  // as the model's D ** -0.5
  a.num_threads = s.num_threads;
  row_attention(a);

  product(w.o, sc.attn.data(), T, sc.y.data(), s.num_threads);
  for (size_t i = 0; i < size_t(T) * H; ++i) s.x[i] += sc.y[i];
  for (int t = 0; t < T; ++t) rms_norm(s.x + size_t(t) * H, w.post_norm, H, w.eps, sc.h.data() + size_t(t) * H);
  product(w.gate_up, sc.h.data(), T, sc.gu.data(), s.num_threads);
  for (int t = 0; t < T; ++t) {
    const float* g = sc.gu.data() + size_t(t) * 2 * I;
    float* out = sc.act.data() + size_t(t) * I;
    for (int i = 0; i < I; ++i) out[i] = g[i] / (1.0f + std::exp(-g[i])) * g[I + i];
  }
  product(w.down, sc.act.data(), T, sc.y.data(), s.num_threads);
  for (size_t i = 0; i < size_t(T) * H; ++i) s.x[i] += sc.y[i];
}

}  // namespace mirror_rt
