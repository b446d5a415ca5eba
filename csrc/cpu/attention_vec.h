// Paged attention — decode stage 1 and prefill — written once over the vector traits of vec.h (`class V`, W fp32
// lanes), for the translation units that instantiate it per instruction set (vec_avx2.cpp: AVX2, 8 lanes;
// vec_avx512.cpp: AVX-512 + AVX512-BF16, 16 lanes).
//
// Why this shape: a plain loop over tokens is compute-bound at 5-10 GB/s on a 2-core Zen 4, far from the ~33 GB/s
// its memory delivers. Here each K/V row of the range is read from memory once per (sequence, KV head) whatever the
// group size, and every FMA lane does useful work. One pass serves a block of query rows (decode: the G heads of the
// group; prefill: a tile of positions times G), chunk by chunk (V::chunk_tokens):
//   1. gather: the chunk's K and V rows are packed [CH, D], V widened to fp32 (bf16 with V::kBf16Dot: as token
//      pairs, step 3), K too unless the scores take it as stored (bf16 with V::kBf16Dot). Rows of one KV head sit
//      Hkv * D elements apart (4 KiB for Llama-3-8B in fp32) in token-major ("NHD") pages, so left in place they
//      fall into the same few L1 sets and evict each other while the block's rows re-read them; packed, each line
//      is read from memory once. (In head-major ("HND") pages, PagedKVCache's CPU default, a page's rows of one head
//      are contiguous.) The next chunk's rows are prefetched into L2 meanwhile, a few lines between each pass over
//      the current chunk (NextRows): in NHD pages every row is on its own 4 KiB page, where the hardware prefetchers
//      stop.
//   2. scores: per query row and W tokens, W accumulators take q . k over D in W-lane pieces, and one hsum turns
//      them into a vector of W scores — every FMA lane does useful work for any group size. bf16 with
//      V::kBf16Dot: the dot-product instruction on the raw bf16 q and K (products exact in fp32), and the softmax
//      scale applied to the fp32 scores, so no rounding is added over eager's bf16 q . k; otherwise q is widened
//      and pre-scaled.
//   3. online softmax per row, then P @ V with the output row held in registers (pieces of up to V::kPvRegs). bf16
//      pages with V::kBf16Dot: P @ V on the dot product too, two tokens per instruction: the gather packs V as
//      pairs of tokens instead of widening it, and the weights are rounded to bf16 (as eager's bf16 attention and
//      the Triton kernel round them; the row's sum takes the rounded ones). Half the P @ V instructions: bf16 decode
//      and prefill 0.75-0.85x the time (README.md, "bf16 P @ V on the dot product").
// fp32 accumulation throughout; FMAs round once where eager's unfused matmul rounds twice. Sliding window, softcap,
// left padding and empty ranges as kernels.h says.
//
// 8-bit pages (cache dtype C = kI8 / kF8E4M3, one fp16 scale per token row): the gather widens the codes (V::load_as
// in code units, vec.h) and reads the chunk's scales; nothing dequantized is stored beyond the chunk's packed rows.
// K's scale is folded into the scores (score_j = (q . code_j) * sk_j), V's into the softmax weights (p_j * sv_j
// multiplies code_j in P @ V; the row's sum takes p_j). With bf16 q the K codes go to bf16 (exact: at most 8
// significant bits) and through the bf16 dot product like bf16 pages. Same head dims as float pages (vec_head_dim).
#pragma once

#include "vec.h"

