// Voting over k sampled critiques and the rule reward, for one group / one row (host or device):
// the rules of grm_engine/voting.py (`vote`, `is_correct`, `rule_reward`), which are the spec.
#pragma once

#include <stdint.h>

#include "decimal_to_double.cuh"  // GRM_HD

namespace grm_cuda {

enum VoteError : int32_t { kVoteOk = 0, kBadResponseCount = 1, kBadPermutation = 2, kNanMeta = 3, kBadBestIndex = 4 };

GRM_HD bool is_nan_float(float x) { return x != x; }

// One group: scores [k, n_max] (row stride n_max), status [k], perm [k, n_max] or null,
// meta [k] or null. Writes totals [n_max] (NaN past n), used [k], best. Returns a VoteError.
GRM_HD int32_t vote_group(int k, int n_max, int n, const float* scores, const int8_t* status, const int32_t* perm,
                          const float* meta, int k_meta, float* totals, bool* used, int64_t* best) {
  *best = -1;
  for (int j = 0; j < k; ++j) used[j] = false;
  for (int p = 0; p < n_max; ++p) {
    union { uint32_t u; float f; } nan_bits;
    nan_bits.u = 0x7fc00000u;
    totals[p] = nan_bits.f;
  }
  if (n < 1 || n > n_max) return kBadResponseCount;
  for (int j = 0; j < k; ++j) {
    used[j] = status[j] == 0;
    if (meta != nullptr && used[j] && is_nan_float(meta[j])) return kNanMeta;
  }
  if (perm != nullptr) {  // every sample's permutation is checked, as the reference does
    for (int j = 0; j < k; ++j) {
      const int32_t* row = perm + static_cast<int64_t>(j) * n_max;
      for (int p = 0; p < n; ++p) {
        if (row[p] < 0 || row[p] >= n) return kBadPermutation;
        for (int q = 0; q < p; ++q)
          if (row[q] == row[p]) return kBadPermutation;
      }
    }
  }
  if (meta != nullptr) {
    // Keep the k_meta valid samples with the highest meta score; ties go to the lower index.
    // Ranks read status and meta only, so used[] can be overwritten in place.
    for (int j = 0; j < k; ++j) {
      int rank = 0;
      if (status[j] == 0) {
        for (int i = 0; i < k; ++i)
          if (status[i] == 0 && (meta[i] > meta[j] || (meta[i] == meta[j] && i < j))) rank++;
      }
      used[j] = status[j] == 0 && rank < k_meta;
    }
  }
  for (int p = 0; p < n; ++p) totals[p] = 0.0f;
  for (int j = 0; j < k; ++j) {  // float32 sums in sample order, as the reference adds them
    if (!used[j]) continue;
    const float* row = scores + static_cast<int64_t>(j) * n_max;
    const int32_t* prow = perm == nullptr ? nullptr : perm + static_cast<int64_t>(j) * n_max;
    for (int p = 0; p < n; ++p) {
      int original = prow == nullptr ? p : prow[p];
#ifdef __CUDA_ARCH__
      totals[original] = __fadd_rn(totals[original], row[p]);
#else
      totals[original] = totals[original] + row[p];
#endif
    }
  }
  // torch: max() is NaN if any total is NaN, and then nothing equals it (best = -1).
  float top = totals[0];
  bool any_nan = false;
  for (int p = 0; p < n; ++p) {
    if (is_nan_float(totals[p])) any_nan = true;
    else if (totals[p] > top) top = totals[p];
  }
  if (any_nan) return kVoteOk;
  int winners = 0, winner = -1;
  for (int p = 0; p < n; ++p)
    if (totals[p] == top) { winners++; if (winner < 0) winner = p; }
  *best = winners == 1 ? winner : -1;
  return kVoteOk;
}

// One row of is_correct / rule_reward: scores [n_max], status, best (index, or the label when
// there is one response), count (responses; < 0: the number of non-NaN scores).
GRM_HD int32_t correct_row(const float* scores, int n_max, int8_t status, double best, int64_t count,
                           bool* correct) {
  *correct = false;
  if (count < 0) {
    count = 0;
    for (int p = 0; p < n_max; ++p) count += !is_nan_float(scores[p]);
  }
  bool ok = status == 0;
  bool single = count == 1;
  int64_t index = static_cast<int64_t>(best);  // torch .long() truncates toward zero
  if (ok && !single && (index < 0 || index >= count)) return kBadBestIndex;
  if (!ok || n_max == 0) return kVoteOk;
  if (single) {
    *correct = static_cast<double>(scores[0]) == best;
    return kVoteOk;
  }
  int64_t safe = index < 0 ? 0 : (index > n_max - 1 ? n_max - 1 : index);
  double best_score = scores[safe];
  bool beats_all = true;
  for (int64_t p = 0; p < n_max && p < count; ++p)
    if (p != safe && !(best_score > static_cast<double>(scores[p]))) beats_all = false;
  *correct = beats_all && count >= 2;
  return kVoteOk;
}

}  // namespace grm_cuda
