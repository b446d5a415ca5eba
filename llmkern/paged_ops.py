"""Paged KV cache ops: writing K/V into pages, copy-on-write of pages, and attention over pages.

Layout (per layer), the NHD layout of vLLM's flash backend, FlashInfer and FlashAttention:

    k_cache, v_cache   [num_blocks, block_size, Hkv, D]   block_size a power of two, 1..256; head_dim contiguous
    block_tables       int32 [B, max_blocks]              page ids of sequence b, in order
    seq_lens           int32 [B]                          tokens held by sequence b (the new ones included)
    slot_mapping       int64 [T]                          slot = block * block_size + offset; < 0 = padding

Each op is one name in the ``llmkern`` torch library with a schema and a fake implementation (so ``torch.compile``
traces through and ``torch.library.opcheck`` holds); the real implementation dispatches per call through
``llmkern.backends.select``: Triton (``llmkern.kernels.cache_ops`` / ``llmkern.kernels.paged_attention``) or the
pure-torch reference (``llmkern.reference``). Validation checks shapes, dtypes and devices only: values that live on
the device (seq_lens, block ids, slots) are never read back for checking, so the ops stay CUDA-graph capturable.
The caller promises ``seq_lens[b] <= max_blocks * block_size``, block ids in ``[0, num_blocks)`` for every page a
sequence uses, and ``0 <= q_lens[b] <= min(S, seq_lens[b])``.

The caches may be strided views on every backend: any strides along blocks, slots and heads, and K's may differ from
V's — the two halves ``kv[:, 0]``, ``kv[:, 1]`` of one ``[num_blocks, 2, block_size, Hkv, D]`` tensor (vLLM's and
FlashInfer's layout), head-major pages ``[num_blocks, Hkv, block_size, D]`` permuted to NHD, or another library's
pool. Only head_dim must be contiguous (last-dim stride 1). Writes land in the caller's tensors: no op copies a cache.

Eager fast path (as ``llmkern.ops``'s): ``reshape_and_cache``, ``paged_decode_attention`` and
``paged_prefill_attention`` called on plain CPU tensors outside torch.compile, with nothing requiring grad and cpp the
thread's choice (``backends.local.direct``), call the C++ kernel straight away (~7 µs) instead of the dispatcher
round trip and the Python checks (~30 µs more per call; a served model makes two or three such calls per layer and
step). The C++ kernels check every tensor, every length, page id and slot before they read or write anything; when
one raises, the call is repeated on the full path, whose Python checks raise the error that names the argument. The
scalars the kernels take as given (scale, window, softcap, split count) are tested in Python first
(``_plain_scalars``).
"""

from numbers import Integral

import torch

from llmkern import _library, backends, reference
from llmkern.ops import (_INF, FLOAT_DTYPES, _PLAIN, _call_direct, _check_positive_float, _check_same,
                         _check_same_device, _check_tensor, _function_mode, _grad_enabled, _is_compiling, _local)

MAX_BLOCK_SIZE = 256
MAX_HEAD_DIM = 256
MAX_NUM_SPLITS = 256
KV_DTYPES = reference.KV_DTYPES  # 8-bit page formats: int8, float8_e4m3fn (codes, with float16 scales beside them)

# --------------------------------------------------------------------------------------------------------------------
# Validation: each check names the argument, what was expected and what came.


def _dt(d: torch.dtype) -> str:
    return str(d).replace("torch.", "")


def _check_int_tensor(t, name: str, dtype: torch.dtype, dim: int) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != dtype:
        raise TypeError(f"{name} must have dtype {_dt(dtype)}, got {_dt(t.dtype)}")
    if t.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D, got shape {tuple(t.shape)}")


def _require_tensors(**named) -> None:
    # The public functions check this much before torch.ops does, so a wrong type gets a TypeError naming the
    # argument rather than the dispatcher's RuntimeError; the op itself validates everything else.
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def _check_cache(k_cache, v_cache) -> None:
    _check_tensor(k_cache, "k_cache", FLOAT_DTYPES + KV_DTYPES)
    _check_tensor(v_cache, "v_cache", FLOAT_DTYPES + KV_DTYPES)
    if k_cache.dim() != 4:
        raise ValueError(f"k_cache must be 4-D (num_blocks, block_size, num_kv_heads, head_dim), "
                         f"got shape {tuple(k_cache.shape)}")
    bs = k_cache.shape[1]
    if bs > MAX_BLOCK_SIZE or bs & (bs - 1):
        raise ValueError(f"k_cache's block_size (its second dimension) must be a power of two in "
                         f"1..{MAX_BLOCK_SIZE}, got {bs}")
    if k_cache.shape[3] > MAX_HEAD_DIM:
        raise ValueError(f"k_cache's head_dim (its last dimension) must be at most {MAX_HEAD_DIM}, got "
                         f"{k_cache.shape[3]}")
    _check_same("shape", k_cache=k_cache, v_cache=v_cache)
    _check_same("dtype", k_cache=k_cache, v_cache=v_cache)
    _check_same_device(k_cache=k_cache, v_cache=v_cache)
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        if cache.stride(3) != 1 and cache.shape[3] > 1:
            raise ValueError(f"{name} must have last-dim stride 1 (head_dim contiguous), got strides "
                             f"{tuple(cache.stride())}; strides along blocks, slots and heads may be anything (e.g. "
                             f"kv[:, 0] of a [num_blocks, 2, block_size, Hkv, D] tensor, or head-major pages permuted "
                             f"to NHD)")


