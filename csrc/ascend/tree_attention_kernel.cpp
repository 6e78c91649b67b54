// AscendC tree_attention for the AI core's vector unit (AIV). Same contract as the CPU kernel
// (csrc/core/tree_attention.h) for contiguous [B, L, H, D] tensors; tiling in tiling.h.
// WRITTEN AGAINST THE CANN AscendC API, NEVER COMPILED OR RUN (no CANN toolkit / NPU in our CI).
//
// Per task (batch b, KV head h, query block): the G * q_block rows that share KV head h keep
// fp32 q rows, output accumulators and running max/sum in UB; keys stream in kv_block rows at a
// time (prefix, then tree nodes with the packed mask), online softmax in fp32.
#define MIRROR_RT_TILING_FN __aicore__ inline
#include "kernel_operator.h"
#include "tiling.h"

using namespace AscendC;
using mirror_rt::ascend::TreeAttentionTiling;

namespace {

constexpr float kMasked = -1e30f;

template <HardEvent E>
__aicore__ inline void Sync() {
  event_t id = static_cast<event_t>(GetTPipePtr()->FetchEventID(E));
  SetFlag<E>(id);
  WaitFlag<E>(id);
}

template <typename T>
class TreeAttention {
 public:
  __aicore__ inline void Init(GM_ADDR q, GM_ADDR kc, GM_ADDR vc, GM_ADDR seqlens, GM_ADDR kt, GM_ADDR vt,
                              GM_ADDR mask, GM_ADDR out, GM_ADDR tiling) {
    auto* src = reinterpret_cast<__gm__ uint32_t*>(tiling);
    auto* dst = reinterpret_cast<uint32_t*>(&t_);
    for (uint32_t i = 0; i < sizeof(TreeAttentionTiling) / 4; ++i) dst[i] = src[i];
    q_.SetGlobalBuffer((__gm__ T*)q);
    kc_.SetGlobalBuffer((__gm__ T*)kc);
    vc_.SetGlobalBuffer((__gm__ T*)vc);
    kt_.SetGlobalBuffer((__gm__ T*)kt);
    vt_.SetGlobalBuffer((__gm__ T*)vt);
    out_.SetGlobalBuffer((__gm__ T*)out);
    seqlens_.SetGlobalBuffer((__gm__ int32_t*)seqlens);
    mask_.SetGlobalBuffer((__gm__ uint32_t*)mask);
    const uint32_t tile = t_.kv_block * t_.d_pad;
    // Same budget as tree_attention_ub_bytes() in tiling.h.
    pipe_.InitBuffer(kIn_, 2, tile * sizeof(T));
    pipe_.InitBuffer(vIn_, 2, tile * sizeof(T));
    pipe_.InitBuffer(kF_, tile * 4);
    pipe_.InitBuffer(vF_, tile * 4);
    pipe_.InitBuffer(prod_, tile * 4);
    pipe_.InitBuffer(qF_, t_.rows * t_.d_pad * 4);
    pipe_.InitBuffer(o_, t_.rows * t_.d_pad * 4);
    pipe_.InitBuffer(s_, t_.rows * t_.kv_block * 4);
    pipe_.InitBuffer(m_, mirror_rt::ascend::round_up(t_.rows * 4, 32));
    pipe_.InitBuffer(l_, mirror_rt::ascend::round_up(t_.rows * 4, 32));
    pipe_.InitBuffer(alpha_, 32);
    pipe_.InitBuffer(bits_, mirror_rt::ascend::round_up(t_.q_block * t_.mask_words * 4, 32));
    // Product columns D..d_pad are never written by the masked Mul below: zero them once.
    Duplicate(prod_.Get<float>(), 0.0f, tile);
  }

  __aicore__ inline void Process() {
    uint32_t begin, count;
    mirror_rt::ascend::core_task_range(t_, GetBlockIdx(), &begin, &count);
    for (uint32_t task = begin; task < begin + count; ++task) RunTask(task);
  }

