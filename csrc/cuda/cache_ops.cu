// CUDA paged-cache ops: reshape_and_cache (write new K/V rows into their slots) and copy_blocks (copy-on-write of
// whole pages). Offsets are int64: num_blocks * block_size * Hkv * D passes 2^31 for large pools.
#include "common.cuh"
#include "launch.h"

namespace llmkern {
namespace cuda {
namespace {

// grid T; threads walk the token's Hkv * D elements. slot < 0 (padding) and slots past the pool are skipped (the
// glue checks the mapping on the host before launching, so the second case never reaches here).
template <typename T>
__global__ void reshape_and_cache_kernel(const T* __restrict__ key, int64_t skt, int64_t skh,
                                         const T* __restrict__ value, int64_t svt, int64_t svh, T* __restrict__ kc,
                                         T* __restrict__ vc, const int64_t* __restrict__ slots, int64_t Hkv,
                                         int64_t D, int64_t num_slots) {
  const int64_t t = blockIdx.x;
  const int64_t slot = slots[t];
  if (slot < 0 || slot >= num_slots) return;
  for (int64_t j = threadIdx.x; j < Hkv * D; j += blockDim.x) {
    const int64_t h = j / D, d = j % D;
    kc[slot * Hkv * D + j] = key[t * skt + h * skh + d];
    vc[slot * Hkv * D + j] = value[t * svt + h * svh + d];
  }
}

// grid (n, chunks): pair i copies its source block to its destination, 16-byte words when aligned.
__global__ void copy_blocks_kernel(char* __restrict__ kc, char* __restrict__ vc, const int64_t* __restrict__ src,
                                   const int64_t* __restrict__ dst, int64_t block_bytes) {
  const int64_t s = src[blockIdx.x] * block_bytes, d = dst[blockIdx.x] * block_bytes;
  const int64_t words = block_bytes / 16;
  const int64_t stride = static_cast<int64_t>(gridDim.y) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x; i < words; i += stride) {
    reinterpret_cast<int4*>(kc + d)[i] = reinterpret_cast<const int4*>(kc + s)[i];
    reinterpret_cast<int4*>(vc + d)[i] = reinterpret_cast<const int4*>(vc + s)[i];
  }
  for (int64_t i = words * 16 + static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x; i < block_bytes;
       i += stride) {
    kc[d + i] = kc[s + i];
    vc[d + i] = vc[s + i];
  }
}

}  // namespace

cudaError_t reshape_and_cache(const void* key, int64_t skt, int64_t skh, const void* value, int64_t svt,
                              int64_t svh, void* k_cache, void* v_cache, const int64_t* slot_mapping, int64_t T,
                              int64_t Hkv, int64_t D, int64_t num_slots, DType t, cudaStream_t stream) {
  if (T == 0) return cudaSuccess;
  const int threads = Hkv * D >= 512 ? 512 : 128;
#define C_(TI, TT)                                                                                          \
  if (t == TI) {                                                                                            \
    reshape_and_cache_kernel<TT><<<T, threads, 0, stream>>>((const TT*)key, skt, skh, (const TT*)value, svt, \
                                                           svh, (TT*)k_cache, (TT*)v_cache, slot_mapping, Hkv, \
                                                           D, num_slots);                                   \
    return cudaGetLastError();                                                                              \
  }
  C_(cpu::kF32, float) C_(cpu::kF16, __half) C_(cpu::kBF16, __nv_bfloat16)
#undef C_
  return cudaErrorInvalidValue;
}

cudaError_t copy_blocks(void* k_cache, void* v_cache, const int64_t* src, const int64_t* dst, int64_t n,
                        int64_t block_elems, DType t, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  const int64_t elem = t == cpu::kF32 ? 4 : 2;
  const int64_t block_bytes = block_elems * elem;
  const unsigned chunks = static_cast<unsigned>((block_bytes / 16 + 255) / 256 < 64 ? (block_bytes / 16 + 255) / 256 + 1 : 64);
  copy_blocks_kernel<<<dim3(static_cast<unsigned>(n), chunks), 256, 0, stream>>>(
      static_cast<char*>(k_cache), static_cast<char*>(v_cache), src, dst, block_bytes);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace llmkern
