// Paged attention (decode and prefill) written with AVX-512 intrinsics, for CPUs with AVX-512 F/BW/VL/DQ and
// AVX512-BF16 (AMD Zen 4 and later, Intel Sapphire Rapids and later). dispatch.cpp uses it when the machine has
// those and head_dim is one of kHeadDims; otherwise the portable templated kernels of kernels_impl.h run.
//
// Why a separate kernel: the portable decode loop is compute-bound at 5-10 GB/s on a 2-core Zen 4 (one 512-bit FMA
// per cycle), far from the 33 GB/s the memory delivers. Here every FMA lane does useful work for any GQA group
// size:
//   * scores: for one query row and 16 tokens, 16 accumulators take q . k over D in 16-lane pieces (K rows read as
//     stored, no transpose), then one 16x16 transpose-and-add tree turns them into a vector of 16 scores. bf16
//     caches use VDPBF16PS on the raw bf16 q and K (products exact in fp32, fp32 accumulation) and apply the
//     softmax scale to the fp32 scores, so no rounding is added over eager's bf16 q . k.
//   * P @ V: the output row (D / 16 registers) stays in registers over a chunk of 64 tokens; bf16/fp16 V rows are
//     converted to fp32 once per chunk and shared by the group's rows.
//   * online softmax per 64-token chunk with a vector exp (same polynomial as kernels_impl.h's vexp).
// Each K/V row of the range is read from memory once per (sequence, KV head) whatever the group size; the chunk's
// rows are then re-read from L1 by the group's query rows. fp32 accumulation throughout, each chunk's P @ V and
// softmax sums started from zero and merged once per chunk, and one division at the end: the fp32 error stays within
// the bound llmkern/testing.py derives for this algorithm, and within a few eps of the output's scale.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__x86_64__)

#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma,f16c")
// GCC 12's _mm512_reduce_* start from _mm512_undefined_ps(), which -Wmaybe-uninitialized flags.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#include "avx512_util.h"
#include "kernels.h"