 private:
  // GM -> UB copy of n rows of D elements (GM row stride src_stride elements) into rows of d_pad.
  __aicore__ inline void CopyRows(const LocalTensor<T>& dst, GlobalTensor<T>& src, uint64_t off, uint32_t n,
                                  uint32_t src_stride) {
    DataCopyExtParams p{static_cast<uint16_t>(n), static_cast<uint32_t>(t_.D * sizeof(T)),
                        static_cast<uint32_t>((src_stride - t_.D) * sizeof(T)),
                        static_cast<uint32_t>((t_.d_pad * sizeof(T) - RoundUp32(t_.D * sizeof(T))) / 32), 0};
    DataCopyPad(dst, src[off], p, DataCopyPadExtParams<T>{false, 0, 0, 0});
  }
  __aicore__ inline uint32_t RoundUp32(uint32_t bytes) { return (bytes + 31) / 32 * 32; }

  // fp32 view of a K or V tile: cast bf16 into `f32`, or reuse the fp32 tile itself.
  __aicore__ inline LocalTensor<float> ToF32(const LocalTensor<T>& x, TBuf<TPosition::VECCALC>& f32, uint32_t n) {
    if constexpr (sizeof(T) == 4) {
      return x.template ReinterpretCast<float>();
    } else {
      LocalTensor<float> y = f32.Get<float>();
      Cast(y, x, RoundMode::CAST_NONE, n * t_.d_pad);
      return y;
    }
  }

  __aicore__ inline void RunTask(uint32_t task) {
    const uint32_t qb = task % t_.num_q_blocks, bh = task / t_.num_q_blocks;
    const uint32_t kvh = bh % t_.Hkv, b = bh / t_.Hkv;
    const uint32_t q0 = qb * t_.q_block;
    const uint32_t nq = t_.Tq - q0 < t_.q_block ? t_.Tq - q0 : t_.q_block;
    const uint32_t G = t_.group, M = nq * G, D = t_.D, Dp = t_.d_pad;
    LocalTensor<float> qF = qF_.Get<float>(), o = o_.Get<float>(), m = m_.Get<float>(), l = l_.Get<float>();

    // Query rows (heads kvh*G .. kvh*G+G-1 of queries q0..q0+nq-1 are contiguous per query),
    // staged in the output accumulator's buffer, which is large enough for them in any dtype.
    LocalTensor<T> qIn = o.template ReinterpretCast<T>();
    for (uint32_t i = 0; i < nq; ++i)
      CopyRows(qIn[i * G * Dp], q_, ((uint64_t(b) * t_.Tq + q0 + i) * t_.Hq + kvh * G) * D, G, D);
    Sync<HardEvent::MTE2_V>();
    if constexpr (sizeof(T) == 4) {
      Muls(qF, qIn.template ReinterpretCast<float>(), t_.sm_scale, M * Dp);
    } else {
      Cast(qF, qIn, RoundMode::CAST_NONE, M * Dp);
      Muls(qF, qF, t_.sm_scale, M * Dp);
    }
    PipeBarrier<PIPE_V>();  // the accumulator is overwritten next
    Duplicate(o, 0.0f, M * Dp);
    Duplicate(m, kMasked, M);
    Duplicate(l, 0.0f, M);

    // Mask rows of this query block.
    LocalTensor<uint32_t> bits = bits_.Get<uint32_t>();
    DataCopyExtParams mp{1, static_cast<uint32_t>(nq * t_.mask_words * 4), 0, 0, 0};
    DataCopyPad(bits, mask_[(uint64_t(b) * t_.Tq + q0) * t_.mask_words], mp, DataCopyPadExtParams<uint32_t>{false, 0, 0, 0});
    Sync<HardEvent::MTE2_S>();

    const int32_t n = seqlens_.GetValue(b);
    const uint32_t row_stride = t_.Hkv * D;
    for (int32_t j0 = 0; j0 < n; j0 += t_.kv_block) {
      const uint32_t N = n - j0 < int32_t(t_.kv_block) ? n - j0 : t_.kv_block;
      const uint64_t off = (uint64_t(b) * t_.S + j0) * row_stride + kvh * D;
      Block(kc_, vc_, off, N, M, nq, bits, -1);
    }
    for (uint32_t j0 = 0; j0 < t_.T; j0 += t_.kv_block) {
      const uint32_t N = t_.T - j0 < t_.kv_block ? t_.T - j0 : t_.kv_block;
      const uint64_t off = (uint64_t(b) * t_.T + j0) * row_stride + kvh * D;
      Block(kt_, vt_, off, N, M, nq, bits, int32_t(j0));
    }

    // out = o / l (rows that saw nothing: l = 0 -> zeros), cast, store.
    Sync<HardEvent::V_S>();
    for (uint32_t r = 0; r < M; ++r) {
      const float lr = l.GetValue(r);
      Sync<HardEvent::S_V>();
      Muls(o[r * Dp], o[r * Dp], lr > 0.0f ? 1.0f / lr : 0.0f, D);
    }
    LocalTensor<T> outT = vIn_.AllocTensor<T>();
    if constexpr (sizeof(T) == 4) {
      DataCopy(outT.template ReinterpretCast<float>(), o, M * Dp);
    } else {
      Cast(outT, o, RoundMode::CAST_RINT, M * Dp);
    }
    Sync<HardEvent::V_MTE3>();
    for (uint32_t i = 0; i < nq; ++i) {
      DataCopyExtParams p{static_cast<uint16_t>(G), static_cast<uint32_t>(D * sizeof(T)),
                          static_cast<uint32_t>((Dp * sizeof(T) - RoundUp32(D * sizeof(T))) / 32), 0, 0};
      DataCopyPad(out_[((uint64_t(b) * t_.Tq + q0 + i) * t_.Hq + kvh * G) * D], outT[i * G * Dp], p);
    }
    Sync<HardEvent::MTE3_V>();
    vIn_.FreeTensor(outT);
  }

