// Vector traits: one struct per instruction set with the same static members (W lanes of fp32, loads that widen
// bf16/fp16, stores that narrow them, FMA, horizontal reductions, 2^n for vec_exp), so that attention_vec.h and
// linear_vec.h write each algorithm once, templated on `class V`, and a translation unit per instruction set
// instantiates it (vec_avx2.cpp: VecAvx2, 8 lanes; vec_avx512.cpp: VecAvx512, 16 lanes). What differs per
// instruction set beyond the width is a trait too: the attention chunk size (chunk_tokens), how many registers the
// P @ V output row may hold (kPvRegs), and a bf16 dot-product instruction where there is one (kBf16Dot).
//
// Include after the translation unit's `#pragma GCC target(...)` and after every standard header (a template
// defined after the pragma is compiled for that target wherever it is instantiated). VecAvx512 is defined only where
// the translation unit asks for it with `#define LLMKERN_VEC_AVX512` (GCC's C++ front end does not set __AVX512F__
// under the pragma, and 512-bit types in an AVX2 unit draw ABI warnings). Everything here is in an anonymous
// namespace: the same inline function compiled for two instruction sets must never be merged by the linker, or an
// AVX-512 copy could end up serving an AVX2-only CPU.
#pragma once

#include <cstdint>
#include <cstring>

#include "kernels.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace llmkern {
namespace cpu {
namespace {

constexpr int64_t elem_size(DType t) { return dtype_bytes(t); }

// 8-bit cache codes are read in "code units": load_as<kI8> gives the integer code, load_as<kF8E4M3> the e4m3 value
// times 2^-8 (its bits moved into an fp16 and widened by F16C: exact, subnormals included, with no special cases).
// A code's value is load_as * kCodeUnit<C>; the kernels fold the unit into the per-token scales.
template <DType C>
constexpr float kCodeUnit = C == kF8E4M3 ? 256.f : 1.f;

#if defined(__x86_64__)

// AVX2 + FMA + F16C: 8 fp32 lanes in a ymm register (16 of them).
struct VecAvx2 {
  static constexpr int W = 8;
  using reg = __m256;
  // Attention: tokens per chunk, a multiple of W with the packed fp32 K and V of a chunk within 32 KiB (L1), at most
  // 64; up to 12 of the 16 registers hold the P @ V output row; no bf16 dot product (K is widened to fp32).
  static constexpr int64_t chunk_tokens(int64_t D) {
    const int64_t c = 4096 / D / W * W;
    return c < W ? W : c > 64 ? 64 : c;
  }
  static constexpr int kPvRegs = 12;
  static constexpr bool kBf16Dot = false;

  static reg zero() { return _mm256_setzero_ps(); }
  static reg set1(float f) { return _mm256_set1_ps(f); }
  static reg load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, reg v) { _mm256_storeu_ps(p, v); }
  static reg add(reg a, reg b) { return _mm256_add_ps(a, b); }
  static reg sub(reg a, reg b) { return _mm256_sub_ps(a, b); }
  static reg mul(reg a, reg b) { return _mm256_mul_ps(a, b); }
  static reg div(reg a, reg b) { return _mm256_div_ps(a, b); }
  static reg max(reg a, reg b) { return _mm256_max_ps(a, b); }
  static reg fma(reg a, reg b, reg c) { return _mm256_fmadd_ps(a, b, c); }  // a * b + c, rounded once

