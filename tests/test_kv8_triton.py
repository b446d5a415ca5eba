"""8-bit KV cache, the Triton kernels (kernels/cache_ops.py, kernels/paged_attention.py) called through their launchers.

On a machine without CUDA they run in the Triton interpreter on CPU tensors, with GPU numerics emulated
(tests/conftest.py); with CUDA they are compiled and run on the GPU. The format is llmkern/reference.py's
(``quantize_kv``): int8 or fp8 e4m3fn codes, one fp16 scale per (token, KV head).

* Writes (``reshape_and_cache_fwd`` with scales): the codes and scales ``reference.reshape_and_cache`` writes, bit
  for bit (the kernel divides with div.rn and rounds to nearest even like torch), and the looser rule every backend
  must meet (scales within one fp16 ulp, codes within one step, dequantized within the rounding bound); every
  rounding case of the fp8 and int8 encoders (ties, subnormals, the top of the range); padding and out-of-pool slots
  skipped; strided pages and scales whose untouched bytes keep their bits.
* ``copy_blocks_fwd`` on 1-byte pages and on the fp16 scales' ``[nb, bs, Hkv, 1]`` views.
* Attention (``paged_decode_fwd`` / ``paged_prefill_fwd`` with scales) against an fp64 oracle over the dequantized
  pages, with the paged attention tests' tolerance (tests/test_paged_attention.py: no worse than Hugging Face's eager
  attention, here over the dequantized K/V in the model's dtype, element by element, with the same 85% margin):
  GQA groups 1, 2, 7; pages of 1, 16 and 64 tokens; head dims 64, 80, 128; fp32 / fp16 / bf16 q; split counts;
  sliding window and softcap; strided pages, scales and q; an empty sequence. Unwritten page rows hold junk codes and
  NaN scales, so a read past a sequence shows.
"""

import pytest
import torch

from llmkern import reference
from llmkern.kernels import cache_ops, paged_attention as PA
from llmkern.testing import assert_no_worse_than_eager
from tests.test_paged_attention import eager, error_scale, oracle

KV = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}
I32 = torch.int32
MARGIN = 0.85  # tests/conftest.py's margin for the paged attention tests


def _i8(t: torch.Tensor) -> torch.Tensor:
    """1-byte pages as int8 bit patterns (fp8 tensors have no comparison or indexing everywhere)."""
    return t.view(torch.int8)


def _pages(nb, bs, H, D, dt, strided: bool, gen, device="cpu"):
    """``(k, v, k_scales, v_scales)`` on ``device`` holding junk: random codes (fp8: no NaN patterns needed, the
    scales carry the NaN) and NaN scales. ``strided``: views of bigger pools (a spare head and padded head_dim in the
    pages, the scales [nb, Hkv + 2, bs] transposed, so every stride differs from the contiguous one)."""
    def codes(shape):
        return torch.randint(-128, 128, shape, generator=gen, dtype=torch.int8).to(device).view(dt)

    def scales():
        if strided:
            pool = torch.full((nb, H + 2, bs), float("nan"), dtype=torch.float16, device=device)
            return pool.transpose(1, 2)[:, :, 1:H + 1]
        return torch.full((nb, bs, H), float("nan"), dtype=torch.float16, device=device)

    if strided:
        k, v = codes((nb, bs, H + 1, D + 16))[:, :, 1:, :D], codes((nb, bs, H + 1, D + 16))[:, :, :H, 8:D + 8]
    else:
        k, v = codes((nb, bs, H, D)), codes((nb, bs, H, D))
    return k, v, scales(), scales()


# ---------------------------------------------------------------------------------------------------------------------
# Writes


