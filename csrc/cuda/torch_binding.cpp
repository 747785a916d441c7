// grm_engine._cuda: the torch binding of the plain-CUDA launchers in grm_cuda.h. Compiled only
// where torch has CUDA. Checks devices, dtypes and shapes, allocates outputs, passes the stream;
// the Python side (grm_engine/gpu_scoring.py) converts dtypes and validates values.
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include "grm_cuda.h"

namespace {

void check(const torch::Tensor& t, const char* name, torch::ScalarType dtype, const torch::Tensor& like) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor");
  TORCH_CHECK(t.device() == like.device(), name, " is on ", t.device(), " but the inputs are on ", like.device());
  TORCH_CHECK(t.scalar_type() == dtype, name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, what, " kernel launch failed: ", cudaGetErrorString(err));
}

std::tuple<torch::Tensor, torch::Tensor> parse_scores_from_tokens(torch::Tensor token_ids, torch::Tensor lengths,
                                                                  torch::Tensor num_responses, torch::Tensor entries,
                                                                  torch::Tensor flags, torch::Tensor blob,
                                                                  int64_t n_max, double lo, double hi) {
  TORCH_CHECK(token_ids.is_cuda() && token_ids.dim() == 2, "token_ids must be a 2-D CUDA tensor [N, L]");
  TORCH_CHECK(token_ids.scalar_type() == torch::kInt32 || token_ids.scalar_type() == torch::kInt64,
              "token_ids must be int32 or int64, got ", token_ids.scalar_type());
  TORCH_CHECK(token_ids.stride(1) == 1, "token_ids rows must be contiguous");
  const int64_t n_rows = token_ids.size(0);
  check(lengths, "lengths", torch::kInt32, token_ids);
  check(num_responses, "num_responses", torch::kInt32, token_ids);
  check(entries, "vocab entries", torch::kInt32, token_ids);
  check(flags, "vocab flags", torch::kUInt8, token_ids);
  check(blob, "vocab blob", torch::kUInt8, token_ids);
  TORCH_CHECK(lengths.numel() == n_rows && num_responses.numel() == n_rows, "lengths and num_responses must have ",
              n_rows, " entries");
  TORCH_CHECK(entries.dim() == 2 && entries.size(1) == 4 && flags.numel() == entries.size(0),
              "vocab tables are inconsistent: entries ", entries.sizes(), ", flags ", flags.sizes());
  TORCH_CHECK(token_ids.size(1) < (int64_t(1) << 31), "sequences longer than 2^31 tokens are not supported");
  const c10::cuda::CUDAGuard guard(token_ids.device());
  auto scores = torch::empty({n_rows, n_max}, token_ids.options().dtype(torch::kFloat32));
  auto status = torch::empty({n_rows}, token_ids.options().dtype(torch::kInt8));
  check_launch(grm_cuda::launch_parse_scores_from_tokens(
                   token_ids.data_ptr(), token_ids.scalar_type() == torch::kInt64, n_rows,
                   n_rows > 1 ? token_ids.stride(0) : token_ids.size(1), token_ids.size(1), lengths.data_ptr<int32_t>(),
                   num_responses.data_ptr<int32_t>(), entries.data_ptr<int32_t>(), flags.data_ptr<uint8_t>(),
                   blob.data_ptr<uint8_t>(), entries.size(0), lo, hi, scores.data_ptr<float>(), n_max,
                   status.data_ptr<int8_t>(), c10::cuda::getCurrentCUDAStream().stream()),
               "parse_scores_from_tokens");
  return {scores, status};
}

