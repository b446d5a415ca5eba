// The one file of the extension that includes torch: input checks (TORCH_CHECK with a message that names the
// argument), dtype mapping, threading with at::parallel_for, and registration of every op in the `llmkern_C`
// library with schemas (`Tensor(a!)` marks what is mutated) and per-device implementations.
//
// The public `llmkern::` ops (llmkern/ops.py) choose a backend per call and call these for backend "cpp" (CPU
// tensors) and "cuda" (CUDA tensors); that keeps backend choice observable and lets tests force any backend.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <Python.h>
#include <torch/library.h>

#include <algorithm>
#include <initializer_list>
#include <limits>
#include <string>
#include <vector>

#include "cpu/kernels.h"
#ifdef LLMKERN_WITH_CUDA
#include "cuda/launch.h"
#include <ATen/DeviceGuard.h>   // at::device_of
#include <c10/cuda/CUDAGuard.h>  // OptionalCUDAGuard: each CUDA op runs on its tensors' device
#include <c10/cuda/CUDAStream.h>  // not ATen/cuda/CUDAContext.h: that pulls cuSPARSE/cuBLAS headers
#endif

namespace {

namespace kc = llmkern::cpu;

kc::DType dtype_of(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return kc::kF32;
    case at::kHalf: return kc::kF16;
    case at::kBFloat16: return kc::kBF16;
    default:
      TORCH_CHECK_TYPE(false, name, " must be float32, float16 or bfloat16, got ", t.scalar_type());
  }
}

bool is_8bit_cache(at::ScalarType t) { return t == at::kChar || t == at::kFloat8_e4m3fn; }

// A cache's dtype: float pages as dtype_of, or 8-bit codes (int8, float8_e4m3fn).
kc::DType cache_dtype_of(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kChar: return kc::kI8;
    case at::kFloat8_e4m3fn: return kc::kF8E4M3;
    case at::kFloat:
    case at::kHalf:
    case at::kBFloat16: return dtype_of(t, name);
    default:
      TORCH_CHECK_TYPE(false, name, " must be float32, float16, bfloat16, int8 or float8_e4m3fn, got ",
                       t.scalar_type());
  }
}

void ok(int status, const char* op) {
  TORCH_CHECK(status == kc::kOk, "llmkern ", op, ": ", kc::status_string(status));
}

void check_same_device(const at::Tensor& a, const char* an, const at::Tensor& b, const char* bn) {
  TORCH_CHECK(a.device() == b.device(), an, " and ", bn, " must be on one device, got ", a.device(), " and ",
              b.device());
}

void check_nonempty(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.numel() > 0, name, " must not be empty, got shape ", t.sizes());
}

// Leading dims collapsed into rows: a view whenever the strides allow it (always for HF activations).
at::Tensor rows_of(const at::Tensor& t) { return t.reshape({-1, t.size(-1)}); }

// The same rows without creating a tensor when the strides allow it (always for HF activations and our outputs):
// a view costs ~0.45 us through the dispatcher and autograd's view bookkeeping, about what a decode-sized kernel
// does. Otherwise `copy` holds reshape's copy (inputs only: outputs are allocated contiguous).
struct RowView {
  at::Tensor copy;
  void* p;
  int64_t M, sm, sn;
};

RowView row_view(const at::Tensor& t) {
  const int64_t d = t.dim();
  int64_t M = 1, sm = t.size(d - 1) * t.stride(d - 1), expect = -1;
  bool ok_layout = true;
  for (int64_t i = d - 2; i >= 0; --i) {
    if (t.size(i) == 1) continue;
    if (expect < 0) {
      sm = t.stride(i);
    } else if (t.stride(i) != expect) {
      ok_layout = false;
      break;
    }
    expect = (expect < 0 ? sm : expect) * t.size(i);
    M *= t.size(i);
  }
  if (ok_layout) return {at::Tensor(), t.data_ptr(), M, sm, t.stride(d - 1)};
  at::Tensor r = rows_of(t);
  return {r, r.data_ptr(), r.size(0), r.stride(0), r.stride(1)};
}

// Rows per parallel_for chunk so that tiny (decode) problems stay on the calling thread.
int64_t row_grain(int64_t cols) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(cols, 1)); }

at::ScalarType norm_out_dtype(const at::Tensor& x, const at::Tensor& w, double offset) {
  return offset == 0.0 ? at::promote_types(x.scalar_type(), w.scalar_type()) : x.scalar_type();
}

void check_norm(const at::Tensor& x, const at::Tensor& w, double eps) {
  check_nonempty(x, "x");
  check_same_device(x, "x", w, "weight");
  TORCH_CHECK(w.dim() == 1 && w.size(0) == x.size(-1), "weight must have shape (", x.size(-1),
              ",) to match the last dim of x, got ", w.sizes());
  TORCH_CHECK(eps > 0.0, "eps must be positive, got ", eps);
}

// ------------------------------------------------------------------------------------------------------------------
// CPU implementations

