"""Launch geometry against CUDA's limits, without a GPU (issue #12).

* Every Triton launcher's grid, captured from the launcher itself (the kernel is swapped for a recorder; tensors are
  on the meta device, so nothing is allocated or run), for each layout of ``kernels/_layouts.py`` at its longest
  context, batch 1 and 256, every dtype: x below 2^31, y and z at most 65535.
* The CUDA launchers' geometry (``csrc/cuda/launch.h``, host-only): the same check, and copy_blocks' word width
  on misaligned caches, from a small program built with the host compiler.
* The CUDA extension carries PTX for its newest arch (sm_100/sm_120 JIT it) besides the sm_80/sm_90 cubins.
"""

import glob
import os
import shutil
import subprocess

import pytest
import torch

from llmkern.kernels import _layouts as L

META = "meta"
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _Recorder:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](...)`` records the grid and runs nothing."""

    def __init__(self):
        self.grids = []

    def __getitem__(self, grid):
        self.grids.append(tuple(grid))
        return lambda *a, **k: None


def _record(monkeypatch, module, *names):
    recs = {n: _Recorder() for n in names}
    for n, r in recs.items():
        monkeypatch.setattr(module, n, r)
    return recs


def _check(grids, what):
    bad = [g for g in grids if not L.fits_grid(g)]
    assert grids and not bad, f"{what}: grids outside CUDA's limits {L.GRID_LIMITS}: {bad}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B", [1, L.MAX_BATCH])
def test_attention_grids_fit_at_longest_context(B, dtype, monkeypatch):
    from llmkern.kernels import paged_attention as PA

    recs = _record(monkeypatch, PA, "_paged_prefill_kernel", "_paged_decode_split_kernel",
                   "_paged_decode_reduce_kernel")
    for name, Hq, Hkv, D, ctx, win in L.head_layouts():
        bs = 16
        blocks = -(-ctx // bs)
        kc = torch.empty(B * blocks, bs, Hkv, D, dtype=dtype, device=META)
        bt = torch.empty(B, blocks, dtype=torch.int32, device=META)
        lens = torch.empty(B, dtype=torch.int32, device=META)
        # Prefill of whole prompts of the longest context (HF's [b, s, H, d] viewed as [b, H, s, d]).
        q = torch.empty(B, ctx, Hq, D, dtype=dtype, device=META).transpose(1, 2)
        PA.paged_prefill_fwd(q, kc, kc, bt, lens, lens, torch.empty_like(q), 0.1, win, None)
        _check(recs["_paged_prefill_kernel"].grids, f"prefill {name} B={B} S={ctx} {dtype}")
        # Decode at that context, with the split count the heuristic picks on each GPU.
        qd = torch.empty(B, Hq, D, dtype=dtype, device=META)
        for sms in L.SM_COUNTS:
            n = PA.decode_num_splits(B, Hkv, ctx, D, win, sms, Hq // Hkv)
            PA.paged_decode_fwd(qd, kc, kc, bt, lens, torch.empty_like(qd), 0.1, win, None, n)
        _check(recs["_paged_decode_split_kernel"].grids, f"decode {name} B={B}")
        for r in recs.values():
            r.grids.clear()


def test_prefill_grid_puts_row_tiles_on_x(monkeypatch):
    """The case of the issue: group 16 (Qwen3-235B: 64 query / 4 KV heads) in bf16 at a 262,144-token prompt has
    65,536 row tiles, one more than the y/z limit."""
    from llmkern.kernels import paged_attention as PA

    rec = _record(monkeypatch, PA, "_paged_prefill_kernel")["_paged_prefill_kernel"]
    S = 262144
    q = torch.empty(1, S, 64, 128, dtype=torch.bfloat16, device=META).transpose(1, 2)
    kc = torch.empty(S // 16, 16, 4, 128, dtype=torch.bfloat16, device=META)
    bt = torch.empty(1, S // 16, dtype=torch.int32, device=META)
    lens = torch.empty(1, dtype=torch.int32, device=META)
    PA.paged_prefill_fwd(q, kc, kc, bt, lens, lens, torch.empty_like(q), 0.1, None, None)
    (grid,) = rec.grids
    assert grid[0] == S * 16 // PA.prefill_config(16, 128)["BLOCK_M"] and L.fits_grid(grid), grid


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_row_op_and_cache_grids_fit_at_longest_context(dtype, monkeypatch):
    from llmkern.kernels import cache_ops, rms_norm, rope, swiglu

    recs = {**_record(monkeypatch, rms_norm, "_rms_norm_kernel", "_fused_add_rms_norm_kernel"),
            **_record(monkeypatch, swiglu, "_silu_and_mul_kernel"), **_record(monkeypatch, rope, "_rope_kernel"),
            **_record(monkeypatch, cache_ops, "_reshape_and_cache_kernel", "_reshape_and_cache_q8_kernel",
                       "_copy_blocks_kernel")}
    for lay in L.LAYOUTS:
        for B in (1, L.MAX_BATCH):
            T = B * lay.max_pos
            x = torch.empty(T, lay.hidden, dtype=dtype, device=META)
            w = torch.empty(lay.hidden, dtype=dtype, device=META)
            rms_norm.rms_norm_fwd(x, w, x, 1e-6, 0.0)
            rms_norm.fused_add_rms_norm_fwd(x, x, w, x, x, 1e-6)
            if lay.qk_norm:
                xq = torch.empty(T * lay.Hq, lay.D, dtype=dtype, device=META)
                rms_norm.rms_norm_fwd(xq, w[:lay.D], xq, 1e-6, 0.0)
            g = torch.empty(T, lay.intermediate, dtype=dtype, device=META)
            swiglu.silu_and_mul_fwd(g, g, g)
            q = torch.empty(B, lay.max_pos, lay.Hq, lay.D, dtype=dtype, device=META).transpose(1, 2)
            k = torch.empty(B, lay.max_pos, lay.Hkv, lay.D, dtype=dtype, device=META).transpose(1, 2)
            cos = torch.empty(B, lay.max_pos, lay.D, dtype=dtype, device=META)
            rope.rope_fwd(q, k, cos, cos, q, k)
            kv = torch.empty(T, lay.Hkv, lay.D, dtype=dtype, device=META)
            kc = torch.empty(T // 16 + 1, 16, lay.Hkv, lay.D, dtype=dtype, device=META)
            slots = torch.empty(T, dtype=torch.int64, device=META)
            cache_ops.reshape_and_cache_fwd(kv, kv, kc, kc, slots)
            for kv_dtype in (torch.int8, torch.float8_e4m3fn):  # 8-bit pages: the quantizing write
                kc8 = torch.empty(kc.shape, dtype=kv_dtype, device=META)
                sc = torch.empty(kc.shape[:3], dtype=torch.float16, device=META)
                cache_ops.reshape_and_cache_fwd(kv, kv, kc8, kc8, slots, sc, sc)
            cache_ops.copy_blocks_fwd(kc, kc, slots[:T // 16], slots[:T // 16])
    for name, r in recs.items():
        _check(r.grids, name)


# ---------------------------------------------------------------------------------------------------------------------
# CUDA launchers (csrc/cuda/launch.h): geometry and copy_blocks' alignment, on the host

_HOST_PROGRAM = r"""
#include <cstdio>
#include <cstdlib>
#include "cuda/launch.h"
using namespace llmkern::cuda;
static void show(const char* what, Grid g) { std::printf("grid %s %lld %lld %lld\n", what, (long long)g.x,
                                                         (long long)g.y, (long long)g.z); }
