"""The planted bugs of the mutation check (tests/mutation/run.py): typical kernel bugs, one per mutant, each a small
textual patch of the tracked sources and the pytest selection that must catch it.

A replacement ``(file, old, new)`` must match ``old`` exactly once in the current file: when the source changes so a
mutant no longer applies, the check fails loudly (tests/test_mutation.py runs that check in the normal suite) rather
than silently testing nothing. ``tests`` are pytest arguments run from the repository root; ``dtypes`` the dtypes the
bug is visible in (a truncating 16-bit store is the same program as the original in fp32), each of which the
selection must exercise; ``note`` says what the report should make of a survivor.

Kinds: ``triton`` (kernels/, run by the Triton interpreter on CPU tensors, tests/conftest.py), ``python``
(llmkern/: the reference, the op layer), ``cpp`` (csrc/cpu/: the extension is rebuilt for each, so they are few and
run last).
"""

from dataclasses import dataclass

ALL_DTYPES = ("fp32", "fp16", "bf16")


@dataclass(frozen=True)
class Mutant:
    name: str
    kind: str  # "triton" | "python" | "cpp"
    bug: str  # what is planted, in words
    replacements: tuple  # ((path, old, new), ...): each `old` occurs exactly once in `path`
    tests: tuple  # pytest arguments (paths, node ids, -k expressions)
    dtypes: tuple = ALL_DTYPES
    note: str = ""


_DECODE_TESTS = ("tests/test_paged_attention.py", "-k",
                 "decode_head_dims_dtypes or decode_long_qwen2_layout or decode_softcap or decode_block_sizes")