  // W elements of dtype T at p as fp32: bf16 by a 16-bit shift (exact), fp16 with F16C (exact); 8-bit cache codes
  // in code units (kCodeUnit above).
  template <DType T>
  static reg load_as(const void* p) {
    if constexpr (T == kF32) {
      return _mm256_loadu_ps(static_cast<const float*>(p));
    } else if constexpr (T == kI8) {
      return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(static_cast<const __m128i*>(p))));
    } else if constexpr (T == kF8E4M3) {
      return _mm256_cvtph_ps(fp8_to_half(_mm_cvtepi8_epi16(_mm_loadl_epi64(static_cast<const __m128i*>(p)))));
    } else {
      const __m128i h = _mm_loadu_si128(static_cast<const __m128i*>(p));
      if constexpr (T == kBF16) return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
      return _mm256_cvtph_ps(h);
    }
  }
  // e4m3 bytes sign-extended to 16-bit lanes -> fp16 bits of the value times 2^-8: the exponent biases differ by 8
  // (7 vs 15), so the 7 magnitude bits shifted into place (bits 7..13) are the same number scaled, subnormals
  // included; the shift also moves a copy of the sign to bit 15 (from the extension) and one to bit 14 (cleared).
  static __m128i fp8_to_half(__m128i b) {
    return _mm_and_si128(_mm_slli_epi16(b, 7), _mm_set1_epi16(static_cast<short>(0xbfff)));
  }
  // 2W bf16 at p as two fp32 vectors, the even and the odd elements: one load and two bit operations for 16
  // elements. For dot products, where only the pairing of x and w matters, not the order.
  static void load_bf16_pairs(const void* p, reg* even, reg* odd) {
    const __m256i h = _mm256_loadu_si256(static_cast<const __m256i*>(p));
    *even = _mm256_castsi256_ps(_mm256_slli_epi32(h, 16));
    *odd = _mm256_castsi256_ps(_mm256_and_si256(h, _mm256_set1_epi32(static_cast<int>(0xffff0000u))));
  }
  // fp32 to dtype T at p: bf16 rounds to nearest even (a NaN stays a quiet NaN), fp16 with F16C.
  template <DType T>
  static void store_as(void* p, reg v) {
    if constexpr (T == kF32) {
      _mm256_storeu_ps(static_cast<float*>(p), v);
    } else if constexpr (T == kF16) {
      _mm_storeu_si128(static_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
    } else {
      const __m256i u = _mm256_castps_si256(v);
      const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
      __m256i r = _mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), odd));
      const __m256i quiet = _mm256_or_si256(u, _mm256_set1_epi32(0x00400000));
      r = _mm256_blendv_epi8(r, quiet, _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
      r = _mm256_srli_epi32(r, 16);  // < 2^16: packus does not saturate
      const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08);
      _mm_storeu_si128(static_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
    }
  }

  static float reduce_add(reg v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
  }
  static float reduce_max(reg v) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
  }
  // v[0 .. W-1] -> one vector whose lane t is the sum of v[t]'s lanes (W dot products finished at once).
  static reg hsum(const reg* v) {
    reg pair[4], quad[2];
    for (int i = 0; i < 4; ++i)  // per 128-bit half: [a0+a2, b0+b2, a1+a3, b1+b3] of (a, b) = (v[2i], v[2i+1])
      pair[i] = _mm256_add_ps(_mm256_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm256_unpackhi_ps(v[2 * i], v[2 * i + 1]));
    for (int j = 0; j < 2; ++j) {  // per 128-bit half: the half-sums of v[4j .. 4j+3]
      const __m256d a = _mm256_castps_pd(pair[2 * j]), b = _mm256_castps_pd(pair[2 * j + 1]);
      quad[j] = _mm256_add_ps(_mm256_castpd_ps(_mm256_unpacklo_pd(a, b)), _mm256_castpd_ps(_mm256_unpackhi_pd(a, b)));
    }
    const reg lo_halves = _mm256_permute2f128_ps(quad[0], quad[1], 0x20);
    const reg hi_halves = _mm256_permute2f128_ps(quad[0], quad[1], 0x31);
    return _mm256_add_ps(lo_halves, hi_halves);
  }
  static reg min(reg a, reg b) { return _mm256_min_ps(a, b); }
  static reg round(reg x) { return _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  // 2^n for integer-valued n in [-126, 127], built in the exponent bits.
  static reg exp2_int(reg n) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23));
  }
  // x where lo <= base + lane < hi, `fill` elsewhere.
  static reg keep_range(reg x, int32_t base, int32_t lo, int32_t hi, float fill) {
    const __m256i idx = _mm256_add_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(base));
    const __m256i in = _mm256_andnot_si256(_mm256_cmpgt_epi32(_mm256_set1_epi32(lo), idx),
                                           _mm256_cmpgt_epi32(_mm256_set1_epi32(hi), idx));
    return _mm256_blendv_ps(_mm256_set1_ps(fill), x, _mm256_castsi256_ps(in));
  }
  // y where x is not -inf, 0 where it is.
  static reg zero_where_neg_inf(reg x, reg y) {
    return _mm256_and_ps(_mm256_cmp_ps(x, _mm256_set1_ps(-__builtin_inff()), _CMP_NEQ_UQ), y);
  }
  static void prefetch_l2(const void* p) { _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T1); }
};

#if defined(LLMKERN_VEC_AVX512)
// AVX-512 F/BW/VL/DQ + AVX512-BF16 + FMA + F16C: 16 fp32 lanes in a zmm register (32 of them).
struct VecAvx512 {
  static constexpr int W = 16;
  using reg = __m512;
  // Attention: 64 tokens per chunk (four score vectors), 32 from head_dim 128 on, so that the packed K (bf16 as
  // stored) and V (fp32) of a chunk stay near L1; the whole output row (up to 16 registers of 32) stays in registers
  // over P @ V; bf16 scores by VDPBF16PS on K as stored (products exact in fp32, fp32 accumulation).
  static constexpr int64_t chunk_tokens(int64_t D) { return D >= 128 ? 32 : 64; }
  static constexpr int kPvRegs = 16;
  static constexpr bool kBf16Dot = true;
  using bf16x2 = __m512bh;  // 2W bf16: W pairs

