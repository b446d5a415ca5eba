// Host launchers of the CUDA kernels: torch-free. Pointers, sizes, strides (in elements), a stream; each returns
// the launch's cudaError_t (cudaErrorInvalidValue for a dtype combination it has no kernel for).
#pragma once

#include <cstdint>
#include <utility>

#include <cuda_runtime.h>

#include "../cpu/kernels.h"  // DType, RopeArgs, CacheStrides: shared vocabulary with the CPU kernels

namespace llmkern {
namespace cuda {

using cpu::CacheStrides;
using cpu::DType;
using cpu::KvScales;
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
// 8-bit pages: one warp per (token, KV head) row of K and V (the row's amax is a warp reduction), kQuantWarps heads
// of one token per block: tokens on x, head groups on y.
constexpr int kQuantWarps = 4;
inline Grid reshape_and_cache_quant_grid(int64_t T, int64_t Hkv) {
  return {T, (Hkv + kQuantWarps - 1) / kQuantWarps, 1};
}
inline int64_t copy_blocks_chunks(int64_t block_bytes) {
  const int64_t c = (block_bytes / 16 + 255) / 256 + 1;
  return c < 64 ? c : 64;
}
inline Grid copy_blocks_grid(int64_t n, int64_t block_bytes) { return {n, copy_blocks_chunks(block_bytes), 1}; }

// Width of the words copy_blocks moves: the widest of 16/8/4/2/1 bytes that divides both cache base addresses and
// the block size, so every word access is aligned (a cache view at an offset, or an odd block, takes narrower ones).
// k_stride / v_stride: bytes from one page to the next in each cache (block_bytes for contiguous caches).
inline int copy_blocks_word_bytes(const void* k_cache, const void* v_cache, int64_t block_bytes, int64_t k_stride,
                                  int64_t v_stride) {
  const uint64_t bits = reinterpret_cast<uintptr_t>(k_cache) | reinterpret_cast<uintptr_t>(v_cache) |
                        static_cast<uint64_t>(block_bytes) | static_cast<uint64_t>(k_stride) |
                        static_cast<uint64_t>(v_stride);
  for (int w = 16; w > 1; w /= 2)
    if (bits % w == 0) return w;
  return 1;
}
inline int copy_blocks_word_bytes(const void* k_cache, const void* v_cache, int64_t block_bytes) {
  return copy_blocks_word_bytes(k_cache, v_cache, block_bytes, block_bytes, block_bytes);
}

// Whether the BS * Hkv * D elements of one page of a cache with strides `cs` (unit along D) fill one dense span in
// some order (NHD pages, HND pages seen as NHD, either as half of a [NB, 2, BS, Hkv, D] tensor), so copy_blocks can
// move a page as raw words; otherwise it copies element by element through the strides.
inline bool page_is_dense(const CacheStrides& cs, int64_t BS, int64_t Hkv, int64_t D) {
  int64_t size[2] = {BS, Hkv}, stride[2] = {cs.ss, cs.sh};
  if (stride[0] > stride[1] || (stride[0] == stride[1] && size[0] > size[1])) {
    std::swap(size[0], size[1]);
    std::swap(stride[0], stride[1]);
  }
  int64_t want = D;  // the next dimension up must start where the previous ones end
  for (int i = 0; i < 2; ++i) {
    if (size[i] == 1) continue;
    if (stride[i] != want) return false;
    want *= size[i];
  }
  return true;
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

// key/value [T, Hkv, D] (unit last stride, dtype t) into caches [NB, BS, Hkv, D] with strides kcs / vcs (unit along
// D); slots < 0 or >= NB * BS are skipped. Cache dtype ct: t, or 8-bit codes (kI8, kF8E4M3) quantized on write as
// llmkern/reference.py's quantize_kv (fp16 scales to kss / vss, one per token and KV head).
cudaError_t reshape_and_cache(const void* key, int64_t skt, int64_t skh, const void* value, int64_t svt,
                              int64_t svh, void* k_cache, const CacheStrides& kcs, void* v_cache,
                              const CacheStrides& vcs, const int64_t* slot_mapping, int64_t T, int64_t Hkv, int64_t D,
                              int64_t NB, int64_t BS, DType t, DType ct, const KvScales& kss, const KvScales& vss,
                              cudaStream_t stream);

// Copy whole blocks src[i] -> dst[i] in both caches [NB, BS, Hkv, D] (strides kcs / vcs, unit along D), as bits:
// t gives the element size (any of kernels.h's dtypes; fp16 for scales seen as [NB, BS, Hkv, 1]).
cudaError_t copy_blocks(void* k_cache, const CacheStrides& kcs, void* v_cache, const CacheStrides& vcs,
                        const int64_t* src, const int64_t* dst, int64_t n, int64_t BS, int64_t Hkv, int64_t D, DType t,
                        cudaStream_t stream);

}  // namespace cuda
}  // namespace llmkern