at::Tensor rms_norm_cpu(const at::Tensor& x, const at::Tensor& w, double eps, double offset) {
  check_norm(x, w, eps);
  auto xt = dtype_of(x, "x"), wt = dtype_of(w, "weight");
  at::Tensor out = at::empty(x.sizes(), x.options().dtype(norm_out_dtype(x, w, offset)));
  auto yt = dtype_of(out, "out");
  const RowView x2 = row_view(x), y2 = row_view(out);
  const int64_t M = x2.M, N = x.size(-1);
  at::parallel_for(0, M, row_grain(N), [&](int64_t b, int64_t e) {
    ok(kc::rms_norm(x2.p, x2.sm, x2.sn, w.data_ptr(), w.stride(0), y2.p, y2.sm, y2.sn, b, e, N,
                    static_cast<float>(eps), static_cast<float>(offset), xt, wt, yt),
       "rms_norm");
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> fused_add_rms_norm_cpu(const at::Tensor& x, const at::Tensor& residual,
                                                          const at::Tensor& w, double eps) {
  check_norm(x, w, eps);
  check_same_device(x, "x", residual, "residual");
  TORCH_CHECK(x.sizes() == residual.sizes(), "x and residual must have one shape, got ", x.sizes(), " and ",
              residual.sizes());
  TORCH_CHECK(x.scalar_type() == residual.scalar_type(), "x and residual must have one dtype, got ",
              x.scalar_type(), " and ", residual.scalar_type());
  auto xt = dtype_of(x, "x"), wt = dtype_of(w, "weight");
  at::Tensor out = at::empty(x.sizes(), x.options().dtype(norm_out_dtype(x, w, 0.0)));
  at::Tensor res_out = at::empty(x.sizes(), x.options());
  auto yt = dtype_of(out, "out");
  const RowView x2 = row_view(x), r2 = row_view(residual), y2 = row_view(out), ro2 = row_view(res_out);
  const int64_t M = x2.M, N = x.size(-1);
  at::parallel_for(0, M, row_grain(N), [&](int64_t b, int64_t e) {
    ok(kc::fused_add_rms_norm(x2.p, x2.sm, x2.sn, r2.p, r2.sm, r2.sn, w.data_ptr(), w.stride(0), y2.p, y2.sm, y2.sn,
                              ro2.p, ro2.sm, ro2.sn, b, e, N, static_cast<float>(eps), xt, wt, yt),
       "fused_add_rms_norm");
  });
  return {out, res_out};
}

void check_rope(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos, const at::Tensor& sin) {
  check_nonempty(q, "q");
  check_nonempty(k, "k");
  check_same_device(q, "q", k, "k");
  check_same_device(q, "q", cos, "cos");
  check_same_device(q, "q", sin, "sin");
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4, "q and k must be 4-D [batch, heads, seq, head_dim], got ", q.sizes(),
              " and ", k.sizes());
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(2) == q.size(2) && k.size(3) == q.size(3),
              "k must match q in batch, seq and head_dim: q ", q.sizes(), ", k ", k.sizes());
  TORCH_CHECK(q.scalar_type() == k.scalar_type(), "q and k must have one dtype, got ", q.scalar_type(), " and ",
              k.scalar_type());
  TORCH_CHECK(cos.sizes() == sin.sizes() && cos.dim() == 3 && (cos.size(0) == 1 || cos.size(0) == q.size(0)) &&
                  cos.size(1) == q.size(2),
              "cos and sin must have shape [1 or batch, seq, rotary_dim], got ", cos.sizes(), " and ", sin.sizes());
  TORCH_CHECK(cos.size(2) % 2 == 0 && cos.size(2) <= q.size(3) && cos.size(2) <= 512,
              "rotary_dim (cos.size(-1)) must be even and at most head_dim (and 512), got ", cos.size(2));
  TORCH_CHECK(cos.scalar_type() == sin.scalar_type(), "cos and sin must have one dtype");
}

std::tuple<at::Tensor, at::Tensor> apply_rope_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                                                  const at::Tensor& sin) {
  check_rope(q, k, cos, sin);
  auto xt = dtype_of(q, "q"), ct = dtype_of(cos, "cos");
  at::Tensor qo = at::empty_like(q), ko = at::empty_like(k);
  const int64_t B = q.size(0), S = q.size(2), D = q.size(3), RD = cos.size(2);
  const int64_t scb = cos.size(0) > 1 ? cos.stride(0) : 0, ssb = sin.size(0) > 1 ? sin.stride(0) : 0;
  for (auto [x, o] : {std::pair<const at::Tensor&, at::Tensor&>{q, qo}, {k, ko}}) {
    kc::RopeArgs a{x.data_ptr(), x.stride(0), x.stride(1), x.stride(2), x.stride(3),
                   o.data_ptr(), o.stride(0), o.stride(1), o.stride(2), o.stride(3), x.size(1)};
    at::parallel_for(0, B * S, row_grain(x.size(1) * D), [&](int64_t b, int64_t e) {
      ok(kc::rope(a, cos.data_ptr(), scb, cos.stride(1), cos.stride(2), sin.data_ptr(), ssb, sin.stride(1),
                  sin.stride(2), S, D, RD, b, e, xt, ct),
         "apply_rope");
    });
  }
  return {qo, ko};
}

// A row is split across threads (silu_and_mul_cpu) only with at least this many columns per piece.
constexpr int64_t kSiluMinPiece = 2048;

at::Tensor silu_and_mul_cpu(const at::Tensor& gate, const at::Tensor& up) {
  check_nonempty(gate, "gate");
  check_same_device(gate, "gate", up, "up");
  TORCH_CHECK(gate.sizes() == up.sizes(), "gate and up must have one shape, got ", gate.sizes(), " and ", up.sizes());
  TORCH_CHECK(gate.scalar_type() == up.scalar_type(), "gate and up must have one dtype, got ", gate.scalar_type(),
              " and ", up.scalar_type());
  auto t = dtype_of(gate, "gate");
  at::Tensor out = at::empty(gate.sizes(), gate.options());
  const RowView g2 = row_view(gate), u2 = row_view(up), o2 = row_view(out);
  const int64_t M = g2.M, I = gate.size(-1);
  const int64_t threads = at::get_num_threads();
  if (M < threads && I >= 2 * kSiluMinPiece) {
    // Decode: fewer rows than threads. Each row splits into column pieces, 64-element aligned, about one per thread
    // (the op is elementwise: the same result), so one row of Llama-3-8B's 14336 no longer runs on one thread.
    const int64_t per_row = std::min((threads + M - 1) / M, I / kSiluMinPiece);
    const int64_t piece = ((I + per_row - 1) / per_row + 63) & ~int64_t{63}, es = gate.element_size();
    const int64_t pieces = (I + piece - 1) / piece;
    at::parallel_for(0, M * pieces, 1, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        const int64_t m = i / pieces, c0 = i % pieces * piece, n = std::min(piece, I - c0);
        const auto col = [&](void* p, int64_t sm, int64_t sn) {  // row m, column c0
          return static_cast<void*>(static_cast<char*>(p) + (m * sm + c0 * sn) * es);
        };
        ok(kc::silu_and_mul(col(g2.p, g2.sm, g2.sn), 0, g2.sn, col(u2.p, u2.sm, u2.sn), 0, u2.sn,
                            col(o2.p, o2.sm, o2.sn), 0, o2.sn, 0, 1, n, t),
           "silu_and_mul");
      }
    });
    return out;
  }
  at::parallel_for(0, M, row_grain(I), [&](int64_t b, int64_t e) {
    ok(kc::silu_and_mul(g2.p, g2.sm, g2.sn, u2.p, u2.sm, u2.sn, o2.p, o2.sm, o2.sn, b, e, I, t), "silu_and_mul");
  });
  return out;
}

