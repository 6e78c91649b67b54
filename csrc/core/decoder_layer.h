// One decoder layer of a Llama-family model with quantized linears, for decoding steps on CPU: the
// norms, the fused q/k/v product, rotary embedding, the new K/V written into the cache, row-exact
// attention (row_attention.h), the output projection, the MLP and both residual adds in one call,
// instead of some forty framework ops. Everything is row-local apart from attention, which is
// row-exact: a token's result does not depend on the other rows of the call.
#pragma once
#include <cstdint>

#include "core/quant_linear.h"

namespace mirror_rt {

struct QuantMatrix {
  const uint8_t* w;     // [out, in / 32 blocks]
  int64_t out, in;
  QType type;
  const float* bias;    // [out] or nullptr
  bool packed;          // the 8-row interleaved layout (quant_linear.h)
};

struct DecoderLayerWeights {
  int hidden, heads, kv_heads, head_dim, intermediate;
  float eps;                       // RMSNorm epsilon
  const float* input_norm;         // [hidden]
  const float* post_norm;          // [hidden]
  QuantMatrix qkv;                 // [(heads + 2 kv_heads) * head_dim, hidden]: q rows, k rows, v rows
  QuantMatrix o;                   // [hidden, heads * head_dim]
  QuantMatrix gate_up;             // [2 * intermediate, hidden]: gate rows, then up rows
  QuantMatrix down;                // [hidden, intermediate]
};

struct DecoderLayerStep {
  float* x;                        // [T, hidden] residual stream, updated in place
  int T;
  const float* cos;                // [T, head_dim] rotary tables of each row's position
  const float* sin;
  float* k_cache;                  // [S, kv_heads, head_dim] this layer's cache (batch 1)
  float* v_cache;
  int64_t S;
  int64_t write_slot;              // the new rows' K/V go to slots write_slot .. write_slot + T - 1
  int64_t prefix;                  // attention: slots [0, prefix) seen by every row, then
  int64_t nodes;                   // nodes slots [prefix, prefix + nodes), the last T of them the queries
  const uint32_t* mask_bits;       // [T, W] packed (row_attention's format), or nullptr: a causal chain
  int64_t mask_words;
  int num_threads;
};

// The binding checks sizes; this runs the layer.
void decoder_layer_step(const DecoderLayerWeights& w, const DecoderLayerStep& s);

}  // namespace mirror_rt