namespace llmkern {
namespace cpu {
namespace {

// Where one (sequence, KV head)'s rows live: token t of K at byte offset table[t / BS] * kb + (t % BS) * ks + kh,
// of V likewise with V's strides (any strided views of the pages: kernels.h's CacheStrides, here in bytes).
struct KvHead {
  const char* k;
  const char* v;
  const int32_t* table;
  int64_t BS;
  int64_t kb, ks, kh;  // K: bytes from one page to the next, from one token's row to the next, to this KV head's row
  int64_t vb, vs, vh;  // V: the same
  // 8-bit pages: the fp16 scales of K and V (null for float pages), element strides along pages, slots, and to
  // this KV head's scale.
  const uint16_t* ksc;
  const uint16_t* vsc;
  int64_t ksb, kss, ksh, vsb, vss, vsh;
  // Byte offsets of tokens [c0, c0 + n) in K (kout) and V (vout), and with kScales their scales' element offsets
  // (ksout, vsout). The page is tracked incrementally: a 64-bit division per token costs more than the token's
  // arithmetic. int64: a pool may pass 2^31 bytes.
  template <bool kScales>
  void offsets(int64_t c0, int64_t n, int64_t* kout, int64_t* vout, int64_t* ksout, int64_t* vsout) const {
    int64_t page = c0 / BS, slot = c0 % BS;
    for (int64_t j = 0; j < n; ++page, slot = 0) {  // page by page: the products once per page
      const int64_t p = table[page], m = std::min(BS - slot, n - j);
      const int64_t k0 = p * kb + kh + slot * ks, v0 = p * vb + vh + slot * vs;
      for (int64_t i = 0; i < m; ++i) {
        kout[j + i] = k0 + i * ks;
        vout[j + i] = v0 + i * vs;
      }
      if constexpr (kScales) {
        const int64_t ks0 = p * ksb + ksh + slot * kss, vs0 = p * vsb + vsh + slot * vss;
        for (int64_t i = 0; i < m; ++i) {
          ksout[j + i] = ks0 + i * kss;
          vsout[j + i] = vs0 + i * vss;
        }
      }
      j += m;
    }
  }
};

// The next chunk's K and V rows, line by line, handed to the L2 prefetcher a few lines at a time between the current
// chunk's arithmetic. Issued all at once (a loop of 2 * CH * D * es / 64 prefetches: 512 for fp32 at D = 64), they
// stall the core once its miss buffers are full, so the lines arrive while it waits instead of while it computes;
// spread over the chunk's score and P @ V passes, memory and arithmetic overlap (AMD EPYC, AVX-512, 2 threads, cold
// caches: 0.65-0.85x the decode time at 8k-32k; README.md, "Decode attention: page layout and prefetch").
struct NextRows {
  const char* k = nullptr;
  const char* v = nullptr;
  const int64_t* offs = nullptr;   // the next chunk's K row offsets (bytes from k)
  const int64_t* voffs = nullptr;  // and V's
  int64_t rows = 0, row_bytes = 0;
  int64_t j = 0, l = 0;  // the next line to hand out: row j, byte l

  int64_t lines() const { return rows * ((row_bytes + 63) / 64); }