std::tuple<torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor> vote(
    torch::Tensor scores, torch::Tensor status, c10::optional<torch::Tensor> perm,
    c10::optional<torch::Tensor> n_responses, c10::optional<torch::Tensor> meta, int64_t k_meta) {
  TORCH_CHECK(scores.is_cuda() && scores.dim() == 3, "scores must be a CUDA tensor [G, k, n_max]");
  check(scores, "scores", torch::kFloat32, scores);
  check(status, "status", torch::kInt8, scores);
  const int64_t groups = scores.size(0), k = scores.size(1), n_max = scores.size(2);
  TORCH_CHECK(status.numel() == groups * k, "status must be [G, k]");
  if (perm) { check(*perm, "perm", torch::kInt32, scores); TORCH_CHECK(perm->numel() == scores.numel(), "perm must be [G, k, n_max]"); }
  if (n_responses) { check(*n_responses, "n_responses", torch::kInt32, scores); TORCH_CHECK(n_responses->numel() == groups, "n_responses must be [G]"); }
  if (meta) { check(*meta, "meta", torch::kFloat32, scores); TORCH_CHECK(meta->numel() == groups * k, "meta must be [G, k]"); }
  const c10::cuda::CUDAGuard guard(scores.device());
  auto totals = torch::empty({groups, n_max}, scores.options());
  auto best = torch::empty({groups}, scores.options().dtype(torch::kInt64));
  auto used = torch::empty({groups, k}, scores.options().dtype(torch::kBool));
  auto errors = torch::empty({groups}, scores.options().dtype(torch::kInt32));
  check_launch(grm_cuda::launch_vote(groups, static_cast<int>(k), static_cast<int>(n_max), scores.data_ptr<float>(),
                                     status.data_ptr<int8_t>(), perm ? perm->data_ptr<int32_t>() : nullptr,
                                     n_responses ? n_responses->data_ptr<int32_t>() : nullptr,
                                     meta ? meta->data_ptr<float>() : nullptr, static_cast<int>(k_meta),
                                     totals.data_ptr<float>(), used.data_ptr<bool>(), best.data_ptr<int64_t>(),
                                     errors.data_ptr<int32_t>(), c10::cuda::getCurrentCUDAStream().stream()),
               "vote");
  return {totals, best, used, errors};
}

std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> rule_reward(torch::Tensor scores, torch::Tensor status,
                                                                    torch::Tensor best,
                                                                    c10::optional<torch::Tensor> counts) {
  TORCH_CHECK(scores.is_cuda() && scores.dim() == 2, "scores must be a CUDA tensor [N, n_max]");
  check(scores, "scores", torch::kFloat32, scores);
  check(status, "status", torch::kInt8, scores);
  check(best, "best", torch::kFloat64, scores);
  const int64_t rows = scores.size(0), n_max = scores.size(1);
  TORCH_CHECK(status.numel() == rows && best.numel() == rows, "status and best must have ", rows, " entries");
  if (counts) { check(*counts, "num_responses", torch::kInt64, scores); TORCH_CHECK(counts->numel() == rows, "num_responses must be [N]"); }
  const c10::cuda::CUDAGuard guard(scores.device());
  auto correct = torch::empty({rows}, scores.options().dtype(torch::kBool));
  auto reward = torch::empty({rows}, scores.options());
  auto errors = torch::empty({rows}, scores.options().dtype(torch::kInt32));
  check_launch(grm_cuda::launch_rule_reward(rows, static_cast<int>(n_max), scores.data_ptr<float>(),
                                            status.data_ptr<int8_t>(), best.data_ptr<double>(),
                                            counts ? counts->data_ptr<int64_t>() : nullptr, correct.data_ptr<bool>(),
                                            reward.data_ptr<float>(), errors.data_ptr<int32_t>(),
                                            c10::cuda::getCurrentCUDAStream().stream()),
               "rule_reward");
  return {correct, reward, errors};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "grm-engine CUDA kernels: score parsing from token ids, voting, rule reward";
  m.def("parse_scores_from_tokens", &parse_scores_from_tokens, "token ids -> (scores [N, n_max], status [N])");
  m.def("vote", &vote, "vote over groups -> (totals, best, used, errors)");
  m.def("rule_reward", &rule_reward, "is_correct and rule reward -> (correct, reward, errors)");
}