namespace llmkern {
namespace cpu {
namespace avx512_attn {

namespace {

constexpr int kChunk = 64;  // tokens per online-softmax step: four 16-token score vectors
enum Kind { kKF32, kKBF16, kKF16 };

// exp(x): x = n ln2 + r, degree-6 polynomial for e^r, scaled by 2^n with VSCALEFPS. ~2 ulp; exp(-inf) is
// clamped to ~1e-38 (callers zero masked lanes).
inline __m512 exp512(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.3f)), _mm512_set1_ps(88.7f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fmadd_ps(n, _mm512_set1_ps(2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500E-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507E-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073E-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894E-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459E-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201E-1f));
  p = _mm512_add_ps(_mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r), _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}

// 16 elements (block i of a row) as fp32.
template <int KIND>
inline __m512 load16(const void* row, int i) {
  if constexpr (KIND == kKF32) {
    return _mm512_loadu_ps(static_cast<const float*>(row) + 16 * i);
  } else {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(row) + 16 * i));
    if constexpr (KIND == kKBF16)
      return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    else
      return _mm512_cvtph_ps(h);
  }
}

// Scores of one query row against 16 packed K rows (row t at kb + t * D elements). f32/f16: q is fp32 and
// pre-scaled; bf16: q is raw bf16. Packed rows make every K operand a constant offset from one base register
// (16 row pointers would not fit in the general registers).
template <int KIND, int ND>
inline __m512 score16(const float* qf, const uint16_t* qb, const char* kb) {
  constexpr int64_t RB = 16 * ND * (KIND == kKF32 ? 4 : 2);  // bytes per packed row
  __m512 a[16];
#pragma GCC unroll 16
  for (int t = 0; t < 16; ++t) a[t] = _mm512_setzero_ps();
  if constexpr (KIND == kKBF16) {
#pragma GCC unroll 8
    for (int i = 0; i < ND / 2; ++i) {
      const __m512bh qv = (__m512bh)_mm512_loadu_si512(qb + 32 * i);
#pragma GCC unroll 16
      for (int t = 0; t < 16; ++t)
        a[t] = _mm512_dpbf16_ps(a[t], qv, (__m512bh)_mm512_loadu_si512(kb + t * RB + 64 * i));
    }
  } else {
#pragma GCC unroll 16
    for (int i = 0; i < ND; ++i) {
      const __m512 qv = _mm512_loadu_ps(qf + 16 * i);
#pragma GCC unroll 16
      for (int t = 0; t < 16; ++t) a[t] = _mm512_fmadd_ps(qv, load16<KIND>(kb + t * RB, i), a[t]);
    }
  }
  return hsum16(a);
}

// One (sequence, KV head): where its pages are. Token t of K starts table[t / BS] * k_block + (t % BS) * k_slot +
// k_head bytes into kc, of V likewise (the caches may be any strided views: kernels.h's CacheStrides, in bytes).
struct Pages {
  const char* kc;
  const char* vc;
  const int32_t* table;
  int64_t BS;
  int64_t k_block, k_slot, k_head;  // K: bytes per page, per token row, to this KV head's row
  int64_t v_block, v_slot, v_head;  // V: the same
};

// KV head h of the caches of `a` (DecodeArgs or PrefillArgs) for sequence b; es: bytes per element.
template <class Args>
Pages pages_of(const Args& a, int64_t b, int64_t h, int64_t es) {
  return Pages{static_cast<const char*>(a.k_cache), static_cast<const char*>(a.v_cache), a.block_tables + b * a.sbt,
               a.BS, a.kcs.sb * es, a.kcs.ss * es, h * a.kcs.sh * es, a.vcs.sb * es, a.vcs.ss * es,
               h * a.vcs.sh * es};
}

// M query rows of one KV head and their online-softmax state. Row m sees tokens [lo[m], hi[m]) (all of the range
// when lo/hi are null).
struct Rows {
  int64_t M;
  const float* qf;     // [M, D] fp32, pre-scaled (f32/f16 caches)
  const uint16_t* qb;  // [M, D] raw bf16 (bf16 caches); scores are multiplied by qscale
  float qscale;
  const int64_t* lo;
  const int64_t* hi;
  float softcap;
  float* acc;  // [M, D]
  float* mx;   // [M]
  float* den;  // [M]
  float* s;    // scratch [M, kChunk]
  float* vbuf;  // scratch [kChunk, D]: the chunk's V rows as fp32
  char* kbuf;   // scratch [kChunk, D] elements: the chunk's K rows as stored
};

template <int KIND, int ND>
void attend(const Pages& pg, Rows& r, int64_t t0, int64_t t1) {
  constexpr int D = 16 * ND;
  constexpr int64_t ES = KIND == kKF32 ? 4 : 2;
  // Tokens per chunk: the packed K and V chunk (below) stay within L1 (32 KiB on Zen 4).
  constexpr int CH = ND >= 8 ? 32 : kChunk;
  const float neg_inf = -std::numeric_limits<float>::infinity();
  const __m512 vneg_inf = _mm512_set1_ps(neg_inf);
  const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const void* krows[kChunk];
  const void* vrows[kChunk];
  for (int64_t c0 = t0; c0 < t1; c0 += CH) {
    const int n = static_cast<int>(std::min<int64_t>(CH, t1 - c0));
    const int nblk = (n + 15) / 16;
    // Walk the pages incrementally: a 64-bit division per token costs more than the token's arithmetic.
    int64_t page = c0 / pg.BS, off = c0 % pg.BS;
    for (int j = 0; j < n; ++j) {
      const int64_t p = pg.table[page];
      krows[j] = pg.kc + p * pg.k_block + off * pg.k_slot + pg.k_head;
      vrows[j] = pg.vc + p * pg.v_block + off * pg.v_slot + pg.v_head;
      if (++off == pg.BS) {
        off = 0;
        ++page;
      }
    }
    // Pack the chunk's K rows (as stored) and V rows (as fp32) contiguously. Rows of one KV head sit Hkv * D
    // elements apart — 4 KiB for Llama-3-8B in fp32 — so unpacked, the rows of a chunk all fall in the same few
    // L1 sets and evict each other while the group's query rows re-read them. Packing reads each line once.
    for (int j = 0; j < n; ++j) {
      char* kd = r.kbuf + j * D * ES;
#pragma GCC unroll 8
      for (int64_t l = 0; l < D * ES; l += 64)
        _mm512_storeu_si512(kd + l, _mm512_loadu_si512(static_cast<const char*>(krows[j]) + l));
#pragma GCC unroll 16
      for (int i = 0; i < ND; ++i) _mm512_storeu_ps(r.vbuf + j * D + 16 * i, load16<KIND>(vrows[j], i));
    }
    // Prefetch the next chunk's K/V rows into L2 while this one computes. Rows of one KV head sit Hkv * D
    // elements apart (4 KiB for Llama-3-8B in fp32), so every row is on its own 4 KiB page and the hardware
    // prefetchers, which stop at page boundaries, cannot see the stream.
    if (c0 + CH < t1) {
      const int64_t c1 = c0 + CH, n1 = std::min<int64_t>(CH, t1 - c1);
      int64_t pg1 = c1 / pg.BS, of1 = c1 % pg.BS;
      for (int64_t j = 0; j < n1; ++j) {
        const int64_t p = pg.table[pg1];
        const char* kr = pg.kc + p * pg.k_block + of1 * pg.k_slot + pg.k_head;
        const char* vr = pg.vc + p * pg.v_block + of1 * pg.v_slot + pg.v_head;
#pragma GCC unroll 8
        for (int64_t l = 0; l < D * ES; l += 64) {
          _mm_prefetch(kr + l, _MM_HINT_T1);
          _mm_prefetch(vr + l, _MM_HINT_T1);
        }
        if (++of1 == pg.BS) {
          of1 = 0;
          ++pg1;
        }
      }
    }
    // Scores, masked to -inf outside each row's [lo, hi) and past the chunk.
    for (int64_t m = 0; m < r.M; ++m) {
      const int64_t lo = r.lo ? r.lo[m] : t0, hi = std::min<int64_t>(r.hi ? r.hi[m] : t1, c0 + n);
      float* sm = r.s + m * kChunk;
      if (hi <= c0 || lo >= c0 + n) {  // nothing of this chunk for this row
        for (int b = 0; b < nblk; ++b) _mm512_storeu_ps(sm + 16 * b, vneg_inf);
        continue;
      }
      for (int b = 0; b < nblk; ++b) {
        // Lanes past n read stale (or zeroed) rows of kbuf and are masked below.
        __m512 sv = score16<KIND, ND>(r.qf + m * D, r.qb + m * D, r.kbuf + 16 * b * D * ES);
        if constexpr (KIND == kKBF16) sv = _mm512_mul_ps(sv, _mm512_set1_ps(r.qscale));
        _mm512_storeu_ps(sm + 16 * b, sv);
      }
      if (r.softcap > 0.f)
        for (int j = 0; j < n; ++j) sm[j] = r.softcap * std::tanh(sm[j] / r.softcap);
      // Offsets from c0 fit in int32.
      const __m512i vlo = _mm512_set1_epi32(static_cast<int32_t>(std::max<int64_t>(lo - c0, -1)));
      const __m512i vhi = _mm512_set1_epi32(static_cast<int32_t>(hi - c0));
      for (int b = 0; b < nblk; ++b) {
        const __m512i tok = _mm512_add_epi32(iota, _mm512_set1_epi32(16 * b));
        const __mmask16 ok = _mm512_cmp_epi32_mask(tok, vlo, _MM_CMPINT_NLT) & _mm512_cmp_epi32_mask(tok, vhi, _MM_CMPINT_LT);
        _mm512_storeu_ps(sm + 16 * b, _mm512_mask_blend_ps(ok, vneg_inf, _mm512_loadu_ps(sm + 16 * b)));
      }
    }
    // Online softmax and P @ V, one row at a time with its output row in registers.
    for (int64_t m = 0; m < r.M; ++m) {
      float* sm = r.s + m * kChunk;
      __m512 vmax = _mm512_loadu_ps(sm);
      for (int b = 1; b < nblk; ++b) vmax = _mm512_max_ps(vmax, _mm512_loadu_ps(sm + 16 * b));
      const float cmax = _mm512_reduce_max_ps(vmax);
      if (cmax == neg_inf) continue;  // no visible token in this chunk
      const float m_old = r.mx[m], m_new = std::max(m_old, cmax);
      const float alpha = m_old == neg_inf ? 0.f : std::exp(m_old - m_new);
      const __m512 vm = _mm512_set1_ps(m_new);
      __m512 vsum = _mm512_setzero_ps();
      for (int b = 0; b < nblk; ++b) {
        const __m512 x = _mm512_loadu_ps(sm + 16 * b);
        const __m512 p = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, vneg_inf, _CMP_NEQ_UQ), exp512(_mm512_sub_ps(x, vm)));
        _mm512_storeu_ps(sm + 16 * b, p);
        vsum = _mm512_add_ps(vsum, p);
      }
      // The chunk's sums start from zero and join the running ones with one FMA each (acc * alpha + chunk):
      // a token's product passes through at most CH + (chunks) additions instead of every one before it, which
      // is what keeps long contexts within eager's blocked-matmul error (tests/test_extension.py derives the
      // bound).
      r.den[m] = std::fma(r.den[m], alpha, _mm512_reduce_add_ps(vsum));
      r.mx[m] = m_new;
      float* am = r.acc + m * D;
      __m512 acc[ND];
      const __m512 va = _mm512_set1_ps(alpha);
#pragma GCC unroll 16
      for (int i = 0; i < ND; ++i) acc[i] = _mm512_setzero_ps();
      for (int j = 0; j < n; ++j) {
        const __m512 p = _mm512_set1_ps(sm[j]);
        const float* v = r.vbuf + j * D;
#pragma GCC unroll 16
        for (int i = 0; i < ND; ++i) acc[i] = _mm512_fmadd_ps(p, _mm512_loadu_ps(v + 16 * i), acc[i]);
      }
#pragma GCC unroll 16
      for (int i = 0; i < ND; ++i) _mm512_storeu_ps(am + 16 * i, _mm512_fmadd_ps(_mm512_loadu_ps(am + 16 * i), va, acc[i]));
    }
  }
}

