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