def _check_kv_scales(k_cache, k_scales, v_scales) -> bool:
    """8-bit pages come with their scales, float pages without; returns whether the pages are 8-bit."""
    eight = k_cache.dtype in KV_DTYPES
    if (k_scales is None) != (v_scales is None):
        raise ValueError("k_scales and v_scales go together: pass both (8-bit pages) or neither (float pages)")
    if eight and k_scales is None:
        raise ValueError(f"k_cache holds {_dt(k_cache.dtype)} codes: pass k_scales and v_scales, float16 "
                         f"[num_blocks, block_size, num_kv_heads] = {tuple(k_cache.shape[:3])}, one scale per token "
                         f"and KV head (llmkern/reference.py, quantize_kv)")
    if not eight and k_scales is not None:
        raise TypeError(f"k_scales and v_scales belong to 8-bit pages (int8 or float8_e4m3fn); k_cache is "
                        f"{_dt(k_cache.dtype)}: pass None")
    if eight:
        for name, t in (("k_scales", k_scales), ("v_scales", v_scales)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
            if t.dtype != reference.SCALE_DTYPE:
                raise TypeError(f"{name} must have dtype float16 (one scale per token and KV head), got "
                                f"{_dt(t.dtype)}")
            if tuple(t.shape) != tuple(k_cache.shape[:3]):
                raise ValueError(f"{name} must have shape {tuple(k_cache.shape[:3])} (k_cache's num_blocks, "
                                 f"block_size, num_kv_heads), got {tuple(t.shape)}")
        _check_same_device(k_cache=k_cache, k_scales=k_scales, v_scales=v_scales)
    return eight


def _check_scale(scale) -> float:
    return _check_positive_float(scale, "scale")


def _check_opt_int(v, name: str, lo: int, hi: int | None = None):
    if v is None:
        return None
    if isinstance(v, torch.SymInt):  # torch.compile with dynamic shapes: a symbolic int, checked as one
        if v < lo or (hi is not None and v > hi):
            raise ValueError(f"{name} must be {f'>= {lo}' if hi is None else f'in {lo}..{hi}'}, got {v}")
        return v
    if isinstance(v, bool) or not isinstance(v, Integral):
        raise TypeError(f"{name} must be an int or None, got {type(v).__name__}")
    v = int(v)
    if v < lo or (hi is not None and v > hi):
        rng = f">= {lo}" if hi is None else f"in {lo}..{hi}"
        raise ValueError(f"{name} must be {rng}, got {v}")
    return v


def _check_softcap(softcap):
    return _check_positive_float(softcap, "softcap", optional=True)


def _scalars(scale, sliding_window, softcap):
    """Check and normalise the scalar arguments (Python float/int, as the op schema wants them)."""
    return _check_scale(scale), _check_opt_int(sliding_window, "sliding_window", 1), _check_softcap(softcap)


_K_WRITE, _K_DECODE, _K_PREFILL = (("reshape_and_cache", "cpp"), ("paged_decode_attention", "cpp"),
                                   ("paged_prefill_attention", "cpp"))


def _plain_scalars(scale, sliding_window, softcap) -> bool:
    """The fast path's test of what the C++ kernels do not check: a positive finite float scale, an int window >= 1
    or None, a positive finite float softcap or None (anything else takes the full path, which normalises or
    raises)."""
    return (type(scale) is float and 0.0 < scale < _INF
            and (sliding_window is None or (type(sliding_window) is int and sliding_window >= 1))
            and (softcap is None or (type(softcap) is float and 0.0 < softcap < _INF)))


def _eager(*tensors) -> bool:
    """Whether a call on ``tensors`` may take the fast path: plain tensors, no torch-function mode, nothing requiring
    grad under grad mode (the full path refuses that with its own error)."""
    for t in tensors:
        if type(t) not in _PLAIN or (t.requires_grad and _grad_enabled()):
            return False
    return not _function_mode()


def _written(fn, *args) -> bool:
    """``fn(*args)`` for an op that returns nothing, as True: ``_call_direct`` takes None for "the kernel raised"."""
    fn(*args)
    return True


def _nonempty(q, k_cache, block_tables) -> bool:
    """The emptiness the full path refuses and the C++ kernels would take (no rows, no pages, no table columns)."""
    return bool(q.numel() and k_cache.numel() and block_tables.numel())


def _check_attention(q, k_cache, v_cache, block_tables, seq_lens, scale, sliding_window, softcap, q_dim: int,
                     k_scales=None, v_scales=None) -> None:
    _check_tensor(q, "q")
    if q.dim() != q_dim:
        want = "(batch, num_heads, head_dim)" if q_dim == 3 else "(batch, num_heads, seq, head_dim)"
        raise ValueError(f"q must be {q_dim}-D {want}, got shape {tuple(q.shape)}")
    _check_cache(k_cache, v_cache)
    _check_int_tensor(block_tables, "block_tables", torch.int32, 2)
    _check_int_tensor(seq_lens, "seq_lens", torch.int32, 1)
    _check_same_device(q=q, k_cache=k_cache, v_cache=v_cache, block_tables=block_tables, seq_lens=seq_lens)
    if not _check_kv_scales(k_cache, k_scales, v_scales) and q.dtype != k_cache.dtype:
        raise TypeError(f"q and k_cache must have the same dtype, got {_dt(q.dtype)} and {_dt(k_cache.dtype)}")
    B, Hq, D = q.shape[0], q.shape[1], q.shape[-1]
    Hkv = k_cache.shape[2]
    if D != k_cache.shape[3]:
        raise ValueError(f"q's head_dim {D} must match k_cache's head_dim {k_cache.shape[3]} "
                         f"(q {tuple(q.shape)}, k_cache {tuple(k_cache.shape)})")
    if Hq % Hkv:
        raise ValueError(f"q's num_heads {Hq} must be a multiple of k_cache's num_kv_heads {Hkv}")
    if block_tables.shape[0] != B or block_tables.shape[1] < 1:
        raise ValueError(f"block_tables must have shape ({B}, n) with n >= 1 (a row of page ids per sequence of q), "
                         f"got {tuple(block_tables.shape)}")
    if seq_lens.shape[0] != B:
        raise ValueError(f"seq_lens must have shape ({B},) (one length per sequence of q), got "
                         f"{tuple(seq_lens.shape)}")
    _check_scale(scale)
    _check_opt_int(sliding_window, "sliding_window", 1)
    _check_softcap(softcap)


def _check_decode(q, k_cache, v_cache, block_tables, seq_lens, scale, sliding_window, softcap, num_splits,
                  max_seq_len, k_scales=None, v_scales=None) -> None:
    _check_attention(q, k_cache, v_cache, block_tables, seq_lens, scale, sliding_window, softcap, 3, k_scales,
                     v_scales)
    _check_opt_int(num_splits, "num_splits", 1, MAX_NUM_SPLITS)
    _check_opt_int(max_seq_len, "max_seq_len", 0)


def _check_prefill(q, k_cache, v_cache, block_tables, seq_lens, q_lens, scale, sliding_window, softcap,
                   k_scales=None, v_scales=None) -> None:
    _check_attention(q, k_cache, v_cache, block_tables, seq_lens, scale, sliding_window, softcap, 4, k_scales,
                     v_scales)
    _check_int_tensor(q_lens, "q_lens", torch.int32, 1)
    _check_same_device(q=q, q_lens=q_lens)
    if q_lens.shape[0] != q.shape[0]:
        raise ValueError(f"q_lens must have shape ({q.shape[0]},) (one count per sequence of q), got "
                         f"{tuple(q_lens.shape)}")


def _check_reshape_and_cache(key, value, k_cache, v_cache, slot_mapping, k_scales=None, v_scales=None) -> None:
    _check_tensor(key, "key")
    _check_tensor(value, "value")
    _check_cache(k_cache, v_cache)
    _check_int_tensor(slot_mapping, "slot_mapping", torch.int64, 1)
    _check_same_device(key=key, value=value, k_cache=k_cache, v_cache=v_cache, slot_mapping=slot_mapping)
    _check_same("shape", key=key, value=value)
    if key.dim() != 3 or tuple(key.shape[1:]) != tuple(k_cache.shape[2:]):
        raise ValueError(f"key and value must be 3-D (num_tokens, num_kv_heads, head_dim) with k_cache's "
                         f"num_kv_heads ({k_cache.shape[2]}) and head_dim ({k_cache.shape[3]}), got shape "
                         f"{tuple(key.shape)}")
    if _check_kv_scales(k_cache, k_scales, v_scales):
        _check_same("dtype", key=key, value=value)
    elif key.dtype != k_cache.dtype or value.dtype != k_cache.dtype:
        raise TypeError(f"key and value must have k_cache's dtype {_dt(k_cache.dtype)}, got {_dt(key.dtype)} and "
                        f"{_dt(value.dtype)}")
    if slot_mapping.shape[0] != key.shape[0]:
        raise ValueError(f"slot_mapping must have shape ({key.shape[0]},) (one slot per token of key), got "
                         f"{tuple(slot_mapping.shape)}")


def _refuse_grad(op: str, **tensors) -> None:
    """The paged ops have no backward: an input that requires grad under grad mode is an error, not a silently
    detached result."""
    if torch.is_grad_enabled():
        needs = [name for name, t in tensors.items() if t.requires_grad]
        if needs:
            raise RuntimeError(
                f"{op} has no backward (the paged KV cache is for inference), but {' and '.join(needs)} "
                f"require{'s' if len(needs) == 1 else ''} grad under grad mode. Run it under torch.no_grad() or "
                f"torch.inference_mode(); to train a patched model, call it with use_cache=False (its attention then "
                f"runs transformers' SDPA, which has a backward).")


def _check_copy_blocks(k_cache, v_cache, src, dst) -> None:
    _check_cache(k_cache, v_cache)
    _check_int_tensor(src, "src", torch.int64, 1)
    _check_int_tensor(dst, "dst", torch.int64, 1)
    _check_same_device(k_cache=k_cache, v_cache=v_cache, src=src, dst=dst)
    _check_same("shape", src=src, dst=dst)


# --------------------------------------------------------------------------------------------------------------------
# reshape_and_cache


def _reshape_and_cache_op(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                          slot_mapping: torch.Tensor, k_scales: torch.Tensor | None = None,
                          v_scales: torch.Tensor | None = None) -> None:
    _refuse_grad("reshape_and_cache", key=key, value=value)
    _check_reshape_and_cache(key, value, k_cache, v_cache, slot_mapping, k_scales, v_scales)
    if key.shape[0] == 0:
        return
    if slot_mapping.device.type == "cpu":
        # Host memory: checking costs no sync, so every backend refuses a slot past the pool before writing. On
        # CUDA the check would sync each layer: the triton and cuda kernels skip such a slot instead.
        top = int(slot_mapping.max())
        if top >= k_cache.shape[0] * k_cache.shape[1]:
            raise ValueError(f"slot_mapping holds slot {top}, past the cache's {k_cache.shape[0] * k_cache.shape[1]} "
                             f"slots ({k_cache.shape[0]} blocks of {k_cache.shape[1]})")
    # Any 1-D view of the slots is taken: the Triton kernel reads slot t at slot_ptr + t and the extension's ops
    # want a contiguous mapping (a strided one wrote the wrong slots on triton and was a RuntimeError on cpp).
    slot_mapping = slot_mapping.contiguous()
    backend = backends.select("reshape_and_cache", key.device)
    if backend in ("cpp", "cuda"):
        if backend == "cuda":  # the CUDA op takes rows of K/V with a unit last stride; any view is accepted here
            key = key if key.stride(-1) == 1 else key.contiguous()
            value = value if value.stride(-1) == 1 else value.contiguous()
        torch.ops.llmkern_C.reshape_and_cache(key, value, k_cache, v_cache, slot_mapping, k_scales, v_scales)
        return
    if backend == "reference":
        reference.reshape_and_cache(key, value, k_cache, v_cache, slot_mapping, k_scales, v_scales)
        return
    from llmkern.kernels import cache_ops as K

    K.reshape_and_cache_fwd(key, value, k_cache, v_cache, slot_mapping, k_scales, v_scales)


def _reshape_and_cache_fake(key, value, k_cache, v_cache, slot_mapping, k_scales=None, v_scales=None):
    _check_reshape_and_cache(key, value, k_cache, v_cache, slot_mapping, k_scales, v_scales)


_library.define(
    "reshape_and_cache(Tensor key, Tensor value, Tensor(a!) k_cache, Tensor(b!) v_cache, "
    "Tensor slot_mapping, Tensor(c!)? k_scales=None, Tensor(d!)? v_scales=None) -> ()",
    _reshape_and_cache_op, _reshape_and_cache_fake)


def reshape_and_cache(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      slot_mapping: torch.Tensor, k_scales: torch.Tensor | None = None,
                      v_scales: torch.Tensor | None = None) -> None:
    """Write the new tokens' K and V into their pages, in place.

    Float pages: no arithmetic and no rounding, the pages hold K and V bit for bit, as eager's ``DynamicCache`` does.
    8-bit pages (int8 or float8_e4m3fn ``k_cache``/``v_cache``, with ``k_scales``/``v_scales``): each token's row of
    a KV head is quantized on write, symmetric, with one float16 scale per (token, KV head) written beside it
    (llmkern/reference.py, ``quantize_kv``, is the definition every backend follows).

    Args:
        key, value: ``[T, Hkv, D]``, the cache's dtype, any strides (HF's transposed views are fine).
        k_cache, v_cache: ``[num_blocks, block_size, Hkv, D]``, mutated in place; any strides along blocks, slots
            and heads (K's may differ from V's, e.g. ``kv[:, 0]`` and ``kv[:, 1]`` of one
            ``[num_blocks, 2, block_size, Hkv, D]`` tensor), head_dim contiguous.
        slot_mapping: int64 ``[T]``; token t goes to page ``slot // block_size``, row ``slot % block_size``.
            A slot < 0 marks a padding token: it is skipped.
        k_scales, v_scales: float16 ``[num_blocks, block_size, Hkv]`` (any strides), mutated in place; required for
            8-bit pages, None for float pages.

    Example:
        >>> kc = torch.zeros(4, 16, 2, 64); vc = torch.zeros_like(kc)
        >>> k = torch.randn(3, 2, 64); v = torch.randn(3, 2, 64)
        >>> llmkern.paged_ops.reshape_and_cache(k, v, kc, vc, torch.tensor([16, 17, -1]))
    """
    fn = None if _is_compiling() else _local.direct.get("reshape_and_cache")  # traced: no thread-local state
    if (fn is not None and type(key) in _PLAIN and key.is_cpu and key.numel() and _eager(key, value, k_cache, v_cache)
            and type(slot_mapping) in _PLAIN
            and _call_direct(_written, _K_WRITE, fn, key, value, k_cache, v_cache, slot_mapping, k_scales,
                             v_scales)):
        return
    _require_tensors(key=key, value=value, k_cache=k_cache, v_cache=v_cache, slot_mapping=slot_mapping)
    torch.ops.llmkern.reshape_and_cache(key, value, k_cache, v_cache, slot_mapping, k_scales, v_scales)


# --------------------------------------------------------------------------------------------------------------------
# copy_blocks


def _check_block_ids(k_cache, src, dst) -> None:
    """Host memory only (reading the ids costs no sync): every id a page of the pool, no page written twice, none
    both read and written (pairs are copied in parallel: the Triton kernel's result would depend on the order)."""
    nb = k_cache.shape[0]
    for name, ids in (("src", src), ("dst", dst)):
        bad = ((ids < 0) | (ids >= nb)).nonzero()
        if bad.numel():
            i = int(bad[0, 0])
            raise ValueError(f"{name}[{i}] = {int(ids[i])} is not a block of the cache: expected ids in [0, {nb}) "
                             f"(k_cache has {nb} blocks)")
    d = dst.tolist()
    if len(set(d)) != len(d):
        raise ValueError(f"dst names a block more than once ({d}): each destination page is written by one pair")
    both = sorted(set(d) & set(src.tolist()))
    if both:
        raise ValueError(f"dst and src share blocks {both}: a destination page may not be the source of another "
                         f"pair (pairs are copied in parallel)")


def _copy_blocks_op(k_cache: torch.Tensor, v_cache: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> None:
    _check_copy_blocks(k_cache, v_cache, src, dst)
    if src.shape[0] == 0:
        return
    if src.device.type == "cpu":
        # As for reshape_and_cache's slots: on CPU tensors every backend refuses a bad id before copying anything
        # (the reference wrapped negative ids and half-copied past the end; the Triton kernel read and wrote out of
        # bounds). On CUDA a check would sync.
        _check_block_ids(k_cache, src, dst)
    # Any 1-D views of the ids are taken: the Triton kernel reads pair i at src_ptr + i, the CUDA op wants contiguous
    # ids.
    src, dst = src.contiguous(), dst.contiguous()
    backend = backends.select("copy_blocks", k_cache.device)
    if backend in ("cpp", "cuda"):
        torch.ops.llmkern_C.copy_blocks(k_cache, v_cache, src, dst)
        return
    if backend == "reference":
        reference.copy_blocks(k_cache, v_cache, src, dst)
        return
    from llmkern.kernels import cache_ops as K

    K.copy_blocks_fwd(k_cache, v_cache, src, dst)


def _copy_blocks_fake(k_cache, v_cache, src, dst):
    _check_copy_blocks(k_cache, v_cache, src, dst)


_library.define(
    "copy_blocks(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor src, Tensor dst) -> ()",
    _copy_blocks_op, _copy_blocks_fake)


def copy_blocks(k_cache: torch.Tensor, v_cache: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> None:
    """Copy whole pages ``src[i] -> dst[i]`` in both caches, in place (copy-on-write of shared pages). Bit copies.

    Args:
        k_cache, v_cache: ``[num_blocks, block_size, Hkv, D]``, mutated in place; strides as
            :func:`reshape_and_cache` takes them.
        src, dst: int64 ``[n]`` page ids in ``[0, num_blocks)``, any 1-D views. No ``dst`` page may appear twice
            or also in ``src`` (pairs are copied in parallel). On CPU tensors a bad id is a ``ValueError`` naming
            ``src`` or ``dst``, raised before anything is copied; on CUDA tensors the caller promises it (checking
            would sync).

    Example:
        >>> llmkern.paged_ops.copy_blocks(kc, vc, torch.tensor([0]), torch.tensor([3]))
    """
    _require_tensors(k_cache=k_cache, v_cache=v_cache, src=src, dst=dst)
    torch.ops.llmkern.copy_blocks(k_cache, v_cache, src, dst)


# --------------------------------------------------------------------------------------------------------------------
# paged_decode_attention


def _paged_decode_op(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                     seq_lens: torch.Tensor, scale: float, sliding_window: int | None, softcap: float | None,
                     num_splits: int | None, max_seq_len: int | None, k_scales: torch.Tensor | None = None,
                     v_scales: torch.Tensor | None = None) -> torch.Tensor:
    _refuse_grad("paged_decode_attention", q=q, k_cache=k_cache, v_cache=v_cache)
    _check_decode(q, k_cache, v_cache, block_tables, seq_lens, scale, sliding_window, softcap, num_splits,
                  max_seq_len, k_scales, v_scales)
    backend = backends.select("paged_decode_attention", q.device)
    if backend == "cpp":
        # The C++ kernel picks its split count from the thread count; 0 = choose.
        return torch.ops.llmkern_C.paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, scale,
                                                          sliding_window or 0, softcap or 0.0, num_splits or 0,
                                                          k_scales, v_scales)
    if backend == "reference":
        return reference.paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, scale, sliding_window,
                                                softcap, k_scales, v_scales)
    from llmkern.kernels import paged_attention as PA

    if num_splits is None:
        if max_seq_len is None:
            max_seq_len = int(seq_lens.max().item())
        num_splits = PA.decode_num_splits(q.shape[0], k_cache.shape[2], max_seq_len, k_cache.shape[3],
                                          sliding_window, PA.num_sms(q.device), q.shape[1] // k_cache.shape[2])
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    PA.paged_decode_fwd(q, k_cache, v_cache, block_tables, seq_lens, out, scale, sliding_window, softcap, num_splits,
                        k_scales, v_scales)
    return out


def _paged_decode_fake(q, k_cache, v_cache, block_tables, seq_lens, scale, sliding_window, softcap, num_splits,
                       max_seq_len, k_scales=None, v_scales=None):
    _check_decode(q, k_cache, v_cache, block_tables, seq_lens, scale, sliding_window, softcap, num_splits,
                  max_seq_len, k_scales, v_scales)
    return q.new_empty(q.shape)


_library.define(
    "paged_decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, "
    "Tensor seq_lens, float scale, SymInt? sliding_window, float? softcap, SymInt? num_splits, "
    "SymInt? max_seq_len, Tensor? k_scales=None, Tensor? v_scales=None) -> Tensor",
    _paged_decode_op, _paged_decode_fake)


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                           seq_lens: torch.Tensor, scale: float, *, sliding_window: int | None = None,
                           softcap: float | None = None, num_splits: int | None = None,
                           max_seq_len: int | None = None, k_scales: torch.Tensor | None = None,
                           v_scales: torch.Tensor | None = None) -> torch.Tensor:
    """Decode attention (one new token per sequence) over a paged KV cache, flash-decoding style.

    Args:
        q: ``[B, Hq, D]`` fp32/fp16/bf16, rope applied, any strides. ``Hq % Hkv == 0`` (any group size).
        k_cache, v_cache: ``[num_blocks, block_size, Hkv, D]``, q's dtype, or 8-bit (int8 / float8_e4m3fn codes with
            ``k_scales``/``v_scales``, dequantized in registers). The new token's K/V are already written.
            Any strides along blocks, slots and heads (K's may differ from V's); head_dim contiguous.
        block_tables: int32 ``[B, max_blocks]``.
        seq_lens: int32 ``[B]``, tokens of sequence b including the new one (0 gives a zero output row).
        scale: softmax scale (``1/sqrt(D)`` for Llama), > 0.
        sliding_window: only the last ``w`` tokens are visible (Mistral/Qwen2 sliding layers); None = all.
        softcap: ``logits = c * tanh(logits / c)`` (Gemma-2 style); None = off.
        num_splits: fixed number of KV splits per sequence (pass it when capturing CUDA graphs). None = heuristic
            from ``B * Hkv``, ``max_seq_len`` and the device's SM count.
        max_seq_len: host-side bound on ``seq_lens`` for the heuristic; None = one ``seq_lens.max().item()``.
            It only steers the split count: each sequence's splits are cut from its own length on the device.
        k_scales, v_scales: float16 ``[num_blocks, block_size, Hkv]``, the scales of 8-bit pages (as
            :func:`reshape_and_cache` writes them); None for float pages.

    Returns:
        ``[B, Hq, D]`` contiguous, q's dtype. Deterministic (fixed split order).

    Rounding (fp16/bf16) differs from eager's ``eager_attention_forward``, which rounds the logits ``q @ k.T``, their
    product with ``scale``, the normalised softmax and ``P @ V`` to the dtype: here logits and softmax stay fp32.
    The reference and the C++ kernels round only the output, except in bf16 where the CPU has AVX512-BF16: there,
    as in the Triton kernel (for its tensor-core ``P @ V``), the unnormalised probabilities ``exp(s - max)`` are
    rounded to bf16 for a ``P @ V`` on the bf16 dot product. Not bit-equal to eager; guarantee: the largest
    error against an fp64 oracle is within the tolerance rule (README.md, "Where fp16/bf16 results are rounded"),
    and the tests keep a 30% margin below it (15% for the kernels that round the weights: tests/conftest.py).

    Example:
        >>> kc = torch.randn(8, 16, 2, 64); vc = torch.randn_like(kc)
        >>> q = torch.randn(2, 14, 64)
        >>> bt = torch.tensor([[0, 1, 2], [3, 4, 5]], dtype=torch.int32)
        >>> lens = torch.tensor([40, 7], dtype=torch.int32)
        >>> out = llmkern.paged_ops.paged_decode_attention(q, kc, vc, bt, lens, 64 ** -0.5)
    """
    fn = None if _is_compiling() else _local.direct.get("paged_decode_attention")  # traced: no thread-local state
    if (fn is not None and type(q) in _PLAIN and q.is_cpu and _plain_scalars(scale, sliding_window, softcap)
            and (num_splits is None or (type(num_splits) is int and 1 <= num_splits <= MAX_NUM_SPLITS))
            and (max_seq_len is None or (type(max_seq_len) is int and max_seq_len >= 0))
            and _eager(q, k_cache, v_cache, block_tables, seq_lens) and _nonempty(q, k_cache, block_tables)):
        out = _call_direct(fn, _K_DECODE, q, k_cache, v_cache, block_tables, seq_lens, scale, sliding_window or 0,
                           softcap or 0.0, num_splits or 0, k_scales, v_scales)
        if out is not None:
            return out
    _require_tensors(q=q, k_cache=k_cache, v_cache=v_cache, block_tables=block_tables, seq_lens=seq_lens)
    scale, sliding_window, softcap = _scalars(scale, sliding_window, softcap)
    num_splits = _check_opt_int(num_splits, "num_splits", 1, MAX_NUM_SPLITS)
    max_seq_len = _check_opt_int(max_seq_len, "max_seq_len", 0)
    return torch.ops.llmkern.paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, scale,
                                                    sliding_window, softcap, num_splits, max_seq_len, k_scales,
                                                    v_scales)