def _check_write(kc, vc, ks, vs, want, key, value, slots, what):
    """The written rows against the reference's (bit for bit, and the rule the spec sets for every backend); every
    other byte unchanged."""
    wk, wv, wks, wvs = want
    for got, exp, name in ((kc, wk, "k codes"), (vc, wv, "v codes")):
        gi, ei = _i8(got), _i8(exp)
        assert torch.equal(gi, ei), f"{what}: {name} differ at {(gi != ei).nonzero()[:5].tolist()}"
    for got, exp, name in ((ks, wks, "k scales"), (vs, wvs, "v scales")):
        same = (got.view(torch.int16) == exp.view(torch.int16))
        assert same.all(), f"{what}: {name} differ at {(~same).nonzero()[:5].tolist()}"
    # The backend-independent rule, on the written rows.
    bs = kc.shape[1]
    ok = slots >= 0
    blk, off = slots[ok] // bs, slots[ok] % bs
    for x, c, s, name in ((key, kc, ks, "key"), (value, vc, vs, "value")):
        x = x[ok].float()
        codes = _i8(c)[blk, off].view(c.dtype).float()
        sc = s[blk, off].float()
        rq, rs = reference.quantize_kv(x, c.dtype)
        assert ((sc - rs.float()).abs() <= torch.finfo(torch.float16).eps * rs.float()).all(), f"{what}: {name} scale"
        step = 1.0 if c.dtype == torch.int8 else torch.clamp(rq.float().abs(), min=2.0 ** -6) * 2.0 ** -3
        assert ((codes - rq.float()).abs() <= step).all(), f"{what}: {name} codes more than one step off"
        err = (codes * sc[..., None] - x).abs()
        if c.dtype == torch.int8:
            bound = 0.5 * sc[..., None] * (1 + 1e-3)
        else:
            bound = torch.maximum(x.abs() * 2.0 ** -4, 2.0 ** -10 * sc[..., None])
        assert (err <= bound).all(), f"{what}: {name} dequantized error over the rounding bound"