  static reg zero() { return _mm512_setzero_ps(); }
  static reg set1(float f) { return _mm512_set1_ps(f); }
  static reg load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, reg v) { _mm512_storeu_ps(p, v); }
  static reg add(reg a, reg b) { return _mm512_add_ps(a, b); }
  static reg sub(reg a, reg b) { return _mm512_sub_ps(a, b); }
  static reg mul(reg a, reg b) { return _mm512_mul_ps(a, b); }
  static reg div(reg a, reg b) { return _mm512_div_ps(a, b); }
  static reg max(reg a, reg b) { return _mm512_max_ps(a, b); }
  static reg min(reg a, reg b) { return _mm512_min_ps(a, b); }
  static reg fma(reg a, reg b, reg c) { return _mm512_fmadd_ps(a, b, c); }

  // As VecAvx2::load_as: 8-bit cache codes in code units.
  template <DType T>
  static reg load_as(const void* p) {
    if constexpr (T == kF32) {
      return _mm512_loadu_ps(static_cast<const float*>(p));
    } else if constexpr (T == kI8) {
      return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(static_cast<const __m128i*>(p))));
    } else if constexpr (T == kF8E4M3) {  // as VecAvx2::fp8_to_half
      const __m256i b = _mm256_cvtepi8_epi16(_mm_loadu_si128(static_cast<const __m128i*>(p)));
      return _mm512_cvtph_ps(_mm256_and_si256(_mm256_slli_epi16(b, 7), _mm256_set1_epi16(static_cast<short>(0xbfff))));
    } else {
      const __m256i h = _mm256_loadu_si256(static_cast<const __m256i*>(p));
      if constexpr (T == kBF16) return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
      return _mm512_cvtph_ps(h);
    }
  }
  static void load_bf16_pairs(const void* p, reg* even, reg* odd) {
    const __m512i h = _mm512_loadu_si512(p);
    *even = _mm512_castsi512_ps(_mm512_slli_epi32(h, 16));
    *odd = _mm512_castsi512_ps(_mm512_and_si512(h, _mm512_set1_epi32(static_cast<int>(0xffff0000u))));
  }
  // bf16 by integer rounding, not VCVTNEPS2BF16: that one flushes denormal inputs to zero.
  template <DType T>
  static void store_as(void* p, reg v) {
    if constexpr (T == kF32) {
      _mm512_storeu_ps(static_cast<float*>(p), v);
    } else if constexpr (T == kF16) {
      _mm256_storeu_si256(static_cast<__m256i*>(p), _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
    } else {
      const __m512i u = _mm512_castps_si512(v);
      __m512i r = bf16_rne(u);
      const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
      r = _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(u, _mm512_set1_epi32(0x00400000)));
      _mm256_storeu_si256(static_cast<__m256i*>(p), _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16)));
    }
  }
  // a . b pairwise into acc: acc[i] + a[2i] b[2i] + a[2i+1] b[2i+1] (VDPBF16PS).
  static bf16x2 load_bf16x2(const void* p) { return (bf16x2)_mm512_loadu_si512(p); }
  // 2W 8-bit codes at src -> 2W bf16 at dst, in code units: exact (an int8 code or an e4m3 value times 2^-8 has at
  // most 8 significant bits, all normal in fp32), so the bf16 dot product takes 8-bit K as it takes bf16 K.
  template <DType C>
  static void codes_to_bf16(const void* src, void* dst) {
    const reg lo = load_as<C>(src), hi = load_as<C>(static_cast<const char*>(src) + W);
    _mm512_storeu_si512(dst, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
  }
  static reg dot_bf16(reg acc, bf16x2 a, bf16x2 b) { return _mm512_dpbf16_ps(acc, a, b); }
  // P @ V by the dot product: W elements of two bf16 rows a and b as W pairs (a[d] low, b[d] high), and one pair of
  // weights (bits: the low bf16 for a's token, the high for b's) broadcast to every lane.
  static void pair_bf16(const void* a, const void* b, float* dst) {
    const __m512i lo = _mm512_cvtepu16_epi32(_mm256_loadu_si256(static_cast<const __m256i*>(a)));
    const __m512i hi = _mm512_cvtepu16_epi32(_mm256_loadu_si256(static_cast<const __m256i*>(b)));
    _mm512_storeu_si512(dst, _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
  }
  static bf16x2 bcast_bf16x2(uint32_t bits) { return (bf16x2)_mm512_set1_epi32(static_cast<int>(bits)); }
  // fp32 bits u plus the rounding increment to bf16, nearest even: the bf16 is the top 16 bits (finite u).
  static __m512i bf16_rne(__m512i u) {
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    return _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), odd));
  }
  // x rounded to bf16's precision (nearest even), as fp32: finite x.
  static reg round_bf16(reg x) {
    return _mm512_castsi512_ps(
        _mm512_and_si512(bf16_rne(_mm512_castps_si512(x)), _mm512_set1_epi32(static_cast<int>(0xffff0000u))));
  }

  static float reduce_add(reg v) { return _mm512_reduce_add_ps(v); }
  static float reduce_max(reg v) { return _mm512_reduce_max_ps(v); }
  // v[0 .. 15] -> one vector whose lane t is the sum of v[t]'s lanes (45 shuffles/adds for 16 dot products).
  static reg hsum(const reg* v) {
    reg w[8], x[4];
    for (int i = 0; i < 8; ++i)  // 128-bit lane L: [a(0+2), b(0+2), a(1+3), b(1+3)] of (a, b) = (v[2i], v[2i+1])
      w[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
    for (int j = 0; j < 4; ++j) {  // 128-bit lane L of x[j]: lane-L sums of v[4j .. 4j+3]
      const __m512d a = _mm512_castps_pd(w[2 * j]), b = _mm512_castps_pd(w[2 * j + 1]);
      x[j] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
    }
    // Sum the four 128-bit lanes; 128-bit lane j of the result holds v[4j .. 4j+3].
    const reg z0 = _mm512_add_ps(_mm512_shuffle_f32x4(x[0], x[1], 0x88), _mm512_shuffle_f32x4(x[0], x[1], 0xDD));
    const reg z1 = _mm512_add_ps(_mm512_shuffle_f32x4(x[2], x[3], 0x88), _mm512_shuffle_f32x4(x[2], x[3], 0xDD));
    return _mm512_add_ps(_mm512_shuffle_f32x4(z0, z1, 0x88), _mm512_shuffle_f32x4(z0, z1, 0xDD));
  }
  static reg round(reg x) { return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static reg exp2_int(reg n) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23));
  }
  static reg keep_range(reg x, int32_t base, int32_t lo, int32_t hi, float fill) {
    const __m512i idx = _mm512_add_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                         _mm512_set1_epi32(base));
    const __mmask16 in = _mm512_cmp_epi32_mask(idx, _mm512_set1_epi32(lo), _MM_CMPINT_NLT) &
                         _mm512_cmp_epi32_mask(idx, _mm512_set1_epi32(hi), _MM_CMPINT_LT);
    return _mm512_mask_blend_ps(in, _mm512_set1_ps(fill), x);
  }
  static reg zero_where_neg_inf(reg x, reg y) {
    return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, _mm512_set1_ps(-__builtin_inff()), _CMP_NEQ_UQ), y);
  }
  static void prefetch_l2(const void* p) { _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T1); }
};
#endif  // LLMKERN_VEC_AVX512