// The paged caches: [num_blocks, block_size, num_kv_heads, head_dim] of one shape, dtype and device. Strides along
// blocks, slots and heads may be anything, and K's may differ from V's (the two halves of one [NB, 2, BS, Hkv, D]
// tensor, head-major pages permuted to NHD): the kernels take them (cache_strides). head_dim must be contiguous.
void check_cache(const at::Tensor& k_cache, const at::Tensor& v_cache) {
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes(),
              "k_cache and v_cache must be 4-D [num_blocks, block_size, num_kv_heads, head_dim] of one shape, got ",
              k_cache.sizes(), " and ", v_cache.sizes());
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{k_cache, "k_cache"}, {v_cache, "v_cache"}})
    TORCH_CHECK(t.stride(3) == 1 || t.size(3) <= 1, name, " must have last-dim stride 1 (head_dim contiguous), got "
                "strides ", t.strides(), "; strides along blocks, slots and heads may be anything");
  TORCH_CHECK(k_cache.scalar_type() == v_cache.scalar_type(), "k_cache and v_cache must have one dtype");
  check_same_device(k_cache, "k_cache", v_cache, "v_cache");
  // The page sizes llmkern/paged_ops.py accepts on every backend (MAX_BLOCK_SIZE, MAX_HEAD_DIM): a caller that skips
  // its Python checks (its eager fast path) gets the same refusal here.
  const int64_t BS = k_cache.size(1);
  TORCH_CHECK(BS >= 1 && BS <= 256 && (BS & (BS - 1)) == 0,
              "k_cache's block_size (its second dimension) must be a power of two in 1..256, got ", BS);
  TORCH_CHECK(k_cache.size(3) <= 256, "k_cache's head_dim (its last dimension) must be at most 256, got ",
              k_cache.size(3));
}

// A checked cache's element strides along blocks, slots and heads.
kc::CacheStrides cache_strides(const at::Tensor& cache) { return {cache.stride(0), cache.stride(1), cache.stride(2)}; }

// 8-bit pages (int8 or float8_e4m3fn caches) come with their scales, k_scales and v_scales: float16
// [num_blocks, block_size, num_kv_heads] (any strides) on the caches' device, one per token row of each KV head
// (llmkern/reference.py, quantize_kv); float pages come without. Returns the cache's dtype.
kc::DType check_scales(const at::Tensor& k_cache, const std::optional<at::Tensor>& k_scales,
                       const std::optional<at::Tensor>& v_scales) {
  const bool has_k = k_scales.has_value(), has_v = v_scales.has_value();
  TORCH_CHECK(has_k == has_v, "k_scales and v_scales must be given together (8-bit pages) or both be None (float "
              "pages), got only ", has_k ? "k_scales" : "v_scales");
  const int64_t NB = k_cache.size(0), BS = k_cache.size(1), Hkv = k_cache.size(2);
  if (!is_8bit_cache(k_cache.scalar_type())) {
    TORCH_CHECK_TYPE(!has_k, "k_scales and v_scales are for 8-bit pages (int8 or float8_e4m3fn caches), but "
                     "k_cache is ", k_cache.scalar_type(), ": pass None for float pages");
    return cache_dtype_of(k_cache, "k_cache");
  }
  TORCH_CHECK(has_k, "k_cache and v_cache are ", k_cache.scalar_type(), " (8-bit pages): k_scales and v_scales "
              "(float16 [", NB, ", ", BS, ", ", Hkv, "], one per token and KV head) must be given");
  for (const auto& [t, name] :
       {std::pair<const at::Tensor&, const char*>{*k_scales, "k_scales"}, {*v_scales, "v_scales"}}) {
    TORCH_CHECK_TYPE(t.scalar_type() == at::kHalf, name, " must be float16, got ", t.scalar_type());
    TORCH_CHECK(t.dim() == 3 && t.size(0) == NB && t.size(1) == BS && t.size(2) == Hkv, name, " must have shape [",
                NB, ", ", BS, ", ", Hkv, "] (the caches' [num_blocks, block_size, num_kv_heads]), got ", t.sizes());
    check_same_device(t, name, k_cache, "k_cache");
  }
  return cache_dtype_of(k_cache, "k_cache");
}

// The kernels' view of checked scales (null for float pages).
kc::KvScales kv_scales(const std::optional<at::Tensor>& s) {
  if (!s.has_value()) return {nullptr, 0, 0, 0};
  return {s->data_ptr(), s->stride(0), s->stride(1), s->stride(2)};
}

// key/value rows into the pages; 8-bit pages (k_scales / v_scales given) quantize them on the way (kernels.h).
void reshape_and_cache_cpu(const at::Tensor& key, const at::Tensor& value, at::Tensor& k_cache, at::Tensor& v_cache,
                           const at::Tensor& slot_mapping, const std::optional<at::Tensor>& k_scales,
                           const std::optional<at::Tensor>& v_scales) {
  check_cache(k_cache, v_cache);
  const kc::DType ct = check_scales(k_cache, k_scales, v_scales);
  const int64_t NB = k_cache.size(0), BS = k_cache.size(1), Hkv = k_cache.size(2), D = k_cache.size(3);
  TORCH_CHECK(key.dim() == 3 && key.sizes() == value.sizes() && key.size(1) == Hkv && key.size(2) == D,
              "key and value must have shape [num_tokens, ", Hkv, ", ", D, "], got ", key.sizes(), " and ",
              value.sizes());
  if (kc::is_8bit(ct)) {
    TORCH_CHECK(key.scalar_type() == value.scalar_type(), "key and value must have one dtype, got ",
                key.scalar_type(), " and ", value.scalar_type());
  } else {
    TORCH_CHECK(key.scalar_type() == k_cache.scalar_type() && value.scalar_type() == k_cache.scalar_type(),
                "key/value dtype must match the cache dtype ", k_cache.scalar_type());
  }
  TORCH_CHECK(slot_mapping.scalar_type() == at::kLong && slot_mapping.dim() == 1 &&
                  slot_mapping.size(0) == key.size(0) && slot_mapping.is_contiguous(),
              "slot_mapping must be a contiguous int64 tensor of shape [", key.size(0), "], got ",
              slot_mapping.scalar_type(), " ", slot_mapping.sizes());
  check_same_device(key, "key", k_cache, "k_cache");
  check_same_device(slot_mapping, "slot_mapping", k_cache, "k_cache");
  const int64_t T = key.size(0);
  // Validate every slot before writing any, so a bad slot leaves the cache untouched.
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t)
    TORCH_CHECK(slots[t] < NB * BS, "slot_mapping[", t, "] = ", slots[t], " is past the cache's ", NB * BS, " slots");
  auto dt = dtype_of(key, "key");
  const kc::CacheStrides kcs = cache_strides(k_cache), vcs = cache_strides(v_cache);
  const kc::KvScales kss = kv_scales(k_scales), vss = kv_scales(v_scales);
  at::parallel_for(0, T, row_grain(Hkv * D), [&](int64_t b, int64_t e) {
    ok(kc::reshape_and_cache(key.data_ptr(), key.stride(0), key.stride(1), key.stride(2), value.data_ptr(),
                             value.stride(0), value.stride(1), value.stride(2), k_cache.data_ptr(), kcs,
                             v_cache.data_ptr(), vcs, slots, b, e, Hkv, D, NB, BS, dt, ct, kss, vss),
       "reshape_and_cache");
  });
}