float ldf(const void* p, int64_t i, DType t) {
  if (t == kF32) return static_cast<const float*>(p)[i];
  const uint16_t h = static_cast<const uint16_t*>(p)[i];
  if (t == kBF16) {
    const uint32_t u = static_cast<uint32_t>(h) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
  return _cvtsh_ss(h);
}

void stf(void* p, int64_t i, float f, DType t) {
  if (t == kF32) {
    static_cast<float*>(p)[i] = f;
  } else if (t == kBF16) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    const uint32_t rr = ((u & 0x7fffffffu) > 0x7f800000u) ? (u | 0x00400000u) : (u + 0x7fffu + ((u >> 16) & 1u));
    static_cast<uint16_t*>(p)[i] = static_cast<uint16_t>(rr >> 16);
  } else {
    static_cast<uint16_t*>(p)[i] = _cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT);
  }
}

// Query row (strided, any dtype) into the kernel's q layout.
template <int KIND>
void load_q(const void* q, int64_t off, int64_t sd, int64_t D, float scale, DType t, float* qf, uint16_t* qb) {
  if constexpr (KIND == kKBF16) {
    for (int64_t d = 0; d < D; ++d) qb[d] = static_cast<const uint16_t*>(q)[off + d * sd];
  } else {
    for (int64_t d = 0; d < D; ++d) qf[d] = ldf(q, off + d * sd, t) * scale;
  }
}

