// CUDA paged-cache ops: reshape_and_cache (write new K/V rows into their slots) and copy_blocks (copy-on-write of
// whole pages). The caches may be strided views (kernels.h's CacheStrides: any element strides along blocks, slots
// and heads, K's and V's each their own; head_dim contiguous). Offsets are int64: a pool passes 2^31 elements.
#include <cuda_fp8.h>

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

// One row x[0 .. D) (unit stride) of an 8-bit cache, by one warp: codes to dst and the fp16 scale to *scale, as
// llmkern/reference.py's quantize_kv in fp32 — amax over the row (a warp reduction), s = fp16(clamp(amax / QMAX,
// 2^-14, 65504)) rounded to nearest even, codes x / s clamped to +-QMAX and rounded to nearest even (int8) or to
// e4m3 (cuda_fp8.h, nearest even). Both divisions are IEEE (__fdiv_rn), as on the CPU.
template <bool kInt8, typename T>
__device__ __forceinline__ void quantize_row(const T* __restrict__ x, int64_t D, uint8_t* __restrict__ dst,
                                             __half* __restrict__ scale, int lane) {
  constexpr float qmax = kInt8 ? 127.f : 448.f;
  float amax = 0.f;
  for (int64_t d = lane; d < D; d += 32) amax = fmaxf(amax, fabsf(ld(x + d)));
  for (int o = 16; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
  const __half sh = __float2half_rn(fminf(fmaxf(__fdiv_rn(amax, qmax), 0x1p-14f), 65504.f));
  if (lane == 0) *scale = sh;
  const float sf = __half2float(sh);
  for (int64_t d = lane; d < D; d += 32) {
    const float y = fminf(fmaxf(__fdiv_rn(ld(x + d), sf), -qmax), qmax);
    if constexpr (kInt8)
      dst[d] = static_cast<uint8_t>(static_cast<int8_t>(__float2int_rn(y)));
    else
      dst[d] = static_cast<uint8_t>(__nv_cvt_float_to_fp8(y, __NV_SATFINITE, __NV_E4M3));
  }
}

// 8-bit pages: grid reshape_and_cache_quant_grid (tokens on x, groups of kQuantWarps KV heads on y), one warp per
// (token, head) quantizes its K row and its V row. Slots outside the pool are skipped as above.
template <bool kInt8, typename T>
__global__ void reshape_and_cache_quant_kernel(const T* __restrict__ key, int64_t skt, int64_t skh,
                                               const T* __restrict__ value, int64_t svt, int64_t svh,
                                               uint8_t* __restrict__ kc, CacheStrides kcs,
                                               uint8_t* __restrict__ vc, CacheStrides vcs, KvScales kss,
                                               KvScales vss, const int64_t* __restrict__ slots, int64_t Hkv,
                                               int64_t D, int64_t NB, int64_t BS) {
  const int64_t t = blockIdx.x, h = static_cast<int64_t>(blockIdx.y) * kQuantWarps + threadIdx.x / 32;
  const int64_t slot = slots[t];
  if (h >= Hkv || slot < 0 || slot >= NB * BS) return;  // uniform per warp
  const int64_t blk = slot / BS, off = slot % BS;
  const int lane = threadIdx.x & 31;
  quantize_row<kInt8>(key + t * skt + h * skh, D, kc + blk * kcs.sb + off * kcs.ss + h * kcs.sh,
                      static_cast<__half*>(kss.p) + blk * kss.sb + off * kss.ss + h * kss.sh, lane);
  quantize_row<kInt8>(value + t * svt + h * svh, D, vc + blk * vcs.sb + off * vcs.ss + h * vcs.sh,
                      static_cast<__half*>(vss.p) + blk * vss.sb + off * vss.ss + h * vss.sh, lane);
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
// fill a dense span (heads of K and V interleaved in one pool, a padded head stride, ...). T: an unsigned integer
// of the element's size (bits are copied, whatever the dtype).
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
                              int64_t NB, int64_t BS, DType t, DType ct, const KvScales& kss, const KvScales& vss,
                              cudaStream_t stream) {
  if (T == 0) return cudaSuccess;
  if (cpu::is_8bit(ct)) {
    if (kss.p == nullptr || vss.p == nullptr) return cudaErrorInvalidValue;
    const Grid g = reshape_and_cache_quant_grid(T, Hkv);
    const dim3 grid(static_cast<unsigned>(g.x), static_cast<unsigned>(g.y));
#define Q_(TI, TT, I8)                                                                                             \
  if (t == TI && (ct == cpu::kI8) == I8) {                                                                         \
    reshape_and_cache_quant_kernel<I8, TT><<<grid, 32 * kQuantWarps, 0, stream>>>(                                 \
        (const TT*)key, skt, skh, (const TT*)value, svt, svh, (uint8_t*)k_cache, kcs, (uint8_t*)v_cache, vcs, kss, \
        vss, slot_mapping, Hkv, D, NB, BS);                                                                        \
    return cudaGetLastError();                                                                                     \
  }
    Q_(cpu::kF32, float, true) Q_(cpu::kF16, __half, true) Q_(cpu::kBF16, __nv_bfloat16, true)
    Q_(cpu::kF32, float, false) Q_(cpu::kF16, __half, false) Q_(cpu::kBF16, __nv_bfloat16, false)
#undef Q_
    return cudaErrorInvalidValue;
  }
  if (ct != t) return cudaErrorInvalidValue;
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
  const int64_t elem = cpu::dtype_bytes(t);
  const int64_t block_bytes = BS * Hkv * D * elem;
  const Grid gr = copy_blocks_grid(n, block_bytes);
  const dim3 grid(static_cast<unsigned>(gr.x), static_cast<unsigned>(gr.y));
  if (!page_is_dense(kcs, BS, Hkv, D) || !page_is_dense(vcs, BS, Hkv, D)) {
#define C_(BYTES, TT)                                                                                            \
  if (elem == BYTES) {                                                                                           \
    copy_blocks_strided_kernel<TT><<<grid, 256, 0, stream>>>((TT*)k_cache, kcs, (TT*)v_cache, vcs, src, dst, BS, \
                                                             Hkv, D);                                            \
    return cudaGetLastError();                                                                                   \
  }
    C_(4, uint32_t) C_(2, uint16_t) C_(1, uint8_t)
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
