// Launchers of the grm_engine._cuda kernels: plain CUDA C++ (raw pointers, sizes, a stream),
// so every .cu compiles with nvcc alone; csrc/cuda/torch_binding.cpp wraps them for torch.
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

namespace grm_cuda {

// Scores [n_rows, n_max] (float32, NaN where absent) and status [n_rows] (int8, ParseStatus) of
// the generated token ids, as grm_engine.parse_scores gives on the decoded text.
// token_ids: [n_rows, row_stride] int32 (ids_are_int64 = false) or int64; lengths [n_rows] int32
// (clamped to 0..max_length); num_responses [n_rows] int32, each in 1..n_max.
// entries [vocab, 4] int32, flags [vocab] uint8, blob: the VocabBytes tables.
cudaError_t launch_parse_scores_from_tokens(const void* token_ids, bool ids_are_int64, int64_t n_rows,
                                            int64_t row_stride, int64_t max_length, const int32_t* lengths,
                                            const int32_t* num_responses, const int32_t* entries,
                                            const uint8_t* flags, const uint8_t* blob, int64_t vocab_size,
                                            double lo, double hi, float* scores, int64_t n_max, int8_t* status,
                                            cudaStream_t stream);

// vote over groups: scores [groups, k, n_max] f32, status [groups, k] i8, perm [groups, k, n_max]
// i32 or null, n_responses [groups] i32 or null (= n_max), meta [groups, k] f32 or null.
// Outputs totals [groups, n_max] f32, used [groups, k] bool, best [groups] i64, errors [groups] i32.
cudaError_t launch_vote(int64_t groups, int k, int n_max, const float* scores, const int8_t* status,
                        const int32_t* perm, const int32_t* n_responses, const float* meta, int k_meta,
                        float* totals, bool* used, int64_t* best, int32_t* errors, cudaStream_t stream);

// is_correct / rule_reward per row: scores [rows, n_max] f32, status [rows] i8, best [rows] f64
// (index, or the label for one response), counts [rows] i64 or null (count the non-NaN scores).
// Outputs correct [rows] bool, reward [rows] f32 (+1 / -1), errors [rows] i32.
cudaError_t launch_rule_reward(int64_t rows, int n_max, const float* scores, const int8_t* status,
                               const double* best, const int64_t* counts, bool* correct, float* reward,
                               int32_t* errors, cudaStream_t stream);

}  // namespace grm_cuda
