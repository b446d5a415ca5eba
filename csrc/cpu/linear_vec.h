// Decode-sized Linear, y = x W^T (+ b) for a few rows of x, written once over the vector traits of vec.h
// (`class V`, W fp32 lanes); instantiated per instruction set by vec_avx2.cpp (VecAvx2) and vec_avx512.cpp
// (VecAvx512). Contract of kernels.h's `linear` (16-feature blocks, unit last strides, fp32 or bf16); fp32
// accumulation, and bf16 output rounded to nearest even once, after the bias add (what oneDNN's bf16 GEMM does).
//
// At decode every weight byte is read once per step for one multiply-add per row of x: the kernel's job is to
// stream W from memory, and, as rows of x grow, to reuse each loaded weight vector from registers. Two walks over a
// block of 16 output features (linear_range picks one, with the measurements):
//   * by row (linear_by_row): W in memory order, R weight rows at a time against up to G = 4 rows of x, A
//     accumulators per pair over interleaved steps of K (G * R * A >= 8 independent chains hide the FMA / VDPBF16PS
//     latency); the finished accumulators go through V::hsum, W features per vector. R = 1 keeps one sequential
//     stream for the hardware prefetchers: a bf16 row of a small model is short (SmolLM2: 1152 bytes), and read 16
//     side by side such rows streamed at 14 GB/s on one thread of an AMD EPYC (AVX-512), walked one by one at 22
//     GB/s. R = 4 (AVX-512) / 2 (AVX2) is register blocking: G loads of x and R of W feed G * R products;
//   * side by side (linear_side_by_side; one row of x): one step of K of each of W weight rows into W accumulators,
//     then V::hsum.
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

// out[g * 16 + r] = x[g] . rows[r] over K (not reduced: W partial sums) for G rows of x and R weight rows;
// `tail_x[g]` / `tail_w[r]` hold the last K - k_main elements zero-padded to one step (used when `tail`).
template <class V, DType T, int G, int R>
inline void row_dot(const unsigned char* const* x, const unsigned char* const* rows, int64_t k_main, bool tail,
                    const unsigned char* const* tail_x, const unsigned char* const* tail_w, typename V::reg* out) {
  using reg = typename V::reg;
  constexpr int A = G * R >= 8 ? 1 : G <= 2 ? 4 : 2;  // accumulators per (x row, weight row)
  constexpr int64_t es = elem_size(T), SB = (T == kBF16 ? 2 * V::W : V::W) * es;  // bytes per step
  const int64_t main_b = k_main * es;
  reg acc[G][R][A];
#pragma GCC unroll 8
  for (int g = 0; g < G; ++g)
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
      for (int i = 0; i < A; ++i) acc[g][r][i] = V::zero();
  int64_t b = 0;
  for (; b + A * SB <= main_b; b += A * SB) {
#pragma GCC unroll 8
    for (int i = 0; i < A; ++i)
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
        for (int g = 0; g < G; ++g)
          acc[g][r][i] = dot_step<V, T>(acc[g][r][i], x[g] + b + i * SB, rows[r] + b + i * SB);
  }
  for (; b < main_b; b += SB)  // < A steps left
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
      for (int g = 0; g < G; ++g) acc[g][r][0] = dot_step<V, T>(acc[g][r][0], x[g] + b, rows[r] + b);
  if (tail)
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
      for (int g = 0; g < G; ++g) acc[g][r][0] = dot_step<V, T>(acc[g][r][0], tail_x[g], tail_w[r]);
#pragma GCC unroll 8
  for (int g = 0; g < G; ++g)
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      reg s = acc[g][r][0];
#pragma GCC unroll 8
      for (int i = 1; i < A; ++i) s = V::add(s, acc[g][r][i]);
      out[g * 16 + r] = s;
    }
}

// The rows of x in groups of 4, 2, 1 against R weight rows.
template <class V, DType T, int R>
inline void rows_dot(const unsigned char* const* xr, int mc, const unsigned char* const* rows, int64_t k_main,
                     bool tail, const unsigned char* const* txr, const unsigned char* const* tw, typename V::reg* out) {
  int g = 0;
  for (; g + 4 <= mc; g += 4) row_dot<V, T, 4, R>(xr + g, rows, k_main, tail, txr + g, tw, out + g * 16);
  if (mc - g >= 2) {
    row_dot<V, T, 2, R>(xr + g, rows, k_main, tail, txr + g, tw, out + g * 16);
    g += 2;
  }
  if (g < mc) row_dot<V, T, 1, R>(xr + g, rows, k_main, tail, txr + g, tw, out + g * 16);
}