def decode_num_splits(batch_size: int, num_heads: int, num_kv_heads: int, head_dim: int, max_seq_len: int, *,
                      sliding_window: int | None = None, device="cuda") -> int:
    """The split count :func:`paged_decode_attention` would pick, for host-side planning once per decode step
    (pass it as ``num_splits`` to every layer; a fixed value is also what CUDA-graph capture needs).

    Example:
        >>> n = llmkern.paged_ops.decode_num_splits(4, 14, 2, 64, max_seq_len=4096, device="cuda")
    """
    from llmkern.kernels import paged_attention as PA

    for name, v in (("batch_size", batch_size), ("num_heads", num_heads), ("num_kv_heads", num_kv_heads),
                    ("head_dim", head_dim)):
        _check_opt_int(v, name, 1)
    _check_opt_int(max_seq_len, "max_seq_len", 0)
    _check_opt_int(sliding_window, "sliding_window", 1)
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads {num_heads} must be a multiple of num_kv_heads {num_kv_heads}")
    return PA.decode_num_splits(batch_size, num_kv_heads, max_seq_len, head_dim, sliding_window,
                                PA.num_sms(device), num_heads // num_kv_heads)


# --------------------------------------------------------------------------------------------------------------------
# paged_prefill_attention


def _cpp_prefill_ok(dtype: torch.dtype, head_dim: int, cache_dtype: torch.dtype | None = None) -> bool:
    from llmkern import _ext

    if not _ext.load():
        return False
    if cache_dtype is None or cache_dtype == dtype:
        return torch.ops.llmkern_C.cpu_fast_attention(dtype, head_dim)
    return torch.ops.llmkern_C.cpu_fast_attention(dtype, head_dim, cache_dtype)


def _paged_prefill_op(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                      seq_lens: torch.Tensor, q_lens: torch.Tensor, scale: float, sliding_window: int | None,
                      softcap: float | None, k_scales: torch.Tensor | None = None,
                      v_scales: torch.Tensor | None = None) -> torch.Tensor:
    _refuse_grad("paged_prefill_attention", q=q, k_cache=k_cache, v_cache=v_cache)
    _check_prefill(q, k_cache, v_cache, block_tables, seq_lens, q_lens, scale, sliding_window, softcap, k_scales,
                   v_scales)
    # The C++ prefill kernels are the AVX-512 and AVX2 ones; elsewhere (a CPU without AVX2, or a head_dim they lack)
    # the reference runs.
    cpp_ok = q.device.type != "cpu" or _cpp_prefill_ok(q.dtype, q.shape[-1], k_cache.dtype)
    backend = backends.select("paged_prefill_attention", q.device, cpp=cpp_ok)
    if backend == "cpp":
        return torch.ops.llmkern_C.paged_prefill_attention(q, k_cache, v_cache, block_tables, seq_lens, q_lens, scale,
                                                           sliding_window or 0, softcap or 0.0, k_scales, v_scales)
    if backend == "reference":
        return reference.paged_prefill_attention(q, k_cache, v_cache, block_tables, seq_lens, q_lens, scale,
                                                 sliding_window, softcap, k_scales, v_scales)
    from llmkern.kernels import paged_attention as PA

    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    PA.paged_prefill_fwd(q, k_cache, v_cache, block_tables, seq_lens, q_lens, out, scale, sliding_window, softcap,
                         k_scales, v_scales)
    return out


def _paged_prefill_fake(q, k_cache, v_cache, block_tables, seq_lens, q_lens, scale, sliding_window, softcap,
                        k_scales=None, v_scales=None):
    _check_prefill(q, k_cache, v_cache, block_tables, seq_lens, q_lens, scale, sliding_window, softcap, k_scales,
                   v_scales)
    return q.new_empty(q.shape)


_library.define(
    "paged_prefill_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, "
    "Tensor seq_lens, Tensor q_lens, float scale, SymInt? sliding_window, float? softcap, "
    "Tensor? k_scales=None, Tensor? v_scales=None) -> Tensor",
    _paged_prefill_op, _paged_prefill_fake)


def paged_prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                            seq_lens: torch.Tensor, q_lens: torch.Tensor, scale: float, *,
                            sliding_window: int | None = None, softcap: float | None = None,
                            k_scales: torch.Tensor | None = None, v_scales: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention of a chunk of new tokens (left padded, HF style) over a paged KV cache.

    Args:
        q: ``[B, Hq, S, D]`` fp32/fp16/bf16, rope applied, any strides. For sequence b the last ``q_lens[b]`` rows
            are real tokens at positions ``seq_lens[b] - q_lens[b] .. seq_lens[b] - 1``; the first
            ``S - q_lens[b]`` rows are padding.
        k_cache, v_cache: ``[num_blocks, block_size, Hkv, D]``, q's dtype or 8-bit with ``k_scales``/``v_scales``
            (as :func:`paged_decode_attention` takes them); the new tokens' K/V already written.
        block_tables: int32 ``[B, max_blocks]``. seq_lens, q_lens: int32 ``[B]``, ``q_lens[b] <= seq_lens[b]``.
        scale, sliding_window, softcap: as in :func:`paged_decode_attention`; each row at position p sees cache
            positions ``max(0, p - w + 1) .. p``.

    Returns:
        ``[B, Hq, S, D]`` contiguous, q's dtype; padding rows are zeros.

    Rounding (fp16/bf16): as :func:`paged_decode_attention`, fewer roundings than eager, not bit-equal to it.

    Example:
        >>> q = torch.randn(2, 14, 5, 64)
        >>> out = llmkern.paged_ops.paged_prefill_attention(q, kc, vc, bt, lens,
        ...         torch.tensor([5, 3], dtype=torch.int32), 64 ** -0.5)
    """
    fn = None if _is_compiling() else _local.direct.get("paged_prefill_attention")  # traced: no thread-local state
    if (fn is not None and type(q) in _PLAIN and q.is_cpu and _plain_scalars(scale, sliding_window, softcap)
            and _eager(q, k_cache, v_cache, block_tables, seq_lens, q_lens) and _nonempty(q, k_cache, block_tables)):
        out = _call_direct(fn, _K_PREFILL, q, k_cache, v_cache, block_tables, seq_lens, q_lens, scale,
                           sliding_window or 0, softcap or 0.0, k_scales, v_scales)
        if out is not None:
            return out
    _require_tensors(q=q, k_cache=k_cache, v_cache=v_cache, block_tables=block_tables, seq_lens=seq_lens,
                     q_lens=q_lens)
    scale, sliding_window, softcap = _scalars(scale, sliding_window, softcap)
    return torch.ops.llmkern.paged_prefill_attention(q, k_cache, v_cache, block_tables, seq_lens, q_lens, scale,
                                                     sliding_window, softcap, k_scales, v_scales)
