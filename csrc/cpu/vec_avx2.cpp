// The vector-width templated kernels (attention_vec.h, linear_vec.h) instantiated for AVX2 + FMA + F16C: 8 fp32
// lanes (VecAvx2 in vec.h). dispatch.cpp uses them when the active instruction set is AVX2, and on AVX-512 CPUs for
// what the AVX-512 kernels do not serve (no AVX512-BF16, head_dim 80). Other architectures compile this file empty.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <new>
#include <vector>

#include "kernels.h"

#if defined(__x86_64__)

#pragma GCC target("avx2,fma,f16c")
#include "attention_vec.h"
#include "linear_vec.h"

namespace llmkern {
namespace cpu {
namespace avx2_vec {

namespace {
bool cpu_ok() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}
const bool kCpuOk = cpu_ok();
}  // namespace

// ct: the cache's dtype, t (float pages) or 8-bit codes.
bool attention_supported(DType t, int64_t D, DType ct) {
  return kCpuOk && (t == kF32 || t == kF16 || t == kBF16) && (ct == t || is_8bit(ct)) && vec_head_dim(D, ct);
}

int paged_decode_stage1(const DecodeArgs& a, int64_t i0, int64_t i1) {
  if (!attention_supported(a.t, a.D, a.ct)) return kNoKernel;
  return run_attention<VecAvx2, DecodeRange>(a, i0, i1);
}

int paged_prefill(const PrefillArgs& a, int64_t i0, int64_t i1) {
  if (!attention_supported(a.t, a.D, a.ct) || a.tile <= 0) return kNoKernel;
  return run_attention<VecAvx2, PrefillRange>(a, i0, i1);
}

bool linear_supported(DType t) { return kCpuOk && (t == kF32 || t == kBF16); }

int linear(const LinearArgs& a, int64_t blk0, int64_t blk1) {
  if (!avx2_vec::linear_supported(a.t)) return kNoKernel;  // qualified: kernels.h has one too
  return run_linear<VecAvx2>(a, blk0, blk1);
}

}  // namespace avx2_vec
}  // namespace cpu
}  // namespace llmkern

#endif  // __x86_64__ (other architectures: dispatch.cpp's stubs)
