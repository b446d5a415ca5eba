// CUDA row ops: RMSNorm, residual-add + RMSNorm, RoPE, SwiGLU. Same rounding points as the Triton kernels (README.md,
// "Where fp16/bf16 results are rounded": eager's for RMSNorm and SwiGLU; RoPE rounds once from fp32)
// (fp32 accumulation; the normalised row rounded to x's dtype before the weight multiply; silu rounded before the
// multiply). Rows are strided (row stride passed), columns unit-stride: the glue makes sure of that.
#include "common.cuh"
#include "launch.h"

namespace llmkern {
namespace cuda {
namespace {

using f16 = __half;
using bf16 = __nv_bfloat16;

int threads_for(int64_t n) {
  int64_t t = (n + 3) / 4;  // ~4 elements per thread
  t = (t + 31) / 32 * 32;
  return static_cast<int>(t < 32 ? 32 : (t > 1024 ? 1024 : t));
}

// One block per row. Pass 1 sums squares, pass 2 writes (the row is re-read from L1/L2, not DRAM).
template <typename X, typename W, typename Y>
__global__ void rms_norm_kernel(const X* __restrict__ x, int64_t sxm, const W* __restrict__ w, Y* __restrict__ y,
                                int64_t sym, int64_t N, float eps, float offset) {
  const X* xr = x + blockIdx.x * sxm;
  Y* yr = y + blockIdx.x * sym;
  float ss = 0.f;
  for (int64_t i = threadIdx.x; i < N; i += blockDim.x) {
    const float v = ld(xr + i);
    ss += v * v;
  }
  const float rstd = rsqrtf(block_sum(ss) / static_cast<float>(N) + eps);
  for (int64_t i = threadIdx.x; i < N; i += blockDim.x) {
    const float h = ld(xr + i) * rstd;
    if (offset == 0.f)
      st(yr + i, rnd<X>(h) * ld(w + i));
    else
      st(yr + i, h * (offset + ld(w + i)));
  }
}

template <typename X, typename W, typename Y>
__global__ void fused_add_rms_norm_kernel(const X* __restrict__ x, int64_t sxm, const X* __restrict__ r,
                                          int64_t srm, const W* __restrict__ w, Y* __restrict__ y, int64_t sym,
                                          X* __restrict__ ro, int64_t srom, int64_t N, float eps) {
  const X* xr = x + blockIdx.x * sxm;
  const X* rr = r + blockIdx.x * srm;
  X* ror = ro + blockIdx.x * srom;
  Y* yr = y + blockIdx.x * sym;
  float ss = 0.f;
  for (int64_t i = threadIdx.x; i < N; i += blockDim.x) {
    const float s = rnd<X>(ld(xr + i) + ld(rr + i));  // eager normalises the rounded residual
    st(ror + i, s);
    ss += s * s;
  }
  const float rstd = rsqrtf(block_sum(ss) / static_cast<float>(N) + eps);
  for (int64_t i = threadIdx.x; i < N; i += blockDim.x) st(yr + i, rnd<X>(ld(ror + i) * rstd) * ld(w + i));
}

// Rotates one token of one tensor; threads walk (head, i) pairs of the rotated half.
template <typename X, typename C>
__device__ __forceinline__ void rope_token(const RopeArgs& a, const C* __restrict__ cr, int64_t scd,
                                           const C* __restrict__ sr, int64_t ssd, int64_t b, int64_t p, int64_t D,
                                           int64_t RD) {
  const int64_t half = RD / 2;
  const X* x = static_cast<const X*>(a.x);
  X* o = static_cast<X*>(a.o);
  for (int64_t j = threadIdx.x; j < a.H * half; j += blockDim.x) {
    const int64_t h = j / half, i = j % half;
    const X* xr = x + b * a.sxb + h * a.sxh + p * a.sxs;
    X* orow = o + b * a.sob + h * a.soh + p * a.sos;
    const float x1 = ld(xr + i * a.sxd), x2 = ld(xr + (half + i) * a.sxd);
    st(orow + i * a.sod, x1 * ld(cr + i * scd) - x2 * ld(sr + i * ssd));
    st(orow + (half + i) * a.sod, x2 * ld(cr + (half + i) * scd) + x1 * ld(sr + (half + i) * ssd));
  }
  const int64_t pass = D - RD;
  for (int64_t j = threadIdx.x; j < a.H * pass; j += blockDim.x) {
    const int64_t h = j / pass, i = RD + j % pass;
    o[b * a.sob + h * a.soh + p * a.sos + i * a.sod] = x[b * a.sxb + h * a.sxh + p * a.sxs + i * a.sxd];
  }
}

// grid (B * S, 2): y = 0 rotates q, y = 1 rotates k. Two calls rather than selecting a RopeArgs at run time, which
// would copy the kernel-parameter struct to local memory (a 176-byte stack frame).
template <typename X, typename C>
__global__ void rope_kernel(RopeArgs q, RopeArgs k, const C* __restrict__ cos, int64_t scb, int64_t scs,
                            int64_t scd, const C* __restrict__ sin, int64_t ssb, int64_t sss, int64_t ssd, int64_t S,
                            int64_t D, int64_t RD) {
  const int64_t t = blockIdx.x, b = t / S, p = t % S;
  const C* cr = cos + b * scb + p * scs;
  const C* sr = sin + b * ssb + p * sss;
  if (blockIdx.y == 0)
    rope_token<X, C>(q, cr, scd, sr, ssd, b, p, D, RD);
  else
    rope_token<X, C>(k, cr, scd, sr, ssd, b, p, D, RD);
}

// grid (M, column blocks): rows on x, the only axis past 65535.
template <typename T>
__global__ void silu_and_mul_kernel(const T* __restrict__ g, int64_t sgm, const T* __restrict__ u, int64_t sum_,
                                    T* __restrict__ o, int64_t som, int64_t I) {
  const int64_t m = blockIdx.x;
  const int64_t i = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  if (i >= I) return;
  const float gv = ld(g + m * sgm + i);
  st(o + m * som + i, rnd<T>(gv / (1.f + expf(-gv))) * ld(u + m * sum_ + i));
}

template <typename X, typename W, typename Y>
cudaError_t launch_norm(const void* x, int64_t sxm, const void* w, void* y, int64_t sym, int64_t M, int64_t N,
                        float eps, float offset, cudaStream_t s) {
  const unsigned grid = static_cast<unsigned>(rms_norm_grid(M).x);
  rms_norm_kernel<X, W, Y><<<grid, threads_for(N), 0, s>>>((const X*)x, sxm, (const W*)w, (Y*)y, sym, N, eps, offset);
  return cudaGetLastError();
}

template <typename X, typename W, typename Y>
cudaError_t launch_fadd(const void* x, int64_t sxm, const void* r, int64_t srm, const void* w, void* y, int64_t sym,
                        void* ro, int64_t srom, int64_t M, int64_t N, float eps, cudaStream_t s) {
  const unsigned grid = static_cast<unsigned>(rms_norm_grid(M).x);
  fused_add_rms_norm_kernel<X, W, Y><<<grid, threads_for(N), 0, s>>>((const X*)x, sxm, (const X*)r, srm,
                                                                     (const W*)w, (Y*)y, sym, (X*)ro, srom, N, eps);
  return cudaGetLastError();
}

}  // namespace

using cpu::kBF16;
using cpu::kF16;
using cpu::kF32;

// (x, w, y) combinations: same dtype everywhere, or half-precision x with an fp32 weight (y fp32 for Llama's
// promotion, y = x's dtype for Gemma's offset form).
#define LLMKERN_NORM_COMBOS(M)                                                                                    \
  M(kF32, float, kF32, float, kF32, float) M(kF16, f16, kF16, f16, kF16, f16) M(kBF16, bf16, kBF16, bf16, kBF16, bf16) \
  M(kF16, f16, kF32, float, kF32, float) M(kBF16, bf16, kF32, float, kF32, float)                                 \
  M(kF16, f16, kF32, float, kF16, f16) M(kBF16, bf16, kF32, float, kBF16, bf16)

cudaError_t rms_norm(const void* x, int64_t sxm, const void* w, void* y, int64_t sym, int64_t M, int64_t N,
                     float eps, float offset, DType xt, DType wt, DType yt, cudaStream_t stream) {
#define M_(XI, XT, WI, WT, YI, YT) \
  if (xt == XI && wt == WI && yt == YI) return launch_norm<XT, WT, YT>(x, sxm, w, y, sym, M, N, eps, offset, stream);
  LLMKERN_NORM_COMBOS(M_)
#undef M_
  return cudaErrorInvalidValue;
}

cudaError_t fused_add_rms_norm(const void* x, int64_t sxm, const void* r, int64_t srm, const void* w, void* y,
                               int64_t sym, void* ro, int64_t srom, int64_t M, int64_t N, float eps, DType xt,
                               DType wt, DType yt, cudaStream_t stream) {
#define M_(XI, XT, WI, WT, YI, YT)      \
  if (xt == XI && wt == WI && yt == YI) \
    return launch_fadd<XT, WT, YT>(x, sxm, r, srm, w, y, sym, ro, srom, M, N, eps, stream);
  LLMKERN_NORM_COMBOS(M_)
#undef M_
  return cudaErrorInvalidValue;
}

cudaError_t rope(const RopeArgs& q, const RopeArgs& k, const void* cos, int64_t scb, int64_t scs, int64_t scd,
                 const void* sin, int64_t ssb, int64_t sss, int64_t ssd, int64_t B, int64_t S, int64_t D,
                 int64_t RD, DType xt, DType ct, cudaStream_t stream) {
  const int64_t heads = q.H > k.H ? q.H : k.H;
  const Grid gr = rope_grid(B, S);
  const dim3 grid(static_cast<unsigned>(gr.x), static_cast<unsigned>(gr.y));
  const int threads = threads_for(heads * (RD / 2) * 4);
#define R_(XI, XT, CI, CT)                                                                                      \
  if (xt == XI && ct == CI) {                                                                                   \
    rope_kernel<XT, CT><<<grid, threads, 0, stream>>>(q, k, (const CT*)cos, scb, scs, scd, (const CT*)sin, ssb, \
                                                      sss, ssd, S, D, RD);                                     \
    return cudaGetLastError();                                                                                  \
  }
  R_(kF32, float, kF32, float) R_(kF16, f16, kF16, f16) R_(kBF16, bf16, kBF16, bf16) R_(kF16, f16, kF32, float)
  R_(kBF16, bf16, kF32, float)
#undef R_
  return cudaErrorInvalidValue;
}

cudaError_t silu_and_mul(const void* g, int64_t sgm, const void* u, int64_t sum_, void* o, int64_t som, int64_t M,
                         int64_t I, DType t, cudaStream_t stream) {
  const int threads = kSiluThreads;
  const Grid gr = silu_and_mul_grid(M, I);
  const dim3 grid(static_cast<unsigned>(gr.x), static_cast<unsigned>(gr.y));
#define S_(TI, TT)                                                                                               \
  if (t == TI) {                                                                                                 \
    silu_and_mul_kernel<TT><<<grid, threads, 0, stream>>>((const TT*)g, sgm, (const TT*)u, sum_, (TT*)o, som, I); \
    return cudaGetLastError();                                                                                   \
  }
  S_(kF32, float) S_(kF16, f16) S_(kBF16, bf16)
#undef S_
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace llmkern