  // One key block: N keys at GM offset `off` (row stride Hkv*D). t0 < 0: prefix (all visible),
  // else the first tree node of the block (visibility from the packed mask bits).
  __aicore__ inline void Block(GlobalTensor<T>& K, GlobalTensor<T>& V, uint64_t off, uint32_t N, uint32_t M,
                               uint32_t nq, const LocalTensor<uint32_t>& bits, int32_t t0) {
    const uint32_t D = t_.D, Dp = t_.d_pad, KB = t_.kv_block, G = t_.group, rs = t_.Hkv * D;
    LocalTensor<T> kIn = kIn_.AllocTensor<T>();
    LocalTensor<T> vIn = vIn_.AllocTensor<T>();
    CopyRows(kIn, K, off, N, rs);
    CopyRows(vIn, V, off, N, rs);
    kIn_.EnQue(kIn);
    vIn_.EnQue(vIn);
    kIn = kIn_.DeQue<T>();
    vIn = vIn_.DeQue<T>();
    LocalTensor<float> k = ToF32(kIn, kF_, N), v = ToF32(vIn, vF_, N);
    LocalTensor<float> prod = prod_.Get<float>(), s = s_.Get<float>(), qF = qF_.Get<float>();
    LocalTensor<float> o = o_.Get<float>(), m = m_.Get<float>(), l = l_.Get<float>();

    for (uint32_t r = 0; r < M; ++r) {
      LocalTensor<float> sr = s[r * KB];
      // prod[j, :] = k[j, :] * q[r, :] (q row re-read each repeat: src1 repeat stride 0), then the
      // 64-wide chunks folded into the first and summed per key.
      for (uint32_t c = 0; c < Dp; c += 64) {
        const uint64_t width = D - c < 64 ? D - c : 64;
        if (c >= D) break;
        Mul(prod[c], k[c], qF[r * Dp + c], width, N,
            BinaryRepeatParams{1, 1, 1, uint8_t(Dp / 8), uint8_t(Dp / 8), 0});
      }
      for (uint32_t c = 64; c < Dp; c += 64) {
        const uint64_t width = Dp - c < 64 ? Dp - c : 64;
        Add(prod, prod, prod[c], width, N, BinaryRepeatParams{1, 1, 1, uint8_t(Dp / 8), uint8_t(Dp / 8), uint8_t(Dp / 8)});
      }
      WholeReduceSum(sr, prod, Dp < 64 ? Dp : 64, N, 1, 1, Dp / 8);
      Sync<HardEvent::V_S>();
      if (t0 >= 0) {  // hide tree nodes this query may not see
        const uint32_t i = r / G;
        for (uint32_t j = 0; j < N; ++j) {
          const uint32_t node = t0 + j, w = bits.GetValue(i * t_.mask_words + node / 32);
          if (!((w >> (node % 32)) & 1u)) sr.SetValue(j, kMasked);
        }
      }
      // Online softmax: m_new = max(m, max_j s), p = exp(s - m_new), l = l * alpha + sum p,
      // o = o * alpha + p V, alpha = exp(m - m_new).
      float mx = kMasked;
      for (uint32_t j = 0; j < N; ++j) mx = sr.GetValue(j) > mx ? sr.GetValue(j) : mx;
      const float m_old = m.GetValue(r), m_new = m_old > mx ? m_old : mx;
      if (m_new <= 0.5f * kMasked) continue;  // nothing visible to this row yet
      Sync<HardEvent::S_V>();
      Adds(sr, sr, -m_new, N);
      Exp(sr, sr, N);  // masked entries: exp(-1e30) = 0
      LocalTensor<float> alpha = alpha_.Get<float>();
      Duplicate(alpha, m_old - m_new, 8);
      Exp(alpha, alpha, 8);
      Sync<HardEvent::V_S>();
      const float a = alpha.GetValue(0);
      float sum = 0.0f;
      for (uint32_t j = 0; j < N; ++j) sum += sr.GetValue(j);
      l.SetValue(r, l.GetValue(r) * a + sum);
      m.SetValue(r, m_new);
      Sync<HardEvent::S_V>();
      LocalTensor<float> orow = o[r * Dp];
      Muls(orow, orow, a, D);
      for (uint32_t j = 0; j < N; ++j) Axpy(orow, v[j * Dp], sr.GetValue(j), D);
    }
    kIn_.FreeTensor(kIn);
    vIn_.FreeTensor(vIn);
  }

