// Host launchers of the CUDA kernels: torch-free. Pointers, sizes, strides (in elements), a stream; each returns
// the launch's cudaError_t (cudaErrorInvalidValue for a dtype combination it has no kernel for).
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "../cpu/kernels.h"  // DType, RopeArgs: shared vocabulary with the CPU kernels

namespace llmkern {
namespace cuda {

using cpu::DType;
using cpu::RopeArgs;

// Launch geometry, host-only and torch-free, so a test can check it against CUDA's grid limits (x < 2^31, y and z
// <= 65535) without a GPU. int64 so an overflowing dimension shows up instead of wrapping.
struct Grid {
  int64_t x, y, z;
};
constexpr int kSiluThreads = 256;
// One block per row for the norms, one per token for RoPE (y: q then k) and the cache write.
inline Grid rms_norm_grid(int64_t M) { return {M, 1, 1}; }
inline Grid rope_grid(int64_t B, int64_t S) { return {B * S, 2, 1}; }
// Rows on x: 65,536+ rows (a long prefill) would overflow y.
inline Grid silu_and_mul_grid(int64_t M, int64_t I) { return {M, (I + kSiluThreads - 1) / kSiluThreads, 1}; }
inline Grid reshape_and_cache_grid(int64_t T) { return {T, 1, 1}; }
inline int64_t copy_blocks_chunks(int64_t block_bytes) {
  const int64_t c = (block_bytes / 16 + 255) / 256 + 1;
  return c < 64 ? c : 64;
}
inline Grid copy_blocks_grid(int64_t n, int64_t block_bytes) { return {n, copy_blocks_chunks(block_bytes), 1}; }

// Width of the words copy_blocks moves: the widest of 16/8/4/2/1 bytes that divides both cache base addresses and
// the block size, so every word access is aligned (a cache view at an offset, or an odd block, takes narrower ones).
inline int copy_blocks_word_bytes(const void* k_cache, const void* v_cache, int64_t block_bytes) {
  const uint64_t bits = reinterpret_cast<uintptr_t>(k_cache) | reinterpret_cast<uintptr_t>(v_cache) |
                        static_cast<uint64_t>(block_bytes);
  for (int w = 16; w > 1; w /= 2)
    if (bits % w == 0) return w;
  return 1;
}

cudaError_t rms_norm(const void* x, int64_t sxm, const void* w, void* y, int64_t sym, int64_t M, int64_t N,
                     float eps, float offset, DType xt, DType wt, DType yt, cudaStream_t stream);

cudaError_t fused_add_rms_norm(const void* x, int64_t sxm, const void* r, int64_t srm, const void* w, void* y,
                               int64_t sym, void* ro, int64_t srom, int64_t M, int64_t N, float eps, DType xt,
                               DType wt, DType yt, cudaStream_t stream);

cudaError_t rope(const RopeArgs& q, const RopeArgs& k, const void* cos, int64_t scb, int64_t scs, int64_t scd,
                 const void* sin, int64_t ssb, int64_t sss, int64_t ssd, int64_t B, int64_t S, int64_t D,
                 int64_t RD, DType xt, DType ct, cudaStream_t stream);

cudaError_t silu_and_mul(const void* g, int64_t sgm, const void* u, int64_t sum_, void* o, int64_t som, int64_t M,
                         int64_t I, DType t, cudaStream_t stream);

cudaError_t reshape_and_cache(const void* key, int64_t skt, int64_t skh, const void* value, int64_t svt,
                              int64_t svh, void* k_cache, void* v_cache, const int64_t* slot_mapping, int64_t T,
                              int64_t Hkv, int64_t D, int64_t num_slots, DType t, cudaStream_t stream);

// Copy whole blocks src[i] -> dst[i] in both caches; block_elems = block_size * Hkv * D.
cudaError_t copy_blocks(void* k_cache, void* v_cache, const int64_t* src, const int64_t* dst, int64_t n,
                        int64_t block_elems, DType t, cudaStream_t stream);

}  // namespace cuda
}  // namespace llmkern
