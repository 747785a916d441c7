// Score parser: the C++ twin of grm_engine/parsing.py (the reference and the specification).
// Scans each critique backwards from its end for the last complete \boxed{...} or [[...]]
// group, so a typical 2 KB critique touches only its last few dozen bytes.
#pragma once

#include <cstddef>
#include <cstdint>

namespace grm {

enum ParseStatus : int8_t { kOk = 0, kNoScores = 1, kWrongCount = 2, kOutOfRange = 3 };

// Parses one critique of `size` UTF-8 bytes. Writes up to `num_responses` values into
// `out` (the caller pre-fills it with NaN) and returns the status.
ParseStatus parse_one(const char* text, size_t size, int64_t num_responses, double lo, double hi, float* out);

}  // namespace grm
