// Run-time choice of the instruction set for the CPU kernels: the extension is built once (no -march=native, no
// hardware detection at install time) and picks AVX-512, AVX2 or baseline code on the machine it runs on, capped by
// LLMKERN_CPU_ISA; for attention and Linear it also picks which kernel serves (decode_kernel & co., kernels.h).
#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <string>

#include "kernels.h"

namespace llmkern {
namespace cpu {

#define LLMKERN_DECLARE_ISA(NS)                                                                                   \
  namespace NS {                                                                                                  \
  int rms_norm(const void*, int64_t, int64_t, const void*, int64_t, void*, int64_t, int64_t, int64_t, int64_t,     \
               int64_t, float, float, DType, DType, DType);                                                       \
  int fused_add_rms_norm(const void*, int64_t, int64_t, const void*, int64_t, int64_t, const void*, int64_t,      \
                         void*, int64_t, int64_t, void*, int64_t, int64_t, int64_t, int64_t, int64_t, float, DType, \
                         DType, DType);                                                                           \
  int rope(const RopeArgs&, const void*, int64_t, int64_t, int64_t, const void*, int64_t, int64_t, int64_t,        \
           int64_t, int64_t, int64_t, int64_t, int64_t, DType, DType);                                            \
  int silu_and_mul(const void*, int64_t, int64_t, const void*, int64_t, int64_t, void*, int64_t, int64_t, int64_t, \
                   int64_t, int64_t, DType);                                                                      \
  int reshape_and_cache(const void*, int64_t, int64_t, int64_t, const void*, int64_t, int64_t, int64_t, void*,     \
                        const CacheStrides&, void*, const CacheStrides&, const int64_t*, int64_t, int64_t, int64_t, \
                        int64_t, int64_t, int64_t, DType, DType, const KvScales&, const KvScales&);               \
  int paged_decode_stage1(const DecodeArgs&, int64_t, int64_t);                                                   \
  int paged_decode_reduce(const DecodeArgs&, void*, int64_t, int64_t, int64_t, int64_t, int64_t);                 \
  }

LLMKERN_DECLARE_ISA(avx512)
LLMKERN_DECLARE_ISA(avx2)
LLMKERN_DECLARE_ISA(generic)

namespace {

Isa detect() {
#if defined(__x86_64__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("f16c"))
    return kIsaAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
    return kIsaAvx2;
#endif
  return kIsaGeneric;
}

// The hardware's ISA, LLMKERN_CPU_ISA's cap and the active ISA, set up on first use (so no other translation unit's
// static initialisation can see them unset).
struct IsaState {
  Isa hardware = detect();
  Isa cap = hardware;
  std::string env_invalid;  // LLMKERN_CPU_ISA when it names no ISA
  std::atomic<int> active{kIsaGeneric};
  IsaState() {
    const char* env = std::getenv("LLMKERN_CPU_ISA");
    Isa want;
    if (env != nullptr && *env != '\0') {
      if (isa_from_name(env, &want))
        cap = std::min(want, hardware);
      else
        env_invalid = env;
    }
    active = cap;
  }
};

IsaState& isa_state() {
  static IsaState s;
  return s;
}

Isa active_isa() { return static_cast<Isa>(isa_state().active.load(std::memory_order_relaxed)); }

}  // namespace

#define LLMKERN_DISPATCH(FN, ...)                            \
  switch (active_isa()) {                                    \
    case kIsaAvx512: return avx512::FN(__VA_ARGS__);         \
    case kIsaAvx2: return avx2::FN(__VA_ARGS__);             \
    default: return generic::FN(__VA_ARGS__);                \
  }

const char* isa_name(Isa isa) {
  switch (isa) {
    case kIsaAvx512: return "avx512";
    case kIsaAvx2: return "avx2";
    default: return "generic";
  }
}

const char* isa_name() { return isa_name(active_isa()); }

bool isa_from_name(const char* name, Isa* isa) {
  for (Isa i : {kIsaGeneric, kIsaAvx2, kIsaAvx512})
    if (std::strcmp(name, isa_name(i)) == 0) {
      *isa = i;
      return true;
    }
  return false;
}

Isa hardware_isa() { return isa_state().hardware; }
Isa isa_cap() { return isa_state().cap; }
const char* isa_env_invalid() { return isa_state().env_invalid.empty() ? nullptr : isa_state().env_invalid.c_str(); }
Isa set_isa(Isa isa) { return static_cast<Isa>(isa_state().active.exchange(std::min(isa, isa_cap()))); }

const char* status_string(int status) {
  switch (status) {
    case kOk: return "ok";
    case kBadDType: return "unsupported dtype combination";
    case kBadShape: return "unsupported shape";
    case kBadSlot: return "slot_mapping holds a slot past the end of the cache";
    default: return "no kernel";
  }
}

int rms_norm(const void* x, int64_t sxm, int64_t sxn, const void* w, int64_t sw, void* y, int64_t sym, int64_t syn,
             int64_t m0, int64_t m1, int64_t N, float eps, float offset, DType xt, DType wt, DType yt) {
  LLMKERN_DISPATCH(rms_norm, x, sxm, sxn, w, sw, y, sym, syn, m0, m1, N, eps, offset, xt, wt, yt)
}

int fused_add_rms_norm(const void* x, int64_t sxm, int64_t sxn, const void* r, int64_t srm, int64_t srn,
                       const void* w, int64_t sw, void* y, int64_t sym, int64_t syn, void* ro, int64_t srom,
                       int64_t sron, int64_t m0, int64_t m1, int64_t N, float eps, DType xt, DType wt, DType yt) {
  LLMKERN_DISPATCH(fused_add_rms_norm, x, sxm, sxn, r, srm, srn, w, sw, y, sym, syn, ro, srom, sron, m0, m1, N, eps,
                   xt, wt, yt)
}

int rope(const RopeArgs& a, const void* cos, int64_t scb, int64_t scs, int64_t scd, const void* sin, int64_t ssb,
         int64_t sss, int64_t ssd, int64_t S, int64_t D, int64_t RD, int64_t t0, int64_t t1, DType xt, DType ct) {
  LLMKERN_DISPATCH(rope, a, cos, scb, scs, scd, sin, ssb, sss, ssd, S, D, RD, t0, t1, xt, ct)
}

int silu_and_mul(const void* g, int64_t sgm, int64_t sgi, const void* u, int64_t sum_, int64_t sui, void* o,
                 int64_t som, int64_t soi, int64_t m0, int64_t m1, int64_t I, DType t) {
  LLMKERN_DISPATCH(silu_and_mul, g, sgm, sgi, u, sum_, sui, o, som, soi, m0, m1, I, t)
}

int reshape_and_cache(const void* key, int64_t skt, int64_t skh, int64_t skd, const void* value, int64_t svt,
                      int64_t svh, int64_t svd, void* k_cache, const CacheStrides& kcs, void* v_cache,
                      const CacheStrides& vcs, const int64_t* slots, int64_t t0, int64_t t1, int64_t Hkv, int64_t D,
                      int64_t NB, int64_t BS, DType t, DType ct, const KvScales& kss, const KvScales& vss) {
  LLMKERN_DISPATCH(reshape_and_cache, key, skt, skh, skd, value, svt, svh, svd, k_cache, kcs, v_cache, vcs, slots, t0,
                   t1, Hkv, D, NB, BS, t, ct, kss, vss)
}

namespace avx512_vec {
bool attention_supported(DType t, int64_t D, DType ct);
int paged_decode_stage1(const DecodeArgs&, int64_t, int64_t);
int paged_prefill(const PrefillArgs&, int64_t, int64_t);
bool linear_supported(DType t);
int linear(const LinearArgs&, int64_t, int64_t);
}  // namespace avx512_vec

namespace avx2_vec {
bool attention_supported(DType t, int64_t D, DType ct);
int paged_decode_stage1(const DecodeArgs&, int64_t, int64_t);
int paged_prefill(const PrefillArgs&, int64_t, int64_t);
bool linear_supported(DType t);
int linear(const LinearArgs&, int64_t, int64_t);
}  // namespace avx2_vec

#if !defined(__x86_64__)
// Other architectures compile the x86-only translation units empty: their entry points serve nothing.
namespace avx512_vec {
bool attention_supported(DType, int64_t, DType) { return false; }
int paged_decode_stage1(const DecodeArgs&, int64_t, int64_t) { return kNoKernel; }
int paged_prefill(const PrefillArgs&, int64_t, int64_t) { return kNoKernel; }
bool linear_supported(DType) { return false; }
int linear(const LinearArgs&, int64_t, int64_t) { return kNoKernel; }
}  // namespace avx512_vec
namespace avx2_vec {
bool attention_supported(DType, int64_t, DType) { return false; }
int paged_decode_stage1(const DecodeArgs&, int64_t, int64_t) { return kNoKernel; }
int paged_prefill(const PrefillArgs&, int64_t, int64_t) { return kNoKernel; }
bool linear_supported(DType) { return false; }
int linear(const LinearArgs&, int64_t, int64_t) { return kNoKernel; }
}  // namespace avx2_vec
#endif

namespace {
std::atomic<bool> fast_attention_on{true};
}

const char* kernel_name(Kernel k) {
  switch (k) {
    case kKernelAvx512: return "avx512";
    case kKernelAvx2: return "avx2";
    case kKernelPortable: return "portable";
    default: return "reference";
  }
}

// The best vectorised attention kernel the active ISA allows for (t, D, cache dtype ct): attention_vec.h
// instantiated for AVX-512 (vec_avx512.cpp) or AVX2 (vec_avx2.cpp). An AVX-512 CPU without AVX512-BF16, or a
// head_dim the AVX-512 instantiation does not serve (80), gets the AVX2 one.
Kernel prefill_kernel(DType t, int64_t D, DType ct) {
  if (!fast_attention_on.load(std::memory_order_relaxed)) return kKernelNone;
  const Isa isa = active_isa();
  if (isa >= kIsaAvx512 && avx512_vec::attention_supported(t, D, ct)) return kKernelAvx512;
  if (isa >= kIsaAvx2 && avx2_vec::attention_supported(t, D, ct)) return kKernelAvx2;
  return kKernelNone;
}

Kernel decode_kernel(DType t, int64_t D, DType ct) {
  const Kernel k = prefill_kernel(t, D, ct);
  return k == kKernelNone ? kKernelPortable : k;
}

Kernel linear_kernel(DType t) {
  const Isa isa = active_isa();
  if (isa >= kIsaAvx512 && avx512_vec::linear_supported(t)) return kKernelAvx512;
  if (isa >= kIsaAvx2 && avx2_vec::linear_supported(t)) return kKernelAvx2;
  return kKernelNone;
}

bool fast_attention_supported(DType t, int64_t D, DType ct) { return prefill_kernel(t, D, ct) != kKernelNone; }

bool set_fast_attention(bool on) { return fast_attention_on.exchange(on); }

int paged_decode_stage1(const DecodeArgs& a, int64_t i0, int64_t i1) {
  switch (decode_kernel(a.t, a.D, a.ct)) {
    case kKernelAvx512: return avx512_vec::paged_decode_stage1(a, i0, i1);
    case kKernelAvx2: return avx2_vec::paged_decode_stage1(a, i0, i1);
    default: LLMKERN_DISPATCH(paged_decode_stage1, a, i0, i1)
  }
}

int paged_prefill(const PrefillArgs& a, int64_t i0, int64_t i1) {
  switch (prefill_kernel(a.t, a.D, a.ct)) {
    case kKernelAvx512: return avx512_vec::paged_prefill(a, i0, i1);
    case kKernelAvx2: return avx2_vec::paged_prefill(a, i0, i1);
    default: return kNoKernel;
  }
}

bool linear_supported(DType t) { return linear_kernel(t) != kKernelNone; }

int linear(const LinearArgs& a, int64_t b0, int64_t b1) {
  switch (linear_kernel(a.t)) {
    case kKernelAvx512: return avx512_vec::linear(a, b0, b1);
    case kKernelAvx2: return avx2_vec::linear(a, b0, b1);
    default: return kNoKernel;
  }
}

int paged_decode_reduce(const DecodeArgs& a, void* out, int64_t sob, int64_t soh, int64_t sod, int64_t i0,
                        int64_t i1) {
  LLMKERN_DISPATCH(paged_decode_reduce, a, out, sob, soh, sod, i0, i1)
}

}  // namespace cpu
}  // namespace llmkern
