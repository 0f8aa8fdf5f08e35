// quantlab's own pybind11 entry points for the peer Marlin GEMM (vLLM's gptq_marlin kernels,
// built from .peers/gptq_marlin, never committed). Only the uint4b8, group-128, no-act-order
// path is exposed: two functions, no torch op registration.
#include <optional>

#include <torch/extension.h>

#include "core/scalar_type.hpp"

// Defined in the upstream gptq_marlin.cu and gptq_marlin_repack.cu (compiled beside this file).
torch::Tensor gptq_marlin_gemm(
    torch::Tensor& a, std::optional<torch::Tensor> c_or_none, torch::Tensor& b_q_weight,
    std::optional<torch::Tensor> const& b_bias_or_none, torch::Tensor& b_scales,
    std::optional<torch::Tensor> const& global_scale_or_none,
    std::optional<torch::Tensor> const& b_zeros_or_none,
    std::optional<torch::Tensor> const& g_idx_or_none,
    std::optional<torch::Tensor> const& perm_or_none, torch::Tensor& workspace,
    vllm::ScalarTypeId const& b_q_type_id, int64_t size_m, int64_t size_n, int64_t size_k,
    bool is_k_full, bool use_atomic_add, bool use_fp32_reduce, bool is_zp_float);

torch::Tensor gptq_marlin_repack(torch::Tensor& b_q_weight, torch::Tensor& perm, int64_t size_k,
                                 int64_t size_n, int64_t num_bits);

// y (M, N) = x (M, K) @ W^T with W given as Marlin tiles (K/16, 2N) int32 and permuted scales
// (K/128, N) in x's dtype; workspace: zeroed int32, at least one entry per SM.
static torch::Tensor matmul_u4b8(torch::Tensor x, torch::Tensor w, torch::Tensor s,
                                 torch::Tensor workspace, int64_t n, bool fp32_reduce) {
  std::optional<torch::Tensor> none;
  return gptq_marlin_gemm(x, none, w, none, s, none, none, none, none, workspace,
                          vllm::kU4B8.id(), x.size(0), n, x.size(1), /*is_k_full=*/true,
                          /*use_atomic_add=*/false, fp32_reduce, /*is_zp_float=*/false);
}

// GPTQ-packed (K/8, N) int32 (eight 4-bit codes along k, low nibble first) -> Marlin tiles.
static torch::Tensor repack_u4(torch::Tensor qweight, int64_t k, int64_t n) {
  auto no_perm = torch::empty({0}, qweight.options().dtype(torch::kInt));
  return gptq_marlin_repack(qweight, no_perm, k, n, 4);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("matmul_u4b8", &matmul_u4b8, "Marlin W4A16 GEMM (uint4b8, no act-order)");
  m.def("repack_u4", &repack_u4, "GPTQ int32 packing -> Marlin tile layout (4-bit)");
}
