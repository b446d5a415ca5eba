// The vector-width templated kernels (attention_vec.h, linear_vec.h) instantiated for AVX-512 F/BW/VL/DQ +
// AVX512-BF16 + FMA + F16C: 16 fp32 lanes, bf16 dot products by VDPBF16PS (VecAvx512 in vec.h). For CPUs with all of these (AMD Zen 4 and
// later, Intel Sapphire Rapids and later); dispatch.cpp uses it when the active instruction set is AVX-512, and the
// AVX2 instantiation (vec_avx2.cpp) on AVX-512 CPUs without AVX512-BF16 and for head_dim 80 (five 16-lane pieces:
// the bf16 dot takes them in pairs). Other architectures compile this file empty.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <new>
#include <vector>

#include "kernels.h"

#if defined(__x86_64__)

#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma,f16c")
// GCC 12's AVX-512 intrinsics pass _mm512_undefined_ps() and the like as the unused source of their masked
// builtins, which -W(maybe-)uninitialized flags once inlined.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#define LLMKERN_VEC_AVX512
#include "attention_vec.h"
#include "linear_vec.h"

namespace llmkern {
namespace cpu {
namespace avx512_vec {

namespace {
// AVX512-BF16 is checked at run time like the rest: the bf16 scores use it, and the one instantiation serves every
// dtype, so a CPU without it gets the AVX2 kernel for all of them.
bool cpu_ok() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}
const bool kCpuOk = cpu_ok();
}  // namespace

// ct: the cache's dtype, t (float pages) or 8-bit codes.
bool attention_supported(DType t, int64_t D, DType ct) {
  return kCpuOk && (t == kF32 || t == kF16 || t == kBF16) && (ct == t || is_8bit(ct)) && vec_head_dim(D, ct) &&
         D % (2 * VecAvx512::W) == 0;
}

int paged_decode_stage1(const DecodeArgs& a, int64_t i0, int64_t i1) {
  if (!attention_supported(a.t, a.D, a.ct)) return kNoKernel;
  return run_attention<VecAvx512, DecodeRange>(a, i0, i1);
}

int paged_prefill(const PrefillArgs& a, int64_t i0, int64_t i1) {
  if (!attention_supported(a.t, a.D, a.ct) || a.tile <= 0) return kNoKernel;
  return run_attention<VecAvx512, PrefillRange>(a, i0, i1);
}

bool linear_supported(DType t) { return kCpuOk && (t == kF32 || t == kBF16); }

int linear(const LinearArgs& a, int64_t blk0, int64_t blk1) {
  if (!avx512_vec::linear_supported(a.t)) return kNoKernel;  // qualified: kernels.h has one too
  return run_linear<VecAvx512>(a, blk0, blk1);
}

}  // namespace avx512_vec
}  // namespace cpu
}  // namespace llmkern

#endif  // __x86_64__ (other architectures: dispatch.cpp's stubs)