// Output features [16 * blk0, 16 * blk1) of every row of x, R weight rows at a time in memory order (R = 1: the
// streaming walk; R > 1: register blocking for many rows of x). Each block of 16 weight rows serves every row of x
// (up to MO at a time, MC per pass) before the next block is read: with the rows of x outside the weight loop, a
// thread's share of W was read once per MC rows of x, so at 17-64 rows twice or more, from L3 or memory (an fp32
// lm_head of 113 MB twice per decode step of a 32-request batch); now the later passes find the block in L1/L2. Each
// output is the same dot product in the same order either way.
template <class V, DType T, int R>
void linear_by_row(const LinearArgs& a, int64_t blk0, int64_t blk1) {
  using reg = typename V::reg;
  constexpr int W = V::W, MC = 16, MO = 64;  // rows of x per pass over a block's weights; per walk over the range
  constexpr int64_t es = elem_size(T), KS = T == kBF16 ? 2 * W : W;  // elements of K per step
  static_assert(16 % W == 0, "kernels.h's 16-feature blocks split into whole vectors");
  const int64_t K = a.K, k_main = K / KS * KS;
  const bool tail = k_main < K;
  const unsigned char* wb = static_cast<const unsigned char*>(a.w);
  const unsigned char* xb = static_cast<const unsigned char*>(a.x);
  alignas(64) unsigned char tail_x[MO][KS * es] = {};
  alignas(64) unsigned char tail_w[R][KS * es] = {};
  const unsigned char* tw[R];
  for (int r = 0; r < R; ++r) tw[r] = tail_w[r];
  alignas(64) reg sums[MC][16];  // [row of x][feature of the block]: unreduced dot products
  const unsigned char* xr[MO];
  const unsigned char* txr[MO];
  for (int g = 0; g < MO; ++g) txr[g] = tail_x[g];
  for (int64_t mo = 0; mo < a.M; mo += MO) {
    const int mrows = static_cast<int>(std::min<int64_t>(MO, a.M - mo));
    for (int g = 0; g < mrows; ++g) {
      xr[g] = xb + (mo + g) * a.sxm * es;
      if (tail) std::memcpy(tail_x[g], xr[g] + k_main * es, (K - k_main) * es);
    }
    for (int64_t n0 = 16 * blk0; n0 < std::min(16 * blk1, a.N); n0 += 16) {
      const int nn = static_cast<int>(std::min<int64_t>(16, a.N - n0));
      const unsigned char* rows[R];
      for (int m0 = 0; m0 < mrows; m0 += MC) {
        const int mc = std::min(MC, mrows - m0);
        for (int t = nn; t < 16; ++t)
          for (int g = 0; g < mc; ++g) sums[g][t] = V::zero();
        int t = 0;
        for (; t + R <= nn; t += R) {
          for (int r = 0; r < R; ++r) {
            rows[r] = wb + (n0 + t + r) * a.swn * es;
            if (tail) std::memcpy(tail_w[r], rows[r] + k_main * es, (K - k_main) * es);
          }
          rows_dot<V, T, R>(xr + m0, mc, rows, k_main, tail, txr + m0, tw, &sums[0][t]);
        }
        for (; t < nn; ++t) {  // the block's last nn % R rows one at a time
          rows[0] = wb + (n0 + t) * a.swn * es;
          if (tail) std::memcpy(tail_w[0], rows[0] + k_main * es, (K - k_main) * es);
          rows_dot<V, T, 1>(xr + m0, mc, rows, k_main, tail, txr + m0, tw, &sums[0][t]);
        }
        for (int g = 0; g < mc; ++g) {
          unsigned char* out = static_cast<unsigned char*>(a.y) + ((mo + m0 + g) * a.sym + n0) * es;
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
}

// Output features [16 * blk0, 16 * blk1) of every row of x, W weight rows side by side: per row of x, W accumulators
// take one step of K of every weight row, then V::hsum (one weight load per product: for a single row of x).
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

// Which walk serves a call (measured 2026-12-07 on an AMD EPYC with AVX-512 + AVX512-BF16, 2 threads, weights of
// SmolLM2-135M (K 576 / 1536) and Llama-3-8B (K 4096 / 14336) in torch-allocated memory, the walks alternating in
// one process; time relative to the side-by-side walk, which was the only one before):
//   * bf16 rows shorter than 4 KiB, up to 8 rows of x: by row, one weight row at a time (0.87-0.93);
//   * other single rows of x: side by side (by row 1.04-1.20, 4 weight rows at a time 1.00-1.12);
//   * everything else: by row, R = kLinearBlockRows weight rows at a time against up to 4 rows of x (register
//     blocking: 0.33-0.63 at 4-16 rows of Llama-3-8B's weights, 0.78-0.98 at 16 rows of SmolLM2's; 1.05-1.06 at 2-4
//     rows of SmolLM2's fp32 weights, the one loss); except bf16 on AVX2, which stays side by side: there each bf16
//     step is widened into even and odd fp32 lanes, and 2 x 4 blocks of those took 1.3-1.8x the side-by-side
//     walk's time at 4-16 rows (forced AVX2 on the same machine).
template <class V>
constexpr int kLinearBlockRows = V::W == 16 ? 4 : 2;  // AVX2 has 16 registers: 4 x 2 accumulators

template <class V, DType T>
void linear_range(const LinearArgs& a, int64_t blk0, int64_t blk1) {
  if (T == kBF16 && a.K * elem_size(T) < 4096 && a.M <= 8)
    linear_by_row<V, T, 1>(a, blk0, blk1);
  else if (a.M == 1 || (T == kBF16 && !V::kBf16Dot))
    linear_side_by_side<V, T>(a, blk0, blk1);
  else
    linear_by_row<V, T, kLinearBlockRows<V>>(a, blk0, blk1);
}

// kernels.h's `linear` for one instruction set (vec_avx2.cpp, vec_avx512.cpp): the dtype picks the instantiation.
template <class V>
int run_linear(const LinearArgs& a, int64_t blk0, int64_t blk1) {
  if (a.t == kBF16)
    linear_range<V, kBF16>(a, blk0, blk1);
  else
    linear_range<V, kF32>(a, blk0, blk1);
  return kOk;
}

}  // namespace
}  // namespace cpu
}  // namespace llmkern