// The checks decode and prefill share: q's heads and dtype against the cache (float pages: one dtype; 8-bit pages:
// q float32, float16 or bfloat16), the block tables and seq_lens (int32, one row per sequence), every length within
// its table and every page id it reaches inside the pool. Returns the longest sequence.
int64_t check_paged(const at::Tensor& q, int64_t Hq, const at::Tensor& k_cache, const at::Tensor& block_tables,
                    const at::Tensor& seq_lens, int64_t B) {
  const int64_t NB = k_cache.size(0), BS = k_cache.size(1), Hkv = k_cache.size(2);
  TORCH_CHECK(Hq % Hkv == 0, "q's heads (", Hq, ") must be a multiple of the cache's KV heads (", Hkv, ")");
  if (is_8bit_cache(k_cache.scalar_type())) {
    dtype_of(q, "q");
  } else {
    TORCH_CHECK(q.scalar_type() == k_cache.scalar_type(), "q dtype ", q.scalar_type(), " must match the cache dtype ",
                k_cache.scalar_type());
  }
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && block_tables.dim() == 2 && block_tables.size(0) == B &&
                  block_tables.stride(1) == 1,
              "block_tables must be int32 [", B, ", max_blocks] with unit last stride, got ",
              block_tables.scalar_type(), " ", block_tables.sizes());
  TORCH_CHECK(seq_lens.scalar_type() == at::kInt && seq_lens.dim() == 1 && seq_lens.size(0) == B &&
                  seq_lens.is_contiguous(),
              "seq_lens must be a contiguous int32 tensor of shape [", B, "], got ", seq_lens.scalar_type(), " ",
              seq_lens.sizes());
  check_same_device(q, "q", k_cache, "k_cache");
  const int32_t* lens = seq_lens.data_ptr<int32_t>();
  const int32_t* tables = block_tables.data_ptr<int32_t>();
  int64_t max_len = 0;
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(lens[b] >= 0 && lens[b] <= block_tables.size(1) * BS, "seq_lens[", b, "] = ", lens[b],
                " must be in [0, ", block_tables.size(1) * BS, "] (block_tables holds ", block_tables.size(1),
                " blocks of ", BS, ")");
    max_len = std::max<int64_t>(max_len, lens[b]);
    for (int64_t i = 0; i < (lens[b] + BS - 1) / BS; ++i)
      TORCH_CHECK(tables[b * block_tables.stride(0) + i] >= 0 && tables[b * block_tables.stride(0) + i] < NB,
                  "block_tables[", b, ", ", i, "] = ", tables[b * block_tables.stride(0) + i],
                  " is not a block of the cache (", NB, " blocks)");
  }
  return max_len;
}

at::Tensor paged_decode_attention_cpu(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                      const at::Tensor& block_tables, const at::Tensor& seq_lens, double scale,
                                      int64_t sliding_window, double softcap, int64_t num_splits,
                                      const std::optional<at::Tensor>& k_scales,
                                      const std::optional<at::Tensor>& v_scales) {
  check_cache(k_cache, v_cache);
  const kc::DType ct = check_scales(k_cache, k_scales, v_scales);
  const int64_t NB = k_cache.size(0), BS = k_cache.size(1), Hkv = k_cache.size(2), D = k_cache.size(3);
  TORCH_CHECK(q.dim() == 3 && q.size(2) == D, "q must have shape [batch, num_heads, ", D, "], got ", q.sizes());
  const int64_t B = q.size(0), Hq = q.size(1);
  const int64_t max_len = check_paged(q, Hq, k_cache, block_tables, seq_lens, B);
  const int32_t* lens = seq_lens.data_ptr<int32_t>();
  const int32_t* tables = block_tables.data_ptr<int32_t>();
  // Splits: enough work items to keep every thread busy (4 per thread), never shorter than 256 tokens.
  int64_t ns = num_splits;
  if (ns <= 0) {
    const int64_t want = 4 * at::get_num_threads();
    ns = std::max<int64_t>(1, (want + B * Hkv - 1) / (B * Hkv));
    ns = std::min<int64_t>(ns, std::max<int64_t>(1, (max_len + 255) / 256));
  }
  int64_t split_len = (max_len + ns - 1) / ns;
  split_len = (split_len + BS - 1) / BS * BS;
  auto fopts = q.options().dtype(at::kFloat);
  at::Tensor part_out = at::empty({B, Hq, ns, D}, fopts), part_lse = at::empty({B, Hq, ns}, fopts);
  at::Tensor out = at::empty({B, Hq, D}, q.options());
  kc::DecodeArgs a{q.data_ptr(), q.stride(0), q.stride(1), q.stride(2), k_cache.data_ptr(), v_cache.data_ptr(),
                   cache_strides(k_cache), cache_strides(v_cache), tables, block_tables.stride(0), lens, B, Hq, Hkv,
                   D, BS, NB, ns, split_len,
                   static_cast<float>(scale), static_cast<float>(softcap), sliding_window,
                   part_out.data_ptr<float>(), part_lse.data_ptr<float>(), dtype_of(q, "q"), ct,
                   kv_scales(k_scales), kv_scales(v_scales)};
  at::parallel_for(0, B * Hkv * ns, 1, [&](int64_t b, int64_t e) { ok(kc::paged_decode_stage1(a, b, e), "decode"); });
  at::parallel_for(0, B * Hq, 64, [&](int64_t b, int64_t e) {
    ok(kc::paged_decode_reduce(a, out.data_ptr(), out.stride(0), out.stride(1), out.stride(2), b, e), "decode");
  });
  return out;
}

