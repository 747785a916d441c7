// GPU score parser: token ids [N, L] -> scores [N, n_max], status [N], one warp per sequence.
// Traffic: the warp scans ids backwards 256 at a time (coalesced) and gathers 1 flag byte per id
// until it meets the last complete group; only tokens holding { } [ ] are read byte by byte.
// Reference: grm_engine.parse_scores on tokenizer.decode(ids) (rule in score_parser_core.cuh).
#include "grm_cuda.h"
#include "score_parser_core.cuh"

namespace grm_cuda {
namespace {

constexpr int kWarpsPerBlock = 8;
constexpr unsigned kFullMask = 0xffffffffu;

// Largest i < j whose token may hold a delimiter, found 32 * kChunks tokens per step by the
// whole warp: kChunks coalesced id loads per lane in flight, then their flag gathers.
constexpr int kChunks = 8;

template <typename Id>
struct WarpPrevDelimiter {
  const TokenSequence<Id>* seq;
  int lane;
  __device__ int operator()(int j) const {
    constexpr int kStep = 32 * kChunks;
    for (int base = j - kStep; base > -kStep; base -= kStep) {
      uint8_t f[kChunks];
#pragma unroll
      for (int c = 0; c < kChunks; ++c) {
        int i = base + 32 * c + lane;
        f[c] = i >= 0 ? seq->flags(i) : 0;
      }
#pragma unroll
      for (int c = kChunks - 1; c >= 0; --c) {
        unsigned mask = __ballot_sync(kFullMask, (f[c] & kFlagDelimiter) != 0);
        if (mask) return base + 32 * c + 31 - __clz(mask);
      }
    }
    return -1;
  }
};

template <typename Id>
__device__ int warp_first_kept(const TokenSequence<Id>& seq, int lane) {
  for (int base = 0; base < seq.length; base += 32) {
    int i = base + lane;
    unsigned mask = __ballot_sync(kFullMask, i < seq.length && !seq.skipped(i));
    if (mask) return base + __ffs(mask) - 1;
  }
  return -1;
}

template <typename Id>
__global__ void parse_scores_kernel(const Id* __restrict__ token_ids, int64_t n_rows, int64_t row_stride,
                                    int64_t max_length, const int32_t* __restrict__ lengths,
                                    const int32_t* __restrict__ num_responses, VocabView vocab, double lo,
                                    double hi, float* __restrict__ scores, int64_t n_max,
                                    int8_t* __restrict__ status) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= n_rows) return;  // uniform per warp
  float* out = scores + row * n_max;
  for (int64_t c = lane; c < n_max; c += 32) out[c] = quiet_nan();
  __syncwarp();
  int64_t length = lengths[row];
  length = length < 0 ? 0 : (length > max_length ? max_length : length);
  TokenSequence<Id> seq{vocab, token_ids + row * row_stride, static_cast<int>(length)};
  seq.first_kept = warp_first_kept(seq, lane);
  WarpPrevDelimiter<Id> prev{&seq, lane};
  // Every lane runs the same serial parse (identical addresses coalesce); lane 0 writes.
  int8_t st = parse_token_sequence(seq, prev, num_responses[row], lo, hi, lane == 0 ? out : nullptr);
  if (lane == 0) status[row] = st;
}

}  // namespace

cudaError_t launch_parse_scores_from_tokens(const void* token_ids, bool ids_are_int64, int64_t n_rows,
                                            int64_t row_stride, int64_t max_length, const int32_t* lengths,
                                            const int32_t* num_responses, const int32_t* entries,
                                            const uint8_t* flags, const uint8_t* blob, int64_t vocab_size,
                                            double lo, double hi, float* scores, int64_t n_max, int8_t* status,
                                            cudaStream_t stream) {
  if (n_rows == 0) return cudaSuccess;
  VocabView vocab{entries, flags, blob, vocab_size};
  const int64_t blocks = (n_rows + kWarpsPerBlock - 1) / kWarpsPerBlock;
  if (ids_are_int64) {
    parse_scores_kernel<int64_t><<<static_cast<unsigned>(blocks), kWarpsPerBlock * 32, 0, stream>>>(
        static_cast<const int64_t*>(token_ids), n_rows, row_stride, max_length, lengths, num_responses, vocab,
        lo, hi, scores, n_max, status);
  } else {
    parse_scores_kernel<int32_t><<<static_cast<unsigned>(blocks), kWarpsPerBlock * 32, 0, stream>>>(
        static_cast<const int32_t*>(token_ids), n_rows, row_stride, max_length, lengths, num_responses, vocab,
        lo, hi, scores, n_max, status);
  }
  return cudaGetLastError();
}

}  // namespace grm_cuda
