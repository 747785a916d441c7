// GPU voting and rule reward: one thread per group (vote) or per row (reward); k*n_max floats
// read per group, n_max + k + 2 values written. Reference: grm_engine/voting.py (vote,
// is_correct, rule_reward); the per-group rules live in vote_core.cuh.
#include "grm_cuda.h"
#include "vote_core.cuh"

namespace grm_cuda {
namespace {

constexpr int kThreads = 128;

__global__ void vote_kernel(int64_t groups, int k, int n_max, const float* __restrict__ scores,
                            const int8_t* __restrict__ status, const int32_t* __restrict__ perm,
                            const int32_t* __restrict__ n_responses, const float* __restrict__ meta, int k_meta,
                            float* __restrict__ totals, bool* __restrict__ used, int64_t* __restrict__ best,
                            int32_t* __restrict__ errors) {
  const int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (g >= groups) return;
  const int64_t kn = static_cast<int64_t>(k) * n_max;
  errors[g] = vote_group(k, n_max, n_responses == nullptr ? n_max : n_responses[g], scores + g * kn, status + g * k,
                         perm == nullptr ? nullptr : perm + g * kn, meta == nullptr ? nullptr : meta + g * k, k_meta,
                         totals + g * n_max, used + g * k, best + g);
}

__global__ void rule_reward_kernel(int64_t rows, int n_max, const float* __restrict__ scores,
                                   const int8_t* __restrict__ status, const double* __restrict__ best,
                                   const int64_t* __restrict__ counts, bool* __restrict__ correct,
                                   float* __restrict__ reward, int32_t* __restrict__ errors) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r >= rows) return;
  bool is_correct = false;
  errors[r] = correct_row(scores + r * n_max, n_max, status[r], best[r], counts == nullptr ? -1 : counts[r],
                          &is_correct);
  correct[r] = is_correct;
  reward[r] = is_correct ? 1.0f : -1.0f;
}

}  // namespace

cudaError_t launch_vote(int64_t groups, int k, int n_max, const float* scores, const int8_t* status,
                        const int32_t* perm, const int32_t* n_responses, const float* meta, int k_meta,
                        float* totals, bool* used, int64_t* best, int32_t* errors, cudaStream_t stream) {
  if (groups == 0) return cudaSuccess;
  const int64_t blocks = (groups + kThreads - 1) / kThreads;
  vote_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(groups, k, n_max, scores, status, perm,
                                                                       n_responses, meta, k_meta, totals, used,
                                                                       best, errors);
  return cudaGetLastError();
}

cudaError_t launch_rule_reward(int64_t rows, int n_max, const float* scores, const int8_t* status,
                               const double* best, const int64_t* counts, bool* correct, float* reward,
                               int32_t* errors, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  const int64_t blocks = (rows + kThreads - 1) / kThreads;
  rule_reward_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(rows, n_max, scores, status, best,
                                                                              counts, correct, reward, errors);
  return cudaGetLastError();
}

}  // namespace grm_cuda