at::Tensor paged_prefill_attention_cpu(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                       const at::Tensor& block_tables, const at::Tensor& seq_lens,
                                       const at::Tensor& q_lens, double scale, int64_t sliding_window,
                                       double softcap, const std::optional<at::Tensor>& k_scales,
                                       const std::optional<at::Tensor>& v_scales) {
  check_cache(k_cache, v_cache);
  const kc::DType ct = check_scales(k_cache, k_scales, v_scales);
  const int64_t NB = k_cache.size(0), BS = k_cache.size(1), Hkv = k_cache.size(2), D = k_cache.size(3);
  TORCH_CHECK(q.dim() == 4 && q.size(3) == D, "q must have shape [batch, num_heads, seq, ", D, "], got ", q.sizes());
  const int64_t B = q.size(0), Hq = q.size(1), S = q.size(2);
  check_paged(q, Hq, k_cache, block_tables, seq_lens, B);
  TORCH_CHECK(q_lens.scalar_type() == at::kInt && q_lens.dim() == 1 && q_lens.size(0) == B && q_lens.is_contiguous(),
              "q_lens must be a contiguous int32 tensor of shape [", B, "], got ", q_lens.scalar_type(), " ",
              q_lens.sizes());
  const auto dt = dtype_of(q, "q");
  TORCH_CHECK(kc::fast_attention_supported(dt, D, ct), "llmkern paged_prefill_attention: no C++ kernel for head_dim ",
              D, kc::is_8bit(ct) ? " over 8-bit pages" : "", " on this CPU (", kc::isa_name(), ")");
  const int32_t* lens = seq_lens.data_ptr<int32_t>();
  const int32_t* qls = q_lens.data_ptr<int32_t>();
  const int32_t* tables = block_tables.data_ptr<int32_t>();
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(qls[b] >= 0 && qls[b] <= S && qls[b] <= lens[b], "q_lens[", b, "] = ", qls[b], " must be in [0, ",
                std::min<int64_t>(S, lens[b]), "] (q has ", S, " rows, seq_lens[", b, "] = ", lens[b], ")");
  at::Tensor out = at::empty(q.sizes(), q.options());
  if (out.numel() == 0) return out;
  // Query rows per work item: about 64 rows of the [tile * G, D] block, so a 64-token K/V chunk read from memory
  // serves many rows from L1.
  const int64_t G = Hq / Hkv, tile = std::max<int64_t>(1, std::min<int64_t>(S, 64 / G));
  kc::PrefillArgs a{q.data_ptr(), q.stride(0), q.stride(1), q.stride(2), q.stride(3), k_cache.data_ptr(),
                    v_cache.data_ptr(), cache_strides(k_cache), cache_strides(v_cache), tables,
                    block_tables.stride(0), lens, qls, B, Hq, Hkv, S, D, BS, NB,
                    static_cast<float>(scale), static_cast<float>(softcap), sliding_window, out.data_ptr(),
                    out.stride(0), out.stride(1), out.stride(2), out.stride(3), tile, dt, ct,
                    kv_scales(k_scales), kv_scales(v_scales)};
  const int64_t items = B * Hkv * ((S + tile - 1) / tile);
  at::parallel_for(0, items, 1, [&](int64_t b, int64_t e) { ok(kc::paged_prefill(a, b, e), "paged_prefill_attention"); });
  return out;
}

// One projection, checked and set up: its output (allocated), the rows of x it reads (kept alive), the kernel's
// arguments and how many 16-feature blocks it has; `grain` blocks per parallel chunk at least.
struct LinearCall {
  at::Tensor y, x2;
  kc::LinearArgs a;
  int64_t blocks, grain;
};

LinearCall prepare_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(weight.dim() == 2 && weight.stride(1) == 1, "weight must be 2-D [out_features, in_features] with unit "
              "last stride, got shape ", weight.sizes(), " strides ", weight.strides());
  const int64_t N = weight.size(0), K = weight.size(1);
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == K, "x must have shape [..., ", K, "] to match weight ", weight.sizes(),
              ", got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == weight.scalar_type(), "x dtype ", x.scalar_type(), " must match weight dtype ",
              weight.scalar_type());
  check_same_device(x, "x", weight, "weight");
  const auto dt = dtype_of(weight, "weight");
  TORCH_CHECK(kc::linear_supported(dt), "llmkern linear: no C++ kernel for ", weight.scalar_type(), " on this CPU (",
              kc::isa_name(), ")");
  TORCH_CHECK(N > 0 && K > 0, "weight must not be empty, got shape ", weight.sizes());
  const void* bp = nullptr;
  if (bias.has_value()) {
    const at::Tensor& b = *bias;
    TORCH_CHECK(b.dim() == 1 && b.size(0) == N && b.is_contiguous(), "bias must be a contiguous [", N, "] tensor, got ",
                b.sizes());
    TORCH_CHECK(b.scalar_type() == weight.scalar_type(), "bias dtype ", b.scalar_type(), " must match weight dtype ",
                weight.scalar_type());
    check_same_device(b, "bias", weight, "weight");
    bp = b.data_ptr();
  }
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = N;
  LinearCall c;
  c.y = at::empty(shape, x.options());
  c.blocks = 0;
  c.grain = 1;
  if (c.y.numel() == 0) return c;
  c.x2 = rows_of(x);
  if (c.x2.stride(1) != 1) c.x2 = c.x2.contiguous();  // a few decode rows: cheap
  c.a = kc::LinearArgs{c.x2.data_ptr(), c.x2.stride(0), weight.data_ptr(), weight.stride(0), bp, c.y.data_ptr(), N,
                       c.x2.size(0), N, K, dt};
  c.blocks = (N + 15) / 16;
  // At least ~64 KiB of weights per parallel chunk: a small projection stays on one thread.
  c.grain = std::max<int64_t>(1, 65536 / (16 * K * weight.element_size()));
  return c;
}

at::Tensor linear_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  LinearCall c = prepare_linear(x, weight, bias);
  if (c.blocks == 0) return c.y;
  at::parallel_for(0, c.blocks, c.grain, [&](int64_t b, int64_t e) { ok(kc::linear(c.a, b, e), "linear"); });
  return c.y;
}

// Projections of one input (q/k/v, gate/up) in one parallel region over all their blocks: each output is the one
// linear_cpu gives, bit for bit (a block is computed the same whichever thread's range it falls in), with one
// parallel region instead of one per weight. Measured on an AMD EPYC (AVX-512, 2 threads, bf16): 90 SmolLM2 MLP
// weights streamed at 28 GB/s called one by one and at 34 GB/s as one matrix; the difference is per call, mostly each
// call's cold start and its threads' shares ending at different times (the fork/join itself is ~1 µs there).
std::vector<at::Tensor> linear_many(const at::Tensor& x, std::initializer_list<const at::Tensor*> ws,
                                    std::initializer_list<const std::optional<at::Tensor>*> bs) {
  std::vector<LinearCall> calls;
  calls.reserve(ws.size());
  auto bi = bs.begin();
  for (const at::Tensor* w : ws) calls.push_back(prepare_linear(x, *w, **bi++));
  std::vector<int64_t> start(calls.size() + 1, 0);
  int64_t grain = std::numeric_limits<int64_t>::max();
  for (size_t i = 0; i < calls.size(); ++i) {
    start[i + 1] = start[i] + calls[i].blocks;
    if (calls[i].blocks) grain = std::min(grain, calls[i].grain);
  }
  std::vector<at::Tensor> ys;
  for (auto& c : calls) ys.push_back(c.y);
  if (start.back() == 0) return ys;
  at::parallel_for(0, start.back(), grain, [&](int64_t b, int64_t e) {
    for (size_t i = 0; i < calls.size(); ++i) {
      const int64_t lo = std::max(b, start[i]), hi = std::min(e, start[i + 1]);
      if (lo < hi) ok(kc::linear(calls[i].a, lo - start[i], hi - start[i]), "linear");
    }
  });
  return ys;
}

