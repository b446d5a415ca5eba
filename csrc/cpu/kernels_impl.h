// Templated bodies of the CPU kernels declared in kernels.h. Included once per instruction set by
// kernels_{avx512,avx2,generic}.cpp, each compiled with its own `#pragma GCC target`, inside namespace
// llmkern::cpu::LLMKERN_ISA. Inner loops are written so GCC vectorises them (`#pragma omp simd`, no calls, no
// branches); -ffp-contract=off keeps a*b + c*d as two fp32 roundings, as eager torch computes it in fp32.
//
// Rounding to fp16/bf16 (README.md, "Where fp16/bf16 results are rounded"): RMSNorm rounds the normalised row to the
// input dtype before the weight multiply and SwiGLU rounds silu's result before the multiply, as eager does; RoPE
// rounds once from fp32 where eager rounds each product; attention rounds only its output. fp32 accumulation.

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "kernels.h"

namespace llmkern {
namespace cpu {
namespace LLMKERN_ISA {

struct bf16 {
  uint16_t v;
};
using f16 = _Float16;

static inline float ld(const float* p) { return *p; }
static inline float ld(const f16* p) { return static_cast<float>(*p); }
static inline float ld(const bf16* p) {
  uint32_t u = static_cast<uint32_t>(p->v) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
static inline void st(float* p, float f) { *p = f; }
static inline void st(f16* p, float f) { *p = static_cast<f16>(f); }
static inline void st(bf16* p, float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  // Round to nearest even; NaNs keep a quiet-NaN payload.
  uint32_t r = ((u & 0x7fffffffu) > 0x7f800000u) ? (u | 0x00400000u) : (u + 0x7fffu + ((u >> 16) & 1u));
  p->v = static_cast<uint16_t>(r >> 16);
}
// 8-bit cache codes (llmkern/reference.py's quantize_kv): int8, and float8_e4m3fn (bias 7, 3 mantissa bits, no
// infinities; the quantizer never writes the NaN codes 0x7f / 0xff). ld gives the code's value (exact in fp32); the
// row's scale multiplies it.
struct fp8e4m3 {
  uint8_t v;
};
static inline float ld(const int8_t* p) { return static_cast<float>(*p); }
static inline float ld(const fp8e4m3* p) {
  // Normal codes: the exponent rebiased from 7 to 127 in the bits. Subnormal ones (exponent field 0): m * 2^-9,
  // computed from the integer m, so no fp32 denormal is involved (torch.set_flush_denormal(True) sets DAZ).
  const uint32_t b = p->v, sign = (b & 0x80u) << 24;
  uint32_t u = ((b & 0x7fu) << 20) + ((127u - 7u) << 23);
  float f;
  std::memcpy(&f, &u, 4);
  if ((b & 0x78u) == 0) f = static_cast<float>(b & 7u) * 0x1p-9f;
  std::memcpy(&u, &f, 4);
  u |= sign;
  std::memcpy(&f, &u, 4);
  return f;
}

// Round a float to T's precision and back (eager's `.to(dtype)` between two ops).
template <typename T>
static inline float rnd(float f) {
  T t;
  st(&t, f);
  return ld(&t);
}

// exp(x) for float, vectorisable: x = n ln2 + r, |r| <= ln2/2, degree-6 polynomial for e^r, 2^n from the exponent
// bits. Max error ~2 ulp over the normal range; exp(-inf) = 0, large x saturates to +inf.
static inline float vexp(float x) {
  x = x < -87.3f ? -87.3f : x;
  x = x > 88.7f ? 88.7f : x;
  // Round to nearest with the 1.5 * 2^23 trick (|x * log2 e| < 2^22 here): std::nearbyint is a libm call that
  // would stop the loop around it from vectorising.
  float n = (x * 1.44269504088896341f + 12582912.f) - 12582912.f;
  float r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  // Horner steps as fused multiply-adds where the ISA has them (-ffp-contract=off would otherwise split them):
  // exp is not an eager-rounding-order match anyway, and one rounding per step is both faster and more accurate.
#if LLMKERN_HAS_FMA  // set by the AVX2 and AVX-512 translation units
#define LLMKERN_MADD(a, b, c) __builtin_fmaf(a, b, c)
#else
#define LLMKERN_MADD(a, b, c) ((a) * (b) + (c))
#endif
  float p = 1.9875691500E-4f;
  p = LLMKERN_MADD(p, r, 1.3981999507E-3f);
  p = LLMKERN_MADD(p, r, 8.3334519073E-3f);
  p = LLMKERN_MADD(p, r, 4.1665795894E-2f);
  p = LLMKERN_MADD(p, r, 1.6666665459E-1f);
  p = LLMKERN_MADD(p, r, 5.0000001201E-1f);
  p = LLMKERN_MADD(p * r, r, r) + 1.0f;
#undef LLMKERN_MADD
  int32_t e = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &e, 4);
  return p * scale;
}

// ---------------------------------------------------------------------------------------------------------------
// RMSNorm
//
// The sum of squares runs in kSumBlock-element blocks, each block's vectorised sum started from zero and added once:
// an element passes through about kSumBlock / lanes + N / kSumBlock additions instead of N / lanes. Unblocked, the
// baseline ISA (4 lanes, no FMA) was further from fp64 than eager's own fp32 at N = 5125 (tests/test_cpu_isa.py).

constexpr int64_t kSumBlock = 256;

template <typename X, typename W, typename Y>
static void rms_norm_rows(const X* x, int64_t sxm, int64_t sxn, const W* w, int64_t sw, Y* y, int64_t sym,
                          int64_t syn, int64_t m0, int64_t m1, int64_t N, float eps, float offset) {
  for (int64_t m = m0; m < m1; ++m) {
    const X* xr = x + m * sxm;
    Y* yr = y + m * sym;
    float ss = 0.f;
    for (int64_t i0 = 0; i0 < N; i0 += kSumBlock) {
      const int64_t i1 = i0 + kSumBlock < N ? i0 + kSumBlock : N;
      float part = 0.f;
      if (sxn == 1) {
#pragma omp simd reduction(+ : part)
        for (int64_t i = i0; i < i1; ++i) {
          float v = ld(xr + i);
          part += v * v;
        }
      } else {
#pragma omp simd reduction(+ : part)
        for (int64_t i = i0; i < i1; ++i) {
          float v = ld(xr + i * sxn);
          part += v * v;
        }
      }
      ss += part;
    }
    const float rstd = 1.f / std::sqrt(ss / static_cast<float>(N) + eps);
    if (offset == 0.f) {
      if (sxn == 1 && sw == 1 && syn == 1) {
#pragma omp simd
        for (int64_t i = 0; i < N; ++i) st(yr + i, rnd<X>(ld(xr + i) * rstd) * ld(w + i));
      } else {
        for (int64_t i = 0; i < N; ++i) st(yr + i * syn, rnd<X>(ld(xr + i * sxn) * rstd) * ld(w + i * sw));
      }
    } else {
      for (int64_t i = 0; i < N; ++i) st(yr + i * syn, (ld(xr + i * sxn) * rstd) * (offset + ld(w + i * sw)));
    }
  }
}

template <typename X, typename W, typename Y>
static void fused_add_rms_norm_rows(const X* x, int64_t sxm, int64_t sxn, const X* r, int64_t srm, int64_t srn,
                                    const W* w, int64_t sw, Y* y, int64_t sym, int64_t syn, X* ro, int64_t srom,
                                    int64_t sron, int64_t m0, int64_t m1, int64_t N, float eps) {
  for (int64_t m = m0; m < m1; ++m) {
    const X* xr = x + m * sxm;
    const X* rr = r + m * srm;
    X* ror = ro + m * srom;
    Y* yr = y + m * sym;
    float ss = 0.f;
    const bool dense = sxn == 1 && srn == 1 && sron == 1 && sw == 1 && syn == 1;
    for (int64_t i0 = 0; i0 < N; i0 += kSumBlock) {  // blocked as in rms_norm_rows
      const int64_t i1 = i0 + kSumBlock < N ? i0 + kSumBlock : N;
      float part = 0.f;
      if (dense) {
#pragma omp simd reduction(+ : part)
        for (int64_t i = i0; i < i1; ++i) {
          float s = rnd<X>(ld(xr + i) + ld(rr + i));
          st(ror + i, s);
          part += s * s;
        }
      } else {
#pragma omp simd reduction(+ : part)
        for (int64_t i = i0; i < i1; ++i) {
          float s = rnd<X>(ld(xr + i * sxn) + ld(rr + i * srn));
          st(ror + i * sron, s);
          part += s * s;
        }
      }
      ss += part;
    }
    const float rstd = 1.f / std::sqrt(ss / static_cast<float>(N) + eps);
    if (dense) {
#pragma omp simd
      for (int64_t i = 0; i < N; ++i) st(yr + i, rnd<X>(ld(ror + i) * rstd) * ld(w + i));
    } else {
      for (int64_t i = 0; i < N; ++i) st(yr + i * syn, rnd<X>(ld(ror + i * sron) * rstd) * ld(w + i * sw));
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// RoPE

template <typename X, typename C>
static void rope_tokens(const RopeArgs& a, const C* cos, int64_t scb, int64_t scs, int64_t scd, const C* sin,
                        int64_t ssb, int64_t sss, int64_t ssd, int64_t S, int64_t D, int64_t RD, int64_t t0,
                        int64_t t1) {
  const X* x = static_cast<const X*>(a.x);
  X* o = static_cast<X*>(a.o);
  const int64_t half = RD / 2;
  float c[512], s[512];  // RD <= 512, checked by the caller
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t b = t / S, p = t % S;
    const C* cr = cos + b * scb + p * scs;
    const C* sr = sin + b * ssb + p * sss;
    for (int64_t i = 0; i < RD; ++i) {
      c[i] = ld(cr + i * scd);
      s[i] = ld(sr + i * ssd);
    }
    for (int64_t h = 0; h < a.H; ++h) {
      const X* xr = x + b * a.sxb + h * a.sxh + p * a.sxs;
      X* orow = o + b * a.sob + h * a.soh + p * a.sos;
      if (a.sxd == 1 && a.sod == 1) {
#pragma omp simd
        for (int64_t i = 0; i < half; ++i) {
          float x1 = ld(xr + i), x2 = ld(xr + half + i);
          st(orow + i, x1 * c[i] - x2 * s[i]);
          st(orow + half + i, x2 * c[half + i] + x1 * s[half + i]);
        }
        for (int64_t i = RD; i < D; ++i) orow[i] = xr[i];
      } else {
        for (int64_t i = 0; i < half; ++i) {
          float x1 = ld(xr + i * a.sxd), x2 = ld(xr + (half + i) * a.sxd);
          st(orow + i * a.sod, x1 * c[i] - x2 * s[i]);
          st(orow + (half + i) * a.sod, x2 * c[half + i] + x1 * s[half + i]);
        }
        for (int64_t i = RD; i < D; ++i) orow[i * a.sod] = xr[i * a.sxd];
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// SwiGLU

template <typename T>
static void silu_and_mul_rows(const T* g, int64_t sgm, int64_t sgi, const T* u, int64_t sum_, int64_t sui, T* o,
                              int64_t som, int64_t soi, int64_t m0, int64_t m1, int64_t I) {
  for (int64_t m = m0; m < m1; ++m) {
    const T* gr = g + m * sgm;
    const T* ur = u + m * sum_;
    T* orow = o + m * som;
    if (sgi == 1 && sui == 1 && soi == 1) {
#pragma omp simd
      for (int64_t i = 0; i < I; ++i) {
        float gv = ld(gr + i);
        st(orow + i, rnd<T>(gv / (1.f + vexp(-gv))) * ld(ur + i));
      }
    } else {
      for (int64_t i = 0; i < I; ++i) {
        float gv = ld(gr + i * sgi);
        st(orow + i * soi, rnd<T>(gv / (1.f + vexp(-gv))) * ld(ur + i * sui));
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// KV cache write

// One row x[0 .. D) (element stride sd) as 8-bit codes into dst and its fp16 scale into *scale, exactly as
// llmkern/reference.py's quantize_kv in fp32: s = fp16(clamp(amax / QMAX, 2^-14, 65504)) rounded to nearest even,
// y = clamp(x / float(s), -QMAX, QMAX), codes round(y) (int8, half to even) or e4m3(y) (round to nearest even).
template <typename T, typename C>
static void quantize_row(const T* x, int64_t sd, int64_t D, C* dst, f16* scale, float* tmp) {
  constexpr bool i8 = std::is_same_v<C, int8_t>;
  constexpr float qmax = i8 ? 127.f : 448.f;
  float amax = 0.f;
  for (int64_t d = 0; d < D; ++d) {
    tmp[d] = ld(x + d * sd);
    const float a = std::fabs(tmp[d]);
    amax = a > amax || a != a ? a : amax;  // a NaN propagates, as torch's amax does
  }
  float s = amax / qmax;
  s = s < 0x1p-14f ? 0x1p-14f : s;
  s = s > 65504.f ? 65504.f : s;
  const f16 sh = static_cast<f16>(s);  // round to nearest even
  *scale = sh;
  const float sf = static_cast<float>(sh);
#pragma omp simd
  for (int64_t d = 0; d < D; ++d) {
    float y = tmp[d] / sf;
    y = y < -qmax ? -qmax : y;
    y = y > qmax ? qmax : y;
    if constexpr (i8) {
      // Round half to even with the 1.5 * 2^23 trick (|y| <= 127; std::nearbyint is a libm call).
      dst[d] = static_cast<int8_t>((y + 12582912.f) - 12582912.f);
    } else {
      uint32_t u;
      std::memcpy(&u, &y, 4);
      const uint32_t sign = (u >> 24) & 0x80u, mag = u & 0x7fffffffu;
      float a;
      std::memcpy(&a, &mag, 4);
      // Below 2^-6 (subnormal codes m * 2^-9): m = round(a * 2^9), which reaches 8 = the first normal's code. Else
      // the mantissa rounded from 23 bits to 3 (nearest even; a carry moves into the exponent), the exponent
      // rebiased from 127 to 7.
      const uint32_t sub = static_cast<uint32_t>((a * 512.f + 12582912.f) - 12582912.f);
      const uint32_t nrm = ((mag + 0x7ffffu + ((mag >> 20) & 1u)) >> 20) - ((127u - 7u) << 3);
      dst[d].v = static_cast<uint8_t>((a < 0x1p-6f ? sub : nrm) | sign);
    }
  }
}

// Float caches (C == T) take the rows as they are; 8-bit ones (C int8_t / fp8e4m3) quantize them, scales to kss /
// vss.
template <typename T, typename C>
static int reshape_and_cache_rows(const T* key, int64_t skt, int64_t skh, int64_t skd, const T* value, int64_t svt,
                                  int64_t svh, int64_t svd, C* kc, const CacheStrides& kcs, C* vc,
                                  const CacheStrides& vcs, const int64_t* slots, int64_t t0, int64_t t1, int64_t Hkv,
                                  int64_t D, int64_t NB, int64_t BS, const KvScales& kss, const KvScales& vss) {
  constexpr bool quantized = !std::is_same_v<T, C>;
  std::vector<float> tmp(quantized ? D : 0);
  int status = kOk;
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t slot = slots[t];
    if (slot < 0) continue;
    if (slot >= NB * BS) {
      status = kBadSlot;
      continue;
    }
    const int64_t blk = slot / BS, off = slot % BS;
    C* kd = kc + blk * kcs.sb + off * kcs.ss;  // int64 offsets: a pool may pass 2^31 elements
    C* vd = vc + blk * vcs.sb + off * vcs.ss;
    for (int64_t h = 0; h < Hkv; ++h) {
      const T* kr = key + t * skt + h * skh;
      const T* vr = value + t * svt + h * svh;
      if constexpr (quantized) {
        quantize_row(kr, skd, D, kd + h * kcs.sh, static_cast<f16*>(kss.p) + blk * kss.sb + off * kss.ss + h * kss.sh,
                     tmp.data());
        quantize_row(vr, svd, D, vd + h * vcs.sh, static_cast<f16*>(vss.p) + blk * vss.sb + off * vss.ss + h * vss.sh,
                     tmp.data());
      } else {
        for (int64_t d = 0; d < D; ++d) {
          kd[h * kcs.sh + d] = kr[d * skd];
          vd[h * vcs.sh + d] = vr[d * svd];
        }
      }
    }
  }
  return status;
}

// ---------------------------------------------------------------------------------------------------------------
// Paged decode attention (flash-decoding on CPU)

// C: the cache's element type, T (float pages) or int8_t / fp8e4m3 (8-bit pages): each code is multiplied by its
// row's scale as it is read (exact in fp32: an 8-bit code times an fp16 scale has at most 19 significant bits), so
// this kernel computes on the dequantized pages.
template <typename T, typename C>
static void decode_stage1(const DecodeArgs& a, int64_t i0, int64_t i1) {
  // Scores for a chunk of CH tokens land in sc[g][j]. Group sizes up to GP = 16 (every supported model): each K
  // element is broadcast and multiplied into a 16-wide vector of the transposed, pre-scaled queries qT[d][0:16],
  // TB = 8 tokens at a time (eight independent accumulators, no transpose of K, no horizontal sums). Larger groups:
  // the chunk's K is transposed to fp32 kt[D][CH] and each query row is dotted against it, vectorised over tokens.
  // Each K and V row is read (and converted) once, whatever the group size.
  constexpr int64_t CH = 128, GP = 16, TB = 8, DB = 16;
  const int64_t G = a.Hq / a.Hkv, D = a.D;
  const bool small_group = G <= GP;
  constexpr bool q8 = !std::is_same_v<T, C>;
  const T* q = static_cast<const T*>(a.q);
  const C* kc = static_cast<const C*>(a.k_cache);
  const C* vc = static_cast<const C*>(a.v_cache);
  const f16* ksp = static_cast<const f16*>(a.kss.p);
  const f16* vsp = static_cast<const f16*>(a.vss.p);
  std::vector<float> qf(G * D), acc(G * D), cacc(G * D), sc(G * CH), mx(G), den(G), alpha(G), vf(D);
  std::vector<float> kt(small_group ? 0 : D * CH), qT(small_group ? D * GP : 0);
  const C* krows[CH];
  const C* vrows[CH];
  float kscale[CH], vscale[CH];  // 8-bit pages: the chunk's scales (1 for float pages)
  const float neg_inf = -std::numeric_limits<float>::infinity();
  for (int64_t item = i0; item < i1; ++item) {
    const DecodeItem it = decode_item(a, item);
    const int64_t b = it.b, h = it.h, t0 = it.t0, t1 = it.t1;
    float* pout = it.pout;
    float* plse = it.plse;
    if (t0 >= t1) {
      for (int64_t g = 0; g < G; ++g) {
        plse[g * a.num_splits] = neg_inf;
        for (int64_t d = 0; d < D; ++d) pout[g * a.num_splits * D + d] = 0.f;
      }
      continue;
    }
    for (int64_t g = 0; g < G; ++g) {
      const T* qr = q + b * a.sqb + (h * G + g) * a.sqh;
      for (int64_t d = 0; d < D; ++d) qf[g * D + d] = ld(qr + d * a.sqd) * a.scale;
      mx[g] = neg_inf;
      den[g] = 0.f;
    }
    if (small_group) {
      std::fill(qT.begin(), qT.end(), 0.f);
      for (int64_t g = 0; g < G; ++g)
        for (int64_t d = 0; d < D; ++d) qT[d * GP + g] = qf[g * D + d];
    }
    std::fill(acc.begin(), acc.end(), 0.f);
    const int32_t* table = a.block_tables + b * a.sbt;
    for (int64_t c0 = t0; c0 < t1; c0 += CH) {
      const int64_t n = (t1 - c0) < CH ? (t1 - c0) : CH;
      // Walk the pages incrementally: a 64-bit division per token costs more than the token's arithmetic.
      int64_t page = c0 / a.BS, off = c0 % a.BS;
      for (int64_t j = 0; j < n; ++j) {
        const int64_t blk = table[page];  // int64 offsets: big pools
        krows[j] = kc + blk * a.kcs.sb + off * a.kcs.ss + h * a.kcs.sh;
        vrows[j] = vc + blk * a.vcs.sb + off * a.vcs.ss + h * a.vcs.sh;
        kscale[j] = q8 ? static_cast<float>(ksp[blk * a.kss.sb + off * a.kss.ss + h * a.kss.sh]) : 1.f;
        vscale[j] = q8 ? static_cast<float>(vsp[blk * a.vss.sb + off * a.vss.ss + h * a.vss.sh]) : 1.f;
        if (++off == a.BS) {
          off = 0;
          ++page;
        }
      }
      if (small_group) {
        const float* __restrict__ qTp = qT.data();
        for (int64_t j0 = 0; j0 < n; j0 += TB) {
          const C* kr[TB];
          float ks[TB];
          for (int64_t t = 0; t < TB; ++t) {  // tail: recompute row j0
            kr[t] = krows[j0 + t < n ? j0 + t : j0];
            ks[t] = kscale[j0 + t < n ? j0 + t : j0];
          }
          // Blocked over DB head-dim elements: each block's dot starts from zero and is added once, so a product
          // passes through DB + D / DB additions rather than D (the portable build has no FMA to shorten them).
          float s_acc[TB][GP] = {};
          for (int64_t d0 = 0; d0 < D; d0 += DB) {
            float s_blk[TB][GP] = {};
            for (int64_t d = d0; d < d0 + DB && d < D; ++d) {
              const float* __restrict__ qd = qTp + d * GP;
              for (int64_t t = 0; t < TB; ++t) {
                const float kv = q8 ? ld(kr[t] + d) * ks[t] : ld(kr[t] + d);
#pragma omp simd
                for (int64_t g = 0; g < GP; ++g) s_blk[t][g] += kv * qd[g];
              }
            }
            for (int64_t t = 0; t < TB; ++t)
#pragma omp simd
              for (int64_t g = 0; g < GP; ++g) s_acc[t][g] += s_blk[t][g];
          }
          for (int64_t t = 0; t < TB && j0 + t < n; ++t)
            for (int64_t g = 0; g < G; ++g) sc[g * CH + j0 + t] = s_acc[t][g];
        }
      } else {
        for (int64_t j = 0; j < n; ++j)
          for (int64_t d = 0; d < D; ++d) kt[d * CH + j] = q8 ? ld(krows[j] + d) * kscale[j] : ld(krows[j] + d);
        for (int64_t j = n; j < CH; ++j)
          for (int64_t d = 0; d < D; ++d) kt[d * CH + j] = 0.f;
        for (int64_t g = 0; g < G; ++g) {
          float s_acc[CH] = {};  // fixed size: registers, no aliasing checks in the d loop
          const float* __restrict__ qg = &qf[g * D];
          const float* __restrict__ ktp = kt.data();
          for (int64_t d0 = 0; d0 < D; d0 += DB) {  // blocked as above
            float s_blk[CH] = {};
            for (int64_t d = d0; d < d0 + DB && d < D; ++d) {
              const float qd = qg[d];
#pragma omp simd
              for (int64_t j = 0; j < CH; ++j) s_blk[j] += qd * ktp[d * CH + j];
            }
#pragma omp simd
            for (int64_t j = 0; j < CH; ++j) s_acc[j] += s_blk[j];
          }
          for (int64_t j = 0; j < CH; ++j) sc[g * CH + j] = s_acc[j];
        }
      }
      for (int64_t g = 0; g < G; ++g) {
        float* __restrict__ s = &sc[g * CH];
        if (a.softcap > 0.f)
          for (int64_t j = 0; j < n; ++j) s[j] = a.softcap * std::tanh(s[j] / a.softcap);
        float m_new = mx[g];
        for (int64_t j = 0; j < n; ++j) m_new = s[j] > m_new ? s[j] : m_new;
        alpha[g] = vexp(mx[g] - m_new);  // mx = -inf on the first chunk: alpha = 0
        float sum = 0.f;
#pragma omp simd reduction(+ : sum)
        for (int64_t j = 0; j < n; ++j) {
          const float p = vexp(s[j] - m_new);
          s[j] = p;
          sum += p;
        }
        den[g] = den[g] * alpha[g] + sum;
        mx[g] = m_new;
      }
      // Values: each V row converted once, accumulated into all G rows. The chunk's sums start from zero and join
      // the running ones once per chunk (acc * alpha + chunk): a product passes through CH + (chunks) additions,
      // not through every one before it.
      std::fill(cacc.begin(), cacc.end(), 0.f);
      for (int64_t j = 0; j < n; ++j) {
        const C* __restrict__ vr = vrows[j];
        float* __restrict__ vfp = vf.data();
        const float vs = vscale[j];
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) vfp[d] = q8 ? ld(vr + d) * vs : ld(vr + d);
        for (int64_t g = 0; g < G; ++g) {
          const float p = sc[g * CH + j];
          float* __restrict__ cg = &cacc[g * D];
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) cg[d] += p * vfp[d];
        }
      }
      for (int64_t g = 0; g < G; ++g) {
        float* __restrict__ ag = &acc[g * D];
        const float* __restrict__ cg = &cacc[g * D];
        const float al = alpha[g];
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) ag[d] = ag[d] * al + cg[d];
      }
    }
    for (int64_t g = 0; g < G; ++g) {  // a division, not a multiply by 1 / den: one rounding
      for (int64_t d = 0; d < D; ++d) pout[g * a.num_splits * D + d] = acc[g * D + d] / den[g];
      plse[g * a.num_splits] = mx[g] + std::log(den[g]);
    }
  }
}

template <typename T>
static void decode_reduce(const DecodeArgs& a, T* out, int64_t sob, int64_t soh, int64_t sod, int64_t i0,
                          int64_t i1) {
  const int64_t S = a.num_splits, D = a.D;
  std::vector<float> o(D);
  for (int64_t item = i0; item < i1; ++item) {
    const int64_t b = item / a.Hq, hq = item % a.Hq;
    const float* lse = a.part_lse + (b * a.Hq + hq) * S;
    const float* po = a.part_out + (b * a.Hq + hq) * S * D;
    float m = -std::numeric_limits<float>::infinity();
    for (int64_t s = 0; s < S; ++s) m = lse[s] > m ? lse[s] : m;
    std::fill(o.begin(), o.end(), 0.f);
    float wsum = 0.f;
    if (m != -std::numeric_limits<float>::infinity()) {
      for (int64_t s = 0; s < S; ++s) {
        if (lse[s] == -std::numeric_limits<float>::infinity()) continue;  // empty split: weight 0, never NaN
        const float w = std::exp(lse[s] - m);
        wsum += w;
        for (int64_t d = 0; d < D; ++d) o[d] += w * po[s * D + d];
      }
    }
    const float div = wsum > 0.f ? wsum : 1.f;  // no visible token: o is 0, and so is the output
    T* orow = out + b * sob + hq * soh;
    for (int64_t d = 0; d < D; ++d) st(orow + d * sod, o[d] / div);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// dtype dispatch (the exported entry points of this ISA)

#define LLMKERN_CASE3(XT, WT, YT, CALL)                               \
  if (xt == XT##_id && wt == WT##_id && yt == YT##_id) {              \
    using X = XT##_t;                                                  \
    using W = WT##_t;                                                  \
    using Y = YT##_t;                                                  \
    CALL;                                                              \
    return kOk;                                                        \
  }

constexpr DType f32_id = kF32, f16_id = kF16, bf16_id = kBF16;
using f32_t = float;
using f16_t = f16;
using bf16_t = bf16;

int rms_norm(const void* x, int64_t sxm, int64_t sxn, const void* w, int64_t sw, void* y, int64_t sym,
             int64_t syn, int64_t m0, int64_t m1, int64_t N, float eps, float offset, DType xt, DType wt,
             DType yt) {
#define CALL rms_norm_rows<X, W, Y>((const X*)x, sxm, sxn, (const W*)w, sw, (Y*)y, sym, syn, m0, m1, N, eps, offset)
  LLMKERN_CASE3(f32, f32, f32, CALL)
  LLMKERN_CASE3(f16, f16, f16, CALL)
  LLMKERN_CASE3(bf16, bf16, bf16, CALL)
  LLMKERN_CASE3(f16, f32, f32, CALL)
  LLMKERN_CASE3(bf16, f32, f32, CALL)
  LLMKERN_CASE3(f16, f32, f16, CALL)   // Gemma-style offset: output in x's dtype
  LLMKERN_CASE3(bf16, f32, bf16, CALL)
  LLMKERN_CASE3(f32, f16, f32, CALL)
  LLMKERN_CASE3(f32, bf16, f32, CALL)
  LLMKERN_CASE3(f16, bf16, f32, CALL)
  LLMKERN_CASE3(bf16, f16, f32, CALL)
  LLMKERN_CASE3(f16, bf16, f16, CALL)
  LLMKERN_CASE3(bf16, f16, bf16, CALL)
#undef CALL
  return kBadDType;
}

int fused_add_rms_norm(const void* x, int64_t sxm, int64_t sxn, const void* r, int64_t srm, int64_t srn,
                       const void* w, int64_t sw, void* y, int64_t sym, int64_t syn, void* ro, int64_t srom,
                       int64_t sron, int64_t m0, int64_t m1, int64_t N, float eps, DType xt, DType wt, DType yt) {
#define CALL                                                                                                 \
  fused_add_rms_norm_rows<X, W, Y>((const X*)x, sxm, sxn, (const X*)r, srm, srn, (const W*)w, sw, (Y*)y, sym, \
                                   syn, (X*)ro, srom, sron, m0, m1, N, eps)
  LLMKERN_CASE3(f32, f32, f32, CALL)
  LLMKERN_CASE3(f16, f16, f16, CALL)
  LLMKERN_CASE3(bf16, bf16, bf16, CALL)
  LLMKERN_CASE3(f16, f32, f32, CALL)
  LLMKERN_CASE3(bf16, f32, f32, CALL)
  LLMKERN_CASE3(f32, f16, f32, CALL)
  LLMKERN_CASE3(f32, bf16, f32, CALL)
  LLMKERN_CASE3(f16, bf16, f32, CALL)
  LLMKERN_CASE3(bf16, f16, f32, CALL)
#undef CALL
  return kBadDType;
}

#define LLMKERN_CASE1(TT, CALL) \
  if (t == TT##_id) {           \
    using T = TT##_t;           \
    CALL;                       \
  }

int rope(const RopeArgs& a, const void* cos, int64_t scb, int64_t scs, int64_t scd, const void* sin, int64_t ssb,
         int64_t sss, int64_t ssd, int64_t S, int64_t D, int64_t RD, int64_t t0, int64_t t1, DType xt, DType ct) {
  if (RD > 512) return kBadShape;
#define CALL3(XT, CT)                                                                                   \
  if (xt == XT##_id && ct == CT##_id) {                                                                \
    rope_tokens<XT##_t, CT##_t>(a, (const CT##_t*)cos, scb, scs, scd, (const CT##_t*)sin, ssb, sss, ssd, \
                                S, D, RD, t0, t1);                                                      \
    return kOk;                                                                                         \
  }
  CALL3(f32, f32) CALL3(f16, f16) CALL3(bf16, bf16) CALL3(f16, f32) CALL3(bf16, f32) CALL3(f32, f16)
  CALL3(f32, bf16) CALL3(f16, bf16) CALL3(bf16, f16)
#undef CALL3
  return kBadDType;
}

int silu_and_mul(const void* g, int64_t sgm, int64_t sgi, const void* u, int64_t sum_, int64_t sui, void* o,
                 int64_t som, int64_t soi, int64_t m0, int64_t m1, int64_t I, DType t) {
#define CALL \
  silu_and_mul_rows<T>((const T*)g, sgm, sgi, (const T*)u, sum_, sui, (T*)o, som, soi, m0, m1, I); return kOk
  LLMKERN_CASE1(f32, CALL)
  LLMKERN_CASE1(f16, CALL)
  LLMKERN_CASE1(bf16, CALL)
#undef CALL
  return kBadDType;
}

// The cache's element type for q / key dtype T and cache dtype ct: CALL with `using C = ...`.
#define LLMKERN_CACHE_CASES(CALL)         \
  if (ct == t) {                          \
    using C = T;                          \
    CALL;                                 \
  }                                       \
  if (ct == kI8) {                        \
    using C = int8_t;                     \
    CALL;                                 \
  }                                       \
  if (ct == kF8E4M3) {                    \
    using C = fp8e4m3;                    \
    CALL;                                 \
  }                                       \
  return kBadDType

int reshape_and_cache(const void* key, int64_t skt, int64_t skh, int64_t skd, const void* value, int64_t svt,
                      int64_t svh, int64_t svd, void* k_cache, const CacheStrides& kcs, void* v_cache,
                      const CacheStrides& vcs, const int64_t* slots, int64_t t0, int64_t t1, int64_t Hkv, int64_t D,
                      int64_t NB, int64_t BS, DType t, DType ct, const KvScales& kss, const KvScales& vss) {
  if (is_8bit(ct) && (kss.p == nullptr || vss.p == nullptr)) return kBadDType;
#define CALL                                                                                                        \
  return reshape_and_cache_rows<T, C>((const T*)key, skt, skh, skd, (const T*)value, svt, svh, svd, (C*)k_cache,    \
                                      kcs, (C*)v_cache, vcs, slots, t0, t1, Hkv, D, NB, BS, kss, vss)
#define CASES LLMKERN_CACHE_CASES(CALL)
  LLMKERN_CASE1(f32, CASES)
  LLMKERN_CASE1(f16, CASES)
  LLMKERN_CASE1(bf16, CASES)
#undef CASES
#undef CALL
  return kBadDType;
}

int paged_decode_stage1(const DecodeArgs& a, int64_t i0, int64_t i1) {
  const DType t = a.t, ct = a.ct;
  if (is_8bit(ct) && (a.kss.p == nullptr || a.vss.p == nullptr)) return kBadDType;
#define CALL decode_stage1<T, C>(a, i0, i1); return kOk
#define CASES LLMKERN_CACHE_CASES(CALL)
  LLMKERN_CASE1(f32, CASES)
  LLMKERN_CASE1(f16, CASES)
  LLMKERN_CASE1(bf16, CASES)
#undef CASES
#undef CALL
  return kBadDType;
}
#undef LLMKERN_CACHE_CASES

int paged_decode_reduce(const DecodeArgs& a, void* out, int64_t sob, int64_t soh, int64_t sod, int64_t i0,
                        int64_t i1) {
  const DType t = a.t;
#define CALL decode_reduce<T>(a, (T*)out, sob, soh, sod, i0, i1); return kOk
  LLMKERN_CASE1(f32, CALL)
  LLMKERN_CASE1(f16, CALL)
  LLMKERN_CASE1(bf16, CALL)
#undef CALL
  return kBadDType;
}

#undef LLMKERN_CASE1
#undef LLMKERN_CASE3

}  // namespace LLMKERN_ISA
}  // namespace cpu
}  // namespace llmkern