int main(int argc, char** argv) {
  // argv: triples "hidden intermediate Hq Hkv D tokens" per layout.
  for (int i = 1; i + 5 < argc; i += 6) {
    const long long H = atoll(argv[i]), I = atoll(argv[i + 1]), Hq = atoll(argv[i + 2]), Hkv = atoll(argv[i + 3]),
                    D = atoll(argv[i + 4]), T = atoll(argv[i + 5]);
    show("rms_norm", rms_norm_grid(T));
    show("rope", rope_grid(1, T));
    show("silu_and_mul", silu_and_mul_grid(T, I));
    show("reshape_and_cache", reshape_and_cache_grid(T));
    show("reshape_and_cache_quant", reshape_and_cache_quant_grid(T, Hkv));
    show("copy_blocks", copy_blocks_grid(T / 16, 16 * Hkv * D * 4));
    (void)H; (void)Hq;
  }
  alignas(16) static char pool[4096];
  std::printf("word aligned %d\n", copy_blocks_word_bytes(pool, pool + 1024, 16 * 2 * 64 * 2));
  std::printf("word view_at_offset %d\n", copy_blocks_word_bytes(pool + 2, pool + 1024, 16 * 2 * 64 * 2));
  std::printf("word odd_block %d\n", copy_blocks_word_bytes(pool, pool + 1024, 1 * 3 * 5 * 2));
  std::printf("word fp32_view %d\n", copy_blocks_word_bytes(pool + 4, pool + 8, 16 * 2 * 64 * 4));
  return 0;
}
"""


@pytest.fixture(scope="module")
def cuda_geometry(tmp_path_factory):
    cxx = shutil.which(os.environ.get("CXX", "c++"))
    inc = os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "include")
    if cxx is None or not os.path.exists(os.path.join(inc, "cuda_runtime.h")):
        pytest.skip("needs a host C++ compiler and the CUDA headers")
    d = tmp_path_factory.mktemp("cuda_geometry")
    (d / "geometry.cpp").write_text(_HOST_PROGRAM)
    exe = d / "geometry"
    subprocess.run([cxx, "-std=c++17", "-O0", f"-I{os.path.join(ROOT, 'csrc')}", f"-I{inc}", str(d / "geometry.cpp"),
                    "-o", str(exe)], check=True, capture_output=True, text=True)
    args = []
    for lay in L.LAYOUTS:
        args += [lay.hidden, lay.intermediate, lay.Hq, lay.Hkv, lay.D, L.MAX_BATCH * lay.max_pos]
    out = subprocess.run([str(exe), *map(str, args)], check=True, capture_output=True, text=True).stdout
    grids = [(ln.split()[1], tuple(map(int, ln.split()[2:]))) for ln in out.splitlines() if ln.startswith("grid")]
    words = {ln.split()[1]: int(ln.split()[2]) for ln in out.splitlines() if ln.startswith("word")}
    return grids, words


def test_cuda_launch_grids_fit_at_longest_context(cuda_geometry):
    grids, _ = cuda_geometry
    bad = [(k, g) for k, g in grids if not L.fits_grid(g)]
    assert grids and not bad, f"CUDA grids outside the limits {L.GRID_LIMITS}: {bad[:10]}"
    # silu_and_mul had the rows on y: 65,536+ rows failed to launch.
    assert any(k == "silu_and_mul" and g[0] >= 65536 for k, g in grids)
    assert any(k == "reshape_and_cache_quant" for k, g in grids)


def test_cuda_copy_blocks_word_width_follows_alignment(cuda_geometry):
    """16-byte words only when both cache bases and the block size allow them: a cache view at an offset or a
    block of an odd size takes narrower words instead of faulting."""
    _, words = cuda_geometry
    assert words == {"aligned": 16, "view_at_offset": 2, "odd_block": 2, "fp32_view": 4}, words


# ---------------------------------------------------------------------------------------------------------------------
# The extension's CUDA code: cubins for sm_80 / sm_90, PTX for the newest arch


def test_extension_embeds_ptx_for_newer_gpus():
    from llmkern import _ext, inspect as ki

    if not _ext.load() or not _ext.has_cuda():
        pytest.skip("the extension was built without CUDA kernels")
    cov = ki.extension_archs()
    assert cov is not None, "cuobjdump is not available"
    assert {"sm_80", "sm_90"} <= set(cov["sass"]), cov
    assert "compute_90" in cov["ptx"], f"no PTX in the extension: sm_100/sm_120 would have no kernel image ({cov})"


# ---------------------------------------------------------------------------------------------------------------------
# Wide rows: norms wider than one tile loop over MAX_TILE_N chunks (a whole 32K row spilled); same results as eager


def _eager_norm(x, w, eps):
    h = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
    return w * h.to(x.dtype)


@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter check; on a GPU test_ops covers the kernels")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("N", [3 * 8192 + 16, 65536])
def test_wide_row_norms_are_chunked_and_match_eager(N, dtype):
    import llmkern
    from llmkern import ops
    from llmkern.kernels import rms_norm as R
    from llmkern.testing import assert_no_worse_than_eager

    cfg = R.rms_norm_config(3, N)
    assert cfg["CHUNKED"] and cfg["BLOCK_N"] == R.MAX_TILE_N and cfg["BLOCK_M"] == 1
    g = torch.Generator().manual_seed(N)
    x = (torch.randn(3, N, generator=g) * 3).to(dtype)
    r = torch.randn(3, N, generator=g).to(dtype)
    w = (1 + 0.1 * torch.randn(N, generator=g)).to(dtype)
    with llmkern.use_backend("triton"), llmkern.track() as ran:
        y = ops.rms_norm(x, w, 1e-6)
        y2, res = ops.fused_add_rms_norm(x, r, w, 1e-6)
    assert ran.backends("rms_norm") == {"triton"} and ran.backends("fused_add_rms_norm") == {"triton"}
    assert_no_worse_than_eager(y, _eager_norm(x, w, 1e-6), _eager_norm(x.double(), w.double(), 1e-6), what="rms")
    s = x + r
    assert torch.equal(res, s), "the residual out is eager's rounded x + r"
    assert_no_worse_than_eager(y2, _eager_norm(s, w, 1e-6), _eager_norm(s.double(), w.double(), 1e-6),
                               what="fused add + rms")