@pytest.mark.parametrize("kv", KV)
@pytest.mark.parametrize("xdtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("H,D,bs,strided", [(2, 64, 16, False), (3, 80, 1, True), (8, 128, 64, True)])
def test_write_matches_reference(kv, xdtype, H, D, bs, strided, device):
    dt = KV[kv]
    gen = torch.Generator().manual_seed(H * D + bs)
    T = 9
    nb = max(5, -(-(T + 3) // bs))
    # Rows from 1e-6 to 1e4 (scales at their floor, subnormal fp8 codes, large scales), a zero row, big outliers.
    key = (torch.randn(T, H, D, generator=gen) * torch.logspace(-6, 4, T)[:, None, None]).to(xdtype)
    value = torch.randn(T, H, D, generator=gen).to(xdtype)
    key[2, 0] = 0.0
    value[4, -1, 3] = -300.0
    slots = torch.randperm(nb * bs, generator=gen)[:T]
    slots[1], slots[6] = -1, nb * bs + 3  # padding, and a slot past the pool: both skipped
    pages = _pages(nb, bs, H, D, dt, strided, gen, device)
    want = [p.cpu().clone() for p in pages]
    reference.reshape_and_cache(key, value, *want[:2], _in_pool(slots, nb, bs), *want[2:])
    pools = [p._base if p._base is not None else p for p in pages]
    before = [b.clone() for b in pools]
    cache_ops.reshape_and_cache_fwd(key.to(device), value.to(device), *pages[:2], slots.to(device), *pages[2:])
    got = [p.cpu() for p in pages]
    _check_write(*got, want, key, value, _in_pool(slots, nb, bs), f"{kv} {xdtype} H={H} D={D} bs={bs}")
    if strided:
        # Bytes of the pools outside the views (spare heads, padding) keep their bits (NaN scales included).
        for pool, old, view in zip(pools, before, pages):
            mask = torch.ones(pool.shape, dtype=torch.bool, device=pool.device)
            _view_of(mask, pool, view)[...] = False
            a, b = (_i8(pool), _i8(old)) if pool.element_size() == 1 else (pool.view(torch.int16), old.view(torch.int16))
            assert torch.equal(a[mask], b[mask]), f"{kv}: bytes outside the pages' view changed"


def _in_pool(slots, nb, bs):
    """The mapping as the reference must see it: slots past the pool are skipped by the kernel (padding)."""
    return torch.where(slots < nb * bs, slots, torch.full_like(slots, -1))


def _view_of(mask, pool, view):
    """``mask`` viewed as ``view`` views ``pool``."""
    return mask.as_strided(view.shape, view.stride(), view.storage_offset() - pool.storage_offset())


@pytest.mark.parametrize("kv", KV)
def test_write_every_rounding_case(kv, device):
    """Rows whose amax is QMAX give scale 1, so the codes are the values themselves rounded: every code, the
    midpoints between neighbours (ties to even), the midpoints +- one fp32 ulp (fp8's subnormal steps among them),
    -0.0 and values that round to +-0; each against torch's conversion (fp8) or round-half-even (int8)."""
    dt = KV[kv]
    qmax = reference.KV_QMAX[dt]
    if dt == torch.int8:
        grid = torch.arange(-127.0, 128.0)
    else:
        allc = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(dt).float()
        grid = allc[~torch.isnan(allc)].unique()  # every finite e4m3 value, sorted
    mids = (grid[1:] + grid[:-1]) / 2
    below = torch.nextafter(mids, torch.full_like(mids, -1e9))
    above = torch.nextafter(mids, torch.full_like(mids, 1e9))
    vals = torch.cat([grid, mids, below, above, torch.tensor([-0.0, 1e-30, -1e-30, 1e-3, -1e-3])])
    D = 64
    n = -(-vals.numel() // (D - 1))
    x = torch.zeros(n * (D - 1))
    x[:vals.numel()] = vals
    rows = torch.cat([torch.full((n, 1), qmax), x.view(n, D - 1)], 1)
    key = rows.view(n, 1, D)
    slots = torch.arange(n)
    kc = torch.zeros(n, 1, 1, D, dtype=torch.int8).view(dt)
    vc = torch.zeros_like(kc)
    ks = torch.zeros(n, 1, 1, dtype=torch.float16)
    vs = torch.zeros_like(ks)
    args = [t.to(device) for t in (kc, vc, slots, ks, vs)]
    cache_ops.reshape_and_cache_fwd(key.to(device), key.to(device), args[0], args[1], args[2], args[3], args[4])
    assert (args[3].cpu().float() == 1.0).all()
    codes = _i8(args[0].cpu()).view(n, D)
    if dt == torch.int8:
        want = torch.round(rows).to(torch.int8)  # torch.round: half to even
    else:
        want = _i8(rows.to(dt))
    bad = (codes != want).nonzero()
    assert bad.numel() == 0, (f"{kv}: {bad.shape[0]} codes differ, e.g. value {rows[tuple(bad[0])].item()!r}: got "
                              f"{int(codes[tuple(bad[0])]) & 0xFF:#04x}, want {int(want[tuple(bad[0])]) & 0xFF:#04x}")


# ---------------------------------------------------------------------------------------------------------------------
# copy_blocks


@pytest.mark.parametrize("kv", KV)
def test_copy_blocks_pages_and_scales(kv, device):
    dt = KV[kv]
    gen = torch.Generator().manual_seed(1)
    nb, bs, H, D = 6, 16, 3, 64
    kc, vc, ks, vs = _pages(nb, bs, H, D, dt, True, gen, device)
    ks.copy_(torch.randn(ks.shape, generator=gen).half())
    vs.copy_(torch.randn(vs.shape, generator=gen).half())
    src, dst = torch.tensor([0, 2, 4]), torch.tensor([5, 3, 1])
    want = [t.cpu().clone() for t in (kc, vc, ks, vs)]
    reference.copy_blocks(want[0], want[1], src, dst)
    reference.copy_blocks(want[2].unsqueeze(-1), want[3].unsqueeze(-1), src, dst)
    cache_ops.copy_blocks_fwd(kc, vc, src.to(device), dst.to(device))
    cache_ops.copy_blocks_fwd(ks.unsqueeze(-1), vs.unsqueeze(-1), src.to(device), dst.to(device))
    for got, exp in zip((kc, vc, ks, vs), want):
        got = got.cpu()
        a, b = (_i8(got), _i8(exp)) if got.element_size() == 1 else (got.view(torch.int16), exp.view(torch.int16))
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------------------------------
# Attention


def make_paged_q8(lens, bs, Hkv, D, kv_dtype, dtype, device, *, strided=False, seed=0):
    """Per-sequence K/V ``[B, Hkv, L, D]`` in ``dtype``, written by the Triton write kernel into permuted 8-bit pages
    (padding slots among the tokens); unwritten rows hold junk codes and NaN scales. Returns the pages, scales,
    block table, lengths, and the dequantized K/V ``[B, Hkv, L, D]`` fp64 (what the attention kernels must attend
    over; rows past a length are 0)."""
    gen = torch.Generator().manual_seed(seed)
    B, L = len(lens), max(max(lens), 1)
    K = torch.randn(B, Hkv, L, D, generator=gen).to(dtype)
    V = torch.randn(B, Hkv, L, D, generator=gen).to(dtype)
    pages = [-(-n // bs) for n in lens]
    nb = sum(pages) + 3
    perm = torch.randperm(nb, generator=gen)
    bt = torch.full((B, max(max(pages), 1) + 1), 1 << 30, dtype=I32)
    slots, rows_k, rows_v = [], [], []
    used = 0
    for b, n in enumerate(lens):
        ids = perm[used:used + pages[b]]
        used += pages[b]
        bt[b, :pages[b]] = ids.to(I32)
        for t in range(n):
            slots.append(int(ids[t // bs]) * bs + t % bs)
            rows_k.append(K[b, :, t])
            rows_v.append(V[b, :, t])
            if t % 5 == 2:  # a padding token between real ones
                slots.append(-1)
                rows_k.append(torch.full((Hkv, D), float("nan")).to(dtype))
                rows_v.append(torch.full((Hkv, D), float("nan")).to(dtype))
    kc, vc, ks, vs = _pages(nb, bs, Hkv, D, kv_dtype, strided, gen, device)
    if slots:
        cache_ops.reshape_and_cache_fwd(torch.stack(rows_k).to(device), torch.stack(rows_v).to(device), kc, vc,
                                        torch.tensor(slots, device=device), ks, vs)
    Kd = torch.zeros(B, Hkv, L, D, dtype=torch.float64)
    Vd = torch.zeros_like(Kd)
    kcc, vcc, ksc, vsc = (t.cpu() for t in (kc, vc, ks, vs))
    for b, n in enumerate(lens):
        t = torch.arange(n)
        blk = bt[b, t // bs].long()
        for dst, c, s in ((Kd, kcc, ksc), (Vd, vcc, vsc)):
            dst[b, :, :n] = reference.dequantize_kv(_i8(c)[blk, t % bs].view(c.dtype), s[blk, t % bs],
                                                    torch.float64).transpose(0, 1)
    return kc, vc, ks, vs, bt.to(device), torch.tensor(lens, dtype=I32, device=device), Kd, Vd


def _assert_close(out, q4, Kd, Vd, lens, q_lens, scale, window, softcap, what, ref_out=None):
    """The paged attention tests' rule: the fp64 oracle over the dequantized K/V; eager over them in q's dtype. And
    the spec's (tmp/kv8_spec.md, "Testing"): no worse than ``reference.paged_*_attention`` on the same 8-bit pages
    (``ref_out``: fp32 arithmetic, the output rounded once to q's dtype)."""
    ref = oracle(q4, Kd, Vd, lens, q_lens, scale, window, softcap)
    eag = eager(q4, Kd.to(q4.dtype), Vd.to(q4.dtype), lens, q_lens, scale, window, softcap)
    mag = error_scale(q4, Kd, Vd, lens, q_lens, scale, window, softcap)
    S = q4.shape[2]
    for b, n in enumerate(q_lens):
        if n and lens[b]:
            rows = slice(S - n, S)
            for base, name in ((eag, "eager"), (ref_out, "reference")):
                if base is None:
                    continue
                used = assert_no_worse_than_eager(out[b, :, rows], base[b, :, rows], ref[b, :, rows],
                                                  what=f"{what} b={b} (against {name})", scale=mag[b, :, rows])
                assert used <= MARGIN, (f"{what} b={b}: uses {used:.0%} of its allowance against {name} (margin "
                                        f"{MARGIN:.0%})")
        rows = slice(0, S) if not lens[b] else slice(0, S - n)
        assert (out[b, :, rows] == 0).all(), f"{what}: rows that see nothing (sequence {b}) are not zero"


def run_decode(q, kc, vc, ks, vs, bt, sl, scale, window, softcap, num_splits):
    out = torch.empty_like(q)
    PA.paged_decode_fwd(q, kc, vc, bt, sl, out, scale, window, softcap, num_splits, ks, vs)
    return out


def check_decode(kv, lens, bs, Hkv, G, D, dtype, device, *, num_splits, window=None, softcap=None, strided=False,
                 q_scale=1.0, seed=0):
    kc, vc, ks, vs, bt, sl, Kd, Vd = make_paged_q8(lens, bs, Hkv, D, KV[kv], dtype, device, strided=strided,
                                                   seed=seed)
    gen = torch.Generator().manual_seed(seed + 7)
    if strided:  # q as a slice of a fused qkv projection
        qkv = q_scale * torch.randn(len(lens), (G * Hkv + 2 * Hkv) * D, generator=gen)
        q = qkv.to(dtype)[:, :G * Hkv * D].view(len(lens), G * Hkv, D)
    else:
        q = (q_scale * torch.randn(len(lens), G * Hkv, D, generator=gen)).to(dtype)
    scale = D ** -0.5
    out = run_decode(q.to(device), kc, vc, ks, vs, bt, sl, scale, window, softcap, num_splits).cpu()
    assert out.dtype == dtype and torch.isfinite(out).all()
    ref_out = reference.paged_decode_attention(q, *(t.cpu() for t in (kc, vc, bt, sl)), scale, window, softcap,
                                               ks.cpu(), vs.cpu())
    _assert_close(out.unsqueeze(2), q.unsqueeze(2), Kd, Vd, lens, [1] * len(lens), scale, window, softcap,
                  f"decode {kv} bs={bs} G={G} D={D} {dtype}", ref_out.unsqueeze(2))


LENS = [1, 17, 150]
DECODE_CASES = [  # kv, bs, G, D, dtype, num_splits
    ("int8", 16, 1, 64, torch.float32, 1),
    ("int8", 1, 2, 128, torch.bfloat16, 3),
    ("int8", 64, 7, 64, torch.float16, 2),
    ("int8", 16, 7, 80, torch.bfloat16, 2),
    ("fp8", 1, 1, 64, torch.bfloat16, 2),
    ("fp8", 16, 2, 128, torch.float32, 3),
    ("fp8", 64, 7, 64, torch.float16, 1),
    ("fp8", 16, 7, 128, torch.float16, 4),
]


@pytest.mark.parametrize("kv,bs,G,D,dtype,num_splits", DECODE_CASES, ids=lambda v: str(v).replace("torch.", ""))
def test_decode(kv, bs, G, D, dtype, num_splits, device):
    check_decode(kv, LENS, bs, 2, G, D, dtype, device, num_splits=num_splits)


@pytest.mark.parametrize("kv", KV)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_decode_window_softcap(kv, dtype, device):
    # window 45 on 150 tokens: the first visible position (105) is mid-page and mid-split.
    check_decode(kv, LENS, 16, 2, 4, 64, dtype, device, num_splits=3, window=45)
    check_decode(kv, LENS, 16, 2, 4, 64, dtype, device, num_splits=2, window=100, softcap=5.0, q_scale=3.0)


@pytest.mark.parametrize("kv", KV)
def test_decode_strided_and_empty(kv, device):
    # Pages and scales that are views of bigger pools, q a slice of a qkv buffer, a sequence of length 0.
    check_decode(kv, [0, 9, 40], 16, 2, 2, 64, torch.float16, device, num_splits=2, strided=True)
    check_decode(kv, [33, 5], 1, 2, 7, 64, torch.float32, device, num_splits=1, strided=True, seed=3)


def check_prefill(kv, lens, q_lens, S, bs, Hkv, G, D, dtype, device, *, window=None, softcap=None, strided=False,
                  q_scale=1.0, seed=0):
    kc, vc, ks, vs, bt, sl, Kd, Vd = make_paged_q8(lens, bs, Hkv, D, KV[kv], dtype, device, strided=strided,
                                                   seed=seed)
    gen = torch.Generator().manual_seed(seed + 11)
    # HF's q is a [b, s, H, d] buffer viewed as [b, H, s, d].
    q4 = (q_scale * torch.randn(len(lens), S, G * Hkv, D, generator=gen)).to(dtype).transpose(1, 2)
    ql = torch.tensor(q_lens, dtype=I32)
    out = torch.empty_like(q4, device=device)
    scale = D ** -0.5
    PA.paged_prefill_fwd(q4.to(device), kc, vc, bt, sl, ql.to(device), out, scale, window, softcap, ks, vs)
    out = out.cpu()
    assert out.dtype == dtype and torch.isfinite(out).all()
    ref_out = reference.paged_prefill_attention(q4, *(t.cpu() for t in (kc, vc, bt, sl)), ql, scale, window,
                                                softcap, ks.cpu(), vs.cpu())
    _assert_close(out, q4, Kd, Vd, lens, q_lens, scale, window, softcap, f"prefill {kv} bs={bs} G={G} D={D} {dtype}",
                  ref_out)


PREFILL_CASES = [  # kv, bs, G, dtype
    ("int8", 16, 7, torch.float32),
    ("int8", 1, 1, torch.bfloat16),
    ("int8", 64, 2, torch.float16),
    ("fp8", 16, 2, torch.bfloat16),
    ("fp8", 1, 7, torch.float16),
    ("fp8", 64, 1, torch.float32),
]


@pytest.mark.parametrize("kv,bs,G,dtype", PREFILL_CASES, ids=lambda v: str(v).replace("torch.", ""))
def test_prefill_left_padded(kv, bs, G, dtype, device):
    # Sequence 0: a full prompt; 1: one new token after 19 cached (left padded); 2: 4 new after 96 cached; 3: none.
    check_prefill(kv, [6, 20, 100, 5], [6, 1, 4, 0], 6, bs, 2, G, 64, dtype, device)


@pytest.mark.parametrize("kv", KV)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_prefill_window_softcap_strided(kv, dtype, device):
    lens, q_lens, S = [40, 70], [40, 9], 40
    check_prefill(kv, lens, q_lens, S, 16, 1, 7, 128, dtype, device, window=13, strided=True)
    check_prefill(kv, lens, q_lens, S, 16, 1, 7, 128, dtype, device, softcap=4.0, q_scale=3.0, seed=1)


@pytest.mark.parametrize("kv,dtype", [("int8", torch.float16), ("fp8", torch.bfloat16)], ids=str)
def test_head_dim_256(kv, dtype, device):
    # The widest head: its own decode and prefill tiles (32 x 32 prefill for 8-bit pages).
    check_decode(kv, [3, 70], 16, 1, 4, 256, dtype, device, num_splits=2)
    check_prefill(kv, [20, 70], [20, 5], 20, 16, 1, 4, 256, dtype, device)


def test_float_pages_unchanged():
    """Without scales the launchers run the float kernels (KV_QUANT 0), as before."""
    from llmkern.kernels import _launch

    kc = torch.zeros(4, 16, 2, 64, device="meta")
    with _launch.recording() as launches:
        cache_ops.reshape_and_cache_fwd(torch.zeros(3, 2, 64, device="meta"), torch.zeros(3, 2, 64, device="meta"),
                                        kc, kc, torch.zeros(3, dtype=torch.int64, device="meta"))
        PA.paged_decode_fwd(torch.zeros(2, 4, 64, device="meta"), kc, kc, torch.zeros(2, 4, dtype=I32, device="meta"),
                            torch.zeros(2, dtype=I32, device="meta"), torch.zeros(2, 4, 64, device="meta"), 0.125,
                            None, None, 1)
        k8 = torch.zeros(4, 16, 2, 64, dtype=torch.float8_e4m3fn, device="meta")
        sc = torch.zeros(4, 16, 2, dtype=torch.float16, device="meta")
        PA.paged_decode_fwd(torch.zeros(2, 4, 64, device="meta"), k8, k8, torch.zeros(2, 4, dtype=I32, device="meta"),
                            torch.zeros(2, dtype=I32, device="meta"), torch.zeros(2, 4, 64, device="meta"), 0.125,
                            None, None, 1, sc, sc)
    assert launches[0].fn is cache_ops._reshape_and_cache_kernel
    assert launches[1].kwargs["KV_QUANT"] == 0 and launches[1].args[-8:-6] == (None, None)
    assert launches[2].kwargs["KV_QUANT"] == 2 and launches[2].args[1].dtype == torch.uint8