// ------------------------------------------------------------------------------------------------------------------
// A decoder layer's decode step in two calls (llmkern/decode_layer.py): the ops above, called in the order and on the
// tensors the module path gives them, so the result is theirs bit for bit, without a Python round trip per op. The
// cache's plan for the step is made in Python between the two.

// input norm, q/k/v projections, q/k norms over head_dim (Qwen3; undefined weights: none), RoPE. x [B, 1, hidden].
// Returns q, k [B, H, 1, D] with RoPE applied, and v [B, Hkv, 1, D] (a view of the projection).
std::tuple<at::Tensor, at::Tensor, at::Tensor> decode_layer_qkv(
    const at::Tensor& x, const at::Tensor& norm_w, double norm_eps, const at::Tensor& wq,
    const std::optional<at::Tensor>& bq, const at::Tensor& wk, const std::optional<at::Tensor>& bk,
    const at::Tensor& wv, const std::optional<at::Tensor>& bv, const std::optional<at::Tensor>& q_norm_w,
    const std::optional<at::Tensor>& k_norm_w, double q_norm_eps, double k_norm_eps, const at::Tensor& cos,
    const at::Tensor& sin, int64_t head_dim) {
  TORCH_CHECK(x.dim() == 3 && x.size(1) == 1, "x must have shape [batch, 1, hidden], got ", x.sizes());
  TORCH_CHECK(head_dim > 0, "head_dim must be positive, got ", head_dim);
  TORCH_CHECK(q_norm_w.has_value() == k_norm_w.has_value(), "q_norm_weight and k_norm_weight come together");
  const int64_t B = x.size(0);
  const at::Tensor h = rms_norm_cpu(x, norm_w, norm_eps, 0.0);
  const std::vector<at::Tensor> qkv = linear_many(h, {&wq, &wk, &wv}, {&bq, &bk, &bv});
  at::Tensor q = qkv[0].view({B, 1, -1, head_dim});
  at::Tensor k = qkv[1].view({B, 1, -1, head_dim});
  at::Tensor v = qkv[2].view({B, 1, -1, head_dim});
  if (q_norm_w.has_value()) {
    q = rms_norm_cpu(q, *q_norm_w, q_norm_eps, 0.0);
    k = rms_norm_cpu(k, *k_norm_w, k_norm_eps, 0.0);
  }
  auto [qr, kr] = apply_rope_cpu(q.transpose(1, 2), k.transpose(1, 2), cos, sin);
  return {qr, kr, v.transpose(1, 2)};
}

// The K/V write, paged decode attention, o_proj, residual add + post-attention norm, gate/up projections, SwiGLU,
// down projection and the last residual add. q, k, v as decode_layer_qkv returns them; x the layer's input.
at::Tensor decode_layer_rest(const at::Tensor& x, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                             at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& slot_mapping,
                             const at::Tensor& block_tables, const at::Tensor& seq_lens, double scale,
                             int64_t sliding_window, double softcap, int64_t num_splits,
                             const std::optional<at::Tensor>& k_scales, const std::optional<at::Tensor>& v_scales,
                             const at::Tensor& wo, const std::optional<at::Tensor>& bo, const at::Tensor& post_w,
                             double post_eps, const at::Tensor& wg, const std::optional<at::Tensor>& bg,
                             const at::Tensor& wu, const std::optional<at::Tensor>& bu, const at::Tensor& wd,
                             const std::optional<at::Tensor>& bd) {
  TORCH_CHECK(x.dim() == 3 && x.size(1) == 1, "x must have shape [batch, 1, hidden], got ", x.sizes());
  TORCH_CHECK(q.dim() == 4 && q.size(2) == 1 && k.dim() == 4 && k.size(2) == 1 && v.dim() == 4 && v.size(2) == 1,
              "q, k and v must have shape [batch, heads, 1, head_dim], got ", q.sizes(), ", ", k.sizes(), ", ",
              v.sizes());
  reshape_and_cache_cpu(k.squeeze(2), v.squeeze(2), k_cache, v_cache, slot_mapping, k_scales, v_scales);
  const at::Tensor o = paged_decode_attention_cpu(q.squeeze(2), k_cache, v_cache, block_tables, seq_lens, scale,
                                                  sliding_window, softcap, num_splits, k_scales, v_scales);
  const at::Tensor a = linear_cpu(o.reshape({x.size(0), 1, -1}), wo, bo);
  auto [h, residual] = fused_add_rms_norm_cpu(a, x, post_w, post_eps);
  const std::vector<at::Tensor> gu = linear_many(h, {&wg, &wu}, {&bg, &bu});
  const at::Tensor m = silu_and_mul_cpu(gu[0], gu[1]);
  return residual + linear_cpu(m, wd, bd);
}

// Layers [0, n) of a decode step, each decode_layer_qkv then decode_layer_rest on the previous layer's output: one
// call instead of two per layer, so the Python between a model's layers (llmkern/decode_layer.py, the lookahead) is
// paid once per run of layers. Every list holds one entry per layer; the step's plan (slot_mapping, block_tables,
// seq_lens) is shared. Returns each layer's output.
std::vector<at::Tensor> decode_layers(
    const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, int64_t head_dim, const at::Tensor& slot_mapping,
    const at::Tensor& block_tables, const at::Tensor& seq_lens, at::TensorList norm_w, at::ArrayRef<double> norm_eps,
    at::TensorList wq, const c10::List<std::optional<at::Tensor>>& bq, at::TensorList wk,
    const c10::List<std::optional<at::Tensor>>& bk, at::TensorList wv, const c10::List<std::optional<at::Tensor>>& bv,
    const c10::List<std::optional<at::Tensor>>& q_norm_w, const c10::List<std::optional<at::Tensor>>& k_norm_w,
    at::ArrayRef<double> q_norm_eps, at::ArrayRef<double> k_norm_eps, at::TensorList k_cache, at::TensorList v_cache,
    const c10::List<std::optional<at::Tensor>>& k_scales, const c10::List<std::optional<at::Tensor>>& v_scales,
    at::ArrayRef<double> scale, at::IntArrayRef sliding_window, at::ArrayRef<double> softcap,
    at::IntArrayRef num_splits, at::TensorList wo, const c10::List<std::optional<at::Tensor>>& bo,
    at::TensorList post_w, at::ArrayRef<double> post_eps, at::TensorList wg,
    const c10::List<std::optional<at::Tensor>>& bg, at::TensorList wu, const c10::List<std::optional<at::Tensor>>& bu,
    at::TensorList wd, const c10::List<std::optional<at::Tensor>>& bd) {
  const size_t n = norm_w.size();
  const size_t sizes[] = {norm_eps.size(), wq.size(), bq.size(), wk.size(), bk.size(), wv.size(), bv.size(),
                          q_norm_w.size(), k_norm_w.size(), q_norm_eps.size(), k_norm_eps.size(), k_cache.size(),
                          v_cache.size(), k_scales.size(), v_scales.size(), scale.size(), sliding_window.size(),
                          softcap.size(), num_splits.size(), wo.size(), bo.size(), post_w.size(), post_eps.size(),
                          wg.size(), bg.size(), wu.size(), bu.size(), wd.size(), bd.size()};
  for (const size_t s : sizes)
    TORCH_CHECK(s == n, "decode_layers: every per-layer list must have one entry per layer (", n, "), got one of ", s);
  std::vector<at::Tensor> outs;
  outs.reserve(n);
  at::Tensor h = x;
  for (size_t i = 0; i < n; ++i) {
    auto [q, k, v] = decode_layer_qkv(h, norm_w[i], norm_eps[i], wq[i], bq.get(i), wk[i], bk.get(i), wv[i], bv.get(i),
                                      q_norm_w.get(i), k_norm_w.get(i), q_norm_eps[i], k_norm_eps[i], cos, sin,
                                      head_dim);
    at::Tensor kc = k_cache[i], vc = v_cache[i];
    h = decode_layer_rest(h, q, k, v, kc, vc, slot_mapping, block_tables, seq_lens, scale[i], sliding_window[i],
                          softcap[i], num_splits[i], k_scales.get(i), v_scales.get(i), wo[i], bo.get(i), post_w[i],
                          post_eps[i], wg[i], bg.get(i), wu[i], bu.get(i), wd[i], bd.get(i));
    outs.push_back(h);
  }
  return outs;
}

