// Run-time choice of the instruction set for the CPU kernels: the extension is built once (no -march=native, no
// hardware detection at install time) and picks AVX-512, AVX2 or baseline code on the machine it runs on.
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
                        void*, const int64_t*, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, DType);       \
  int paged_decode_stage1(const DecodeArgs&, int64_t, int64_t);                                                   \
  int paged_decode_reduce(const DecodeArgs&, void*, int64_t, int64_t, int64_t, int64_t, int64_t);                 \
  }

LLMKERN_DECLARE_ISA(avx512)
LLMKERN_DECLARE_ISA(avx2)
LLMKERN_DECLARE_ISA(generic)

namespace {
enum class Isa { kAvx512, kAvx2, kGeneric };

Isa detect() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("f16c"))
    return Isa::kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
    return Isa::kAvx2;
  return Isa::kGeneric;
}

const Isa kIsa = detect();
}  // namespace

#define LLMKERN_DISPATCH(FN, ...)                            \
  switch (kIsa) {                                            \
    case Isa::kAvx512: return avx512::FN(__VA_ARGS__);       \
    case Isa::kAvx2: return avx2::FN(__VA_ARGS__);           \
    default: return generic::FN(__VA_ARGS__);                \
  }

const char* isa_name() {
  switch (kIsa) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "generic";
  }
}

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
                      int64_t svh, int64_t svd, void* k_cache, void* v_cache, const int64_t* slots, int64_t t0,
                      int64_t t1, int64_t Hkv, int64_t D, int64_t NB, int64_t BS, DType t) {
  LLMKERN_DISPATCH(reshape_and_cache, key, skt, skh, skd, value, svt, svh, svd, k_cache, v_cache, slots, t0, t1, Hkv,
                   D, NB, BS, t)
}

namespace avx512_attn {
bool supported(DType t, int64_t D);
int paged_decode_stage1(const DecodeArgs&, int64_t, int64_t);
int paged_prefill(const PrefillArgs&, int64_t, int64_t);
}  // namespace avx512_attn

namespace {
bool fast_attention_on = true;
}

bool fast_attention_supported(DType t, int64_t D) { return fast_attention_on && avx512_attn::supported(t, D); }

bool set_fast_attention(bool on) {
  const bool was = fast_attention_on;
  fast_attention_on = on;
  return was;
}

int paged_decode_stage1(const DecodeArgs& a, int64_t i0, int64_t i1) {
  if (fast_attention_supported(a.t, a.D)) return avx512_attn::paged_decode_stage1(a, i0, i1);
  LLMKERN_DISPATCH(paged_decode_stage1, a, i0, i1)
}

namespace avx512_linear {
bool supported(DType t);
int linear(const LinearArgs&, int64_t, int64_t);
}  // namespace avx512_linear

bool linear_supported(DType t) { return avx512_linear::supported(t); }

int linear(const LinearArgs& a, int64_t b0, int64_t b1) { return avx512_linear::linear(a, b0, b1); }

int paged_prefill(const PrefillArgs& a, int64_t i0, int64_t i1) {
  if (fast_attention_supported(a.t, a.D)) return avx512_attn::paged_prefill(a, i0, i1);
  return kNoKernel;
}

int paged_decode_reduce(const DecodeArgs& a, void* out, int64_t sob, int64_t soh, int64_t sod, int64_t i0,
                        int64_t i1) {
  LLMKERN_DISPATCH(paged_decode_reduce, a, out, sob, soh, sod, i0, i1)
}

}  // namespace cpu
}  // namespace llmkern
