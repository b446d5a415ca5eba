// Decode-sized Linear (y = x W^T + b for a few rows of x) with AVX-512 intrinsics, for CPUs with AVX-512 F/BW/VL/DQ
// and AVX512-BF16. At decode a Linear is a matrix-vector product: every weight byte is read once per step and used
// for one multiply-add per row of x, so the only limit that matters is how fast W streams from memory. torch's GEMM
// reaches ~9 GB/s on such shapes on this project's machine; this kernel streams W 16 rows at a time.
//
//   * 16 output features at a time: 16 accumulators take x . w_n over K in 16-lane pieces (VDPBF16PS on bf16
//     pairs for bf16), then one transpose-and-add tree gives the 16 sums in one vector (as attention_vec.h does).
//   * each x row reuses the 16 weight rows from L1/L2; K tails use masked loads; N tails point the missing rows at
//     the last real one and drop their results.
//   * fp32 accumulation; bf16 outputs round to nearest even once, after the bias add (what oneDNN's bf16 GEMM does).
//
// Why a hand-written kernel here when attention on AVX-512 is attention_vec.h instantiated for VecAvx512: measured
// against linear_vec.h instantiated for VecAvx512, alternating call by call in one process (1 thread, decode shapes
// of Qwen2.5-0.5B and Llama-3-8B), the templated Linear took 1.16-1.44x this kernel's time in bf16 and 1.0-1.2x in
// fp32. Here a bf16 step is one VDPBF16PS per 32 elements, where linear_vec.h splits even and odd elements into two
// FMAs (it has no bf16 dot trait yet), and K and N tails are masked loads and stores instead of padded copies.
#include <algorithm>
#include <cstdint>
#include <cstring>

#if defined(__x86_64__)

#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma,f16c")
// GCC 12's AVX-512 intrinsics pass _mm512_undefined_ps() and the like as the unused source of their masked
// builtins, which -Wmaybe-uninitialized flags once inlined.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#define LLMKERN_VEC_AVX512
#include "kernels.h"
#include "vec.h"  // VecAvx512::hsum

namespace llmkern {
namespace cpu {
namespace avx512_linear {

namespace {

inline __m512 bf16_to_f32(__m256i h) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)); }

inline __m256i f32_to_bf16(__m512 f) {  // round to nearest even; NaN stays a quiet NaN
  const __m512i u = _mm512_castps_si512(f);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), lsb));
  const __mmask16 nan = _mm512_cmp_ps_mask(f, f, _CMP_UNORD_Q);
  r = _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(u, _mm512_set1_epi32(0x00400000)));
  return _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16));
}

// 16 dot products x . w[t] (t < 16) over K.
template <bool BF16>
inline __m512 dot16(const void* x, const void* const* w, int64_t K) {
  __m512 a[16];
#pragma GCC unroll 16
  for (int t = 0; t < 16; ++t) a[t] = _mm512_setzero_ps();
  if constexpr (BF16) {
    const uint16_t* xp = static_cast<const uint16_t*>(x);
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {
      const __m512bh xv = (__m512bh)_mm512_loadu_si512(xp + k);
#pragma GCC unroll 16
      for (int t = 0; t < 16; ++t)
        a[t] = _mm512_dpbf16_ps(a[t], xv, (__m512bh)_mm512_loadu_si512(static_cast<const uint16_t*>(w[t]) + k));
    }
    if (k < K) {
      const __mmask32 m = (__mmask32)((1ull << (K - k)) - 1);
      const __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(m, xp + k);
#pragma GCC unroll 16
      for (int t = 0; t < 16; ++t)
        a[t] = _mm512_dpbf16_ps(a[t], xv, (__m512bh)_mm512_maskz_loadu_epi16(m, static_cast<const uint16_t*>(w[t]) + k));
    }
  } else {
    const float* xp = static_cast<const float*>(x);
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {
      const __m512 xv = _mm512_loadu_ps(xp + k);
#pragma GCC unroll 16
      for (int t = 0; t < 16; ++t) a[t] = _mm512_fmadd_ps(xv, _mm512_loadu_ps(static_cast<const float*>(w[t]) + k), a[t]);
    }
    if (k < K) {
      const __mmask16 m = (__mmask16)((1u << (K - k)) - 1);
      const __m512 xv = _mm512_maskz_loadu_ps(m, xp + k);
#pragma GCC unroll 16
      for (int t = 0; t < 16; ++t)
        a[t] = _mm512_fmadd_ps(xv, _mm512_maskz_loadu_ps(m, static_cast<const float*>(w[t]) + k), a[t]);
    }
  }
  return VecAvx512::hsum(a);
}

template <bool BF16>
void linear_blocks(const LinearArgs& a, int64_t blk0, int64_t blk1) {
  constexpr int64_t ES = BF16 ? 2 : 4;
  const char* wb = static_cast<const char*>(a.w);
  for (int64_t blk = blk0; blk < blk1; ++blk) {
    const int64_t n0 = blk * 16, nn = std::min<int64_t>(16, a.N - n0);
    const __mmask16 keep = (__mmask16)((1u << nn) - 1);
    const void* rows[16];
    for (int t = 0; t < 16; ++t) rows[t] = wb + (n0 + std::min<int64_t>(t, nn - 1)) * a.swn * ES;
    __m512 bias = _mm512_setzero_ps();
    if (a.bias) {
      if constexpr (BF16)
        bias = bf16_to_f32(_mm256_maskz_loadu_epi16(keep, static_cast<const uint16_t*>(a.bias) + n0));
      else
        bias = _mm512_maskz_loadu_ps(keep, static_cast<const float*>(a.bias) + n0);
    }
    for (int64_t m = 0; m < a.M; ++m) {
      const __m512 y = _mm512_add_ps(dot16<BF16>(static_cast<const char*>(a.x) + m * a.sxm * ES, rows, a.K), bias);
      if constexpr (BF16)
        _mm256_mask_storeu_epi16(static_cast<uint16_t*>(a.y) + m * a.sym + n0, keep, f32_to_bf16(y));
      else
        _mm512_mask_storeu_ps(static_cast<float*>(a.y) + m * a.sym + n0, keep, y);
    }
  }
}

bool cpu_ok() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("fma");
}

const bool kCpuOk = cpu_ok();

}  // namespace

bool supported(DType t) { return kCpuOk && (t == kF32 || t == kBF16); }

int linear(const LinearArgs& a, int64_t blk0, int64_t blk1) {
  if (!supported(a.t)) return kNoKernel;
  if (a.t == kBF16)
    linear_blocks<true>(a, blk0, blk1);
  else
    linear_blocks<false>(a, blk0, blk1);
  return kOk;
}

}  // namespace avx512_linear
}  // namespace cpu
}  // namespace llmkern

#endif  // __x86_64__ (other architectures: dispatch.cpp's stubs)