bool cpu_linear_supported(at::ScalarType dtype) {
  return dtype == at::kFloat ? kc::linear_supported(kc::kF32)
                             : dtype == at::kBFloat16 ? kc::linear_supported(kc::kBF16) : false;
}

// q's dtype as the kernels name it; false for a dtype they do not take.
bool kernel_dtype(at::ScalarType dtype, kc::DType* t) {
  switch (dtype) {
    case at::kFloat: *t = kc::kF32; return true;
    case at::kHalf: *t = kc::kF16; return true;
    case at::kBFloat16: *t = kc::kBF16; return true;
    default: return false;
  }
}

// The cache's dtype for q's dtype t: None or t itself for float pages, int8 / float8_e4m3fn for 8-bit ones; false
// for any other.
bool kernel_cache_dtype(kc::DType t, std::optional<at::ScalarType> cache_dtype, kc::DType* ct) {
  if (!cache_dtype.has_value()) {
    *ct = t;
    return true;
  }
  switch (*cache_dtype) {
    case at::kChar: *ct = kc::kI8; return true;
    case at::kFloat8_e4m3fn: *ct = kc::kF8E4M3; return true;
    default: return kernel_dtype(*cache_dtype, ct) && *ct == t;
  }
}

bool cpu_fast_attention(at::ScalarType dtype, int64_t head_dim, std::optional<at::ScalarType> cache_dtype) {
  kc::DType t, ct;
  return kernel_dtype(dtype, &t) && kernel_cache_dtype(t, cache_dtype, &ct) &&
         kc::fast_attention_supported(t, head_dim, ct);
}

bool set_cpu_fast_attention(bool on) { return kc::set_fast_attention(on); }

void copy_blocks_impl(at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& src, const at::Tensor& dst) {
  check_cache(k_cache, v_cache);
  TORCH_CHECK(src.scalar_type() == at::kLong && dst.scalar_type() == at::kLong && src.dim() == 1 &&
                  src.sizes() == dst.sizes(),
              "src and dst must be int64 tensors of one shape [n], got ", src.sizes(), " and ", dst.sizes());
  const int64_t NB = k_cache.size(0);
  at::Tensor s = src.to(at::kCPU), d = dst.to(at::kCPU);
  // Every id checked before anything is copied, so a bad one leaves both caches untouched.
  for (int64_t i = 0; i < s.size(0); ++i) {
    const int64_t a = s[i].item<int64_t>(), b = d[i].item<int64_t>();
    TORCH_CHECK_VALUE(a >= 0 && a < NB, "copy_blocks: src[", i, "] = ", a, " is not a block of the cache: expected "
                      "ids in [0, ", NB, ")");
    TORCH_CHECK_VALUE(b >= 0 && b < NB, "copy_blocks: dst[", i, "] = ", b, " is not a block of the cache: expected "
                      "ids in [0, ", NB, ")");
  }
  // index_copy_ is one kernel per cache on any device, and writes through any strides of the caller's views; the
  // copy is whole pages, so there is nothing to fuse. 1-byte pages (int8, float8_e4m3fn) are copied as int8 bits:
  // index_copy_ does not take every float8 dtype.
  at::Tensor di = dst.to(k_cache.device()), si = src.to(k_cache.device());
  at::Tensor kb = k_cache.element_size() == 1 ? k_cache.view(at::kChar) : k_cache;
  at::Tensor vb = v_cache.element_size() == 1 ? v_cache.view(at::kChar) : v_cache;
  kb.index_copy_(0, di, kb.index_select(0, si));
  vb.index_copy_(0, di, vb.index_select(0, si));
}

// The active instruction set of the CPU kernels. A LLMKERN_CPU_ISA naming none is reported here (llmkern._ext.load
// asks once), not silently ignored.
std::string isa() {
  const char* bad = kc::isa_env_invalid();
  TORCH_CHECK_VALUE(bad == nullptr, "LLMKERN_CPU_ISA=", bad, " names no instruction set llmkern has kernels for: "
                    "expected avx512, avx2 or generic (or unset: the best this CPU runs)");
  return kc::isa_name();
}

// Tests: run the CPU kernels on another instruction set; returns the previous one. An ISA this CPU cannot run, or
// one above LLMKERN_CPU_ISA's cap, is an error naming it.
std::string set_cpu_isa(const std::string& name) {
  kc::Isa want;
  TORCH_CHECK_VALUE(kc::isa_from_name(name.c_str(), &want), "set_cpu_isa: unknown instruction set '", name,
                    "', expected avx512, avx2 or generic");
  TORCH_CHECK(want <= kc::hardware_isa(), "set_cpu_isa: this CPU cannot run ", name, " kernels (it runs up to ",
              kc::isa_name(kc::hardware_isa()), ")");
  TORCH_CHECK(want <= kc::isa_cap(), "set_cpu_isa: ", name, " is above LLMKERN_CPU_ISA's cap for this process (",
              kc::isa_name(kc::isa_cap()), ")");
  return kc::isa_name(kc::set_isa(want));
}