struct Scratch {
  std::vector<float> qf, acc, mx, den, s, vbuf;
  std::vector<char> kbuf;
  std::vector<uint16_t> qb;
  std::vector<int64_t> lo, hi;
  Scratch(int64_t M, int64_t D)
      : qf(M * D), acc(M * D), mx(M), den(M), s(M * kChunk), vbuf(kChunk * D), kbuf(kChunk * D * 4), qb(M * D),
        lo(M), hi(M) {}
  Rows rows(int64_t M, float qscale, float softcap, bool masked) {
    return Rows{M, qf.data(), qb.data(), qscale, masked ? lo.data() : nullptr, masked ? hi.data() : nullptr,
                softcap, acc.data(), mx.data(), den.data(), s.data(), vbuf.data(), kbuf.data()};
  }
  void reset(int64_t M, int64_t D) {
    std::fill(acc.begin(), acc.begin() + M * D, 0.f);
    std::fill(mx.begin(), mx.begin() + M, -std::numeric_limits<float>::infinity());
    std::fill(den.begin(), den.begin() + M, 0.f);
  }
};

template <int KIND, int ND>
void decode_items(const DecodeArgs& a, int64_t i0, int64_t i1) {
  constexpr int64_t D = 16 * ND;
  const int64_t G = a.Hq / a.Hkv, es = a.t == kF32 ? 4 : 2;
  Scratch w(G, D);
  const float neg_inf = -std::numeric_limits<float>::infinity();
  for (int64_t item = i0; item < i1; ++item) {
    const DecodeItem it = decode_item(a, item);
    const int64_t b = it.b, h = it.h, t0 = it.t0, t1 = it.t1;
    float* pout = it.pout;
    float* plse = it.plse;
    if (t0 >= t1) {
      for (int64_t g = 0; g < G; ++g) {
        plse[g * a.num_splits] = neg_inf;
        std::fill(pout + g * a.num_splits * D, pout + g * a.num_splits * D + D, 0.f);
      }
      continue;
    }
    for (int64_t g = 0; g < G; ++g)
      load_q<KIND>(a.q, b * a.sqb + (h * G + g) * a.sqh, a.sqd, D, a.scale, a.t, &w.qf[g * D], &w.qb[g * D]);
    w.reset(G, D);
    Rows r = w.rows(G, a.scale, a.softcap, false);
    const Pages pg = pages_of(a, b, h, es);
    attend<KIND, ND>(pg, r, t0, t1);
    for (int64_t g = 0; g < G; ++g) {
      // A division, not a multiply by 1 / den: one rounding instead of two.
      for (int64_t d = 0; d < D; ++d) pout[g * a.num_splits * D + d] = w.acc[g * D + d] / w.den[g];
      plse[g * a.num_splits] = w.mx[g] + std::log(w.den[g]);
    }
  }
}

