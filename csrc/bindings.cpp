// The one pybind11 bindings file: takes tensors zero-copy through DLPack (any object with
// __dlpack__: torch tensors of any version, numpy arrays), checks every argument (raising
// ValueError/TypeError that name it, never crashing), then calls the framework-free core with the
// GIL released. No libtorch link, so one wheel serves every torch version.
#include <pybind11/pybind11.h>

#include <cmath>
#include <memory>
#include <string>
#include <vector>

#include "ascend/tiling.h"
#include "core/branch_tree.h"
#include "core/info.h"
#include "core/quant_linear.h"
#include "core/small_linear.h"
#include "core/decoder_layer.h"
#include "core/row_attention.h"
#include "core/tree_attention.h"
#include "third_party/dlpack/dlpack.h"

namespace py = pybind11;
using namespace mirror_rt;

namespace {

[[noreturn]] void value_error(const std::string& msg) { throw py::value_error(msg); }
[[noreturn]] void type_error(const std::string& msg) { throw py::type_error(msg); }

std::string shape_str(const DLTensor& t) {
  std::string s = "(";
  for (int i = 0; i < t.ndim; ++i) s += (i ? ", " : "") + std::to_string(t.shape[i]);
  return s + (t.ndim == 1 ? ",)" : ")");
}

// A borrowed CPU tensor. The capsule keeps the producer's memory alive; we never rename it, so
// its destructor (run when the View dies, with the GIL held) calls the producer's deleter.
struct View {
  std::string name;
  py::object capsule;
  DLTensor* t = nullptr;

  View(py::handle obj, const char* arg) : name(arg) {
    if (!py::hasattr(obj, "__dlpack__"))
      type_error(name + " must be a tensor supporting DLPack (torch.Tensor, numpy array), got " +
                 std::string(py::str(py::type::of(obj).attr("__name__"))));
    capsule = obj.attr("__dlpack__")();
    auto* m = static_cast<DLManagedTensor*>(PyCapsule_GetPointer(capsule.ptr(), "dltensor"));
    if (!m) {
      PyErr_Clear();
      type_error(name + ": __dlpack__ did not return a 'dltensor' capsule");
    }
    t = &m->dl_tensor;
    if (t->device.device_type != kDLCPU && t->device.device_type != kDLCUDAHost)
      value_error(name + " must be a CPU tensor (device type " + std::to_string(t->device.device_type) + ")");
    if (t->dtype.lanes != 1) type_error(name + " must have a scalar dtype");
  }

  int64_t size(int i) const { return t->shape[i]; }
  // Element stride; DLPack allows strides == NULL for compact row-major tensors.
  int64_t stride(int i) const {
    if (t->strides) return t->strides[i];
    int64_t s = 1;
    for (int j = t->ndim - 1; j > i; --j) s *= t->shape[j];
    return s;
  }
  void* data() const { return static_cast<char*>(t->data) + t->byte_offset; }
  bool is(uint8_t code, int bits) const { return t->dtype.code == code && t->dtype.bits == bits; }
  bool is_int32() const { return is(kDLInt, 32) || is(kDLUInt, 32); }