// Which kernel serves `op` ("paged_decode_attention", "paged_prefill_attention" or "linear") for dtype and head_dim
// under the active ISA: "avx512", "avx2", "portable", or "reference" (no C++ kernel: llmkern runs the torch
// reference). The C++ ops dispatch by the same choice.
// cache_dtype: the pages' dtype for attention (None: q's; int8 / float8_e4m3fn: 8-bit pages).
std::string cpu_kernel(const std::string& op, at::ScalarType dtype, int64_t head_dim,
                       std::optional<at::ScalarType> cache_dtype) {
  kc::DType t, ct;
  if (!kernel_dtype(dtype, &t)) return "reference";
  const bool cache_ok = kernel_cache_dtype(t, cache_dtype, &ct);
  if (op == "paged_decode_attention")
    return cache_ok ? kc::kernel_name(kc::decode_kernel(t, head_dim, ct)) : "reference";
  if (op == "paged_prefill_attention")
    return cache_ok ? kc::kernel_name(kc::prefill_kernel(t, head_dim, ct)) : "reference";
  TORCH_CHECK_VALUE(op == "linear", "cpu_kernel: op must be paged_decode_attention, paged_prefill_attention or "
                    "linear, got '", op, "'");
  return kc::kernel_name(kc::linear_kernel(t));
}

bool has_cuda() {
#ifdef LLMKERN_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace

TORCH_LIBRARY(llmkern_C, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps, float offset) -> Tensor");
  m.def("fused_add_rms_norm(Tensor x, Tensor residual, Tensor weight, float eps) -> (Tensor, Tensor)");
  m.def("apply_rope(Tensor q, Tensor k, Tensor cos, Tensor sin) -> (Tensor, Tensor)");
  m.def("silu_and_mul(Tensor gate, Tensor up) -> Tensor");
  // 8-bit pages (int8 / float8_e4m3fn caches): their fp16 scales [num_blocks, block_size, num_kv_heads] come last;
  // None for float pages.
  m.def(
      "reshape_and_cache(Tensor key, Tensor value, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slot_mapping, "
      "Tensor(c!)? k_scales=None, Tensor(d!)? v_scales=None) -> ()");
  m.def("copy_blocks(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor src, Tensor dst) -> ()");
  m.def(
      "paged_decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor seq_lens, "
      "float scale, int sliding_window, float softcap, int num_splits, Tensor? k_scales=None, "
      "Tensor? v_scales=None) -> Tensor");
  m.def(
      "paged_prefill_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor seq_lens, "
      "Tensor q_lens, float scale, int sliding_window, float softcap, Tensor? k_scales=None, "
      "Tensor? v_scales=None) -> Tensor");
  m.def("linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  m.def(
      "decode_layer_qkv(Tensor x, Tensor norm_weight, float norm_eps, Tensor wq, Tensor? bq, Tensor wk, Tensor? bk, "
      "Tensor wv, Tensor? bv, Tensor? q_norm_weight, Tensor? k_norm_weight, float q_norm_eps, float k_norm_eps, "
      "Tensor cos, Tensor sin, int head_dim) -> (Tensor, Tensor, Tensor)");
  m.def(
      "decode_layer_rest(Tensor x, Tensor q, Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, "
      "Tensor slot_mapping, Tensor block_tables, Tensor seq_lens, float scale, int sliding_window, float softcap, "
      "int num_splits, Tensor(c!)? k_scales, Tensor(d!)? v_scales, Tensor wo, Tensor? bo, Tensor post_norm_weight, "
      "float post_norm_eps, Tensor wg, Tensor? bg, Tensor wu, Tensor? bu, Tensor wd, Tensor? bd) -> Tensor");
  m.def(
      "decode_layers(Tensor x, Tensor cos, Tensor sin, int head_dim, Tensor slot_mapping, Tensor block_tables, "
      "Tensor seq_lens, Tensor[] norm_weight, float[] norm_eps, Tensor[] wq, Tensor?[] bq, Tensor[] wk, Tensor?[] bk, "
      "Tensor[] wv, Tensor?[] bv, Tensor?[] q_norm_weight, Tensor?[] k_norm_weight, float[] q_norm_eps, "
      "float[] k_norm_eps, Tensor(a!)[] k_cache, Tensor(b!)[] v_cache, Tensor(c!)?[] k_scales, Tensor(d!)?[] v_scales, "
      "float[] scale, int[] sliding_window, float[] softcap, int[] num_splits, Tensor[] wo, Tensor?[] bo, "
      "Tensor[] post_norm_weight, float[] post_norm_eps, Tensor[] wg, Tensor?[] bg, Tensor[] wu, Tensor?[] bu, "
      "Tensor[] wd, Tensor?[] bd) -> Tensor[]");
  m.def("cpu_linear_supported(ScalarType dtype) -> bool", &cpu_linear_supported);
  m.def("cpu_isa() -> str", &isa);
  m.def("set_cpu_isa(str name) -> str", &set_cpu_isa);
  m.def("cpu_kernel(str op, ScalarType dtype, int head_dim=0, ScalarType? cache_dtype=None) -> str", &cpu_kernel);
  // Whether a vectorised (AVX-512 or AVX2) attention kernel serves (q dtype, head_dim, cache dtype: None for q's own,
  // int8 / float8_e4m3fn for 8-bit pages) here; the setter (tests) returns the old value.
  m.def("cpu_fast_attention(ScalarType dtype, int head_dim, ScalarType? cache_dtype=None) -> bool",
        &cpu_fast_attention);
  m.def("set_cpu_fast_attention(bool on) -> bool", &set_cpu_fast_attention);
  m.def("has_cuda() -> bool", &has_cuda);
}

TORCH_LIBRARY_IMPL(llmkern_C, CPU, m) {
  m.impl("rms_norm", &rms_norm_cpu);
  m.impl("fused_add_rms_norm", &fused_add_rms_norm_cpu);
  m.impl("apply_rope", &apply_rope_cpu);
  m.impl("silu_and_mul", &silu_and_mul_cpu);
  m.impl("reshape_and_cache", &reshape_and_cache_cpu);
  m.impl("copy_blocks", &copy_blocks_impl);
  m.impl("paged_decode_attention", &paged_decode_attention_cpu);
  m.impl("paged_prefill_attention", &paged_prefill_attention_cpu);
  m.impl("linear", &linear_cpu);
  m.impl("decode_layer_qkv", &decode_layer_qkv);
  m.impl("decode_layer_rest", &decode_layer_rest);
  m.impl("decode_layers", &decode_layers);
}

#ifdef LLMKERN_WITH_CUDA
#include "cuda_bindings.inc"  // NOLINT(build/include)
#endif

// `import llmkern._C` loads this library (and so registers the ops above) without pybind11.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "llmkern's C++/CUDA ops (torch.ops.llmkern_C)",
                                      -1, nullptr};
  return PyModule_Create(&module);
}
