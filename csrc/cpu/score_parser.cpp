#include "score_parser.h"

#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

namespace grm {
namespace {

constexpr char kBoxed[] = "\\boxed{";
constexpr size_t kBoxedLen = 7;

bool is_ascii_space(char c) {
  return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v';
}
bool is_digit(char c) { return c >= '0' && c <= '9'; }

// Last position p < limit (p + len <= limit) where needle occurs, or -1.
long rfind_before(const char* text, size_t limit, const char* needle, size_t len) {
  if (limit < len) return -1;
  for (long p = static_cast<long>(limit - len); p >= 0; --p) {
    if (text[p] == needle[0] && std::memcmp(text + p, needle, len) == 0) return p;
  }
  return -1;
}

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
  // The latest-starting complete group of each kind. A \boxed{ at s is complete iff some
  // '}' lies at or after s + 7; a [[ at s iff some "]]" starts at or after s + 2.
  long boxed_start = -1, bracket_start = -1;
  long last_brace = -1;
  for (long p = static_cast<long>(size) - 1; p >= 0; --p) {
    if (text[p] == '}') { last_brace = p; break; }
  }
  if (last_brace >= 0) boxed_start = rfind_before(text, static_cast<size_t>(last_brace), kBoxed, kBoxedLen);
  long last_close = rfind_before(text, size, "]]", 2);
  if (last_close >= 0) bracket_start = rfind_before(text, static_cast<size_t>(last_close), "[[", 2);
  if (boxed_start < 0 && bracket_start < 0) return kNoScores;

  size_t begin, end;
  if (boxed_start > bracket_start) {
    begin = static_cast<size_t>(boxed_start) + kBoxedLen;
    end = static_cast<size_t>(find_from(text, size, begin, "}", 1));
  } else {
    begin = static_cast<size_t>(bracket_start) + 2;
    end = static_cast<size_t>(find_from(text, size, begin, "]]", 2));
  }

  // Split on commas; every part must be a number.
  std::vector<double> values;
  std::string buffer;
  size_t part_begin = begin;
  while (true) {
    size_t part_end = part_begin;
    while (part_end < end && text[part_end] != ',') ++part_end;
    size_t a = part_begin, b = part_end;
    while (a < b && is_ascii_space(text[a])) ++a;
    while (b > a && is_ascii_space(text[b - 1])) --b;
    if (!is_number(text + a, b - a)) return kNoScores;
    buffer.assign(text + a, b - a);  // strtod needs a terminated string; it rounds correctly
    values.push_back(std::strtod(buffer.c_str(), nullptr));
    if (part_end >= end) break;
    part_begin = part_end + 1;
  }
  if (static_cast<int64_t>(values.size()) != num_responses) return kWrongCount;
  bool in_range = true;
  for (size_t i = 0; i < values.size(); ++i) {
    out[i] = static_cast<float>(values[i]);
    if (!(lo <= values[i] && values[i] <= hi)) in_range = false;
  }
  return in_range ? kOk : kOutOfRange;
}

}  // namespace grm