#endif  // __x86_64__

// e^x for any traits V, the polynomial of kernels_impl.h's vexp: x = n ln2 + r with ln2 split in two (Cody-Waite),
// e^r by a degree-6 Horner polynomial in FMAs, times 2^n. x is clamped to [-87.3, 88.7] so 2^n stays normal:
// e^-inf comes out ~1e-38, and callers zero the lanes that were -inf.
template <class V>
inline typename V::reg vec_exp(typename V::reg x) {
  using reg = typename V::reg;
  static constexpr float kHorner[6] = {1.9875691500E-4f, 1.3981999507E-3f, 8.3334519073E-3f,
                                       4.1665795894E-2f, 1.6666665459E-1f, 5.0000001201E-1f};
  x = V::min(V::max(x, V::set1(-87.3f)), V::set1(88.7f));
  const reg n = V::round(V::mul(x, V::set1(1.44269504088896341f)));
  const reg r = V::fma(n, V::set1(2.12194440e-4f), V::fma(n, V::set1(-0.693359375f), x));
  reg poly = V::set1(kHorner[0]);
  for (int i = 1; i < 6; ++i) poly = V::fma(poly, r, V::set1(kHorner[i]));
  const reg e_r = V::add(V::fma(poly, V::mul(r, r), r), V::set1(1.f));
  return V::mul(e_r, V::exp2_int(n));
}

// n < V::W elements of dtype T at p, the rest of the lanes zero (loop tails).
template <class V, DType T>
inline typename V::reg load_as_n(const void* p, int64_t n) {
  alignas(64) unsigned char buf[4 * V::W] = {};
  std::memcpy(buf, p, n * elem_size(T));
  return V::template load_as<T>(buf);
}

// The first n < V::W lanes of v to dtype T at p.
template <class V, DType T>
inline void store_as_n(void* p, typename V::reg v, int64_t n) {
  alignas(64) unsigned char buf[4 * V::W];
  V::template store_as<T>(buf, v);
  std::memcpy(p, buf, n * elem_size(T));
}

}  // namespace
}  // namespace cpu
}  // namespace llmkern