template <int KIND, int ND>
void prefill_items(const PrefillArgs& a, int64_t i0, int64_t i1) {
  constexpr int64_t D = 16 * ND;
  const int64_t G = a.Hq / a.Hkv, es = a.t == kF32 ? 4 : 2, TQ = a.tile;
  const int64_t ntiles = (a.S + TQ - 1) / TQ;
  Scratch w(TQ * G, D);
  for (int64_t item = i0; item < i1; ++item) {
    // Items run (b, h) outer, tiles inner in the order 0, n-1, 1, n-2, ...: a contiguous range of items (one
    // thread's share) then mixes short early tiles with long late ones.
    const int64_t k = item % ntiles, bh = item / ntiles;
    const int64_t tile = (k % 2 == 0) ? k / 2 : ntiles - 1 - k / 2;
    const int64_t h = bh % a.Hkv, b = bh / a.Hkv;
    const int64_t L = a.seq_lens[b], ql = a.q_lens[b];
    const int64_t s0 = tile * TQ, s1 = std::min(s0 + TQ, a.S), M = (s1 - s0) * G;
    int64_t kv_lo = L, kv_hi = 0;
    for (int64_t s = s0; s < s1; ++s) {
      const int64_t pos = L - a.S + s;  // this row's position; rows s < S - q_len are left padding
      const bool pad = s < a.S - ql || pos < 0;
      const int64_t lo = pad ? 0 : (a.window > 0 ? std::max<int64_t>(pos - a.window + 1, 0) : 0);
      const int64_t hi = pad ? 0 : pos + 1;
      for (int64_t g = 0; g < G; ++g) {
        const int64_t m = (s - s0) * G + g;
        w.lo[m] = lo;
        w.hi[m] = hi;
        load_q<KIND>(a.q, b * a.sqb + (h * G + g) * a.sqh + s * a.sqs, a.sqd, D, a.scale, a.t, &w.qf[m * D],
                     &w.qb[m * D]);
      }
      if (hi > lo) {
        kv_lo = std::min(kv_lo, lo);
        kv_hi = std::max(kv_hi, hi);
      }
    }
    w.reset(M, D);
    Rows r = w.rows(M, a.scale, a.softcap, true);
    const Pages pg = pages_of(a, b, h, es);
    if (kv_lo < kv_hi) attend<KIND, ND>(pg, r, kv_lo, kv_hi);
    for (int64_t s = s0; s < s1; ++s)
      for (int64_t g = 0; g < G; ++g) {
        const int64_t m = (s - s0) * G + g;
        const float den = w.den[m];  // 0: a row with no visible key (padding) writes zeros
        const int64_t o = b * a.sob + (h * G + g) * a.soh + s * a.sos;
        for (int64_t d = 0; d < D; ++d) stf(a.out, o + d * a.sod, den > 0.f ? w.acc[m * D + d] / den : 0.f, a.t);
      }
  }
}

