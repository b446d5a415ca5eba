"""Compile every Triton kernel variant a generation can meet before its first token (issue #9 item 4).

Triton compiles a kernel the first time it is launched with a new *variant*: new constexprs (tile sizes, flags),
new ``num_warps``/``num_stages``, or a new specialisation of an integer argument (equal to 1, divisible by 16,
past 2^31) or of a pointer's alignment. Each compile takes seconds; left to the first launch it stalls a
generation at whatever step first needs it. ``warmup(model, max_batch_size=..., max_seq_len=...)`` lists, from
the model's config and the launch heuristics themselves, every variant a generation up to those limits can
launch, and compiles each on the model's GPU(s) before the first token.

How the list is made: the real launchers (``llmkern.kernels.*_fwd``) are called on meta tensors shaped as a
patched model calls them, inside ``llmkern.kernels._launch.recording()``, so nothing runs and each launch's
arguments are exactly the launcher's; ``_launch.variant_key`` gives each launch's compile identity (Triton's own
specialisation of every argument). The shapes are taken from buckets, not from a scan of every length:

* decode attention: every split count ``decode_num_splits`` can pick (``SPLIT_BUCKETS`` up to the one it picks
  for batch 1 at ``max_seq_len``: it is non-increasing in the batch and non-decreasing in the length), per
  sliding window of the model's layers;
* prefill attention and RoPE: prompt lengths 1..32, powers of two and their neighbours, ``max_seq_len``, and the
  lengths where a stride passes 2^31 (the only places an integer argument's specialisation can change);
* row ops (RMSNorm, residual + RMSNorm, SwiGLU, Qwen3's per-head q/k norm): row counts at powers of two up to the
  largest (their configs step at powers of two), and the largest;
* cache writes (``reshape_and_cache``, ``copy_blocks`` for beam search): their config depends on the layout only.

tests/test_variants.py scans every context length of every supported layout with the heuristics and checks that
this list contains every variant the scan meets.

What is not covered: launches on tensors whose layout differs from a patched Hugging Face model's (a pointer not
16-byte aligned, a stride not a multiple of 16), which specialise differently; ``linear`` (no Triton kernel).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import torch

_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
_META = "meta"
_I32_MAX = 2**31 - 1


@dataclass(frozen=True)
class ModelShapes:
    """What the kernels' launch configs depend on, from a model config."""

    Hq: int
    Hkv: int
    D: int
    hidden: int
    intermediates: tuple  # MLP widths (dense, and the experts' for MoE configs)
    windows: tuple = (None,)  # sliding windows of the attention layers (None: full attention)
    softcap: float | None = None
    qk_norm: bool = False  # Qwen3: RMSNorm over each head's q and k
    rotary_dim: int | None = None  # None: the whole head

    @classmethod
    def from_config(cls, config) -> "ModelShapes":
        if hasattr(config, "get_text_config"):
            config = config.get_text_config()
        Hq = int(config.num_attention_heads)
        Hkv = int(getattr(config, "num_key_value_heads", None) or Hq)
        hidden = int(config.hidden_size)
        D = int(getattr(config, "head_dim", None) or hidden // Hq)
        inter = {int(getattr(config, "intermediate_size"))}
        if getattr(config, "moe_intermediate_size", None):
            inter.add(int(config.moe_intermediate_size))
        window = getattr(config, "sliding_window", None)
        layer_types = getattr(config, "layer_types", None)
        if layer_types:
            windows = {window if t == "sliding_attention" else None for t in layer_types}
        elif window and getattr(config, "use_sliding_window", True) is not False:
            windows = {int(window)}
        else:
            windows = {None}
        rd = int(D * float(getattr(config, "partial_rotary_factor", 1.0) or 1.0))
        model_type = str(getattr(config, "model_type", ""))
        return cls(Hq=Hq, Hkv=Hkv, D=D, hidden=hidden, intermediates=tuple(sorted(inter)),
                   windows=tuple(sorted(windows, key=lambda w: -1 if w is None else w)),
                   softcap=getattr(config, "attn_logit_softcapping", None),
                   qk_norm=model_type.startswith("qwen3"), rotary_dim=rd - rd % 2)


@dataclass(frozen=True)
class Variant:
    """One compiled kernel: ``key`` is its compile identity (``kernels._launch.variant_key``), ``launch`` a launch
    that needs it (meta tensors), ``where`` the op and shapes it was found at."""

    op: str
    key: tuple
    launch: object
    where: str

    @property
    def kernel(self) -> str:
        return self.key[0].lstrip("_").removesuffix("_kernel")


@dataclass
class WarmupReport:
    devices: tuple  # CUDA devices compiled for; empty when nothing was compiled
    dtype: torch.dtype
    block_size: int
    max_batch_size: int
    max_seq_len: int
    variants: list = field(default_factory=list)  # [Variant], one per compiled kernel a generation can meet
    compiled: int = 0  # variants x devices compiled by this call
    seconds: float = 0.0
    note: str = ""

    def by_kernel(self) -> dict:
        out: dict = {}
        for v in self.variants:
            out[v.kernel] = out.get(v.kernel, 0) + 1
        return out

    def __str__(self) -> str:
        head = (f"llmkern.warmup: {len(self.variants)} kernel variants for batch <= {self.max_batch_size}, "
                f"context <= {self.max_seq_len} ({_DTYPES.get(self.dtype, self.dtype)}, page size "
                f"{self.block_size}): {self.note}")
        return head + "\n  " + ", ".join(f"{k} {n}" for k, n in sorted(self.by_kernel().items()))


# --------------------------------------------------------------------------------------------------------------------
# Argument checks


def _check_int(value, name: str, lo: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ValueError(f"{name} must be an int >= {lo}, got {value!r}")
    return value


def _check_dtype(dtype, name: str = "dtype") -> torch.dtype:
    if dtype not in _DTYPES:
        raise ValueError(f"{name} must be torch.float32, torch.float16 or torch.bfloat16, got {dtype!r}")
    return dtype


# --------------------------------------------------------------------------------------------------------------------
# Enumeration


def _pow2_upto(n: int) -> list:
    out, p = [], 1
    while p <= n:
        out.append(p)
        p *= 2
    return out


def _row_counts(max_rows: int) -> list:
    """Row counts where a row op's config or M's type can change: powers of two, the largest, 2^31."""
    rows = set(_pow2_upto(max_rows)) | {max_rows}
    if max_rows > _I32_MAX:
        rows.add(_I32_MAX + 1)
    return sorted(rows)


def _lengths(max_len: int, *coefs: int) -> list:
    """Sequence lengths where an integer argument ``c * S`` can change its specialisation (== 1, % 16, past 2^31):
    1..32, powers of two and their neighbours, ``max_len``, and the first lengths past 2^31 / c."""
    out = set(range(1, 33))
    for p in _pow2_upto(max_len):
        out.update((p - 1, p, p + 1))
    out.add(max_len)
    for c in coefs:
        t = _I32_MAX // c + 1
        out.update(range(t, t + 16))
    return sorted(s for s in out if 1 <= s <= max_len)


def decode_split_counts(Hkv: int, D: int, G: int, max_seq_len: int, sliding_window=None, sms: int | None = None):
    """Every split count the decode heuristic can pick for batch 1..any and context 1..``max_seq_len``: the
    ``SPLIT_BUCKETS`` up to its pick at batch 1 and ``max_seq_len`` (its maximum)."""
    from llmkern.kernels import paged_attention as PA

    sms = PA.NOMINAL_SMS if sms is None else sms
    top = PA.decode_num_splits(1, Hkv, max_seq_len, D, sliding_window, sms, G)
    return [s for s in PA.SPLIT_BUCKETS if s <= top]


def _record(fn, *args) -> list:
    from llmkern.kernels import _launch

    with _launch.recording() as launches:
        fn(*args)
    return launches


def enumerate_variants(shapes: ModelShapes, *, max_batch_size: int, max_seq_len: int, block_size: int = 16,
                       dtype: torch.dtype = torch.float16, sms: int | None = None, kv_dtype=None) -> dict:
    """``{variant key: Variant}`` of every Triton kernel a patched model of ``shapes`` can launch in a generation
    with at most ``max_batch_size`` sequences of at most ``max_seq_len`` tokens (prompt included), with pages of
    ``block_size`` tokens, in ``dtype``, on a GPU with ``sms`` SMs (default: the nominal A100's). ``kv_dtype``: the
    pages' format (``PagedKVCache``'s; None: ``dtype``), 8-bit pages come with their float16 scales."""
    from llmkern.cache.pool import parse_kv_dtype
    from llmkern.kernels import cache_ops, paged_attention as PA, rms_norm, rope, swiglu

    _check_int(max_batch_size, "max_batch_size")
    _check_int(max_seq_len, "max_seq_len")
    _check_int(block_size, "block_size")
    _check_dtype(dtype)
    B, L, bs = max_batch_size, max_seq_len, block_size
    Hq, Hkv, D = shapes.Hq, shapes.Hkv, shapes.D
    G = Hq // Hkv
    out: dict = {}

    def meta(*shape, dt=dtype):
        return torch.empty(*shape, dtype=dt, device=_META)

    def add(op: str, where: str, fn, *args):
        for launch in _record(fn, *args):
            key = launch.key
            if key not in out:
                out[key] = Variant(op, key, launch, where)

    blocks = -(-L // bs)
    kv8 = parse_kv_dtype(kv_dtype)
    kc = meta(B * blocks, bs, Hkv, D, dt=kv8 or dtype)
    vc = meta(B * blocks, bs, Hkv, D, dt=kv8 or dtype)
    scales = (meta(B * blocks, bs, Hkv, dt=torch.float16),) * 2 if kv8 else (None, None)
    i32 = torch.int32
    for window in shapes.windows:
        w = f"window={window}" if window is not None else "full attention"
        for b in sorted({1, B}):
            bt, lens = meta(b, blocks, dt=i32), meta(b, dt=i32)
            q = meta(b, 1, Hq, D).transpose(1, 2).squeeze(2)  # HF's [b, 1, H, d] viewed as [b, H, d]
            for n in decode_split_counts(Hkv, D, G, L, window, sms):
                add("paged_decode_attention", f"decode, {n} split{'s' * (n > 1)}, {w}", PA.paged_decode_fwd,
                    q, kc, vc, bt, lens, meta(*q.shape), 0.125, window, shapes.softcap, n, *scales)
        bt, lens = meta(1, blocks, dt=i32), meta(1, dt=i32)
        for S in _lengths(L, Hq * D, D):
            for q in (meta(1, S, Hq, D).transpose(1, 2), meta(1, Hq, S, D)):  # HF's view, or gathered rows
                add("paged_prefill_attention", f"prefill, {S} tokens, {w}", PA.paged_prefill_fwd,
                    q, kc, vc, bt, lens, lens, meta(*q.shape), 0.125, window, shapes.softcap, *scales)

    for T in (1, 2):
        kv = meta(T, Hkv, D)
        add("reshape_and_cache", "cache write", cache_ops.reshape_and_cache_fwd, kv, kv, kc, vc,
            meta(T, dt=torch.int64), *scales)
    add("copy_blocks", "beam search page copy", cache_ops.copy_blocks_fwd, kc, vc, meta(2, dt=torch.int64),
        meta(2, dt=torch.int64))
    if kv8:  # the scales are copied with their pages, as [num_blocks, block_size, Hkv, 1] pages
        add("copy_blocks", "beam search scale copy", cache_ops.copy_blocks_fwd, scales[0].unsqueeze(-1),
            scales[1].unsqueeze(-1), meta(2, dt=torch.int64), meta(2, dt=torch.int64))

    max_tokens = B * L
    w_h = meta(shapes.hidden)
    for M in _row_counts(max_tokens):
        x = meta(M, shapes.hidden)
        add("rms_norm", f"{M} rows x {shapes.hidden}", rms_norm.rms_norm_fwd, x, w_h, x, 1e-6, 0.0)
        add("fused_add_rms_norm", f"{M} rows x {shapes.hidden}", rms_norm.fused_add_rms_norm_fwd, x, x, w_h, x, x,
            1e-6)
        for inter in shapes.intermediates:
            g = meta(M, inter)
            add("silu_and_mul", f"{M} rows x {inter}", swiglu.silu_and_mul_fwd, g, g, g)
    if shapes.qk_norm:  # rows = tokens x heads: multiples of the head count
        w_d = meta(D)
        for H in sorted({Hq, Hkv}):
            rows = {H * t for t in _row_counts(max_tokens)}
            if max_tokens * H > _I32_MAX:
                rows.add((_I32_MAX // H + 1) * H)
            for M in sorted(rows):
                x = meta(M, D)
                add("rms_norm", f"q/k norm, {M} rows x {D}", rms_norm.rms_norm_fwd, x, w_d, x, 1e-6, 0.0)

    rd = shapes.rotary_dim or D
    shapes_bs = {(b, 1) for b in _row_counts(B)} | {(1, s) for s in _lengths(L, Hq * D, Hkv * D)}
    shapes_bs |= {(B, s) for s in _lengths(L, Hq * D, Hkv * D)} if B > 1 else set()
    for b, S in sorted(shapes_bs):
        q, k = meta(b, S, Hq, D).transpose(1, 2), meta(b, S, Hkv, D).transpose(1, 2)
        cos = meta(b, S, rd)
        add("apply_rope", f"rope, batch {b} x {S} tokens", rope.rope_fwd, q, k, cos, cos,
            torch.empty_like(q), torch.empty_like(k))
    return out


# --------------------------------------------------------------------------------------------------------------------
# Compiling


def _model_devices_and_dtype(model):
    params = [p for p in model.parameters()] + [b for b in model.buffers()]
    if not params:
        raise ValueError("model has no parameters: nothing tells which device and dtype it runs in")
    devices = sorted({p.device for p in params if p.device.type != _META}, key=str)
    floats = [p.dtype for p in model.parameters() if p.dtype.is_floating_point]
    return devices, (floats[0] if floats else None)


def compile_variant(variant: Variant, device: torch.device):
    """Compile ``variant`` for CUDA ``device`` without launching it: ``JITFunction.warmup`` with each meta tensor
    replaced by its dtype (Triton then assumes a 16-byte aligned pointer, as every meta tensor here has)."""
    launch = variant.launch

    def arg(a):
        return a.dtype if isinstance(a, torch.Tensor) else a

    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        return launch.fn.warmup(*map(arg, launch.args), grid=launch.grid,
                                **{k: arg(v) for k, v in launch.kwargs.items()})


def warmup(model, *, max_batch_size: int, max_seq_len: int, block_size: int = 16, dtype=None,
           kv_dtype="patched") -> WarmupReport:
    """Compile, before the first token, every Triton kernel variant a generation of ``model`` (patched with
    ``llmkern.patch``) can launch with up to ``max_batch_size`` sequences of up to ``max_seq_len`` tokens (prompt
    included) and pages of ``block_size`` tokens (``PagedKVCache``'s). ``dtype``: the activations' dtype (default:
    the model's parameters'). ``kv_dtype``: the pages' format (None, ``"int8"``, ``"fp8_e4m3"``); by default the
    one ``llmkern.patch(model, kv_dtype=...)`` was given.

    On a CPU model nothing is compiled (the C++ kernels serve it; under ``TRITON_INTERPRET=1`` the interpreter
    compiles nothing either): the report lists the variants and says so. A model spread over several GPUs gets
    every variant compiled on each of them.

    Example:
        >>> report = llmkern.warmup(model, max_batch_size=8, max_seq_len=8192)
        >>> print(report)
    """
    if not isinstance(model, torch.nn.Module) or getattr(model, "config", None) is None:
        raise ValueError(f"model must be a Hugging Face model (a torch.nn.Module with a .config), got "
                         f"{type(model).__name__}")
    _check_int(max_batch_size, "max_batch_size")
    _check_int(max_seq_len, "max_seq_len")
    _check_int(block_size, "block_size")
    devices, model_dtype = _model_devices_and_dtype(model)
    dtype = _check_dtype(model_dtype if dtype is None else dtype)
    shapes = ModelShapes.from_config(model.config)
    if kv_dtype == "patched":
        from llmkern.patching import patch_report

        report_ = patch_report(model)
        kv_dtype = None if report_ is None else report_.options.get("kv_dtype")
    cuda = [d for d in devices if d.type == "cuda"]
    report = WarmupReport(devices=tuple(str(d) for d in cuda), dtype=dtype, block_size=block_size,
                          max_batch_size=max_batch_size, max_seq_len=max_seq_len)
    t0 = time.perf_counter()
    if not cuda:
        variants = enumerate_variants(shapes, max_batch_size=max_batch_size, max_seq_len=max_seq_len,
                                      block_size=block_size, dtype=dtype, kv_dtype=kv_dtype)
        report.variants = list(variants.values())
        from llmkern import backends

        where = ("Triton kernels run in the interpreter (TRITON_INTERPRET=1), which compiles nothing"
                 if backends.triton_interpret() else "the C++ kernels serve")
        report.note = f"nothing to compile: the model runs on {'/'.join(str(d) for d in devices)}, where {where}"
    else:
        from llmkern.kernels import paged_attention as PA

        seen: dict = {}
        for dev in cuda:
            variants = enumerate_variants(shapes, max_batch_size=max_batch_size, max_seq_len=max_seq_len,
                                          block_size=block_size, dtype=dtype, sms=PA.num_sms(dev),
                                          kv_dtype=kv_dtype)
            for key, v in variants.items():
                seen.setdefault(key, v)
                compile_variant(v, dev)
                report.compiled += 1
        report.variants = list(seen.values())
        report.note = f"compiled {report.compiled} on {', '.join(report.devices)}"
    report.seconds = time.perf_counter() - t0
    if cuda:
        report.note += f" in {report.seconds:.1f} s"
    return report
