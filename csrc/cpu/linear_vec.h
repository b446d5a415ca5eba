// Decode-sized Linear, y = x W^T (+ b) for a few rows of x, written once over the vector traits of vec.h
// (`class V`, W fp32 lanes); instantiated per instruction set by vec_avx2.cpp (VecAvx2) and vec_avx512.cpp
// (VecAvx512). Contract of kernels.h's `linear` (16-feature blocks, unit last strides, fp32 or bf16); fp32
// accumulation, and bf16 output rounded to nearest even once, after the bias add (what oneDNN's bf16 GEMM does).
//
// At decode every weight byte is read once per step for one multiply-add per row of x: the kernel's job is to
// stream W from memory. Two walks over a block of 16 output features (linear_range picks, see the numbers there):
//   * by row (linear_by_row; bf16, up to 4 rows of x): W in memory order, one weight row after another, each row one
//     sequential stream for the hardware prefetchers. Up to G rows of x per weight row, A accumulators each over
//     interleaved steps of K (A * G <= 8 independent chains hide the FMA / VDPBF16PS latency); the 16 rows'
//     finished accumulators of one x row then go through V::hsum, W features per vector. A bf16 row of a small
//     model is short (SmolLM2: 1152 bytes): read 16 side by side, such rows streamed at 14 GB/s on one thread of an
//     AMD EPYC (AVX-512), walked one by one at 22 GB/s;
//   * side by side (linear_side_by_side; fp32, and more rows of x): per row of x, one step of K of each of the 16
//     weight rows into 16 accumulators (W per vector of features), then V::hsum. One weight load per product and the
//     block re-read from L1/L2 per row of x: better once compute binds, and for fp32's longer rows.
// A step is W fp32 elements (one FMA) or 2W bf16 elements: one VDPBF16PS where V has it (kBf16Dot; products exact in
// fp32, fp32 accumulation), else even and odd lanes widened and two FMAs; only the summation order differs. K tails
// go through zero-padded copies of the last partial step; N tails read only the rows that exist (by row) or point
// the missing ones at the last real row (side by side), and drop the missing features at the store.
#pragma once

#include "vec.h"