  TreeAttentionTiling t_;
  TPipe pipe_;
  TQue<QuePosition::VECIN, 2> kIn_, vIn_;
  TBuf<TPosition::VECCALC> kF_, vF_, prod_, qF_, o_, s_, m_, l_, alpha_, bits_;
  GlobalTensor<T> q_, kc_, vc_, kt_, vt_, out_;
  GlobalTensor<int32_t> seqlens_;
  GlobalTensor<uint32_t> mask_;
};

}  // namespace

// One entry point per storage dtype; the launcher picks by q's dtype.
extern "C" __global__ __aicore__ void mirror_tree_attention_f32(GM_ADDR q, GM_ADDR kc, GM_ADDR vc, GM_ADDR seqlens,
                                                                GM_ADDR kt, GM_ADDR vt, GM_ADDR mask, GM_ADDR out,
                                                                GM_ADDR tiling) {
  TreeAttention<float> op;
  op.Init(q, kc, vc, seqlens, kt, vt, mask, out, tiling);
  op.Process();
}

extern "C" __global__ __aicore__ void mirror_tree_attention_bf16(GM_ADDR q, GM_ADDR kc, GM_ADDR vc, GM_ADDR seqlens,
                                                                 GM_ADDR kt, GM_ADDR vt, GM_ADDR mask, GM_ADDR out,
                                                                 GM_ADDR tiling) {
  TreeAttention<bfloat16_t> op;
  op.Init(q, kc, vc, seqlens, kt, vt, mask, out, tiling);
  op.Process();
}
