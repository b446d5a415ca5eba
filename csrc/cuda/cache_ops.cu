// CUDA paged-cache ops: reshape_and_cache (write new K/V rows into their slots) and copy_blocks (copy-on-write of
// whole pages). The caches may be strided views (kernels.h's CacheStrides: any element strides along blocks, slots
// and heads, K's and V's each their own; head_dim contiguous). Offsets are int64: a pool passes 2^31 elements.
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
                                         const T* __restrict__ value, int64_t svt, int64_t svh,
                                         T* __restrict__ kc,  // [NB, BS, Hkv, D] strides kcs
                                         CacheStrides kcs,
                                         T* __restrict__ vc,  // [NB, BS, Hkv, D] strides vcs
                                         CacheStrides vcs, const int64_t* __restrict__ slots, int64_t Hkv,
                                         int64_t D, int64_t NB, int64_t BS) {
  const int64_t t = blockIdx.x;
  const int64_t slot = slots[t];
  if (slot < 0 || slot >= NB * BS) return;
  const int64_t blk = slot / BS, off = slot % BS;
  T* kd = kc + blk * kcs.sb + off * kcs.ss;
  T* vd = vc + blk * vcs.sb + off * vcs.ss;
  for (int64_t j = threadIdx.x; j < Hkv * D; j += blockDim.x) {
    const int64_t h = j / D, d = j % D;
    kd[h * kcs.sh + d] = key[t * skt + h * skh + d];
    vd[h * vcs.sh + d] = value[t * svt + h * svh + d];
  }
}

// grid (n, chunks): pair i copies its source block to its destination in words of W bytes. Each page's elements
// fill one dense span of block_bytes (page_is_dense), K's pages k_stride bytes apart, V's v_stride; the host picks
// W so that both cache base addresses, block_bytes and both strides are multiples of it (copy_blocks_word_bytes), so
// no tail remains.
template <typename W>
__global__ void copy_blocks_kernel(char* __restrict__ kc, char* __restrict__ vc, const int64_t* __restrict__ src,
                                   const int64_t* __restrict__ dst, int64_t block_bytes, int64_t k_stride,
                                   int64_t v_stride) {
  const int64_t ks = src[blockIdx.x] * k_stride, kd = dst[blockIdx.x] * k_stride;
  const int64_t vs = src[blockIdx.x] * v_stride, vd = dst[blockIdx.x] * v_stride;
  const int64_t words = block_bytes / static_cast<int64_t>(sizeof(W));
  const int64_t stride = static_cast<int64_t>(gridDim.y) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x; i < words; i += stride) {
    reinterpret_cast<W*>(kc + kd)[i] = reinterpret_cast<const W*>(kc + ks)[i];
    reinterpret_cast<W*>(vc + vd)[i] = reinterpret_cast<const W*>(vc + vs)[i];
  }
}

// grid (n, chunks): the same copy element by element through the caches' strides, for pages whose elements do not
// fill a dense span (heads of K and V interleaved in one pool, a padded head stride, ...).
template <typename T>
__global__ void copy_blocks_strided_kernel(T* __restrict__ kc,  // [NB, BS, Hkv, D] strides kcs
                                           CacheStrides kcs,
                                           T* __restrict__ vc,  // [NB, BS, Hkv, D] strides vcs
                                           CacheStrides vcs, const int64_t* __restrict__ src,
                                           const int64_t* __restrict__ dst, int64_t BS, int64_t Hkv, int64_t D) {
  const int64_t s = src[blockIdx.x], d = dst[blockIdx.x];
  const int64_t elems = BS * Hkv * D;
  const int64_t stride = static_cast<int64_t>(gridDim.y) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x; i < elems; i += stride) {
    const int64_t e = i % D, row = i / D, h = row % Hkv, slot = row / Hkv;
    const int64_t ko = slot * kcs.ss + h * kcs.sh + e, vo = slot * vcs.ss + h * vcs.sh + e;
    kc[d * kcs.sb + ko] = kc[s * kcs.sb + ko];
    vc[d * vcs.sb + vo] = vc[s * vcs.sb + vo];
  }
}

}  // namespace

cudaError_t reshape_and_cache(const void* key, int64_t skt, int64_t skh, const void* value, int64_t svt,
                              int64_t svh, void* k_cache, const CacheStrides& kcs, void* v_cache,
                              const CacheStrides& vcs, const int64_t* slot_mapping, int64_t T, int64_t Hkv, int64_t D,
                              int64_t NB, int64_t BS, DType t, cudaStream_t stream) {
  if (T == 0) return cudaSuccess;
  const int threads = Hkv * D >= 512 ? 512 : 128;
  const unsigned grid = static_cast<unsigned>(reshape_and_cache_grid(T).x);
#define C_(TI, TT)                                                                                          \
  if (t == TI) {                                                                                            \
    reshape_and_cache_kernel<TT><<<grid, threads, 0, stream>>>((const TT*)key, skt, skh, (const TT*)value, svt, \
                                                           svh, (TT*)k_cache, kcs, (TT*)v_cache, vcs,       \
                                                           slot_mapping, Hkv, D, NB, BS);                   \
    return cudaGetLastError();                                                                              \
  }
  C_(cpu::kF32, float) C_(cpu::kF16, __half) C_(cpu::kBF16, __nv_bfloat16)
#undef C_
  return cudaErrorInvalidValue;
}

cudaError_t copy_blocks(void* k_cache, const CacheStrides& kcs, void* v_cache, const CacheStrides& vcs,
                        const int64_t* src, const int64_t* dst, int64_t n, int64_t BS, int64_t Hkv, int64_t D, DType t,
                        cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  const int64_t elem = t == cpu::kF32 ? 4 : 2;
  const int64_t block_bytes = BS * Hkv * D * elem;
  const Grid gr = copy_blocks_grid(n, block_bytes);
  const dim3 grid(static_cast<unsigned>(gr.x), static_cast<unsigned>(gr.y));
  if (!page_is_dense(kcs, BS, Hkv, D) || !page_is_dense(vcs, BS, Hkv, D)) {
#define C_(TI, TT)                                                                                               \
  if (t == TI) {                                                                                                 \
    copy_blocks_strided_kernel<TT><<<grid, 256, 0, stream>>>((TT*)k_cache, kcs, (TT*)v_cache, vcs, src, dst, BS, \
                                                             Hkv, D);                                            \
    return cudaGetLastError();                                                                                   \
  }
    C_(cpu::kF32, float) C_(cpu::kF16, __half) C_(cpu::kBF16, __nv_bfloat16)
#undef C_
    return cudaErrorInvalidValue;
  }
  const int64_t k_stride = kcs.sb * elem, v_stride = vcs.sb * elem;
  char* kc = static_cast<char*>(k_cache);
  char* vc = static_cast<char*>(v_cache);
#define L_(W) copy_blocks_kernel<W><<<grid, 256, 0, stream>>>(kc, vc, src, dst, block_bytes, k_stride, v_stride)
  switch (copy_blocks_word_bytes(k_cache, v_cache, block_bytes, k_stride, v_stride)) {
    case 16: L_(int4); break;
    case 8: L_(int2); break;
    case 4: L_(int); break;
    case 2: L_(short); break;
    default: L_(char); break;
  }
#undef L_
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace llmkern
