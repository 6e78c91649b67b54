// pybind11 module mirror_rt._C_ascend: launches the AscendC kernels on torch_npu's current stream.
// Built only with -DMIRROR_RT_ASCEND=ON and a CANN toolkit (csrc/ascend/CMakeLists.txt); unlike
// mirror_rt._C it links torch and torch_npu, because it needs their stream and device tensors.
// WRITTEN AGAINST THE CANN / torch_npu APIs, NEVER COMPILED OR RUN (no CANN toolkit / NPU in CI).
#include <torch/extension.h>

#include "aclrtlaunch_mirror_build_branch_tree.h"
#include "aclrtlaunch_mirror_extend_branch_tree.h"
#include "aclrtlaunch_mirror_tree_attention_bf16.h"
#include "aclrtlaunch_mirror_tree_attention_f32.h"
#include "tiling.h"
#include "tiling/platform/platform_ascendc.h"
#include "torch_npu/csrc/core/npu/NPUStream.h"

namespace {

using namespace mirror_rt::ascend;

// stream(true) empties torch_npu's task queue first: ops the caller enqueued before us (e.g. the
// tiling upload below, or the producer of q) reach the stream before our kernel does.
aclrtStream current_stream() { return c10_npu::getCurrentNPUStream().stream(true); }

// A small host struct as a device tensor the kernel reads its tiling from.
template <typename S>
at::Tensor to_device(const S& s, const at::Device& dev) {
  auto host = at::empty({int64_t(sizeof(S))}, at::kByte);
  std::memcpy(host.data_ptr(), &s, sizeof(S));
  return host.to(dev);
}

void need(bool ok, const std::string& msg) { TORCH_CHECK_VALUE(ok, msg); }

void check_npu(const at::Tensor& t, const char* name, int rank) {
  need(t.device().type() == c10::DeviceType::PrivateUse1, std::string(name) + " must be an NPU tensor");
  need(t.dim() == rank, std::string(name) + " must have " + std::to_string(rank) + " dimensions");
  need(t.is_contiguous(), std::string(name) + " must be contiguous");
}

// Same contract as mirror_rt.ops.cpu.tree_attention_cpu with a packed int32 mask [B, Tq, ceil(T/32)]
// (exactly ceil(T/32) words) and contiguous tensors.
at::Tensor tree_attention_npu(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                              const at::Tensor& cache_seqlens, const at::Tensor& k_tree,
                              const at::Tensor& v_tree, const at::Tensor& mask_bits, double sm_scale) {
  for (auto [t, n] : {std::pair{&q, "q"}, {&k_cache, "k_cache"}, {&v_cache, "v_cache"}, {&k_tree, "k_tree"}, {&v_tree, "v_tree"}}) {
    check_npu(*t, n, 4);
    TORCH_CHECK_TYPE(t->scalar_type() == q.scalar_type(), n, " dtype differs from q's");
  }
  check_npu(cache_seqlens, "cache_seqlens", 1);
  check_npu(mask_bits, "tree_mask", 3);
  TORCH_CHECK_TYPE(q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16, "q must be float32 or bfloat16");
  TORCH_CHECK_TYPE(cache_seqlens.scalar_type() == at::kInt, "cache_seqlens must be int32");
  TORCH_CHECK_TYPE(mask_bits.scalar_type() == at::kInt, "tree_mask must be int32 packed bits");
  const int64_t B = q.size(0), Tq = q.size(1), Hq = q.size(2), D = q.size(3);
  const int64_t S = k_cache.size(1), Hkv = k_cache.size(2), T = k_tree.size(1);
  need(k_cache.sizes() == v_cache.sizes() && k_cache.size(0) == B && k_cache.size(3) == D, "k_cache/v_cache must be [B, S, Hkv, D]");
  need(k_tree.sizes() == v_tree.sizes() && k_tree.size(0) == B && k_tree.size(2) == Hkv && k_tree.size(3) == D,
       "k_tree/v_tree must be [B, T, Hkv, D]");
  need(mask_bits.size(0) == B && mask_bits.size(1) == Tq && mask_bits.size(2) == (T + 31) / 32,
       "tree_mask must be [B, Tq, ceil(T/32)]");

  auto* plat = platform_ascendc::PlatformAscendCManager::GetInstance();
  uint64_t ub = 0;
  plat->GetCoreMemSize(platform_ascendc::CoreMemType::UB, ub);
  TreeAttentionTiling t{};
  const int err = make_tree_attention_tiling(B, Tq, T, S, Hq, Hkv, D, q.element_size(), float(sm_scale),
                                             plat->GetCoreNumAiv(), uint32_t(ub), &t);
  need(err == 0, "tree_attention_npu: no tiling for these shapes (code " + std::to_string(err) + ")");
  auto out = at::empty_like(q);
  auto tiling = to_device(t, q.device());
  aclrtStream stream = current_stream();
  if (q.scalar_type() == at::kFloat)
    ACLRT_LAUNCH_KERNEL(mirror_tree_attention_f32)(t.block_dim, stream, q.data_ptr(), k_cache.data_ptr(),
        v_cache.data_ptr(), cache_seqlens.data_ptr(), k_tree.data_ptr(), v_tree.data_ptr(), mask_bits.data_ptr(),
        out.data_ptr(), tiling.data_ptr());
  else
    ACLRT_LAUNCH_KERNEL(mirror_tree_attention_bf16)(t.block_dim, stream, q.data_ptr(), k_cache.data_ptr(),
        v_cache.data_ptr(), cache_seqlens.data_ptr(), k_tree.data_ptr(), v_tree.data_ptr(), mask_bits.data_ptr(),
        out.data_ptr(), tiling.data_ptr());
  return out;  // `tiling` is freed by the caching allocator only after the stream has used it
}

// Tree buffers as in mirror_rt.ops.branch_tree.BranchTree, on the NPU. Returns a device int32
// counts tensor: [num_branches] (or -1 when capacity is too small), read it when needed.
at::Tensor build_branch_tree_npu(const at::Tensor& window, const at::Tensor& exit_ids, int64_t max_branches,
                                 at::Tensor tokens, at::Tensor parents, at::Tensor positions, at::Tensor mask_bits,
                                 at::Tensor branch_pos, at::Tensor branch_rank, at::Tensor branch_tip) {
  BranchTreeTiling t{};
  need(make_branch_tree_tiling(window.size(0), exit_ids.size(1), int32_t(max_branches), tokens.size(0),
                               kDefaultUbBytes, &t) == 0, "build_branch_tree_npu: bad sizes");
  need(mask_bits.size(1) == t.mask_words, "mask_bits must be [capacity, ceil(capacity/32)]");
  auto counts = at::zeros({1}, window.options().dtype(at::kInt));
  auto tiling = to_device(t, window.device());
  ACLRT_LAUNCH_KERNEL(mirror_build_branch_tree)(1, current_stream(), window.data_ptr(), exit_ids.data_ptr(),
      tokens.data_ptr(), parents.data_ptr(), positions.data_ptr(), mask_bits.data_ptr(), branch_pos.data_ptr(),
      branch_rank.data_ptr(), branch_tip.data_ptr(), counts.data_ptr(), tiling.data_ptr());
  return counts;
}

at::Tensor extend_branch_tree_npu(const at::Tensor& new_tokens, int64_t num_nodes, at::Tensor tokens,
                                  at::Tensor parents, at::Tensor positions, at::Tensor mask_bits,
                                  at::Tensor branch_tip) {
  BranchTreeTiling t{};
  need(make_branch_tree_tiling(0, 1, -1, tokens.size(0), kDefaultUbBytes, &t) == 0, "extend_branch_tree_npu: bad sizes");
  auto counts = at::tensor({int32_t(num_nodes), int32_t(new_tokens.size(0)), int32_t(new_tokens.size(1))},
                           at::kInt).to(new_tokens.device());
  auto tiling = to_device(t, new_tokens.device());
  ACLRT_LAUNCH_KERNEL(mirror_extend_branch_tree)(1, current_stream(), new_tokens.data_ptr(), tokens.data_ptr(),
      parents.data_ptr(), positions.data_ptr(), mask_bits.data_ptr(), branch_tip.data_ptr(), counts.data_ptr(),
      tiling.data_ptr());
  return counts;
}

}  // namespace

PYBIND11_MODULE(_C_ascend, m) {
  m.doc() = "mirror_rt AscendC kernels (NPU); see csrc/ascend/README.md";
  m.def("tree_attention", &tree_attention_npu);
  m.def("build_branch_tree", &build_branch_tree_npu);
  m.def("extend_branch_tree", &extend_branch_tree_npu);
}