namespace llmkern {
namespace cpu {
namespace {

// acc += x . w over one step of K: W elements (fp32) or 2W (bf16).
template <class V, DType T>
inline typename V::reg dot_step(typename V::reg acc, const unsigned char* x, const unsigned char* w) {
  using reg = typename V::reg;
  if constexpr (T == kBF16) {
    if constexpr (V::kBf16Dot) {
      return V::dot_bf16(acc, V::load_bf16x2(x), V::load_bf16x2(w));
    } else {
      reg xe, xo, we, wo;
      V::load_bf16_pairs(x, &xe, &xo);
      V::load_bf16_pairs(w, &we, &wo);
      return V::fma(xo, wo, V::fma(xe, we, acc));
    }
  } else {
    return V::fma(V::template load_as<T>(x), V::template load_as<T>(w), acc);
  }
}

// out[g] = x[g] . row over K (not reduced: W partial sums) for G rows of x; `tail_x[g]` / `tail_w` hold the last
// K - k_main elements zero-padded to one step (unused when k_main == K).
template <class V, DType T, int G>
inline void row_dot(const unsigned char* const* x, const unsigned char* row, int64_t k_main, bool tail,
                    const unsigned char* const* tail_x, const unsigned char* tail_w, typename V::reg* out) {
  using reg = typename V::reg;
  constexpr int A = G <= 2 ? 4 : 2;  // accumulators per x row
  constexpr int64_t es = elem_size(T), SB = (T == kBF16 ? 2 * V::W : V::W) * es;  // bytes per step
  const int64_t main_b = k_main * es;
  reg acc[G][A];
#pragma GCC unroll 8
  for (int g = 0; g < G; ++g)
#pragma GCC unroll 8
    for (int i = 0; i < A; ++i) acc[g][i] = V::zero();
  int64_t b = 0;
  for (; b + A * SB <= main_b; b += A * SB) {
#pragma GCC unroll 8
    for (int i = 0; i < A; ++i)
#pragma GCC unroll 8
      for (int g = 0; g < G; ++g) acc[g][i] = dot_step<V, T>(acc[g][i], x[g] + b + i * SB, row + b + i * SB);
  }
  for (; b < main_b; b += SB)  // < A steps left
#pragma GCC unroll 8
    for (int g = 0; g < G; ++g) acc[g][0] = dot_step<V, T>(acc[g][0], x[g] + b, row + b);
  if (tail)
#pragma GCC unroll 8
    for (int g = 0; g < G; ++g) acc[g][0] = dot_step<V, T>(acc[g][0], tail_x[g], tail_w);
#pragma GCC unroll 8
  for (int g = 0; g < G; ++g) {
    reg s = acc[g][0];
#pragma GCC unroll 8
    for (int i = 1; i < A; ++i) s = V::add(s, acc[g][i]);
    out[g * 16] = s;
  }
}

// Output features [16 * blk0, 16 * blk1) of every row of x, weight rows one after another (the streaming walk).
template <class V, DType T>
void linear_by_row(const LinearArgs& a, int64_t blk0, int64_t blk1) {
  using reg = typename V::reg;
  constexpr int W = V::W, MC = 16;  // rows of x per pass over a block's weights
  constexpr int64_t es = elem_size(T), KS = T == kBF16 ? 2 * W : W;  // elements of K per step
  static_assert(16 % W == 0, "kernels.h's 16-feature blocks split into whole vectors");
  const int64_t K = a.K, k_main = K / KS * KS;
  const bool tail = k_main < K;
  const unsigned char* wb = static_cast<const unsigned char*>(a.w);
  const unsigned char* xb = static_cast<const unsigned char*>(a.x);
  alignas(64) unsigned char tail_x[MC][KS * es] = {};
  alignas(64) unsigned char tail_w[KS * es] = {};
  alignas(64) reg sums[MC][16];  // [row of x][feature of the block]: unreduced dot products
  const unsigned char* xr[MC];
  const unsigned char* txr[MC];
  for (int g = 0; g < MC; ++g) txr[g] = tail_x[g];
  for (int64_t m0 = 0; m0 < a.M; m0 += MC) {
    const int mc = static_cast<int>(std::min<int64_t>(MC, a.M - m0));
    for (int g = 0; g < mc; ++g) {
      xr[g] = xb + (m0 + g) * a.sxm * es;
      if (tail) std::memcpy(tail_x[g], xr[g] + k_main * es, (K - k_main) * es);
    }
    for (int64_t n0 = 16 * blk0; n0 < std::min(16 * blk1, a.N); n0 += 16) {
      const int nn = static_cast<int>(std::min<int64_t>(16, a.N - n0));
      for (int t = 0; t < 16; ++t) {
        if (t >= nn) {
          for (int g = 0; g < mc; ++g) sums[g][t] = V::zero();
          continue;
        }
        const unsigned char* row = wb + (n0 + t) * a.swn * es;
        if (tail) std::memcpy(tail_w, row + k_main * es, (K - k_main) * es);
        int g = 0;
        for (; g + 4 <= mc; g += 4) row_dot<V, T, 4>(xr + g, row, k_main, tail, txr + g, tail_w, &sums[g][t]);
        if (mc - g >= 2) {
          row_dot<V, T, 2>(xr + g, row, k_main, tail, txr + g, tail_w, &sums[g][t]);
          g += 2;
        }
        if (g < mc) row_dot<V, T, 1>(xr + g, row, k_main, tail, txr + g, tail_w, &sums[g][t]);
      }
      for (int g = 0; g < mc; ++g) {
        unsigned char* out = static_cast<unsigned char*>(a.y) + ((m0 + g) * a.sym + n0) * es;
        for (int s = 0; s * W < nn; ++s) {
          const int n = std::min(W, nn - s * W);
          reg bias = V::zero();
          if (a.bias) {
            const unsigned char* bp = static_cast<const unsigned char*>(a.bias) + (n0 + s * W) * es;
            bias = n == W ? V::template load_as<T>(bp) : load_as_n<V, T>(bp, n);
          }
          const reg y = V::add(V::hsum(&sums[g][s * W]), bias);
          if (n == W)
            V::template store_as<T>(out + s * W * es, y);
          else
            store_as_n<V, T>(out + s * W * es, y, n);
        }
      }
    }
  }
}

// Output features [16 * blk0, 16 * blk1) of every row of x, the block's 16 weight rows side by side: per row of x,
// W accumulators per vector of features take one step of K of every weight row, then V::hsum. Each step loads one
// weight vector per product; for more than a few rows of x (compute, not the stream, binds) this beats walking row
// by row, which loads the x rows again per weight row.
template <class V, DType T>
void linear_side_by_side(const LinearArgs& a, int64_t blk0, int64_t blk1) {
  using reg = typename V::reg;
  constexpr int W = V::W;
  constexpr int64_t es = elem_size(T), KS = T == kBF16 ? 2 * W : W, SB = KS * es;
  const int64_t K = a.K, k_main = K / KS * KS;
  const unsigned char* wb = static_cast<const unsigned char*>(a.w);
  for (int64_t n0 = 16 * blk0; n0 < std::min(16 * blk1, a.N); n0 += W) {
    const int64_t nn = std::min<int64_t>(W, a.N - n0);
    const unsigned char* rows[W];
    for (int t = 0; t < W; ++t) rows[t] = wb + (n0 + std::min<int64_t>(t, nn - 1)) * a.swn * es;
    alignas(64) unsigned char tail_w[W][SB] = {};  // K tail of the W rows, zero-padded to one step
    for (int t = 0; t < W; ++t) std::memcpy(tail_w[t], rows[t] + k_main * es, (K - k_main) * es);
    reg bias = V::zero();
    if (a.bias) bias = load_as_n<V, T>(static_cast<const unsigned char*>(a.bias) + n0 * es, nn);
    for (int64_t m = 0; m < a.M; ++m) {
      const unsigned char* x = static_cast<const unsigned char*>(a.x) + m * a.sxm * es;
      reg acc[W];
#pragma GCC unroll 16
      for (int t = 0; t < W; ++t) acc[t] = V::zero();
      for (int64_t b = 0; b < k_main * es; b += SB)
#pragma GCC unroll 16
        for (int t = 0; t < W; ++t) acc[t] = dot_step<V, T>(acc[t], x + b, rows[t] + b);
      if (k_main < K) {
        alignas(64) unsigned char tail_x[SB] = {};
        std::memcpy(tail_x, x + k_main * es, (K - k_main) * es);
#pragma GCC unroll 16
        for (int t = 0; t < W; ++t) acc[t] = dot_step<V, T>(acc[t], tail_x, tail_w[t]);
      }
      const reg y = V::add(V::hsum(acc), bias);
      unsigned char* out = static_cast<unsigned char*>(a.y) + (m * a.sym + n0) * es;
      if (nn == W)
        V::template store_as<T>(out, y);
      else
        store_as_n<V, T>(out, y, nn);
    }
  }
}

// Output features [16 * blk0, 16 * blk1) of every row of x: bf16 weights with up to kLinearByRowMaxM rows of x walk
// row by row, everything else side by side. Measured 2026-12-07 (AMD EPYC AVX-512 + AVX512-BF16, 30 layers of
// SmolLM2-135M's 7 weights, torch-allocated, one process, the two walks alternating; time by row / side by side):
// bf16 1 row 0.68 (1 thread) - 0.88 (2 threads), 4 rows 0.77; fp32 1 row 1.05-1.11 (slower), 4 rows 0.85-1.04
// (noise); 16 rows 1.2 both. Forced AVX2 (vec_avx2.cpp): bf16 1 row 0.63.
constexpr int64_t kLinearByRowMaxM = 4;
template <class V, DType T>
void linear_range(const LinearArgs& a, int64_t blk0, int64_t blk1) {
  if (T == kBF16 && a.M <= kLinearByRowMaxM)
    linear_by_row<V, T>(a, blk0, blk1);
  else
    linear_side_by_side<V, T>(a, blk0, blk1);
}

}  // namespace
}  // namespace cpu
}  // namespace llmkern
