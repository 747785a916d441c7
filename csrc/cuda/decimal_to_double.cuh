// Decimal string -> correctly rounded double, for one thread (host or device): what Python's
// float() (and strtod) returns, which grm_engine/parsing.py stores as float32.
// Fast path: <= 19 significant digits that fit 2^53 with |exp10| <= 22 (exact IEEE ops, Clinger).
// Slow path: Go strconv's decimal algorithm (800-digit buffer, binary shifts, round half to even).
#pragma once

#include <stdint.h>

#ifdef __CUDACC__
#define GRM_HD __host__ __device__ __forceinline__
#else
#define GRM_HD inline
#endif

namespace grm_cuda {

// The digits of one number as the parser saw them; the slow path re-reads the text.
struct DecimalSummary {
  uint64_t mantissa = 0;  // first <= 19 significant digits
  int kept = 0;           // digits in mantissa
  bool truncated = false; // nonzero digits dropped after the 19th
  long exp10 = 0;         // value = mantissa * 10^exp10 (plus the dropped digits)
  bool negative = false;
};

GRM_HD void summary_add_digit(DecimalSummary& s, int digit, bool fraction) {
  if (s.mantissa == 0 && digit == 0) {  // a leading zero only moves the point
    if (fraction) s.exp10 -= 1;
    return;
  }
  if (s.kept < 19) {
    s.mantissa = s.mantissa * 10 + static_cast<uint64_t>(digit);
    s.kept += 1;
    if (fraction) s.exp10 -= 1;
  } else {
    if (!fraction) s.exp10 += 1;
    if (digit != 0) s.truncated = true;
  }
}

GRM_HD double exact_power_of_ten(int e) {  // 10^e for 0 <= e <= 22, exact in double
  double p = 1.0;
  for (int i = 0; i < e; ++i) p *= 10.0;
  return p;
}

// Fast path; false when the exact-arithmetic argument does not apply.
GRM_HD bool summary_to_double_fast(const DecimalSummary& s, double* out) {
  const uint64_t two53 = 1ull << 53;
  if (s.mantissa == 0) { *out = s.negative ? -0.0 : 0.0; return true; }
  if (s.truncated || s.mantissa > two53) return false;
  double m = static_cast<double>(s.mantissa);
  double value;
  if (s.exp10 >= 0 && s.exp10 <= 22) {
    value = m * exact_power_of_ten(static_cast<int>(s.exp10));
  } else if (s.exp10 < 0 && s.exp10 >= -22) {
    value = m / exact_power_of_ten(static_cast<int>(-s.exp10));
  } else if (s.exp10 > 22 && s.exp10 <= 22 + 15) {
    uint64_t scaled = s.mantissa;
    for (long i = 22; i < s.exp10; ++i) {
      if (scaled > two53 / 10) return false;
      scaled *= 10;
    }
    value = static_cast<double>(scaled) * exact_power_of_ten(22);
  } else {
    return false;
  }
  *out = s.negative ? -value : value;
  return true;
}

// Go's strconv.decimal: value = 0.d[0]d[1]...d[nd-1] * 10^dp, digits stored as 0..9.
struct SlowDecimal {
  static const int kMaxDigits = 800;
  uint8_t d[kMaxDigits];
  int nd = 0;
  int dp = 0;
  bool negative = false;
  bool trunc = false;  // nonzero digits dropped beyond d[:nd]
};

GRM_HD void decimal_trim(SlowDecimal& a) {
  while (a.nd > 0 && a.d[a.nd - 1] == 0) a.nd--;
  if (a.nd == 0) a.dp = 0;
}

GRM_HD void decimal_right_shift(SlowDecimal& a, unsigned k) {  // divide by 2^k, k <= 60
  int r = 0, w = 0;
  uint64_t n = 0;
  for (; (n >> k) == 0; r++) {
    if (r >= a.nd) {
      if (n == 0) { a.nd = 0; return; }
      while ((n >> k) == 0) { n = n * 10; r++; }
      break;
    }
    n = n * 10 + a.d[r];
  }
  a.dp -= r - 1;
  const uint64_t mask = (uint64_t(1) << k) - 1;
  for (; r < a.nd; r++) {
    uint64_t digit = n >> k;
    n &= mask;
    a.d[w++] = static_cast<uint8_t>(digit);
    n = n * 10 + a.d[r];
  }
  while (n > 0) {
    uint64_t digit = n >> k;
    n &= mask;
    if (w < SlowDecimal::kMaxDigits) a.d[w++] = static_cast<uint8_t>(digit);
    else if (digit > 0) a.trunc = true;
    n = n * 10;
  }
  a.nd = w;
  decimal_trim(a);
}

GRM_HD void decimal_left_shift(SlowDecimal& a, unsigned k) {  // multiply by 2^k, k <= 60
  uint64_t carry = 0;
  for (int i = a.nd - 1; i >= 0; --i) {
    uint64_t n = (static_cast<uint64_t>(a.d[i]) << k) + carry;
    a.d[i] = static_cast<uint8_t>(n % 10);
    carry = n / 10;
  }
  int extra = 0;
  for (uint64_t c = carry; c > 0; c /= 10) extra++;
  if (extra > 0) {
    // Make room at the front; digits pushed past the buffer are dropped (sticky in trunc).
    int new_nd = a.nd + extra;
    if (new_nd > SlowDecimal::kMaxDigits) {
      for (int i = SlowDecimal::kMaxDigits - extra; i < a.nd; ++i)
        if (a.d[i] != 0) a.trunc = true;
      new_nd = SlowDecimal::kMaxDigits;
    }
    for (int i = new_nd - 1; i >= extra; --i) a.d[i] = a.d[i - extra];
    for (int i = extra - 1; i >= 0; --i) { a.d[i] = static_cast<uint8_t>(carry % 10); carry /= 10; }
    a.nd = new_nd;
    a.dp += extra;
  }
  decimal_trim(a);
}

GRM_HD void decimal_shift(SlowDecimal& a, int k) {
  const int max_shift = 60;
  if (a.nd == 0) return;
  if (k > 0) {
    while (k > max_shift) { decimal_left_shift(a, max_shift); k -= max_shift; }
    decimal_left_shift(a, static_cast<unsigned>(k));
  } else if (k < 0) {
    while (k < -max_shift) { decimal_right_shift(a, max_shift); k += max_shift; }
    decimal_right_shift(a, static_cast<unsigned>(-k));
  }
}

GRM_HD bool decimal_should_round_up(const SlowDecimal& a, int nd) {
  if (nd < 0 || nd >= a.nd) return false;
  if (a.d[nd] == 5 && nd + 1 == a.nd) {  // exactly halfway: to even, unless digits were dropped
    if (a.trunc) return true;
    return nd > 0 && (a.d[nd - 1] % 2) == 1;
  }
  return a.d[nd] >= 5;
}

GRM_HD uint64_t decimal_rounded_integer(const SlowDecimal& a) {
  if (a.dp > 20) return ~uint64_t(0);
  int i = 0;
  uint64_t n = 0;
  for (; i < a.dp && i < a.nd; i++) n = n * 10 + a.d[i];
  for (; i < a.dp; i++) n *= 10;
  if (decimal_should_round_up(a, a.dp)) n++;
  return n;
}

// Go's decimal.floatBits for float64 (mantissa 52 bits, exponent 11 bits, bias -1023).
GRM_HD double decimal_to_double(SlowDecimal& a) {
  const int mant_bits = 52, exp_bits = 11, bias = -1023;
  const int powtab[9] = {1, 3, 6, 9, 13, 16, 19, 23, 26};
  uint64_t mant = 0;
  int exp = 0;
  bool overflow = false;
  if (a.nd == 0 || a.dp < -330) {
    mant = 0;
    exp = bias;
  } else if (a.dp > 310) {
    overflow = true;
  } else {
    while (a.dp > 0) {
      int n = a.dp >= 9 ? 27 : powtab[a.dp];
      decimal_shift(a, -n);
      exp += n;
    }
    while (a.dp < 0 || (a.dp == 0 && a.d[0] < 5)) {
      int n = -a.dp >= 9 ? 27 : powtab[-a.dp];
      decimal_shift(a, n);
      exp -= n;
    }
    exp--;  // [0.5, 1) -> [1, 2)
    if (exp < bias + 1) {
      int n = bias + 1 - exp;
      decimal_shift(a, -n);
      exp += n;
    }
    if (exp - bias >= (1 << exp_bits) - 1) {
      overflow = true;
    } else {
      decimal_shift(a, 1 + mant_bits);
      mant = decimal_rounded_integer(a);
      if (mant == (uint64_t(2) << mant_bits)) {
        mant >>= 1;
        exp++;
        if (exp - bias >= (1 << exp_bits) - 1) overflow = true;
      }
      if (!overflow && (mant & (uint64_t(1) << mant_bits)) == 0) exp = bias;  // subnormal
    }
  }
  if (overflow) {
    mant = 0;
    exp = (1 << exp_bits) - 1 + bias;
  }
  uint64_t bits = mant & ((uint64_t(1) << mant_bits) - 1);
  bits |= static_cast<uint64_t>((exp - bias) & ((1 << exp_bits) - 1)) << mant_bits;
  if (a.negative) bits |= uint64_t(1) << (mant_bits + exp_bits);
  union { uint64_t u; double f; } pun;
  pun.u = bits;
  return pun.f;
}

// Feeding the slow decimal, in text order (mirrors Go's decimal.set).
struct SlowDecimalReader {
  bool saw_dot = false;
  long exponent = 0;
};

GRM_HD void slow_add_digit(SlowDecimal& a, int digit) {
  if (digit == 0 && a.nd == 0) { a.dp--; return; }  // leading zero
  if (a.nd < SlowDecimal::kMaxDigits) a.d[a.nd++] = static_cast<uint8_t>(digit);
  else if (digit != 0) a.trunc = true;
}
GRM_HD void slow_add_dot(SlowDecimal& a, SlowDecimalReader& r) { r.saw_dot = true; a.dp = a.nd; }
GRM_HD void slow_finish(SlowDecimal& a, SlowDecimalReader& r) {
  if (!r.saw_dot) a.dp = a.nd;
  // Exponents are clamped far outside the double range; the digits cannot bring them back.
  long dp = static_cast<long>(a.dp) + r.exponent;
  a.dp = dp > 100000 ? 100000 : (dp < -100000 ? -100000 : static_cast<int>(dp));
  decimal_trim(a);
}

}  // namespace grm_cuda