bool cpu_ok() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}

const bool kCpuOk = cpu_ok();

#define LLMKERN_ATTN_DISPATCH(FN, ...)                                                        \
  const int kind = a.t == kF32 ? kKF32 : a.t == kBF16 ? kKBF16 : kKF16;                       \
  switch (kind * 100 + static_cast<int>(a.D / 16)) {                                          \
    case kKF32 * 100 + 4: FN<kKF32, 4>(__VA_ARGS__); return kOk;                              \
    case kKF32 * 100 + 6: FN<kKF32, 6>(__VA_ARGS__); return kOk;                              \
    case kKF32 * 100 + 8: FN<kKF32, 8>(__VA_ARGS__); return kOk;                              \
    case kKF32 * 100 + 16: FN<kKF32, 16>(__VA_ARGS__); return kOk;                            \
    case kKBF16 * 100 + 4: FN<kKBF16, 4>(__VA_ARGS__); return kOk;                            \
    case kKBF16 * 100 + 6: FN<kKBF16, 6>(__VA_ARGS__); return kOk;                            \
    case kKBF16 * 100 + 8: FN<kKBF16, 8>(__VA_ARGS__); return kOk;                            \
    case kKBF16 * 100 + 16: FN<kKBF16, 16>(__VA_ARGS__); return kOk;                          \
    case kKF16 * 100 + 4: FN<kKF16, 4>(__VA_ARGS__); return kOk;                              \
    case kKF16 * 100 + 6: FN<kKF16, 6>(__VA_ARGS__); return kOk;                              \
    case kKF16 * 100 + 8: FN<kKF16, 8>(__VA_ARGS__); return kOk;                              \
    case kKF16 * 100 + 16: FN<kKF16, 16>(__VA_ARGS__); return kOk;                            \
    default: return kNoKernel;                                                                \
  }

}  // namespace

bool supported(DType t, int64_t D) {
  return kCpuOk && (t == kF32 || t == kF16 || t == kBF16) && (D == 64 || D == 96 || D == 128 || D == 256);
}

int paged_decode_stage1(const DecodeArgs& a, int64_t i0, int64_t i1) {
  if (!supported(a.t, a.D)) return kNoKernel;
  LLMKERN_ATTN_DISPATCH(decode_items, a, i0, i1)
}

int paged_prefill(const PrefillArgs& a, int64_t i0, int64_t i1) {
  if (!supported(a.t, a.D) || a.tile <= 0) return kNoKernel;
  LLMKERN_ATTN_DISPATCH(prefill_items, a, i0, i1)
}

#undef LLMKERN_ATTN_DISPATCH

}  // namespace avx512_attn
}  // namespace cpu
}  // namespace llmkern

#endif  // __x86_64__ (other architectures: dispatch.cpp's stubs)