MUTANTS = (
    # ---------------------------------------------------------------------------------------------------- Triton
    Mutant(
        "triton-swiglu-store-truncates", "triton",
        "silu_and_mul rounds its fp16/bf16 store toward zero instead of to nearest even",
        (("kernels/swiglu.py",
          "cols[None, :] * stride_oi, out.to(o_ptr.dtype.element_ty), mask=mask)",
          "cols[None, :] * stride_oi, out.to(o_ptr.dtype.element_ty, fp_downcast_rounding=\"rtz\"), mask=mask)"),),
        ("tests/test_ops.py", "-k", "silu_and_mul and triton"),
        dtypes=("fp16", "bf16"),
        note="fp32 stores are not narrowed (the mutant is the original there). Caught element by element only: under "
             "a per-tensor max-error tolerance most cases pass (issue #23 item 1; the per-element rule is another "
             "branch's)."),
    Mutant(
        "triton-residual-store-truncates", "triton",
        "fused_add_rms_norm rounds the residual sum toward zero instead of to nearest even",
        (("kernels/rms_norm.py", "\n    s = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)\n",
          "\n    s = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype, fp_downcast_rounding=\"rtz\")\n"),),
        ("tests/test_ops.py", "-k", "fused_add and triton"),
        dtypes=("fp16", "bf16"),
        note="fp32 sums are not narrowed (the mutant is the original there). The residual is checked bit for bit "
             "against eager's residual + x."),
    Mutant(
        "triton-rms-norm-eps-hardcoded", "triton",
        "rms_norm's kernel adds a hard-coded 1e-5 instead of the eps it is given (1e-6 in the tests)",
        (("kernels/rms_norm.py", "tl.math.div_rn(sum_sq, N * 1.0) + eps)", "tl.math.div_rn(sum_sq, N * 1.0) + 1e-5)"),),
        ("tests/test_ops.py", "-k", "rms_norm and triton"),
        note="On unit-scale rows the change is ~5e-6 relative: many ulp in fp32, below one ulp of fp16/bf16 unless a "
             "row's mean square is near eps (rows of one element can be)."),
    Mutant(
        "triton-rms-norm-gemma-offset-dropped", "triton",
        "Gemma's rms_norm (offset 1) multiplies by w instead of (1 + w)",
        (("kernels/rms_norm.py", "\n        y = h * (OFFSET + w[None, :])\n", "\n        y = h * w[None, :]\n"),),
        ("tests/test_ops.py", "-k", "gemma_offset and triton")),
    Mutant(
        "triton-rope-rotate-half-sign", "triton",
        "RoPE's first half adds x2 * sin instead of subtracting it (rotate_half negates the wrong half)",
        (("kernels/rope.py", "o1 = x1f * c1[None, :] - x2f * s1[None, :]", "o1 = x1f * c1[None, :] + x2f * s1[None, :]"),),
        ("tests/test_ops.py", "-k", "rope and triton")),
    Mutant(
        "triton-rope-position-off-by-one", "triton",
        "RoPE rotates token s with the cos/sin row of position s - 1 (an offset off by one)",
        (("kernels/rope.py", "s.to(tl.int64) * stride_cs", "tl.maximum(s - 1, 0).to(tl.int64) * stride_cs"),
         ("kernels/rope.py", "s.to(tl.int64) * stride_ss", "tl.maximum(s - 1, 0).to(tl.int64) * stride_ss")),
        ("tests/test_ops.py", "-k", "rope and triton")),
    Mutant(
        "triton-decode-drops-last-key", "triton",
        "decode attention never sees the newest token (pos < seq_len - 1)",
        (("kernels/paged_attention.py", "valid = (pos >= start) & (pos < seq_len)",
          "valid = (pos >= start) & (pos < seq_len - 1)"),),
        _DECODE_TESTS),
    Mutant(
        "triton-decode-drops-last-partial-tile", "triton",
        "decode attention counts its tiles with a floor division: a partly filled last tile (page) is dropped",
        (("kernels/paged_attention.py", "n_tiles = tl.cdiv(seq_len - start_al, BLOCK_N)",
          "n_tiles = (seq_len - start_al) // BLOCK_N"),),
        _DECODE_TESTS),
    Mutant(
        "triton-decode-window-off-by-one", "triton",
        "decode's sliding window shows window - 1 tokens",
        (("kernels/paged_attention.py", "start = tl.maximum(seq_len - window, 0)",
          "start = tl.maximum(seq_len - window + 1, 0)"),),
        ("tests/test_paged_attention.py", "-k", "decode_sliding_window or decode_softcap")),
    Mutant(
        "triton-prefill-window-off-by-one", "triton",
        "prefill's sliding window shows window + 1 tokens (>= where > belongs)",
        (("kernels/paged_attention.py", "vis = vis & (pos[None, :] > qpos[:, None] - window)",
          "vis = vis & (pos[None, :] >= qpos[:, None] - window)"),),
        ("tests/test_paged_attention.py", "-k", "prefill_window_softcap or prefill_left_padded")),
    Mutant(
        "triton-decode-skips-last-head-of-group", "triton",
        "decode attention computes G - 1 query heads of each GQA group (the group mask is off by one)",
        (("kernels/paged_attention.py", "gmask = g < G\n", "gmask = g < G - 1\n"),),
        _DECODE_TESTS),
    Mutant(
        "triton-cache-write-drops-slot-0", "triton",
        "reshape_and_cache skips slot 0 as if it were padding (> 0 where >= 0 belongs)",
        # The float write kernel's guard (the 8-bit one's is followed by `hmask =`).
        (("kernels/cache_ops.py",
          "if (slot >= 0) & (slot < num_slots):\n        blk = slot // BLOCK_SIZE\n        off = slot % BLOCK_SIZE\n"
          "        mask =",
          "if (slot > 0) & (slot < num_slots):\n        blk = slot // BLOCK_SIZE\n        off = slot % BLOCK_SIZE\n"
          "        mask ="),),
        ("tests/test_cache_ops.py", "-k", "reshape_and_cache and triton and not bad_input")),
    Mutant(
        "triton-copy-blocks-drops-last-row", "triton",
        "copy_blocks launches block_size - 1 token rows per page: each copied page loses its last token",
        (("kernels/cache_ops.py", "return (n, block_size * triton.cdiv(",
          "return (n, (block_size - 1) * triton.cdiv("),),
        ("tests/test_cache_ops.py", "-k", "copy_blocks and triton and not bad_input")),
    # ---------------------------------------------------------------------------------------------------- Python
    Mutant(
        "python-reference-window-off-by-one", "python",
        "the reference's sliding window shows window + 1 tokens",
        (("llmkern/reference.py", "mask & (kpos[None, None, :] > qpos[:, :, None] - sliding_window)",
          "mask & (kpos[None, None, :] >= qpos[:, :, None] - sliding_window)"),),
        ("tests/test_cpu_isa.py", "tests/test_reference.py", "-k", "window or test_reference_paged_attention")),
    Mutant(
        "python-reference-gqa-interleaved", "python",
        "the reference maps query head i to KV head i % Hkv instead of i // G (a GQA group of the wrong heads)",
        (("llmkern/reference.py", "qf = q.to(acc).reshape(B, Hkv, G, S, D)",
          "qf = q.to(acc).reshape(B, G, Hkv, S, D).transpose(1, 2)"),
         ("llmkern/reference.py", "out = torch.einsum(\"bhgsl,bhld->bhgsd\", p, v).reshape(B, Hq, S, D)",
          "out = torch.einsum(\"bhgsl,bhld->bhgsd\", p, v).transpose(1, 2).reshape(B, Hq, S, D)")),
        ("tests/test_cpu_isa.py", "tests/test_reference.py", "-k",
         "(test_decode and not window) or test_reference_paged_attention")),
    Mutant(
        "python-reference-rms-norm-eps", "python",
        "the reference rms_norm (the tests' fp64 oracle) adds a hard-coded 1e-5 instead of eps",
        (("llmkern/reference.py", "xf.pow(2).mean(-1, keepdim=True) + eps)", "xf.pow(2).mean(-1, keepdim=True) + 1e-5)"),),
        ("tests/test_ops.py", "tests/test_reference.py", "-k", "rms_norm and (cpp or test_reference) and not gemma"),
        note="A wrong oracle would widen eager's error and so the allowance; tests/test_reference.py holds the "
             "reference to hand-written fp64 formulas and to transformers' eager (issue #23 item 2)."),
    Mutant(
        "python-cache-slot-bound-off-by-one", "python",
        "paged_ops accepts slot num_blocks * block_size (> where >= belongs) on CPU tensors",
        (("llmkern/paged_ops.py", "if top >= k_cache.shape[0] * k_cache.shape[1]:",
          "if top > k_cache.shape[0] * k_cache.shape[1]:"),),
        ("tests/test_cache_ops.py", "-k", "bad_input and slot"),
        dtypes=("fp32",),
        note="Validation is dtype-blind: the bad-input cases use fp32 caches."),
    # ---------------------------------------------------------------------------------------------------- C++
    Mutant(
        "cpp-avx2-attention-tail-unmasked", "cpp",
        "the AVX2 attention kernel masks a chunk's scores only up to its last token, not its last W-lane block: "
        "zero-padded tail lanes get softmax weight",
        (("csrc/cpu/attention_vec.h", "if (lo > c0 || hi < c0 + nblk * W)", "if (lo > c0 || hi < c0 + n)"),),
        ("tests/test_cpu_isa.py", "-k", "avx2 and (test_decode or test_prefill)"),
        note="Forced with set_cpu_isa('avx2'), which AVX-512 machines run too."),
    Mutant(
        "cpp-bf16-store-truncates", "cpp",
        "the C++ row kernels' fp32 -> bf16 store truncates instead of rounding to nearest even",
        (("csrc/cpu/kernels_impl.h", ": (u + 0x7fffu + ((u >> 16) & 1u));", ": u;"),),
        ("tests/test_ops.py", "-k", "cpp and (rms_norm or silu_and_mul or rope) and bfloat16"),
        dtypes=("bf16",),
        note="Only bf16 goes through this store (fp16 converts with the compiler's cast, fp32 is not narrowed)."),
    Mutant(
        "cpp-cache-write-drops-slot-0", "cpp",
        "the C++ reshape_and_cache skips slot 0 as if it were padding",
        (("csrc/cpu/kernels_impl.h", "if (slot < 0) continue;", "if (slot <= 0) continue;"),),
        ("tests/test_cache_ops.py", "-k", "reshape_and_cache and cpp and not bad_input")),
    Mutant(
        "cpp-kv8-drops-v-scale", "cpp",
        "the C++ attention over 8-bit pages forgets V's per-token scale: P multiplies the raw codes",
        (("csrc/cpu/attention_vec.h", "V::store(s + b * W, vsc ? V::mul(p, V::load(vsc + b * W)) : p);",
          "V::store(s + b * W, p);"),),
        ("tests/test_kv8_cpp.py", "-k", "decode or prefill"),
        note="Float pages pass no scales: only the 8-bit tests can see it."),
    Mutant(
        "python-cb-block-table-reversed", "python",
        "under continuous batching, a request's block table lists the engine's pages in reverse order",
        (("llmkern/continuous.py", "row = [b * stride for b in blocks[:n]]",
          "row = [b * stride for b in blocks[:n]][::-1]"),),
        ("tests/test_cb_kernels.py", "-k", "not bf16"),
        dtypes=("fp32",),
        note="A request of one page reads the same either way: the tests' prompts and chunks span several pages."),
)


def by_name(names) -> list:
    known = {m.name: m for m in MUTANTS}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"unknown mutant(s) {unknown}; known: {sorted(known)}")
    return [known[n] for n in names]
