// llmkern CPU kernels: torch-free. Pointers, sizes, strides (in elements) and a work range; no allocation, no
// threads (the caller splits work with at::parallel_for and calls a kernel per range). Every function returns 0 on
// success or a negative Status the caller turns into an exception.
//
// Vocabulary: M rows x N columns for row ops; T tokens, B sequences, Hq query heads, Hkv KV heads, G = Hq / Hkv
// (the GQA group), D head_dim, BS block (page) size.
#pragma once

#include <cstdint>

namespace llmkern {
namespace cpu {

// q, key/value and output dtypes (kF32, kF16, kBF16), and the cache's: the same float types, or 8-bit codes (kI8,
// kF8E4M3: float8_e4m3fn) with one fp16 scale per (token, KV head) beside the pages (llmkern/reference.py's
// quantize_kv: codes = round(x / s), s = fp16(amax / QMAX); dequantized x = code * s in fp32).
enum DType : int { kF32 = 0, kF16 = 1, kBF16 = 2, kI8 = 3, kF8E4M3 = 4 };
constexpr bool is_8bit(DType t) { return t == kI8 || t == kF8E4M3; }
constexpr int64_t dtype_bytes(DType t) { return t == kF32 ? 4 : is_8bit(t) ? 1 : 2; }

enum Status : int {
  kOk = 0,
  kBadDType = -1,
  kBadShape = -2,
  kBadSlot = -3,
  kNoKernel = -4,
};

const char* status_string(int status);

// Instruction sets of the CPU kernels, lowest first. The extension is built once with code for each; at run time
// the active one is the best this CPU runs, capped by LLMKERN_CPU_ISA (avx512|avx2|generic, read when the library
// loads), and set_isa (tests) moves it anywhere up to that cap.
enum Isa : int { kIsaGeneric = 0, kIsaAvx2 = 1, kIsaAvx512 = 2 };

const char* isa_name();        // the active instruction set: "avx512", "avx2" or "generic"
const char* isa_name(Isa isa);
bool isa_from_name(const char* name, Isa* isa);  // false for a name that is none of the three
Isa hardware_isa();  // the best this CPU runs
Isa isa_cap();       // LLMKERN_CPU_ISA, or hardware_isa() when unset; never above hardware_isa()
// LLMKERN_CPU_ISA as found when the library loaded: null when unset or valid, else the value that named no ISA
// (the bindings report it; the kernels then run on hardware_isa()).
const char* isa_env_invalid();
Isa set_isa(Isa isa);  // the caller checks isa <= isa_cap(); returns the previous one

// Which kernel serves an op for (dtype, head_dim) under the active instruction set; kKernelNone: no C++ kernel (the
// caller runs the pure-torch reference). The dispatchers below use the same choice.
// ct: the cache's dtype (t for float pages, kI8 / kF8E4M3 for 8-bit ones).
enum Kernel : int { kKernelNone = 0, kKernelPortable = 1, kKernelAvx2 = 2, kKernelAvx512 = 3 };
const char* kernel_name(Kernel k);  // "reference", "portable", "avx2", "avx512"
Kernel decode_kernel(DType t, int64_t D, DType ct);   // never kKernelNone: the portable kernel serves any D
Kernel prefill_kernel(DType t, int64_t D, DType ct);
inline Kernel decode_kernel(DType t, int64_t D) { return decode_kernel(t, D, t); }
inline Kernel prefill_kernel(DType t, int64_t D) { return prefill_kernel(t, D, t); }
Kernel linear_kernel(DType t);

// y[m, :] = rms_norm(x[m, :]) * w for m in [m_begin, m_end).
//   offset == 0: w * (x * rstd).to(x dtype)   (Llama/Qwen2: rounded to x's dtype before the weight multiply)
//   offset != 0: ((x * rstd) * (offset + w)).to(y dtype)  (Gemma)
// x [M, N] strides (sxm, sxn); w [N] stride sw; y [M, N] strides (sym, syn).
int rms_norm(const void* x, int64_t sxm, int64_t sxn, const void* w, int64_t sw, void* y, int64_t sym,
             int64_t syn, int64_t m_begin, int64_t m_end, int64_t N, float eps, float offset, DType xt, DType wt,
             DType yt);

// ro = (x + r).to(x dtype); y = w * (ro * rstd).to(x dtype). x, r, ro share dtype xt; y has dtype yt.
int fused_add_rms_norm(const void* x, int64_t sxm, int64_t sxn, const void* r, int64_t srm, int64_t srn,
                       const void* w, int64_t sw, void* y, int64_t sym, int64_t syn, void* ro, int64_t srom,
                       int64_t sron, int64_t m_begin, int64_t m_end, int64_t N, float eps, DType xt, DType wt,
                       DType yt);

// Rotate-half RoPE for tokens [t_begin, t_end) of a [B, H, S, D] tensor (token t = b * S + s).
// cos/sin [Bc, S, RD] (scb == 0 when broadcast over the batch). Dims >= RD are copied through.
struct RopeArgs {
  const void* x;
  int64_t sxb, sxh, sxs, sxd;
  void* o;
  int64_t sob, soh, sos, sod;
  int64_t H;
};
int rope(const RopeArgs& a, const void* cos, int64_t scb, int64_t scs, int64_t scd, const void* sin, int64_t ssb,
         int64_t sss, int64_t ssd, int64_t S, int64_t D, int64_t RD, int64_t t_begin, int64_t t_end, DType xt,
         DType ct);

// out[m, i] = silu(g[m, i]).to(dtype) * u[m, i] for m in [m_begin, m_end).
int silu_and_mul(const void* g, int64_t sgm, int64_t sgi, const void* u, int64_t sum_, int64_t sui, void* o,
                 int64_t som, int64_t soi, int64_t m_begin, int64_t m_end, int64_t I, DType t);

// Where the rows of a paged cache [NB, BS, Hkv, D] live: element strides along blocks, slots and heads, any values
// (K and V as the two halves of one [NB, 2, BS, Hkv, D] tensor, head-major [NB, Hkv, BS, D] pages seen as NHD, ...);
// head_dim is contiguous (unit stride). Row (block, slot, head) starts at block * sb + slot * ss + head * sh
// elements, in int64: a pool may pass 2^31 elements. K and V each have their own.
struct CacheStrides {
  int64_t sb, ss, sh;
};

// The fp16 scales of 8-bit pages: scales[NB, BS, Hkv] (one per token row of each KV head) at p, element strides
// along blocks, slots and heads (any values). p null: float pages, no scales. Written by reshape_and_cache only.
struct KvScales {
  void* p;
  int64_t sb, ss, sh;
};

// Write key/value [T, Hkv, D] rows t in [t_begin, t_end) to slot_mapping[t] of caches [NB, BS, Hkv, D] (strides
// kcs / vcs). slot < 0 is padding and skipped; slot >= NB * BS is an error (kBadSlot) and nothing of that row is
// written.
// 8-bit caches (ct kI8 / kF8E4M3): each row is quantized on write as llmkern/reference.py's quantize_kv does (fp32
// amax, the fp16 scale rounded to nearest even and clamped to [2^-14, 65504], codes x / s rounded to nearest even)
// and its scale written to kss / vss (null for float caches, where ct == t); t is key/value's dtype.
int reshape_and_cache(const void* key, int64_t skt, int64_t skh, int64_t skd, const void* value, int64_t svt,
                      int64_t svh, int64_t svd, void* k_cache, const CacheStrides& kcs, void* v_cache,
                      const CacheStrides& vcs, const int64_t* slot_mapping, int64_t t_begin, int64_t t_end,
                      int64_t Hkv, int64_t D, int64_t NB, int64_t BS, DType t, DType ct, const KvScales& kss,
                      const KvScales& vss);

// Paged decode attention, stage 1: one work item = (sequence b, KV head h, split s). It serves all G query heads of
// KV head h, reads each K/V row of its token range once, and writes fp32 partial out [G, D] and log-sum-exp [G]
// (-inf when the range is empty).
struct DecodeArgs {
  const void* q;  // [B, Hq, D] strides (sqb, sqh, sqd)
  int64_t sqb, sqh, sqd;
  const void* k_cache;  // [NB, BS, Hkv, D] strides kcs (unit along D)
  const void* v_cache;  // [NB, BS, Hkv, D] strides vcs (unit along D)
  CacheStrides kcs, vcs;
  const int32_t* block_tables;  // [B, max_blocks] row stride sbt
  int64_t sbt;
  const int32_t* seq_lens;  // [B]
  int64_t B, Hq, Hkv, D, BS, NB;
  int64_t num_splits;
  int64_t split_len;  // tokens per split (a multiple of BS)
  float scale;
  float softcap;  // 0 = off
  int64_t window;  // 0 = off
  float* part_out;  // [B, Hq, num_splits, D]
  float* part_lse;  // [B, Hq, num_splits]
  DType t;          // q's (and the output's)
  DType ct;         // the cache's: t, or 8-bit codes with scales kss / vss
  KvScales kss, vss;
};
int paged_decode_stage1(const DecodeArgs& a, int64_t item_begin, int64_t item_end);

// What work item `item` of stage 1 covers (both CPU decode kernels use it): sequence b, KV head h, split sp, the
// token range [t0, t1) (empty when the split lies past the sequence or before its sliding window), and where its
// fp32 partials go: row g of the group at pout + g * num_splits * D and plse + g * num_splits.
struct DecodeItem {
  int64_t b, h, sp, t0, t1;
  float* pout;
  float* plse;
};
inline DecodeItem decode_item(const DecodeArgs& a, int64_t item) {
  const int64_t sp = item % a.num_splits, h = (item / a.num_splits) % a.Hkv, b = item / (a.num_splits * a.Hkv);
  const int64_t L = a.seq_lens[b], G = a.Hq / a.Hkv;
  const int64_t first = a.window > 0 && L > a.window ? L - a.window : 0;
  const int64_t t0 = sp * a.split_len > first ? sp * a.split_len : first;
  const int64_t t1 = (sp + 1) * a.split_len < L ? (sp + 1) * a.split_len : L;
  const int64_t row0 = b * a.Hq + h * G;
  return {b, h, sp, t0, t1, a.part_out + (row0 * a.num_splits + sp) * a.D, a.part_lse + row0 * a.num_splits + sp};
}

// Paged prefill attention: q [B, Hq, S, D] (strides sqb, sqh, sqs, sqd); row s of sequence b sits at position
// seq_lens[b] - S + s and sees cache keys max(0, pos - window + 1) .. pos; rows s < S - q_lens[b] are left padding
// and get zeros. One work item = (b, KV head h, tile of `tile` query rows): items = B * Hkv * ceil(S / tile).
struct PrefillArgs {
  const void* q;
  int64_t sqb, sqh, sqs, sqd;
  const void* k_cache;  // [NB, BS, Hkv, D] strides kcs (unit along D)
  const void* v_cache;  // [NB, BS, Hkv, D] strides vcs (unit along D)
  CacheStrides kcs, vcs;
  const int32_t* block_tables;
  int64_t sbt;
  const int32_t* seq_lens;  // [B]
  const int32_t* q_lens;    // [B]
  int64_t B, Hq, Hkv, S, D, BS, NB;
  float scale;
  float softcap;   // 0 = off
  int64_t window;  // 0 = off
  void* out;       // [B, Hq, S, D], q's dtype
  int64_t sob, soh, sos, sod;
  int64_t tile;
  DType t;   // q's and out's
  DType ct;  // the cache's: t, or 8-bit codes with scales kss / vss
  KvScales kss, vss;
};

// The vectorised attention kernels: attention_vec.h as instantiated by vec_avx512.cpp (AVX-512 + AVX512-BF16;
// head_dim 64, 96, 128, 256) and by vec_avx2.cpp (AVX2 + FMA + F16C; head_dim 64, 80, 96, 128, 256), the best one
// the active instruction set allows, for float and 8-bit pages alike (the portable decode kernel takes any other
// head dim). paged_decode_stage1 falls back to the portable kernel of kernels_impl.h;
// paged_prefill returns kNoKernel (the caller then uses the pure-torch reference). fast_attention_supported: whether
// a vectorised kernel serves (t, D). set_fast_attention(false) forces the portable decode kernel and no prefill
// kernel; it returns the previous setting.
bool fast_attention_supported(DType t, int64_t D, DType ct);
inline bool fast_attention_supported(DType t, int64_t D) { return fast_attention_supported(t, D, t); }
bool set_fast_attention(bool on);
int paged_prefill(const PrefillArgs& a, int64_t item_begin, int64_t item_end);

// y[m, n] = sum_k x[m, k] w[n, k] (+ bias[n]) for m < M and output features n in 16-wide blocks [blk_begin, blk_end)
// (linear_vec.h as instantiated by vec_avx512.cpp or vec_avx2.cpp, per linear_kernel): the decode-sized Linear.
// x, w, y have unit last stride; one dtype (fp32 or bf16).
struct LinearArgs {
  const void* x;
  int64_t sxm;
  const void* w;  // [N, K]
  int64_t swn;
  const void* bias;  // [N] contiguous, or null
  void* y;
  int64_t sym;
  int64_t M, N, K;
  DType t;
};
bool linear_supported(DType t);
int linear(const LinearArgs& a, int64_t blk_begin, int64_t blk_end);

// Stage 2: out[b, hq, :] = sum_s exp(lse_s - lse) * part_out_s for items (b, hq) in [begin, end).
int paged_decode_reduce(const DecodeArgs& a, void* out, int64_t sob, int64_t soh, int64_t sod, int64_t item_begin,
                        int64_t item_end);

}  // namespace cpu
}  // namespace llmkern