  // Up to `lines` more of the K (and as many of the V) lines.
  template <class V>
  void issue(int64_t lines) {
    for (; lines > 0 && j < rows; --lines) {
      V::prefetch_l2(k + offs[j] + l);
      V::prefetch_l2(v + voffs[j] + l);
      l += 64;
      if (l >= row_bytes) {
        l = 0;
        ++j;
      }
    }
  }
};

// Whether the n rows at byte offsets offs follow one another, row_bytes apart (one block read in place).
inline bool rows_follow(const int64_t* offs, int64_t n, int64_t row_bytes) {
  for (int64_t i = 1; i < n; ++i)
    if (offs[i] != offs[0] + i * row_bytes) return false;
  return true;
}

// A block of M query rows and their online-softmax state.
struct QueryRows {
  int64_t M;
  const float* q;     // [M, D] fp32, pre-scaled (scores by FMA)
  const uint16_t* qb;  // [M, D] raw bf16 (scores by the bf16 dot; they are then multiplied by scale)
  float scale;
  const int64_t* lo;  // row m sees tokens [lo[m], hi[m]); null: every token of the pass
  const int64_t* hi;
  float softcap;      // 0: off
  float* acc;         // [M, D] sum of p * v, not yet divided by the row's sum
  float* row_max;     // [M]
  float* row_sum;     // [M]
};

// Whether scores of dtype T at head_dim ND * W take the bf16 dot product on q and K as stored: it consumes W pairs
// of elements per step, so ND must be even.
template <class V, DType T, int ND>
constexpr bool kDotBf16 = T == kBF16 && V::kBf16Dot && ND % 2 == 0;

// Registers per P @ V piece: the largest divisor of ND within V::kPvRegs.
template <class V, int ND>
constexpr int pv_piece() {
  int p = ND < V::kPvRegs ? ND : V::kPvRegs;
  while (ND % p) --p;
  return p;
}

// Cache-line-aligned storage for the buffers the vector loops read. malloc aligns to 16 bytes: a buffer that starts
// 16, 32 or 48 bytes into a line has every 64-byte load cross two lines (AVX2's 32-byte loads: one in two), and
// which buffers are hit changes from run to run with the heap.
template <class T>
struct LineAligned {
  using value_type = T;
  LineAligned() = default;
  template <class U>
  LineAligned(const LineAligned<U>&) {}
  T* allocate(std::size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t(64))); }
  void deallocate(T* p, std::size_t) { ::operator delete(p, std::align_val_t(64)); }
  template <class U>
  bool operator==(const LineAligned<U>&) const { return true; }
};
template <class T>
using LineVector = std::vector<T, LineAligned<T>>;

// One thread's working memory, for row blocks of up to M rows.
template <class V>
struct Workspace {
  LineVector<float> q, acc, row_max, row_sum, scores, kf, vf;  // kf: [CH, D] fp32, or [CH, D] bf16 as stored
  LineVector<float> ksc, vsc;  // 8-bit pages: the chunk's K and V scales [CH] (times the code unit)
  LineVector<uint16_t> qb;
  std::vector<int64_t> lo, hi, offs, voffs;  // offs, voffs: the chunk's K and V row offsets
  std::vector<int64_t> ksoffs, vsoffs;       // 8-bit pages: the chunk's K and V scale offsets
  std::vector<unsigned char> row_bytes;  // one row as stored (q gathered in, prefill output scattered out)
  Workspace(int64_t M, int64_t D)
      : q(M * D), acc(M * D), row_max(M), row_sum(M), scores(M * V::chunk_tokens(D)), kf(V::chunk_tokens(D) * D),
        vf(V::chunk_tokens(D) * D), ksc(V::chunk_tokens(D)), vsc(V::chunk_tokens(D)), qb(V::kBf16Dot ? M * D : 0),
        lo(M), hi(M), offs(V::chunk_tokens(D)), voffs(V::chunk_tokens(D)), ksoffs(V::chunk_tokens(D)),
        vsoffs(V::chunk_tokens(D)), row_bytes(4 * D) {}
  // The first M rows, state cleared; ranged: rows carry their own [lo, hi).
  QueryRows start(int64_t M, int64_t D, float scale, float softcap, bool ranged) {
    std::fill(acc.begin(), acc.begin() + M * D, 0.f);
    std::fill(row_max.begin(), row_max.begin() + M, -std::numeric_limits<float>::infinity());
    std::fill(row_sum.begin(), row_sum.begin() + M, 0.f);
    return {M, q.data(), qb.data(), scale, ranged ? lo.data() : nullptr, ranged ? hi.data() : nullptr, softcap,
            acc.data(), row_max.data(), row_sum.data()};
  }
};

// Query row m (dtype T, element stride sd) into the block: fp32 times scale, or raw bf16 for the bf16 dot. `tmp`
// holds D elements as stored.
template <class V, DType T, int ND>
inline void load_query(const void* q, int64_t off, int64_t sd, float scale, Workspace<V>& w, int64_t m,
                       unsigned char* tmp) {
  constexpr int64_t es = elem_size(T), D = ND * V::W;
  const unsigned char* src = static_cast<const unsigned char*>(q) + off * es;
  if (sd != 1) {
    for (int64_t d = 0; d < D; ++d) std::memcpy(tmp + d * es, src + d * sd * es, es);
    src = tmp;
  }
  if constexpr (kDotBf16<V, T, ND>) {
    std::memcpy(w.qb.data() + m * D, src, D * es);
  } else {
    const typename V::reg vs = V::set1(scale);
    float* dst = w.q.data() + m * D;
    for (int64_t i = 0; i < D; i += V::W) V::store(dst + i, V::mul(V::template load_as<T>(src + i * es), vs));
  }
}

// Scores of query row m against nblk blocks of W K rows, block b's rows contiguous at kblk[b] (packed, or in place in
// the page): fp32 q . k, or bf16 pairs then times r.scale. 8-bit pages (ksc non-null): times each token's K scale,
// which for the bf16 dot already includes r.scale.
template <class V, DType T, int ND>
inline void score_row(const QueryRows& r, int64_t m, const float* const* kblk, int64_t nblk, float* s,
                      const float* ksc) {
  constexpr int W = V::W, D = ND * V::W;
  for (int64_t b = 0; b < nblk; ++b) {
    typename V::reg dot[W];
#pragma GCC unroll 16
    for (int t = 0; t < W; ++t) dot[t] = V::zero();
    if constexpr (kDotBf16<V, T, ND>) {
      const uint16_t* q = r.qb + m * D;
      const uint16_t* kb = reinterpret_cast<const uint16_t*>(kblk[b]);
#pragma GCC unroll 16
      for (int i = 0; i < ND / 2; ++i) {
        const typename V::bf16x2 qv = V::load_bf16x2(q + 2 * i * W);
#pragma GCC unroll 16
        for (int t = 0; t < W; ++t) dot[t] = V::dot_bf16(dot[t], qv, V::load_bf16x2(kb + t * D + 2 * i * W));
      }
      V::store(s + b * W, V::mul(V::hsum(dot), ksc ? V::load(ksc + b * W) : V::set1(r.scale)));
    } else {
      const float* q = r.q + m * D;
      const float* kb = kblk[b];
#pragma GCC unroll 32
      for (int i = 0; i < ND; ++i) {
        const typename V::reg qv = V::load(q + i * W);
#pragma GCC unroll 16
        for (int t = 0; t < W; ++t) dot[t] = V::fma(qv, V::load(kb + t * D + i * W), dot[t]);
      }
      V::store(s + b * W, ksc ? V::mul(V::hsum(dot), V::load(ksc + b * W)) : V::hsum(dot));
    }
  }
}

// Online-softmax step of one row over a chunk's scores s[0 .. nblk * W) (-inf where masked), then its P @ V into
// acc (V's fp32 rows by blocks of W at vblk[b], as score_row's K). The output row stays in registers over the chunk,
// PW registers at a time. 8-bit pages (vsc non-null): the weights that multiply V are p_j times token j's V scale;
// the row's sum takes p_j. PB (bf16 pages, the bf16 dot product): the weights are rounded to bf16 (the row's sum
// takes the rounded ones) and P @ V runs on the dot product over pairs of tokens: vblk[0] holds the chunk's V as
// pairs, token pair k's D pairs at vblk[0] + k * D (32 bits each; pair_bf16), the odd tail paired with zeros.
template <class V, int ND, bool PB = false>
inline void softmax_pv_row(float* s, int64_t n, int64_t nblk, const float* const* vblk, float* acc, float* row_max,
                           float* row_sum, const float* vsc) {
  using reg = typename V::reg;
  constexpr int W = V::W, D = ND * V::W, PW = pv_piece<V, ND>();
  static_assert(ND % PW == 0, "output pieces must tile the head");
  const float neg_inf = -std::numeric_limits<float>::infinity();
  reg vmax = V::load(s);
  for (int64_t b = 1; b < nblk; ++b) vmax = V::max(vmax, V::load(s + b * W));
  const float chunk_max = V::reduce_max(vmax);
  if (chunk_max == neg_inf) return;  // nothing of this chunk is visible to the row
  const float m_new = std::max(*row_max, chunk_max);
  const float alpha = *row_max == neg_inf ? 0.f : std::exp(*row_max - m_new);
  const reg vm = V::set1(m_new);
  reg vsum = V::zero();
  for (int64_t b = 0; b < nblk; ++b) {
    const reg x = V::load(s + b * W);
    reg p = V::zero_where_neg_inf(x, vec_exp<V>(V::sub(x, vm)));
    if constexpr (PB) p = V::round_bf16(p);
    V::store(s + b * W, vsc ? V::mul(p, V::load(vsc + b * W)) : p);
    vsum = V::add(vsum, p);
  }
  // The chunk's sums start from zero and join the running ones with one FMA each (acc * alpha + chunk): a token's
  // product passes through at most CH + (chunks) additions instead of every one before it (the error bound in
  // tests/test_extension.py).
  *row_sum = std::fma(*row_sum, alpha, V::reduce_add(vsum));
  *row_max = m_new;
  const reg va = V::set1(alpha);
  for (int p0 = 0; p0 < ND; p0 += PW) {
    reg o[PW];
#pragma GCC unroll 16
    for (int i = 0; i < PW; ++i) o[i] = V::zero();
    if constexpr (PB) {
      // Tail lanes past n hold p = 0 (masked scores), so an odd n's last pair takes 0 for its zero row.
      uint32_t bits[2];
      for (int64_t k = 0; k < (n + 1) / 2; ++k) {
        std::memcpy(bits, s + 2 * k, 8);
        const typename V::bf16x2 pk = V::bcast_bf16x2((bits[0] >> 16) | (bits[1] & 0xffff0000u));
        const float* vk = vblk[0] + k * D + p0 * W;
#pragma GCC unroll 16
        for (int i = 0; i < PW; ++i) o[i] = V::dot_bf16(o[i], pk, V::load_bf16x2(vk + i * W));
      }
    } else {
      for (int64_t j = 0; j < n; ++j) {
        const reg pj = V::set1(s[j]);
        const float* vj = vblk[j / W] + (j % W) * D + p0 * W;
#pragma GCC unroll 16
        for (int i = 0; i < PW; ++i) o[i] = V::fma(pj, V::load(vj + i * W), o[i]);
      }
    }
#pragma GCC unroll 16
    for (int i = 0; i < PW; ++i) V::store(acc + (p0 + i) * W, V::fma(V::load(acc + (p0 + i) * W), va, o[i]));
  }
}

// All rows of r over tokens [t0, t1) of one KV head, whose cache holds dtype C (T, or 8-bit codes with scales).
template <class V, DType T, DType C, int ND>
void attend_rows(const KvHead& kv, QueryRows& r, Workspace<V>& w, int64_t t0, int64_t t1) {
  constexpr int W = V::W;
  constexpr int64_t D = ND * V::W, es = elem_size(C), CH = V::chunk_tokens(D);
  constexpr bool dot_bf16 = kDotBf16<V, T, ND>, q8 = is_8bit(C);
  static_assert(C == T || q8, "the cache holds q's dtype or 8-bit codes");
  static_assert(CH % W == 0, "a chunk is whole blocks of W tokens");
  // Which of K and V the passes can read as the pages store them: fp32, and bf16 K for the bf16 dot.
  constexpr bool k_as_stored = !q8 && (C == kF32 || dot_bf16), v_as_stored = !q8 && C == kF32;
  // bf16 pages with the bf16 dot product: P @ V on the dot product too, V packed as pairs of tokens (softmax_pv_row).
  constexpr bool pv_pairs = dot_bf16 && C == kBF16;
  [[maybe_unused]] static const uint16_t zero_row[256] = {};  // an odd chunk's last V pair: D <= 256
  const float neg_inf = -std::numeric_limits<float>::infinity();
  float* kf = w.kf.data();
  float* vf = w.vf.data();
  int64_t* offs = w.offs.data();
  int64_t* voffs = w.voffs.data();
  // 8-bit: K's scales times the code unit (and the softmax scale where the bf16 dot leaves it to the scores; the
  // fp32 q is pre-scaled), V's times the code unit; zero past the chunk's last token (masked anyway).
  float* ksc = q8 ? w.ksc.data() : nullptr;
  float* vsc = q8 ? w.vsc.data() : nullptr;
  const float kmul = kCodeUnit<C> * (dot_bf16 ? r.scale : 1.f), vmul = kCodeUnit<C>;
  int64_t* ksoffs = w.ksoffs.data();
  int64_t* vsoffs = w.vsoffs.data();
  kv.offsets<q8>(t0, std::min(CH, t1 - t0), offs, voffs, ksoffs, vsoffs);
  for (int64_t c0 = t0; c0 < t1; c0 += CH) {
    const int64_t n = std::min(CH, t1 - c0), nblk = (n + W - 1) / W;
    if constexpr (q8) {
      for (int64_t j = 0; j < n; ++j) {
        ksc[j] = _cvtsh_ss(kv.ksc[ksoffs[j]]) * kmul;
        vsc[j] = _cvtsh_ss(kv.vsc[vsoffs[j]]) * vmul;
      }
      std::fill(ksc + n, ksc + nblk * W, 0.f);
      std::fill(vsc + n, vsc + nblk * W, 0.f);
    }
    // gather, a block of W tokens at a time: V widened, K widened or (bf16 dot) copied as stored; a full block whose
    // rows lie one after another in its page (head-major pages, or one KV head) and are read as stored (fp32 K and V,
    // bf16 K for the dot) is read in place instead.
    const float* kblk[CH / W];
    const float* vblk[CH / W];
    for (int64_t b = 0; b < nblk; ++b) {
      const int64_t j0 = b * W, j1 = std::min<int64_t>(j0 + W, n);
      bool k_in = false, v_in = false;
      if constexpr (k_as_stored) k_in = j1 - j0 == W && rows_follow(offs + j0, W, D * es);
      if constexpr (v_as_stored) v_in = j1 - j0 == W && rows_follow(voffs + j0, W, D * es);
      kblk[b] = k_in ? reinterpret_cast<const float*>(kv.k + offs[j0]) : kf + j0 * (dot_bf16 ? D / 2 : D);
      vblk[b] = v_in ? reinterpret_cast<const float*>(kv.v + voffs[j0]) : vf + j0 * D;
      for (int64_t j = j0; j < j1; ++j) {
        const char* kr = kv.k + offs[j];
        const char* vr = kv.v + voffs[j];
        if (!k_in) {
          if constexpr (dot_bf16 && q8) {  // 8-bit codes to bf16, 2W at a time
#pragma GCC unroll 16
            for (int i = 0; i < ND / 2; ++i) V::template codes_to_bf16<C>(kr + 2 * i * W, kf + j * D / 2 + i * W);
          } else if constexpr (dot_bf16) {  // D bf16 = D / 2 fp32 words, moved as bits
#pragma GCC unroll 16
            for (int i = 0; i < ND / 2; ++i)
              V::store(kf + j * D / 2 + i * W, V::load(reinterpret_cast<const float*>(kr) + i * W));
          } else {
#pragma GCC unroll 32
            for (int i = 0; i < ND; ++i) V::store(kf + j * D + i * W, V::template load_as<C>(kr + i * W * es));
          }
        }
        if constexpr (pv_pairs) {
          if ((j - j0) % 2 == 0) {  // tokens j and j + 1 (or zeros) as one pair row
            const char* vr1 = j + 1 < j1 ? kv.v + voffs[j + 1] : reinterpret_cast<const char*>(zero_row);
#pragma GCC unroll 16
            for (int i = 0; i < ND; ++i) V::pair_bf16(vr + i * W * es, vr1 + i * W * es, vf + j / 2 * D + i * W);
          }
        } else if (!v_in) {
#pragma GCC unroll 32
          for (int i = 0; i < ND; ++i) V::store(vf + j * D + i * W, V::template load_as<C>(vr + i * W * es));
        }
      }
    }
    // Tail lanes score 0, then are masked (a partial last block is always packed).
    if constexpr (dot_bf16)
      std::fill(kf + n * D / 2, kf + nblk * W * D / 2, 0.f);
    else
      std::fill(kf + n * D, kf + nblk * W * D, 0.f);
    NextRows next;  // the next chunk: its offsets now, its lines on their way to L2 between the passes below
    if (c0 + CH < t1) {
      const int64_t n1 = std::min(CH, t1 - c0 - CH);
      kv.offsets<q8>(c0 + CH, n1, offs, voffs, ksoffs, vsoffs);
      next = NextRows{kv.k, kv.v, offs, voffs, n1, D * es};
      if constexpr (q8) {  // the scales' lines, each once (a page's scales share a few lines)
        uintptr_t klast = 0, vlast = 0;
        for (int64_t j = 0; j < n1; ++j) {
          const uintptr_t kl = reinterpret_cast<uintptr_t>(kv.ksc + ksoffs[j]) >> 6;
          const uintptr_t vl = reinterpret_cast<uintptr_t>(kv.vsc + vsoffs[j]) >> 6;
          if (kl != klast) V::prefetch_l2(kv.ksc + ksoffs[j]);
          if (vl != vlast) V::prefetch_l2(kv.vsc + vsoffs[j]);
          klast = kl;
          vlast = vl;
        }
      }
    }
    // 2M + 1 portions: before the scores, after each row's scores and after each row's P @ V.
    const int64_t portion = (next.lines() + 2 * r.M) / (2 * r.M + 1);
    next.template issue<V>(portion);
    for (int64_t m = 0; m < r.M; ++m) {
      float* sm = w.scores.data() + m * CH;
      const int64_t lo = r.lo ? std::max(r.lo[m], c0) : c0, hi = r.hi ? std::min(r.hi[m], c0 + n) : c0 + n;
      if (lo >= hi) {
        std::fill(sm, sm + nblk * W, neg_inf);
        continue;
      }
      score_row<V, T, ND>(r, m, kblk, nblk, sm, ksc);
      next.template issue<V>(portion);
      if (r.softcap > 0.f)
        for (int64_t j = 0; j < n; ++j) sm[j] = r.softcap * std::tanh(sm[j] / r.softcap);
      if (lo > c0 || hi < c0 + nblk * W)  // offsets from c0 fit in int32
        for (int64_t b = 0; b < nblk; ++b)
          V::store(sm + b * W, V::keep_range(V::load(sm + b * W), static_cast<int32_t>(b * W),
                                             static_cast<int32_t>(lo - c0), static_cast<int32_t>(hi - c0), neg_inf));
    }
    for (int64_t m = 0; m < r.M; ++m) {
      if constexpr (pv_pairs)
        softmax_pv_row<V, ND, true>(w.scores.data() + m * CH, n, nblk, &vf, r.acc + m * D, r.row_max + m,
                                    r.row_sum + m, vsc);
      else
        softmax_pv_row<V, ND>(w.scores.data() + m * CH, n, nblk, vblk, r.acc + m * D, r.row_max + m, r.row_sum + m,
                              vsc);
      next.template issue<V>(portion);
    }
    next.template issue<V>(next.lines());  // whatever rounding left
  }
}

// KV head h of the caches of `a` (DecodeArgs or PrefillArgs; cache dtype C), for the sequence whose block table row
// is `table`.
template <class V, DType C, class Args>
inline KvHead kv_head(const Args& a, const int32_t* table, int64_t h) {
  constexpr int64_t es = elem_size(C);
  const CacheStrides &k = a.kcs, &v = a.vcs;
  const KvScales &ks = a.kss, &vs = a.vss;
  return {static_cast<const char*>(a.k_cache), static_cast<const char*>(a.v_cache), table, a.BS,
          k.sb * es, k.ss * es, h * k.sh * es, v.sb * es, v.ss * es, h * v.sh * es,
          static_cast<const uint16_t*>(ks.p), static_cast<const uint16_t*>(vs.p),
          ks.sb, ks.ss, h * ks.sh, vs.sb, vs.ss, h * vs.sh};
}

// Stage 1 of decode for work items [i0, i1) (kernels.h: DecodeArgs, decode_item).
template <class V, DType T, DType C, int ND>
struct DecodeRange {
  static void run(const DecodeArgs& a, int64_t i0, int64_t i1) {
    constexpr int64_t D = ND * V::W;
    const int64_t G = a.Hq / a.Hkv, ns = a.num_splits;
    Workspace<V> w(G, D);
    for (int64_t item = i0; item < i1; ++item) {
      const DecodeItem it = decode_item(a, item);
      if (it.t0 >= it.t1) {  // an empty split: weight 0 in the reduce
        for (int64_t g = 0; g < G; ++g) {
          std::fill(it.pout + g * ns * D, it.pout + g * ns * D + D, 0.f);
          it.plse[g * ns] = -std::numeric_limits<float>::infinity();
        }
        continue;
      }
      for (int64_t g = 0; g < G; ++g)
        load_query<V, T, ND>(a.q, it.b * a.sqb + (it.h * G + g) * a.sqh, a.sqd, a.scale, w, g, w.row_bytes.data());
      QueryRows r = w.start(G, D, a.scale, a.softcap, false);
      attend_rows<V, T, C, ND>(kv_head<V, C>(a, a.block_tables + it.b * a.sbt, it.h), r, w, it.t0, it.t1);
      for (int64_t g = 0; g < G; ++g) {
        const typename V::reg sum = V::set1(r.row_sum[g]);  // divided, not multiplied by 1 / sum: one rounding
        for (int64_t i = 0; i < D; i += V::W)
          V::store(it.pout + g * ns * D + i, V::div(V::load(r.acc + g * D + i), sum));
        it.plse[g * ns] = r.row_max[g] + std::log(r.row_sum[g]);
      }
    }
  }
};

// Prefill for work items [i0, i1): (b, KV head h, tile of a.tile query positions) as kernels.h's PrefillArgs says.
template <class V, DType T, DType C, int ND>
struct PrefillRange {
  static void run(const PrefillArgs& a, int64_t i0, int64_t i1) {
    constexpr int64_t D = ND * V::W, es = elem_size(T);
    const int64_t G = a.Hq / a.Hkv, tiles = (a.S + a.tile - 1) / a.tile;
    Workspace<V> w(a.tile * G, D);
    for (int64_t item = i0; item < i1; ++item) {
      // Within one (b, h) the tiles go 0, last, 1, last - 1, ...: a thread's contiguous share of items mixes the
      // short causal tiles with the long ones.
      const int64_t k = item % tiles, bh = item / tiles, h = bh % a.Hkv, b = bh / a.Hkv;
      const int64_t tile = k % 2 ? tiles - 1 - k / 2 : k / 2;
      const int64_t L = a.seq_lens[b], first_real = a.S - a.q_lens[b];
      const int64_t s0 = tile * a.tile, s1 = std::min(s0 + a.tile, a.S);
      int64_t need_lo = L, need_hi = 0;  // the tokens any row of the tile sees
      for (int64_t s = s0; s < s1; ++s) {
        const int64_t pos = L - a.S + s;  // left padding (s < first_real) and positions before 0 see nothing
        const bool live = s >= first_real && pos >= 0;
        const int64_t hi = live ? pos + 1 : 0;
        const int64_t lo = live && a.window > 0 ? std::max<int64_t>(0, pos + 1 - a.window) : 0;
        for (int64_t g = 0; g < G; ++g) {
          const int64_t m = (s - s0) * G + g;
          w.lo[m] = lo;
          w.hi[m] = hi;
          load_query<V, T, ND>(a.q, b * a.sqb + (h * G + g) * a.sqh + s * a.sqs, a.sqd, a.scale, w, m,
                               w.row_bytes.data());
        }
        if (live) {
          need_lo = std::min(need_lo, lo);
          need_hi = std::max(need_hi, hi);
        }
      }
      QueryRows r = w.start((s1 - s0) * G, D, a.scale, a.softcap, true);
      if (need_lo < need_hi)
        attend_rows<V, T, C, ND>(kv_head<V, C>(a, a.block_tables + b * a.sbt, h), r, w, need_lo, need_hi);
      unsigned char* row = w.row_bytes.data();
      for (int64_t m = 0; m < r.M; ++m) {
        const int64_t s = s0 + m / G, g = m % G;
        // A row with no visible key (padding) has sum 0 and writes zeros (0 / 1).
        const typename V::reg sum = V::set1(r.row_sum[m] > 0.f ? r.row_sum[m] : 1.f);
        for (int64_t i = 0; i < D; i += V::W)
          V::template store_as<T>(row + i * es, V::div(V::load(r.acc + m * D + i), sum));
        unsigned char* dst = static_cast<unsigned char*>(a.out) + (b * a.sob + (h * G + g) * a.soh + s * a.sos) * es;
        if (a.sod == 1)
          std::memcpy(dst, row, D * es);
        else
          for (int64_t d = 0; d < D; ++d) std::memcpy(dst + d * a.sod * es, row + d * es, es);
      }
    }
  }
};

// Head dims with an instantiation, for float and 8-bit pages alike: 64, 80, 96, 128, 256 (each a multiple of W = 8 or
// 16). Any other head dim goes to the portable decode kernel and the reference prefill.
constexpr bool vec_head_dim(int64_t D) { return D == 64 || D == 80 || D == 96 || D == 128 || D == 256; }
constexpr bool vec_head_dim(int64_t D, DType) { return vec_head_dim(D); }

template <class V, template <class, DType, DType, int> class Fn, DType T, DType C, class Args>
int run_head_dim(int64_t D, const Args& a, int64_t i0, int64_t i1) {
  switch (D) {
    case 64: Fn<V, T, C, 64 / V::W>::run(a, i0, i1); return kOk;
    case 80: Fn<V, T, C, 80 / V::W>::run(a, i0, i1); return kOk;
    case 96: Fn<V, T, C, 96 / V::W>::run(a, i0, i1); return kOk;
    case 128: Fn<V, T, C, 128 / V::W>::run(a, i0, i1); return kOk;
    case 256: Fn<V, T, C, 256 / V::W>::run(a, i0, i1); return kOk;
    default: return kNoKernel;
  }
}

template <class V, template <class, DType, DType, int> class Fn, DType T, class Args>
int run_cache_dtype(const Args& a, int64_t i0, int64_t i1) {
  if (a.ct == T) return run_head_dim<V, Fn, T, T>(a.D, a, i0, i1);
  if (a.kss.p == nullptr || a.vss.p == nullptr) return kBadDType;  // 8-bit pages come with their scales
  if (a.ct == kI8) return run_head_dim<V, Fn, T, kI8>(a.D, a, i0, i1);
  if (a.ct == kF8E4M3) return run_head_dim<V, Fn, T, kF8E4M3>(a.D, a, i0, i1);
  return kBadDType;
}

template <class V, template <class, DType, DType, int> class Fn, class Args>
int run_attention(const Args& a, int64_t i0, int64_t i1) {
  switch (a.t) {
    case kF32: return run_cache_dtype<V, Fn, kF32>(a, i0, i1);
    case kBF16: return run_cache_dtype<V, Fn, kBF16>(a, i0, i1);
    case kF16: return run_cache_dtype<V, Fn, kF16>(a, i0, i1);
    default: return kBadDType;
  }
}

}  // namespace
}  // namespace cpu
}  // namespace llmkern
