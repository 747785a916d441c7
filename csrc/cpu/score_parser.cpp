#include "score_parser.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>

namespace grm {
namespace {

constexpr char kBoxed[] = "\\boxed{";
constexpr size_t kBoxedLen = 7;

bool is_ascii_space(char c) {
  return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v';
}
bool is_digit(char c) { return c >= '0' && c <= '9'; }

// First position p >= from where needle occurs, or -1.
long find_from(const char* text, size_t size, size_t from, const char* needle, size_t len) {
  if (size < len) return -1;
  for (size_t p = from; p + len <= size; ++p) {
    if (text[p] == needle[0] && std::memcmp(text + p, needle, len) == 0) return static_cast<long>(p);
  }
  return -1;
}

// [+-]?(digits(.digits*)?|.digits)([eE][+-]?digits)? over the whole span.
bool is_number(const char* s, size_t n) {
  size_t i = 0;
  if (i < n && (s[i] == '+' || s[i] == '-')) ++i;
  size_t int_digits = 0, frac_digits = 0;
  while (i < n && is_digit(s[i])) ++i, ++int_digits;
  if (i < n && s[i] == '.') {
    ++i;
    while (i < n && is_digit(s[i])) ++i, ++frac_digits;
  }
  if (int_digits == 0 && frac_digits == 0) return false;
  if (i < n && (s[i] == 'e' || s[i] == 'E')) {
    ++i;
    if (i < n && (s[i] == '+' || s[i] == '-')) ++i;
    size_t exp_digits = 0;
    while (i < n && is_digit(s[i])) ++i, ++exp_digits;
    if (exp_digits == 0) return false;
  }
  return i == n;
}

}  // namespace

ParseStatus parse_one(const char* text, size_t size, int64_t num_responses, double lo, double hi, float* out) {
  // The winner is the latest-starting complete group of either kind. A \boxed{ at p is
  // complete iff some '}' lies at or after p + 7; a [[ at p iff some "]]" starts at or after
  // p + 2; so the last '}' and the last "]]" decide completeness for every start. memrchr
  // (vectorized in libc) finds them, which rejects a critique without closers at once; the
  // backward walk then starts at the last closer and stops at the first complete start.
  const void* brace = memrchr(text, '}', size);
  long last_brace = brace ? static_cast<const char*>(brace) - text : -1;
  long last_close = -1;
  for (size_t limit = size; limit > 1;) {
    const void* bracket = memrchr(text, ']', limit);
    if (!bracket) break;
    const long q = static_cast<const char*>(bracket) - text;
    if (q >= 1 && text[q - 1] == ']') { last_close = q - 1; break; }
    limit = static_cast<size_t>(q);
  }
  if (last_brace < 0 && last_close < 0) return kNoScores;
  long start = -1;
  bool boxed = false;
  for (long p = std::max(last_brace, last_close); p >= 0; --p) {
    const char c = text[p];
    if (c == '[') {
      if (last_close >= p + 2 && static_cast<size_t>(p) + 1 < size && text[p + 1] == '[') { start = p; break; }
    } else if (c == '\\') {
      if (last_brace >= p + static_cast<long>(kBoxedLen) && std::memcmp(text + p, kBoxed, kBoxedLen) == 0) {
        start = p;
        boxed = true;
        break;
      }
    }
  }
  if (start < 0) return kNoScores;
  const size_t begin = static_cast<size_t>(start) + (boxed ? kBoxedLen : 2);
  const size_t end = static_cast<size_t>(boxed ? find_from(text, size, begin, "}", 1) : find_from(text, size, begin, "]]", 2));

  // Split on commas; every part must be a number. Values land in `out` as they are parsed;
  // a row that ends unparseable or with the wrong count is reset to NaN.
  int64_t count = 0;
  bool in_range = true;
  ParseStatus status = kOk;
  char small[64];
  std::string large;
  size_t part_begin = begin;
  while (true) {
    size_t part_end = part_begin;
    while (part_end < end && text[part_end] != ',') ++part_end;
    size_t a = part_begin, b = part_end;
    while (a < b && is_ascii_space(text[a])) ++a;
    while (b > a && is_ascii_space(text[b - 1])) --b;
    if (!is_number(text + a, b - a)) { status = kNoScores; break; }
    // strtod needs a terminated string; it rounds correctly, as Python's float() does.
    const char* number = small;
    if (b - a < sizeof(small)) {
      std::memcpy(small, text + a, b - a);
      small[b - a] = '\0';
    } else {
      large.assign(text + a, b - a);
      number = large.c_str();
    }
    const double value = std::strtod(number, nullptr);
    if (count < num_responses) out[count] = static_cast<float>(value);
    if (!(lo <= value && value <= hi)) in_range = false;
    ++count;
    if (part_end >= end) break;
    part_begin = part_end + 1;
  }
  if (status == kOk && count != num_responses) status = kWrongCount;
  if (status != kOk) {
    const float nan = std::numeric_limits<float>::quiet_NaN();
    for (int64_t i = 0; i < num_responses && i < count; ++i) out[i] = nan;
    return status;
  }
  return in_range ? kOk : kOutOfRange;
}

}  // namespace grm
