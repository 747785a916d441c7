// Score parsing over one sequence of token ids, for one thread (host or device): the rule of
// grm_engine/parsing.py (latest-starting complete \boxed{...} or [[...]] group) applied to the
// byte stream that VocabBytes defines (grm_engine/vocab_bytes.py: parse_view_bytes).
// The caller supplies `prev_delimiter_token` (a warp ballot on the GPU, a loop on the host), so
// only tokens that hold one of { } [ ] are looked into; everything else is plain serial code.
#pragma once

#include <stdint.h>

#include "decimal_to_double.cuh"

namespace grm_cuda {

enum ParseStatus : int8_t { kOk = 0, kNoScores = 1, kWrongCount = 2, kOutOfRange = 3 };

// Flag bits of VocabBytes.flags (grm_engine/vocab_bytes.py).
constexpr uint8_t kFlagSkipped = 1;
constexpr uint8_t kFlagByteToken = 2;
constexpr uint8_t kFlagDelimiter = 4;
constexpr int kInvalidRunByte = 0x80;  // a byte token of an invalid UTF-8 run (U+FFFD in decode)

struct VocabView {
  const int32_t* entries;  // [V, 4]: start, length, first start, first length
  const uint8_t* flags;    // [V]
  const uint8_t* blob;     // [B]
  int64_t vocab_size;
};

template <typename Id>
struct TokenSequence {
  VocabView vocab;
  const Id* ids;  // [length]
  int length;
  int first_kept = -1;  // index of the first kept token (Metaspace treats it differently)
  // Cache of the byte-fallback run validated last: tokens [run_begin, run_end) are one run.
  int run_begin = 0, run_end = 0;
  bool run_valid = true;

