// CUDA paged-cache ops: reshape_and_cache (write new K/V rows into their slots) and copy_blocks (copy-on-write of
// whole pages). Offsets are int64: num_blocks * block_size * Hkv * D passes 2^31 for large pools.
#include "common.cuh"
#include "launch.h"

namespace llmkern {
namespace cuda {
namespace {

// grid T; threads walk the token's Hkv * D elements. slot < 0 (padding) and slots past the pool are skipped: the
// glue cannot check a device-side mapping without a sync, so this guard is what keeps a bad slot from writing out
// of bounds (the Triton kernel does the same; on CPU tensors llmkern.paged_ops raises instead).
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

// grid (n, chunks): pair i copies its source block to its destination in words of W bytes; the host picks W so
// that both cache base addresses and block_bytes are multiples of it (copy_blocks_word_bytes), so no tail remains.
template <typename W>
__global__ void copy_blocks_kernel(char* __restrict__ kc, char* __restrict__ vc, const int64_t* __restrict__ src,
                                   const int64_t* __restrict__ dst, int64_t block_bytes) {
  const int64_t s = src[blockIdx.x] * block_bytes, d = dst[blockIdx.x] * block_bytes;
  const int64_t words = block_bytes / static_cast<int64_t>(sizeof(W));
  const int64_t stride = static_cast<int64_t>(gridDim.y) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x; i < words; i += stride) {
    reinterpret_cast<W*>(kc + d)[i] = reinterpret_cast<const W*>(kc + s)[i];
    reinterpret_cast<W*>(vc + d)[i] = reinterpret_cast<const W*>(vc + s)[i];
  }
}

}  // namespace

cudaError_t reshape_and_cache(const void* key, int64_t skt, int64_t skh, const void* value, int64_t svt,
                              int64_t svh, void* k_cache, void* v_cache, const int64_t* slot_mapping, int64_t T,
                              int64_t Hkv, int64_t D, int64_t num_slots, DType t, cudaStream_t stream) {
  if (T == 0) return cudaSuccess;
  const int threads = Hkv * D >= 512 ? 512 : 128;
  const unsigned grid = static_cast<unsigned>(reshape_and_cache_grid(T).x);
#define C_(TI, TT)                                                                                          \
  if (t == TI) {                                                                                            \
    reshape_and_cache_kernel<TT><<<grid, threads, 0, stream>>>((const TT*)key, skt, skh, (const TT*)value, svt, \
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
  const Grid gr = copy_blocks_grid(n, block_bytes);
  const dim3 grid(static_cast<unsigned>(gr.x), static_cast<unsigned>(gr.y));
  char* kc = static_cast<char*>(k_cache);
  char* vc = static_cast<char*>(v_cache);
  switch (copy_blocks_word_bytes(k_cache, v_cache, block_bytes)) {
    case 16: copy_blocks_kernel<int4><<<grid, 256, 0, stream>>>(kc, vc, src, dst, block_bytes); break;
    case 8: copy_blocks_kernel<int2><<<grid, 256, 0, stream>>>(kc, vc, src, dst, block_bytes); break;
    case 4: copy_blocks_kernel<int><<<grid, 256, 0, stream>>>(kc, vc, src, dst, block_bytes); break;
    case 2: copy_blocks_kernel<short><<<grid, 256, 0, stream>>>(kc, vc, src, dst, block_bytes); break;
    default: copy_blocks_kernel<char><<<grid, 256, 0, stream>>>(kc, vc, src, dst, block_bytes); break;
  }
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace llmkern