  void rank(int r) const {
    if (t->ndim != r)
      value_error(name + " must have " + std::to_string(r) + " dimensions, got shape " + shape_str(*t));
  }
  void shape(std::initializer_list<int64_t> want, const char* what) const {
    rank(int(want.size()));
    int i = 0;
    for (int64_t w : want)
      if (size(i++) != w) value_error(name + " must be " + what + ", got shape " + shape_str(*t));
  }
  void inner_contiguous() const {
    if (t->ndim && size(t->ndim - 1) > 1 && stride(t->ndim - 1) != 1)
      value_error(name + " must be contiguous in its last dimension (call .contiguous())");
  }
  void contiguous() const {
    int64_t want = 1;
    for (int i = t->ndim - 1; i >= 0; --i) {
      if (size(i) > 1 && stride(i) != want)
        value_error(name + " must be contiguous (call .contiguous())");
      want *= size(i);
    }
  }
  void dtype(bool ok, const char* what) const {
    if (!ok)
      type_error(name + " must be " + what + ", got DLPack dtype code " + std::to_string(t->dtype.code) +
                 " with " + std::to_string(t->dtype.bits) + " bits");
  }
};

DType float_dtype(const View& v) {
  if (v.is(kDLFloat, 32)) return DType::kF32;
  // bf16, or its bit pattern carried as a 16-bit integer view (for producers without bf16).
  if (v.is(kDLBfloat, 16) || v.is(kDLInt, 16) || v.is(kDLUInt, 16)) return DType::kBF16;
  v.dtype(false, "float32 or bfloat16");
  return DType::kF32;
}

Tensor4 tensor4(const View& v) { return {v.data(), v.stride(0), v.stride(1), v.stride(2)}; }

std::string dims(const char* fmt, std::initializer_list<std::pair<const char*, int64_t>> kv) {
  std::string s = fmt;
  for (auto& p : kv) {
    auto at = s.find(p.first);
    if (at != std::string::npos) s.insert(at + std::string(p.first).size(), "=" + std::to_string(p.second));
  }
  return s;
}

void tree_attention_py(py::handle q_, py::handle kc_, py::handle vc_, py::handle seqlens_,
                       py::handle kt_, py::handle vt_, py::handle mask_, py::handle out_,
                       double sm_scale, int num_threads, bool row_exact) {
  View q(q_, "q"), kc(kc_, "k_cache"), vc(vc_, "v_cache"), sl(seqlens_, "cache_seqlens"),
      kt(kt_, "k_tree"), vt(vt_, "v_tree"), mask(mask_, "tree_mask"), out(out_, "out");
  q.rank(4);
  const int64_t B = q.size(0), Tq = q.size(1), Hq = q.size(2), D = q.size(3);
  const DType dt = float_dtype(q);
  kc.rank(4);
  const int64_t S = kc.size(1), Hkv = kc.size(2);
  kt.rank(4);
  const int64_t T = kt.size(1);
  const std::string cache_shape = dims("[B, S, Hkv, D]", {{"B", B}, {"S", S}, {"Hkv", Hkv}, {"D", D}});
  const std::string tree_shape = dims("[B, T, Hkv, D]", {{"B", B}, {"T", T}, {"Hkv", Hkv}, {"D", D}});
  kc.shape({B, S, Hkv, D}, cache_shape.c_str());
  vc.shape({B, S, Hkv, D}, cache_shape.c_str());
  kt.shape({B, T, Hkv, D}, tree_shape.c_str());
  vt.shape({B, T, Hkv, D}, tree_shape.c_str());
  for (View* v : {&kc, &vc, &kt, &vt, &out})
    if (float_dtype(*v) != dt) type_error(v->name + " dtype differs from q's");
  if (Hkv < 1 || Hq % Hkv) value_error("q heads (" + std::to_string(Hq) + ") must be a multiple of k_cache heads (" + std::to_string(Hkv) + ")");
  if (D < 1 || D > kMaxHeadDim) value_error("head dim D must be in [1, " + std::to_string(kMaxHeadDim) + "], got " + std::to_string(D));
  if (T < 1 || T > kMaxTreeNodes)
    value_error("k_tree: tree size T must be in [1, " + std::to_string(kMaxTreeNodes) + "] (packed mask limit), got " + std::to_string(T));
  if (Tq < 1 || Tq > T) value_error("q holds " + std::to_string(Tq) + " tree nodes; it must hold between 1 and T=" + std::to_string(T));
  for (View* v : {&q, &kc, &vc, &kt, &vt, &out}) v->inner_contiguous();
  out.shape({B, Tq, Hq, D}, "[B, Tq, Hq, D] like q");
  sl.shape({B}, "[B]");
  sl.dtype(sl.is(kDLInt, 32), "int32");
  const int64_t W = (T + 31) / 32;
  mask.rank(3);
  mask.dtype(mask.is_int32(), "int32 packed bits [B, Tq, W] (see mirror_rt.ops.cpu.pack_tree_mask)");
  if (mask.size(0) != B || mask.size(1) != Tq || mask.size(2) < W)
    value_error("tree_mask bits must be [B=" + std::to_string(B) + ", Tq=" + std::to_string(Tq) + ", W>=" + std::to_string(W) + "], got shape " + shape_str(*mask.t));
  mask.inner_contiguous();
  if (!std::isfinite(sm_scale)) value_error("sm_scale must be finite");
  if (row_exact && dt != DType::kF32) type_error("row_exact tree_attention takes float32 tensors only");

  TreeAttentionArgs a{};
  a.dtype = dt;
  a.B = int(B); a.Tq = int(Tq); a.T = int(T); a.S = int(S); a.Hq = int(Hq); a.Hkv = int(Hkv); a.D = int(D);
  a.q = tensor4(q); a.k_cache = tensor4(kc); a.v_cache = tensor4(vc);
  a.k_tree = tensor4(kt); a.v_tree = tensor4(vt);
  const int32_t* lens = static_cast<const int32_t*>(sl.data());
  for (int64_t b = 0; b < B; ++b) {
    const int64_t n = lens[b * sl.stride(0)];
    if (n < 0 || n > S) value_error("cache_seqlens[" + std::to_string(b) + "]=" + std::to_string(n) + " outside [0, S=" + std::to_string(S) + "]");
  }
  std::vector<int32_t> lens_copy(B);  // the core wants them contiguous
  for (int64_t b = 0; b < B; ++b) lens_copy[b] = lens[b * sl.stride(0)];
  a.cache_seqlens = lens_copy.data();
  a.mask_bits = static_cast<const uint32_t*>(mask.data());
  a.mask_sb = mask.stride(0); a.mask_si = mask.stride(1);
  a.out = out.data();
  a.out_sb = out.stride(0); a.out_sl = out.stride(1); a.out_sh = out.stride(2);
  a.sm_scale = float(sm_scale);
  a.num_threads = num_threads;
  if (B == 0) return;
  py::gil_scoped_release nogil;
  if (row_exact)
    row_attention(a);
  else
    tree_attention(a);
}

void pack_tree_mask_py(py::handle mask_, py::handle out_) {
  View m(mask_, "tree_mask"), o(out_, "out");
  m.rank(3);
  m.dtype(m.is(kDLBool, 8) || m.is(kDLUInt, 8) || m.is(kDLInt, 8), "bool");
  const int64_t B = m.size(0), Tq = m.size(1), T = m.size(2), W = (T + 31) / 32;
  o.dtype(o.is_int32(), "int32");
  o.rank(3);
  if (o.size(0) != B || o.size(1) != Tq || o.size(2) < W) value_error("out must be [B, Tq, W>=ceil(T/32)], got shape " + shape_str(*o.t));
  o.contiguous();
  py::gil_scoped_release nogil;
  pack_tree_mask(static_cast<const uint8_t*>(m.data()), m.stride(0), m.stride(1), m.stride(2), int(B),
                 int(Tq), int(T), static_cast<uint32_t*>(o.data()), int(o.size(2)));
}

// The tree buffers of mirror_rt.ops.branch_tree.BranchTree, checked against each other.
struct TreeViews {
  View tokens, parents, positions, mask, tips;
  TreeViews(py::handle tok, py::handle par, py::handle pos, py::handle mask_, py::handle tip)
      : tokens(tok, "tokens"), parents(par, "parents"), positions(pos, "positions"),
        mask(mask_, "mask_bits"), tips(tip, "branch_tip") {
    tokens.rank(1);
    const int64_t cap = tokens.size(0);
    tokens.dtype(tokens.is(kDLInt, 64), "int64");
    parents.dtype(parents.is(kDLInt, 32), "int32");
    positions.dtype(positions.is(kDLInt, 64), "int64");
    mask.dtype(mask.is_int32(), "int32");
    tips.dtype(tips.is(kDLInt, 32), "int32");
    parents.shape({cap}, "[capacity] like tokens");
    positions.shape({cap}, "[capacity] like tokens");
    mask.rank(2);
    if (mask.size(0) != cap || mask.size(1) * 32 < cap) value_error("mask_bits must be [capacity, W >= capacity/32], got shape " + shape_str(*mask.t));
    tips.rank(1);
    for (View* v : {&tokens, &parents, &positions, &mask, &tips}) v->contiguous();
  }
  BranchTreeBuffers buffers() const {
    return {int(tokens.size(0)), int(mask.size(1)), static_cast<int64_t*>(tokens.data()),
            static_cast<int32_t*>(parents.data()), static_cast<int64_t*>(positions.data()),
            static_cast<uint32_t*>(mask.data()), static_cast<int32_t*>(tips.data())};
  }
};

int build_branch_tree_py(py::handle window_, py::handle exit_, int max_branches, py::handle tok,
                         py::handle par, py::handle pos, py::handle mask, py::handle bpos_,
                         py::handle brank_, py::handle tip) {
  View w(window_, "window"), e(exit_, "exit_ids"), bpos(bpos_, "branch_pos"), brank(brank_, "branch_rank");
  TreeViews tv(tok, par, pos, mask, tip);
  w.rank(1);
  w.dtype(w.is(kDLInt, 64), "int64");
  const int64_t gamma = w.size(0);
  e.rank(2);
  e.dtype(e.is(kDLInt, 64), "int64");
  if (e.size(0) != gamma + 1) value_error("exit_ids must be [gamma+1=" + std::to_string(gamma + 1) + ", kappa], got shape " + shape_str(*e.t));
  const int64_t kappa = e.size(1), nmax = (gamma + 1) * kappa;
  for (View* v : {&bpos, &brank}) {
    v->dtype(v->is(kDLInt, 32), "int32");
    v->rank(1);
    if (v->size(0) < nmax) value_error(v->name + " must hold (gamma+1)*kappa=" + std::to_string(nmax) + " entries");
    v->contiguous();
  }
  if (tv.tips.size(0) < nmax) value_error("branch_tip must hold (gamma+1)*kappa=" + std::to_string(nmax) + " entries");
  w.contiguous();
  e.contiguous();
  int nb;
  {
    py::gil_scoped_release nogil;
    nb = build_branch_tree(static_cast<const int64_t*>(w.data()), int(gamma), static_cast<const int64_t*>(e.data()),
                           int(kappa), max_branches, tv.buffers(), static_cast<int32_t*>(bpos.data()),
                           static_cast<int32_t*>(brank.data()));
  }
  if (nb < 0) value_error("capacity " + std::to_string(tv.tokens.size(0)) + " too small for the window and its branches");
  return nb;
}

int extend_branch_tree_py(py::handle new_, int num_nodes, py::handle tok, py::handle par,
                          py::handle pos, py::handle mask, py::handle tip) {
  View nt(new_, "new_tokens");
  TreeViews tv(tok, par, pos, mask, tip);
  nt.rank(2);
  nt.dtype(nt.is(kDLInt, 64), "int64");
  nt.contiguous();
  const int64_t nb = nt.size(0), n_new = nt.size(1);
  if (n_new < 1) value_error("new_tokens must add at least one token per branch, got shape " + shape_str(*nt.t));
  if (nb > tv.tips.size(0)) value_error("new_tokens has " + std::to_string(nb) + " branches, branch_tip only " + std::to_string(tv.tips.size(0)));
  if (num_nodes < 0 || num_nodes > tv.tokens.size(0)) value_error("num_nodes outside [0, capacity]");
  const int32_t* tips = static_cast<const int32_t*>(tv.tips.data());
  for (int64_t k = 0; k < nb; ++k)  // a bad tip would index outside the buffers
    if (tips[k] < 0 || tips[k] >= num_nodes) value_error("branch_tip[" + std::to_string(k) + "]=" + std::to_string(tips[k]) + " is not a node below num_nodes");
  int T;
  {
    py::gil_scoped_release nogil;
    T = extend_branch_tree(static_cast<const int64_t*>(nt.data()), int(nb), int(n_new), num_nodes, tv.buffers());
  }
  if (T < 0) value_error("tree capacity " + std::to_string(tv.tokens.size(0)) + " exceeded: " + std::to_string(num_nodes) + " nodes + " + std::to_string(nb * n_new) + " new");
  return T;
}

const char* tiling_error(int code) {
  switch (code) {
    case 1: return "bad shape (need B, Tq, Hq, Hkv, D, num_cores > 0, Hq % Hkv == 0, Tq <= T)";
    case 2: return "tree size T beyond the packed-mask limit of 256";
    case 3: return "elem_bytes must be 2 (bf16) or 4 (fp32)";
    default: return "no tile fits ub_bytes";
  }
}

py::dict ascend_tiling_py(uint32_t B, uint32_t Tq, uint32_t T, uint32_t S, uint32_t Hq, uint32_t Hkv,
                          uint32_t D, uint32_t elem_bytes, float sm_scale, uint32_t num_cores,
                          uint32_t ub_bytes) {
  ascend::TreeAttentionTiling t{};
  if (int err = ascend::make_tree_attention_tiling(B, Tq, T, S, Hq, Hkv, D, elem_bytes, sm_scale, num_cores, ub_bytes, &t))
    value_error(std::string("ascend_tiling: ") + tiling_error(err));
  py::dict d;
#define MIRROR_RT_FIELD(f) d[#f] = t.f
  MIRROR_RT_FIELD(B); MIRROR_RT_FIELD(Tq); MIRROR_RT_FIELD(T); MIRROR_RT_FIELD(S); MIRROR_RT_FIELD(Hq);
  MIRROR_RT_FIELD(Hkv); MIRROR_RT_FIELD(D); MIRROR_RT_FIELD(elem_bytes); MIRROR_RT_FIELD(group);
  MIRROR_RT_FIELD(d_pad); MIRROR_RT_FIELD(mask_words); MIRROR_RT_FIELD(q_block); MIRROR_RT_FIELD(num_q_blocks);
  MIRROR_RT_FIELD(rows); MIRROR_RT_FIELD(kv_block); MIRROR_RT_FIELD(num_tasks); MIRROR_RT_FIELD(block_dim);
  MIRROR_RT_FIELD(ub_bytes); MIRROR_RT_FIELD(sm_scale);
#undef MIRROR_RT_FIELD
  py::list ranges;
  for (uint32_t c = 0; c < t.block_dim; ++c) {
    uint32_t begin, count;
    ascend::core_task_range(t, c, &begin, &count);
    ranges.append(py::make_tuple(begin, count));
  }
  d["core_ranges"] = ranges;
  return d;
}

py::dict ascend_branch_tree_tiling_py(uint32_t gamma, uint32_t kappa, int32_t max_branches, uint32_t capacity,
                                      uint32_t ub_bytes) {
  ascend::BranchTreeTiling t{};
  if (int err = ascend::make_branch_tree_tiling(gamma, kappa, max_branches, capacity, ub_bytes, &t))
    value_error(std::string("ascend_branch_tree_tiling: ") + tiling_error(err));
  py::dict d;
  d["gamma"] = t.gamma; d["kappa"] = t.kappa; d["max_branches"] = t.max_branches;
  d["capacity"] = t.capacity; d["mask_words"] = t.mask_words; d["ub_bytes"] = t.ub_bytes;
  return d;
}

void small_linear_py(py::handle x_, py::handle w_, py::object bias_, py::handle out_, int num_threads) {
  View x(x_, "x"), w(w_, "weight"), out(out_, "out");
  x.rank(2);
  w.rank(2);
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  for (View* v : {&x, &w, &out}) v->dtype(v->is(kDLFloat, 32), "float32");
  if (M < 1 || M > kSmallLinearMaxRows)
    value_error("x must have between 1 and " + std::to_string(kSmallLinearMaxRows) + " rows, got " + std::to_string(M));
  const std::string w_shape = dims("[out, in]", {{"in", K}});
  if (w.size(1) != K)
    value_error("weight must be " + w_shape + " (x has in=" + std::to_string(K) + "), got shape " + shape_str(*w.t));
  const std::string out_shape = dims("[rows, out]", {{"rows", M}, {"out", N}});
  out.shape({M, N}, out_shape.c_str());
  for (View* v : {&x, &w, &out}) v->inner_contiguous();
  const float* bias = nullptr;
  std::unique_ptr<View> b;
  if (!bias_.is_none()) {
    b = std::make_unique<View>(bias_, "bias");
    b->dtype(b->is(kDLFloat, 32), "float32");
    const std::string b_shape = dims("[out]", {{"out", N}});
    b->shape({N}, b_shape.c_str());
    b->contiguous();
    bias = static_cast<const float*>(b->data());
  }
  SmallLinearArgs a{static_cast<const float*>(x.data()), M, K, x.stride(0), static_cast<const float*>(w.data()), N,
                    w.stride(0), bias, static_cast<float*>(out.data()), out.stride(0), num_threads};
  py::gil_scoped_release release;
  small_linear_f32(a);
}

// The same kernel on raw addresses, for mirror_rt.ops.linear's hot path: on a small model one
// decoding pass makes ~200 such calls, and taking three tensors through DLPack costs more than
// the kernel saves on the smaller ones (bench/RESULTS.md). The caller has checked dtypes,
// shapes and contiguity; only what would crash outright is re-checked here.
void small_linear_ptr_py(uintptr_t x, int64_t rows, int64_t in, uintptr_t w, int64_t out_features, uintptr_t bias,
                         uintptr_t y, int num_threads) {
  if (rows < 1 || rows > kSmallLinearMaxRows || in < 1 || out_features < 1 || !x || !w || !y)
    value_error("small_linear_ptr: rows must be in [1, " + std::to_string(kSmallLinearMaxRows) +
                "], sizes positive, addresses non-null");
  SmallLinearArgs a{reinterpret_cast<const float*>(x), rows, in, in, reinterpret_cast<const float*>(w), out_features,
                    in, reinterpret_cast<const float*>(bias), reinterpret_cast<float*>(y), out_features, num_threads};
  py::gil_scoped_release release;
  small_linear_f32(a);
}


// Row-exact attention on raw addresses, for the model's CPU attention (one call per layer): q, out
// contiguous [B, Tq, Hq, D]; k/v contiguous [B, S, Hkv, D] KV-cache buffers whose first `prefix`
// slots every row sees and whose next T slots are the new nodes (mask_bits 0: a causal chain, else
// packed [B, Tq, W] bits). The model checked the shapes when it built the cache.
void row_attention_ptr_py(uintptr_t q, int64_t B, int64_t Tq, int64_t Hq, int64_t D, uintptr_t k, uintptr_t v,
                          int64_t S, int64_t Hkv, int64_t prefix, int64_t T, uintptr_t mask_bits, int64_t W,
                          uintptr_t out, double sm_scale, int num_threads) {
  if (B < 1 || Tq < 1 || Tq > T || Hkv < 1 || Hq % Hkv || D < 1 || D > kMaxHeadDim || prefix < 0 ||
      prefix + T > S || (mask_bits && W * 32 < T) || !q || !k || !v || !out)
    value_error("row_attention_ptr: need 1 <= Tq <= T, prefix + T <= S, Hq a multiple of Hkv, 1 <= D <= " +
                std::to_string(kMaxHeadDim) + ", W >= ceil(T / 32), non-null addresses");
  TreeAttentionArgs a{};
  a.dtype = DType::kF32;
  a.B = int(B); a.Tq = int(Tq); a.T = int(T); a.S = int(S); a.Hq = int(Hq); a.Hkv = int(Hkv); a.D = int(D);
  const int64_t ksl = Hkv * D, ksb = S * ksl;
  a.q = Tensor4{reinterpret_cast<const void*>(q), Tq * Hq * D, Hq * D, D};
  a.k_cache = Tensor4{reinterpret_cast<const void*>(k), ksb, ksl, D};
  a.v_cache = Tensor4{reinterpret_cast<const void*>(v), ksb, ksl, D};
  a.k_tree = Tensor4{reinterpret_cast<const float*>(k) + prefix * ksl, ksb, ksl, D};
  a.v_tree = Tensor4{reinterpret_cast<const float*>(v) + prefix * ksl, ksb, ksl, D};
  std::vector<int32_t> lens(B, int32_t(prefix));
  a.cache_seqlens = lens.data();
  a.mask_bits = reinterpret_cast<const uint32_t*>(mask_bits);
  a.mask_sb = Tq * W; a.mask_si = W;
  a.out = reinterpret_cast<void*>(out);
  a.out_sb = Tq * Hq * D; a.out_sl = Hq * D; a.out_sh = D;
  a.sm_scale = float(sm_scale);
  a.num_threads = num_threads;
  py::gil_scoped_release release;
  row_attention(a);
}


// A decoder layer's weights by address (see csrc/core/decoder_layer.h); the Python side keeps the
// tensors alive. Each matrix is (address, out, in, qtype, bias address or 0, packed).
QuantMatrix quant_matrix(const py::tuple& t, int64_t out, int64_t in, const char* name) {
  if (t.size() != 6) value_error(std::string(name) + ": expected (address, out, in, qtype, bias address, packed)");
  const int64_t o = t[1].cast<int64_t>(), i = t[2].cast<int64_t>();
  const int type = t[3].cast<int>();
  if (o != out || i != in || i % kQuantBlock || !quant_block_bytes(type) || !t[0].cast<uintptr_t>())
    value_error(std::string(name) + ": expected a [" + std::to_string(out) + ", " + std::to_string(in) +
                "] Q8_0/Q4_0/Q4_1 matrix, got [" + std::to_string(o) + ", " + std::to_string(i) + "] type " +
                std::to_string(type));
  const bool packed = t[5].cast<bool>();
  if (packed && o % kPackRows) value_error(std::string(name) + ": a packed matrix needs out a multiple of 8");
  return QuantMatrix{reinterpret_cast<const uint8_t*>(t[0].cast<uintptr_t>()), o, i, QType(type),
                     reinterpret_cast<const float*>(t[4].cast<uintptr_t>()), packed};
}

DecoderLayerWeights make_decoder_layer(int hidden, int heads, int kv_heads, int head_dim, int intermediate, double eps,
                                       uintptr_t input_norm, uintptr_t post_norm, py::tuple qkv, py::tuple o,
                                       py::tuple gate_up, py::tuple down) {
  if (hidden < 1 || heads < 1 || kv_heads < 1 || heads % kv_heads || head_dim < 2 || head_dim % 2 ||
      head_dim > kMaxHeadDim || intermediate < 1 || !input_norm || !post_norm)
    value_error("DecoderLayerWeights: sizes must be positive, heads a multiple of kv_heads, head_dim even and <= " +
                std::to_string(kMaxHeadDim) + ", norms non-null");
  DecoderLayerWeights w{hidden, heads, kv_heads, head_dim, intermediate, float(eps),
                        reinterpret_cast<const float*>(input_norm), reinterpret_cast<const float*>(post_norm),
                        quant_matrix(qkv, int64_t(heads + 2 * kv_heads) * head_dim, hidden, "qkv"),
                        quant_matrix(o, hidden, int64_t(heads) * head_dim, "o"),
                        quant_matrix(gate_up, 2 * int64_t(intermediate), hidden, "gate_up"),
                        quant_matrix(down, hidden, intermediate, "down")};
  return w;
}

void decoder_layer_step_py(const DecoderLayerWeights& w, uintptr_t x, int T, uintptr_t cos, uintptr_t sin, uintptr_t k,
                           uintptr_t v, int64_t S, int64_t write_slot, int64_t prefix, int64_t nodes, uintptr_t mask,
                           int64_t mask_words, int num_threads) {
  if (T < 1 || nodes < T || (mask && nodes > kMaxTreeNodes) || prefix < 0 || write_slot < 0 || write_slot + T > S ||
      prefix + nodes > S || (mask && mask_words * 32 < nodes) || !x || !cos || !sin || !k || !v)
    value_error("decoder_layer_step: need 1 <= T <= nodes (a tree: at most " + std::to_string(kMaxTreeNodes) +
                " nodes), the written and attended slots within S, mask words >= ceil(nodes / 32), non-null addresses");
  DecoderLayerStep s{reinterpret_cast<float*>(x), T, reinterpret_cast<const float*>(cos),
                     reinterpret_cast<const float*>(sin), reinterpret_cast<float*>(k), reinterpret_cast<float*>(v), S,
                     write_slot, prefix, nodes, reinterpret_cast<const uint32_t*>(mask), mask_words, num_threads};
  py::gil_scoped_release release;
  decoder_layer_step(w, s);
}


// --- quantized weights (GGUF block formats) ---------------------------------------------------

QType quant_type(int type) {
  if (quant_block_bytes(type) == 0)
    value_error("qtype must be a GGML type id of Q4_0 (2), Q4_1 (3) or Q8_0 (8), got " + std::to_string(type));
  return QType(type);
}

// Checks blocks [out, in/32 * block_bytes] uint8 against in; returns the row stride in bytes.
int64_t check_blocks(const View& w, QType type, int64_t in) {
  w.dtype(w.is(kDLUInt, 8) || w.is(kDLInt, 8), "uint8 (packed GGUF blocks)");
  w.rank(2);
  if (in < kQuantBlock || in % kQuantBlock)
    value_error("in_features must be a positive multiple of " + std::to_string(kQuantBlock) + ", got " + std::to_string(in));
  const int64_t row_bytes = in / kQuantBlock * quant_block_bytes(int(type));
  if (w.size(1) != row_bytes)
    value_error("weight blocks must be [out, " + std::to_string(row_bytes) + "] bytes for in_features=" +
                std::to_string(in) + ", got shape " + shape_str(*w.t) + " (truncated or another type?)");
  w.inner_contiguous();
  return w.stride(0);
}

void check_packed(bool packed, int64_t rows) {
  if (packed && rows % kPackRows)
    value_error("a packed weight (8-row interleaved layout) needs a multiple of 8 rows, got " + std::to_string(rows));
}

void quant_linear_py(py::handle x_, py::handle w_, int qtype, py::object bias_, py::handle out_, int num_threads,
                     bool packed) {
  View x(x_, "x"), w(w_, "weight"), out(out_, "out");
  const QType type = quant_type(qtype);
  x.rank(2);
  x.dtype(x.is(kDLFloat, 32), "float32");
  out.dtype(out.is(kDLFloat, 32), "float32");
  const int64_t M = x.size(0), K = x.size(1);
  const int64_t w_stride = check_blocks(w, type, K);
  const int64_t N = w.size(0);
  check_packed(packed, N);
  if (M < 1) value_error("x must have at least one row, got shape " + shape_str(*x.t));
  const std::string out_shape = dims("[rows, out]", {{"rows", M}, {"out", N}});
  out.shape({M, N}, out_shape.c_str());
  x.inner_contiguous();
  out.inner_contiguous();
  const float* bias = nullptr;
  std::unique_ptr<View> b;
  if (!bias_.is_none()) {
    b = std::make_unique<View>(bias_, "bias");
    b->dtype(b->is(kDLFloat, 32), "float32");
    const std::string b_shape = dims("[out]", {{"out", N}});
    b->shape({N}, b_shape.c_str());
    b->contiguous();
    bias = static_cast<const float*>(b->data());
  }
  QuantLinearArgs a{static_cast<const float*>(x.data()), M, K, x.stride(0), static_cast<const uint8_t*>(w.data()), N,
                    w_stride, type, bias, static_cast<float*>(out.data()), out.stride(0), num_threads, packed};
  if (N == 0) return;
  py::gil_scoped_release release;
  quant_linear(a);
}

// quant_linear on raw addresses, for QuantLinear's hot path (see small_linear_ptr_py): the module
// checked the blocks once when it was built, and x and out per call.
void quant_linear_ptr_py(uintptr_t x, int64_t rows, int64_t in, uintptr_t w, int64_t out_features, int qtype,
                         uintptr_t bias, uintptr_t y, int num_threads, bool packed) {
  const QType type = quant_type(qtype);
  check_packed(packed, out_features);
  if (rows < 1 || in < kQuantBlock || in % kQuantBlock || out_features < 1 || !x || !w || !y)
    value_error("quant_linear_ptr: rows and out_features must be positive, in_features a positive multiple of 32, "
                "addresses non-null");
  QuantLinearArgs a{reinterpret_cast<const float*>(x), rows, in, in, reinterpret_cast<const uint8_t*>(w), out_features,
                    in / kQuantBlock * quant_block_bytes(qtype), type, reinterpret_cast<const float*>(bias),
                    reinterpret_cast<float*>(y), out_features, num_threads, packed};
  py::gil_scoped_release release;
  quant_linear(a);
}

void dequantize_rows_py(py::handle w_, int qtype, py::object ids_, py::handle out_, int num_threads, bool packed) {
  View w(w_, "weight"), out(out_, "out");
  const QType type = quant_type(qtype);
  out.rank(2);
  out.dtype(out.is(kDLFloat, 32), "float32");
  const int64_t K = out.size(1);
  const int64_t w_stride = check_blocks(w, type, K);
  const int64_t rows = w.size(0);
  check_packed(packed, rows);
  const int64_t* ids = nullptr;
  int64_t n = rows;
  std::unique_ptr<View> iv;
  if (!ids_.is_none()) {
    iv = std::make_unique<View>(ids_, "ids");
    iv->dtype(iv->is(kDLInt, 64), "int64");
    iv->rank(1);
    iv->contiguous();
    ids = static_cast<const int64_t*>(iv->data());
    n = iv->size(0);
    for (int64_t i = 0; i < n; ++i)  // an id outside the table would read outside the weight
      if (ids[i] < 0 || ids[i] >= rows)
        value_error("ids[" + std::to_string(i) + "]=" + std::to_string(ids[i]) + " outside [0, " + std::to_string(rows) + ")");
  }
  if (out.size(0) != n)
    value_error("out must be [" + std::to_string(n) + ", in], got shape " + shape_str(*out.t));
  out.inner_contiguous();
  py::gil_scoped_release release;
  dequantize_rows(static_cast<const uint8_t*>(w.data()), w_stride, type, K, ids, n, static_cast<float*>(out.data()),
                  out.stride(0), num_threads, packed);
}

void take_rows_py(py::handle w_, int qtype, py::handle ids_, py::handle out_, bool packed) {
  View w(w_, "blocks"), ids(ids_, "ids"), out(out_, "out");
  const QType type = quant_type(qtype);
  for (View* v : {&w, &out}) {
    v->dtype(v->is(kDLUInt, 8), "uint8");
    v->rank(2);
    v->contiguous();
  }
  ids.dtype(ids.is(kDLInt, 64), "int64");
  ids.rank(1);
  ids.contiguous();
  const int64_t rows = w.size(0), row_bytes = w.size(1), n = ids.size(0);
  if (row_bytes % quant_block_bytes(qtype)) value_error("blocks: rows must be whole blocks, got shape " + shape_str(*w.t));
  check_packed(packed, rows);
  if (out.size(0) != n || out.size(1) != row_bytes)
    value_error("out must be [" + std::to_string(n) + ", " + std::to_string(row_bytes) + "], got " + shape_str(*out.t));
  const int64_t* id = static_cast<const int64_t*>(ids.data());
  for (int64_t i = 0; i < n; ++i)
    if (id[i] < 0 || id[i] >= rows)
      value_error("ids[" + std::to_string(i) + "]=" + std::to_string(id[i]) + " outside [0, " + std::to_string(rows) + ")");
  py::gil_scoped_release release;
  take_rows(static_cast<const uint8_t*>(w.data()), row_bytes, type, id, n, static_cast<uint8_t*>(out.data()), packed);
}

void pack_rows8_py(py::handle src_, int qtype, py::handle dst_) {
  View src(src_, "blocks"), dst(dst_, "out");
  const QType type = quant_type(qtype);
  for (View* v : {&src, &dst}) {
    v->dtype(v->is(kDLUInt, 8), "uint8");
    v->rank(2);
    v->contiguous();
  }
  const int64_t out = src.size(0), row_bytes = src.size(1);
  if (row_bytes % quant_block_bytes(qtype)) value_error("blocks: rows must be whole blocks, got shape " + shape_str(*src.t));
  check_packed(true, out);
  if (dst.size(0) != out || dst.size(1) != row_bytes) value_error("out must have the blocks' shape " + shape_str(*src.t));
  if (src.data() == dst.data()) value_error("out must not be the blocks themselves");
  py::gil_scoped_release release;
  pack_rows8(static_cast<const uint8_t*>(src.data()), static_cast<uint8_t*>(dst.data()), out, row_bytes, type);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "mirror_rt C++ operators (CPU) for the draft's streaming step";
  m.attr("abi_version") = mirror_rt::kCoreAbiVersion;
  m.attr("max_tree_nodes") = kMaxTreeNodes;
  m.attr("small_linear_max_rows") = kSmallLinearMaxRows;
  m.attr("small_linear_prefetch_hint") = mirror_rt::small_linear_prefetch_hint();
  m.attr("quant_linear_max_rows") = kQuantLinearMaxRows;
  m.def("quant_linear", &quant_linear_py, py::arg("x"), py::arg("weight"), py::arg("qtype"), py::arg("bias"),
        py::arg("out"), py::arg("num_threads") = 0, py::arg("packed") = false,
        "out [rows, out] = x [rows, in] float32 @ W^T, W as GGUF blocks uint8 [out, in/32*block_bytes] "
        "of GGML type qtype (Q4_0=2, Q4_1=3, Q8_0=8), row-major or (packed) 8-row interleaved; x rounded "
        "to int8 per 32-block.");
  m.def("quant_linear_ptr", &quant_linear_ptr_py, py::arg("x"), py::arg("rows"), py::arg("in_features"),
        py::arg("weight"), py::arg("out_features"), py::arg("qtype"), py::arg("bias"), py::arg("out"),
        py::arg("num_threads") = 0, py::arg("packed") = false,
        "quant_linear on contiguous buffers given by address (bias 0: none).");
  m.def("dequantize_rows", &dequantize_rows_py, py::arg("weight"), py::arg("qtype"), py::arg("ids"), py::arg("out"),
        py::arg("num_threads") = 0, py::arg("packed") = false,
        "out [n, in] float32 = rows ids (int64 [n], or None: all) of the blocks (packed: 8-row interleaved).");
  m.def("take_rows", &take_rows_py, py::arg("blocks"), py::arg("qtype"), py::arg("ids"), py::arg("out"),
        py::arg("packed") = false, "out [n, row_bytes] uint8 = rows ids (int64 [n]) of the blocks, row-major.");
  m.def("pack_rows8", &pack_rows8_py, py::arg("blocks"), py::arg("qtype"), py::arg("out"),
        "out = blocks uint8 [out, in/32*block_bytes] (row-major, a multiple of 8 rows) in the 8-row packed layout.");
  m.def("quant_block_bytes", &mirror_rt::quant_block_bytes, py::arg("qtype"), "Bytes of one 32-value block (0: unknown type).");
  m.def("quant_linear_isa", &mirror_rt::quant_linear_isa, "\"avx2\" or \"portable\": the path quant_linear takes.");
  m.def("quant_linear_force_portable", &mirror_rt::quant_linear_force_portable, py::arg("on"),
        "Make quant_linear take its portable path (for tests).");
  m.def("openmp_max_threads", &mirror_rt::openmp_max_threads, "OpenMP threads the core may use");
  m.def("tree_attention", &tree_attention_py, py::arg("q"), py::arg("k_cache"), py::arg("v_cache"),
        py::arg("cache_seqlens"), py::arg("k_tree"), py::arg("v_tree"), py::arg("tree_mask"),
        py::arg("out"), py::arg("sm_scale"), py::arg("num_threads") = 0, py::arg("row_exact") = false,
        "Writes out [B,Tq,Hq,D]. tree_mask: int32 packed bits [B,Tq,W>=ceil(T/32)]; cache_seqlens int32 [B]. "
        "row_exact: float32 only, each row's result independent of the call (csrc/core/row_attention.h).");
  m.def("row_attention_ptr", &row_attention_ptr_py, py::arg("q"), py::arg("B"), py::arg("Tq"), py::arg("Hq"),
        py::arg("D"), py::arg("k"), py::arg("v"), py::arg("S"), py::arg("Hkv"), py::arg("prefix"), py::arg("T"),
        py::arg("mask_bits"), py::arg("W"), py::arg("out"), py::arg("sm_scale"), py::arg("num_threads") = 0,
        "Row-exact attention over KV-cache buffers given by address (see row_attention_ptr_py).");
  py::class_<DecoderLayerWeights>(m, "DecoderLayerWeights",
                                  "A quantized decoder layer's weights by address (csrc/core/decoder_layer.h).")
      .def(py::init(&make_decoder_layer), py::arg("hidden"), py::arg("heads"), py::arg("kv_heads"), py::arg("head_dim"),
           py::arg("intermediate"), py::arg("eps"), py::arg("input_norm"), py::arg("post_norm"), py::arg("qkv"),
           py::arg("o"), py::arg("gate_up"), py::arg("down"));
  m.def("decoder_layer_step", &decoder_layer_step_py, py::arg("weights"), py::arg("x"), py::arg("T"), py::arg("cos"),
        py::arg("sin"), py::arg("k"), py::arg("v"), py::arg("S"), py::arg("write_slot"), py::arg("prefix"),
        py::arg("nodes"), py::arg("mask"), py::arg("mask_words"), py::arg("num_threads") = 0,
        "One decoding step of a quantized decoder layer on buffers given by address (x updated in place).");
  m.def("small_linear", &small_linear_py, py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("out"),
        py::arg("num_threads") = 0,
        "out [rows, out] = x [rows<=8, in] @ weight [out, in]^T (+ bias [out] or None); float32.");
  m.def("small_linear_ptr", &small_linear_ptr_py, py::arg("x"), py::arg("rows"), py::arg("in_features"),
        py::arg("weight"), py::arg("out_features"), py::arg("bias"), py::arg("out"), py::arg("num_threads") = 0,
        "small_linear on contiguous float32 buffers given by address (bias 0: none); no tensor checks.");
  m.def("pack_tree_mask", &pack_tree_mask_py, py::arg("tree_mask"), py::arg("out"),
        "bool [B,Tq,T] -> int32 bits out [B,Tq,W]: node j is bit j%32 of word j/32.");
  m.def("build_branch_tree", &build_branch_tree_py, py::arg("window"), py::arg("exit_ids"),
        py::arg("max_branches"), py::arg("tokens"), py::arg("parents"), py::arg("positions"),
        py::arg("mask_bits"), py::arg("branch_pos"), py::arg("branch_rank"), py::arg("branch_tip"),
        "Fills the tree buffers; returns the number of branches. See mirror_rt.ops.branch_tree.");
  m.def("extend_branch_tree", &extend_branch_tree_py, py::arg("new_tokens"), py::arg("num_nodes"),
        py::arg("tokens"), py::arg("parents"), py::arg("positions"), py::arg("mask_bits"),
        py::arg("branch_tip"), "Appends new_tokens [nb, n_new]; returns the new node count.");
  m.def("ascend_tiling", &ascend_tiling_py, py::arg("B"), py::arg("Tq"), py::arg("T"), py::arg("S"),
        py::arg("Hq"), py::arg("Hkv"), py::arg("D"), py::arg("elem_bytes"), py::arg("sm_scale") = 1.0,
        py::arg("num_cores") = ascend::kDefaultCores, py::arg("ub_bytes") = ascend::kDefaultUbBytes,
        "The AscendC tree_attention tiling (csrc/ascend/tiling.h) as a dict, with core_ranges.");
  m.def("ascend_branch_tree_tiling", &ascend_branch_tree_tiling_py, py::arg("gamma"), py::arg("kappa"),
        py::arg("max_branches"), py::arg("capacity"), py::arg("ub_bytes") = ascend::kDefaultUbBytes,
        "The AscendC branch-tree tiling as a dict.");
}