  GRM_HD int64_t id(int i) const { return static_cast<int64_t>(ids[i]); }
  GRM_HD uint8_t flags(int i) const {
    int64_t t = id(i);
    if (t < 0 || t >= vocab.vocab_size) return kFlagSkipped;  // decode drops unknown ids
    return vocab.flags[t];
  }
  GRM_HD bool skipped(int i) const { return (flags(i) & kFlagSkipped) != 0; }
  GRM_HD bool is_byte_token(int i) const { return (flags(i) & (kFlagByteToken | kFlagSkipped)) == kFlagByteToken; }
  GRM_HD int token_length(int i) const {
    uint8_t f = flags(i);
    if (f & kFlagSkipped) return 0;
    const int32_t* e = vocab.entries + 4 * id(i);
    return i == first_kept ? e[3] : e[1];
  }
  GRM_HD int raw_byte(int i, int k) const {
    const int32_t* e = vocab.entries + 4 * id(i);
    return vocab.blob[(i == first_kept ? e[2] : e[0]) + k];
  }
  // Strict UTF-8 validity of the run of byte tokens around token i (skipped tokens do not end a run).
  GRM_HD bool byte_run_valid(int i) {
    if (i >= run_begin && i < run_end) return run_valid;
    int begin = i;
    while (begin > 0 && (skipped(begin - 1) || is_byte_token(begin - 1))) begin--;
    int need = 0;          // continuation bytes still expected
    int lower = 0x80, upper = 0xBF;  // allowed range of the next continuation byte
    bool valid = true;
    int end = begin;
    for (; end < length && (skipped(end) || is_byte_token(end)); ++end) {
      if (skipped(end) || !valid) continue;
      int b = raw_byte(end, 0);
      if (need > 0) {
        if (b < lower || b > upper) { valid = false; continue; }
        need--;
        lower = 0x80; upper = 0xBF;
      } else if (b < 0x80) {
      } else if (b >= 0xC2 && b <= 0xDF) { need = 1;
      } else if (b == 0xE0) { need = 2; lower = 0xA0;
      } else if ((b >= 0xE1 && b <= 0xEC) || b == 0xEE || b == 0xEF) { need = 2;
      } else if (b == 0xED) { need = 2; upper = 0x9F;  // no surrogates
      } else if (b == 0xF0) { need = 3; lower = 0x90;
      } else if (b >= 0xF1 && b <= 0xF3) { need = 3;
      } else if (b == 0xF4) { need = 3; upper = 0x8F;
      } else { valid = false; }
    }
    run_begin = begin;
    run_end = end;
    run_valid = valid && need == 0;
    return run_valid;
  }
  GRM_HD int byte_at(int i, int k) {
    if (is_byte_token(i)) return byte_run_valid(i) ? raw_byte(i, 0) : kInvalidRunByte;
    return raw_byte(i, k);
  }
};

// A position in the byte stream: byte `offset` of token `token`.
struct Cursor {
  int token;
  int offset;
};

// Moves to the next byte; false at the end of the stream.
template <typename Id>
GRM_HD bool cursor_next(TokenSequence<Id>& seq, Cursor& c) {
  c.offset++;
  while (c.offset >= seq.token_length(c.token)) {
    c.token++;
    c.offset = 0;
    if (c.token >= seq.length) return false;
  }
  return true;
}

template <typename Id>
GRM_HD bool cursor_prev(TokenSequence<Id>& seq, Cursor& c) {
  c.offset--;
  while (c.offset < 0) {
    c.token--;
    if (c.token < 0) return false;
    c.offset = seq.token_length(c.token) - 1;
  }
  return true;
}

template <typename Id>
GRM_HD int next_byte(TokenSequence<Id>& seq, Cursor c) {  // the byte after c, or -1
  return cursor_next(seq, c) ? seq.byte_at(c.token, c.offset) : -1;
}

GRM_HD bool is_space(int c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v'; }
GRM_HD bool is_digit(int c) { return c >= '0' && c <= '9'; }

// Reads one number starting at `c` (already on its first byte) per the grammar
// [+-]?(digits(.digits*)?|.digits)([eE][+-]?digits)?; leaves `c` on the first byte after it
// (`at_end` when the stream ended). Returns false when the bytes are not a number.
template <typename Id, typename Sink>
GRM_HD bool read_number(TokenSequence<Id>& seq, Cursor& c, bool& at_end, Sink&& sink) {
  int ch = seq.byte_at(c.token, c.offset);
  auto advance = [&]() {
    if (!cursor_next(seq, c)) { at_end = true; ch = -1; } else { ch = seq.byte_at(c.token, c.offset); }
  };
  if (ch == '+' || ch == '-') { sink.sign(ch == '-'); advance(); }
  int int_digits = 0, frac_digits = 0;
  while (!at_end && is_digit(ch)) { sink.digit(ch - '0', false); int_digits++; advance(); }
  if (!at_end && ch == '.') {
    sink.dot();
    advance();
    while (!at_end && is_digit(ch)) { sink.digit(ch - '0', true); frac_digits++; advance(); }
  }
  if (int_digits == 0 && frac_digits == 0) return false;
  if (!at_end && (ch == 'e' || ch == 'E')) {
    advance();
    bool negative = false;
    if (!at_end && (ch == '+' || ch == '-')) { negative = ch == '-'; advance(); }
    long exponent = 0;
    int exp_digits = 0;
    while (!at_end && is_digit(ch)) {
      if (exponent < 1000000) exponent = exponent * 10 + (ch - '0');  // saturates far past any double
      exp_digits++;
      advance();
    }
    if (exp_digits == 0) return false;
    sink.exponent(negative ? -exponent : exponent);
  }
  return true;
}

struct SummarySink {
  DecimalSummary s;
  GRM_HD void sign(bool negative) { s.negative = negative; }
  GRM_HD void digit(int d, bool fraction) { summary_add_digit(s, d, fraction); }
  GRM_HD void dot() {}
  GRM_HD void exponent(long e) { s.exp10 += e; }
};

struct SlowSink {
  SlowDecimal a;
  SlowDecimalReader r;
  GRM_HD void sign(bool negative) { a.negative = negative; }
  GRM_HD void digit(int d, bool) { slow_add_digit(a, d); }
  GRM_HD void dot() { slow_add_dot(a, r); }
  GRM_HD void exponent(long e) { r.exponent = e; }
};

// Parses the content that starts at `c` and ends at the first '}' (boxed) or "]]" (bracket).
// Writes values to out[0 .. num_responses) when `out` is not null (the caller pre-fills NaN).
GRM_HD float quiet_nan() {
  union { uint32_t u; float f; } pun;
  pun.u = 0x7fc00000u;
  return pun.f;
}

template <typename Id>
GRM_HD int8_t parse_content(TokenSequence<Id>& seq, Cursor c, bool at_end, bool boxed, int num_responses,
                            double lo, double hi, float* out) {
  int count = 0;
  bool in_range = true;
  auto fail = [&](int8_t status) -> int8_t {  // a row that is not OK/OUT_OF_RANGE holds no values
    if (out != nullptr)
      for (int i = 0; i < num_responses && i < count; ++i) out[i] = quiet_nan();
    return status;
  };
  while (true) {  // one comma-separated part per iteration
    int ch = at_end ? -1 : seq.byte_at(c.token, c.offset);
    while (!at_end && is_space(ch)) {
      if (!cursor_next(seq, c)) at_end = true; else ch = seq.byte_at(c.token, c.offset);
    }
    if (at_end) return fail(kNoScores);  // cannot happen inside a complete group
    Cursor number_start = c;
    SummarySink summary;
    if (!read_number(seq, c, at_end, summary)) return fail(kNoScores);
    ch = at_end ? -1 : seq.byte_at(c.token, c.offset);
    while (!at_end && is_space(ch)) {
      if (!cursor_next(seq, c)) at_end = true; else ch = seq.byte_at(c.token, c.offset);
    }
    bool last;
    if (ch == ',') last = false;
    else if (boxed && ch == '}') last = true;
    else if (!boxed && ch == ']' && next_byte(seq, c) == ']') last = true;
    else return fail(kNoScores);
    if (count < num_responses) {
      double value;
      if (!summary_to_double_fast(summary.s, &value)) {
        SlowSink slow;
        bool slow_end = false;
        read_number(seq, number_start, slow_end, slow);
        slow_finish(slow.a, slow.r);
        value = decimal_to_double(slow.a);
      }
      if (out != nullptr) out[count] = static_cast<float>(value);
      if (!(lo <= value && value <= hi)) in_range = false;
    }
    count++;
    if (last) break;
    if (!cursor_next(seq, c)) at_end = true;  // past the comma
  }
  if (count != num_responses) return fail(kWrongCount);
  return in_range ? kOk : kOutOfRange;
}

// Finds the latest-starting complete group and parses it. `prev_delimiter_token(j)` returns the
// largest i < j whose token may hold { } [ ] (FLAG_DELIMITER), or -1.
template <typename Id, typename PrevDelimiter>
GRM_HD int8_t parse_token_sequence(TokenSequence<Id>& seq, PrevDelimiter&& prev_delimiter_token, int num_responses,
                                   double lo, double hi, float* out) {
  bool have_brace = false, have_close = false;  // a '}' / a "]]" seen (later in the text)
  for (int token = prev_delimiter_token(seq.length); token >= 0; token = prev_delimiter_token(token)) {
    for (int offset = seq.token_length(token) - 1; offset >= 0; --offset) {
      int ch = seq.byte_at(token, offset);
      Cursor here{token, offset};
      if (ch == '}') {
        have_brace = true;
      } else if (ch == ']') {
        if (!have_close && next_byte(seq, here) == ']') have_close = true;
      } else if (ch == '{' && have_brace) {
        // Complete iff a '}' follows; it does (have_brace). Is it "\boxed{"?
        const char* word = "\\boxed";
        Cursor back = here;
        bool match = true;
        for (int i = 5; i >= 0 && match; --i)
          match = cursor_prev(seq, back) && seq.byte_at(back.token, back.offset) == word[i];
        if (match) {
          bool at_end = !cursor_next(seq, here);
          return parse_content(seq, here, at_end, true, num_responses, lo, hi, out);
        }
      } else if (ch == '[' && have_close) {
        // A "]]" starts after this byte and is not the next byte (that is '[' below).
        Cursor second = here;
        if (cursor_next(seq, second) && seq.byte_at(second.token, second.offset) == '[') {
          bool at_end = !cursor_next(seq, second);
          return parse_content(seq, second, at_end, false, num_responses, lo, hi, out);
        }
      }
    }
  }
  return kNoScores;
}

}  // namespace grm_cuda
