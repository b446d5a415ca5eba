// Decode-sized Linear, y = x W^T (+ b) for a few rows of x, written once over the vector traits of vec.h
// (`class V`, W fp32 lanes); instantiated per instruction set by vec_avx2.cpp. Contract of kernels.h's `linear`
// (16-feature blocks, unit last strides, fp32 or bf16), numerics of linear_avx512.cpp: fp32 accumulation, and bf16
// output rounded to nearest even once, after the bias add.
//
// At decode every weight byte is read once per step for one multiply-add per row of x: the kernel's job is to
// stream W from memory. It takes W output features at a time: W accumulators run x . w_n over K (bf16: 2W elements
// per load, split into even and odd lanes — the products pair x and w the same way, only the summation order
// changes), and one hsum gives the W sums in one vector. Each further row of x re-reads the W weight rows from
// L1/L2. K tails go through zero-padded copies; N tails point the missing rows at the last real one and drop them.
#pragma once

#include "vec.h"

namespace llmkern {
namespace cpu {
namespace {

// acc[t] += x . w[t] over one step of K: W elements (fp32) or 2W (bf16) at byte offset `off` of each weight row.
template <class V, DType T>
inline void dot_step(const unsigned char* x, const unsigned char* const* w, int64_t off, typename V::reg* acc) {
  using reg = typename V::reg;
  if constexpr (T == kBF16) {
    reg xe, xo;
    V::load_bf16_pairs(x, &xe, &xo);
#pragma GCC unroll 16
    for (int t = 0; t < V::W; ++t) {
      reg we, wo;
      V::load_bf16_pairs(w[t] + off, &we, &wo);
      acc[t] = V::fma(xo, wo, V::fma(xe, we, acc[t]));
    }
  } else {
    const reg xv = V::template load_as<T>(x);
#pragma GCC unroll 16
    for (int t = 0; t < V::W; ++t) acc[t] = V::fma(xv, V::template load_as<T>(w[t] + off), acc[t]);
  }
}

// Output features [16 * blk0, 16 * blk1) of every row of x.
template <class V, DType T>
void linear_range(const LinearArgs& a, int64_t blk0, int64_t blk1) {
  using reg = typename V::reg;
  constexpr int W = V::W;
  constexpr int64_t es = elem_size(T), KS = T == kBF16 ? 2 * W : W;  // elements of K per step
  static_assert(16 % W == 0, "kernels.h's 16-feature blocks split into whole vectors");
  const int64_t K = a.K, k_main = K / KS * KS;
  const unsigned char* wb = static_cast<const unsigned char*>(a.w);
  for (int64_t n0 = 16 * blk0; n0 < std::min(16 * blk1, a.N); n0 += W) {
    const int64_t nn = std::min<int64_t>(W, a.N - n0);
    const unsigned char* rows[W];
    for (int t = 0; t < W; ++t) rows[t] = wb + (n0 + std::min<int64_t>(t, nn - 1)) * a.swn * es;
    // K tail: the last K - k_main elements of the W rows, zero-padded to one step.
    alignas(64) unsigned char tail_w[W][KS * es] = {};
    const unsigned char* tail_rows[W];
    for (int t = 0; t < W; ++t) {
      std::memcpy(tail_w[t], rows[t] + k_main * es, (K - k_main) * es);
      tail_rows[t] = tail_w[t];
    }
    const reg bias =
        a.bias ? load_as_n<V, T>(static_cast<const unsigned char*>(a.bias) + n0 * es, nn) : V::zero();
    for (int64_t m = 0; m < a.M; ++m) {
      const unsigned char* x = static_cast<const unsigned char*>(a.x) + m * a.sxm * es;
      reg acc[W];
#pragma GCC unroll 16
      for (int t = 0; t < W; ++t) acc[t] = V::zero();
      for (int64_t k = 0; k < k_main; k += KS) dot_step<V, T>(x + k * es, rows, k * es, acc);
      if (k_main < K) {
        alignas(64) unsigned char tail_x[KS * es] = {};
        std::memcpy(tail_x, x + k_main * es, (K - k_main) * es);
        dot_step<V, T>(tail_x, tail_rows, 0, acc);
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

}  // namespace
}  // namespace cpu
}  // namespace llmkern
