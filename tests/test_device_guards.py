"""Every op runs on its tensors' device (issue #10 item 3).

* Triton launchers (``llmkern.kernels.*.*_fwd``): each runs its body under ``kernels/_launch.device_guard`` of its
  tensors, so Triton compiles for that device and launches on its current stream. Checked by running every
  launcher (found by name, so a new one without a case here fails) with the guard swapped for a recorder and the
  kernel class's ``run`` wrapped: each kernel launch must happen inside a guard entered with the inputs' device.
* C++ CUDA bindings (csrc/cuda_bindings.inc): each function registered for the CUDA key declares a
  ``c10::cuda::OptionalCUDAGuard`` (or ``CUDAGuard``) on one of its tensors before it allocates or launches, and
  passes a stream obtained from c10 for that tensor's device; the .cu launchers launch on the stream they are given.
  A source check, which is shown to fail on a binding with its guard removed.
* On a machine with 2+ GPUs (``gpu`` marker): every op with its inputs on cuda:1 while cuda:0 is current gives
  cuda:0's result, on cuda:1, and leaves cuda:0 current.
* Inputs on two devices are a ValueError naming both (CPU and meta tensors show it without a GPU).
"""

import contextlib
import inspect
import os
import re

import pytest
import torch

import llmkern
from llmkern import ops, paged_ops
from llmkern.kernels import _launch, cache_ops, paged_attention, rms_norm, rope, swiglu

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERNEL_MODULES = (rms_norm, rope, swiglu, cache_ops, paged_attention)
I32 = torch.int32


# --------------------------------------------------------------------------------------------------------------------
# Inputs for every op / launcher


def _paged_inputs(device, dtype=torch.float32, B=2, Hq=4, Hkv=2, D=64, bs=16, seq=(40, 7)):
    g = torch.Generator().manual_seed(0)
    nb = 8
    kc = torch.randn(nb, bs, Hkv, D, generator=g).to(dtype).to(device)
    vc = torch.randn(nb, bs, Hkv, D, generator=g).to(dtype).to(device)
    bt = torch.arange(B * 3, dtype=I32).reshape(B, 3).to(device)
    lens = torch.tensor(seq, dtype=I32, device=device)
    return kc, vc, bt, lens


def _launcher_cases(device):
    """``{launcher name: (launcher, args, tensor whose device the launch must use)}`` for every ``*_fwd``."""
    f32 = dict(device=device, dtype=torch.float32)
    x, w = torch.randn(3, 64, **f32), torch.randn(64, **f32)
    q4, k4 = torch.randn(1, 4, 5, 32, **f32), torch.randn(1, 2, 5, 32, **f32)
    cos, sin = torch.randn(1, 5, 32, **f32), torch.randn(1, 5, 32, **f32)
    kc, vc, bt, lens = _paged_inputs(device)
    key, value = torch.randn(3, 2, 64, **f32), torch.randn(3, 2, 64, **f32)
    slots = torch.tensor([0, 17, 5], device=device)
    qd = torch.randn(2, 4, 64, **f32)
    qp = torch.randn(2, 4, 3, 64, **f32)
    qlens = torch.tensor([3, 2], dtype=I32, device=device)
    return {
        "rms_norm_fwd": (rms_norm.rms_norm_fwd, (x, w, torch.empty_like(x), 1e-6, 0.0), x),
        "fused_add_rms_norm_fwd": (rms_norm.fused_add_rms_norm_fwd,
                                   (x, x.clone(), w, torch.empty_like(x), torch.empty_like(x), 1e-6), x),
        "rope_fwd": (rope.rope_fwd, (q4, k4, cos, sin, torch.empty_like(q4), torch.empty_like(k4)), q4),
        "silu_and_mul_fwd": (swiglu.silu_and_mul_fwd, (x, x.clone(), torch.empty_like(x)), x),
        "reshape_and_cache_fwd": (cache_ops.reshape_and_cache_fwd, (key, value, kc, vc, slots), kc),
        "copy_blocks_fwd": (cache_ops.copy_blocks_fwd,
                            (kc, vc, torch.tensor([1, 2], device=device), torch.tensor([5, 6], device=device)), kc),
        # num_splits 2: the split kernel and the reduce kernel both launch.
        "paged_decode_fwd": (paged_attention.paged_decode_fwd,
                             (qd, kc, vc, bt, lens, torch.empty_like(qd), 0.125, None, None, 2), qd),
        "paged_prefill_fwd": (paged_attention.paged_prefill_fwd,
                              (qp, kc, vc, bt, lens, qlens, torch.empty_like(qp), 0.125, None, None), qp),
    }


def _launchers() -> set:
    """Every launcher of the kernel modules: their public ``*_fwd`` functions."""
    return {f"{m.__name__.rsplit('.', 1)[-1]}.{n}" for m in KERNEL_MODULES for n, f in vars(m).items()
            if n.endswith("_fwd") and inspect.isfunction(f) and f.__module__ == m.__name__}


# --------------------------------------------------------------------------------------------------------------------
# (1) Triton launchers enter the guard with their tensors' device


def test_device_guard_helper():
    class _T:  # a CUDA tensor's device without needing a GPU: only .device is read
        device = torch.device("cuda", 1)

    g = _launch.device_guard(_T())
    assert isinstance(g, torch.cuda.device) and g.idx == 1
    for dev in ("cpu", "meta"):
        g = _launch.device_guard(torch.empty(1, device=dev))
        assert isinstance(g, contextlib.nullcontext)
        with g:
            pass


def test_every_launcher_is_covered(device):
    cases = {f"{fn.__module__.rsplit('.', 1)[-1]}.{name}" for name, (fn, _, _) in _launcher_cases(device).items()}
    assert _launchers() == cases, f"launchers without a device-guard case: {_launchers() - cases}"


@pytest.mark.parametrize("name", sorted(_launcher_cases("cpu")))
def test_launcher_launches_inside_its_tensors_device_guard(name, device, monkeypatch):
    fn, args, anchor = _launcher_cases(device)[name]
    stack, entered, launches = [], [], []

    @contextlib.contextmanager
    def recording_guard(t):
        entered.append(t.device)
        stack.append(t.device)
        try:
            yield
        finally:
            stack.pop()

    kernel_cls = type(paged_attention._paged_prefill_kernel)  # JITFunction on a GPU, InterpretedFunction here
    real_run = kernel_cls.run

    def run(self, *a, **k):
        launches.append((getattr(self.fn, "__name__", "?"), stack[-1] if stack else None))
        return real_run(self, *a, **k)

    monkeypatch.setattr(_launch, "device_guard", recording_guard)
    monkeypatch.setattr(kernel_cls, "run", run)
    fn(*args)
    assert entered == [anchor.device], f"{name} entered guards for {entered}, want one for {anchor.device}"
    assert launches, f"{name} launched no kernel"
    outside = [k for k, dev in launches if dev != anchor.device]
    assert not outside, f"{name} launched {outside} outside a guard for {anchor.device}: {launches}"


# --------------------------------------------------------------------------------------------------------------------
# (2) C++ CUDA bindings create a guard before launching


def _read(rel):
    with open(os.path.join(ROOT, rel)) as f:
        return f.read()


def _strip_comments(src: str) -> str:
    src = re.sub(r"/\*.*?\*/", "", src, flags=re.S)
    return re.sub(r"//[^\n]*", "", src)


def _function_bodies(src: str) -> dict:
    """``{name: (params, body)}`` of the top-level C++ function definitions in ``src`` (comments stripped)."""
    out = {}
    for m in re.finditer(r"\b([A-Za-z_]\w*)\s*\(([^;{}]*)\)\s*(?:const\s*)?\{", src):
        name, params = m.group(1), m.group(2)
        if name in ("if", "for", "while", "switch", "return", "sizeof", "catch"):
            continue
        depth, i = 1, m.end()
        while depth and i < len(src):
            depth += {"{": 1, "}": -1}.get(src[i], 0)
            i += 1
        out.setdefault(name, (params, src[m.end():i - 1]))
    return out


def _cuda_registered(src: str) -> list:
    block = re.search(r"TORCH_LIBRARY_IMPL\(\s*llmkern_C\s*,\s*CUDA\s*,\s*\w+\s*\)\s*\{(.*?)\n\}", src, re.S)
    assert block, "no TORCH_LIBRARY_IMPL(llmkern_C, CUDA, m) block in csrc/cuda_bindings.inc"
    return re.findall(r'\.impl\(\s*"\w+"\s*,\s*&?\s*(\w+)\s*\)', block.group(1))


_GUARD = re.compile(r"\bc10::cuda::(?:Optional)?CUDAGuard\s+\w+\s*[({]\s*(?:at::)?device_of\(\s*(\w+)\s*\)")


def _binding_problems(src: str) -> list:
    """What is wrong with the CUDA bindings in ``src``: a registered function without a device guard on one of its
    tensor parameters as its first use of the device (before any allocation, kernel call or stream), or a launch on
    a stream not obtained from c10 for a tensor's device."""
    src = _strip_comments(src)
    funcs = _function_bodies(src)
    problems = []
    registered = _cuda_registered(src)
    if not registered:
        problems.append("no function is registered for the CUDA key")
    for name in registered:
        if name not in funcs:
            problems.append(f"{name}: registered for CUDA but its definition was not found")
            continue
        params, body = funcs[name]
        tensors = set(re.findall(r"at::Tensor\s*&?\s*(\w+)", params))
        guard = _GUARD.search(body)
        if guard is None:
            problems.append(f"{name}: no c10::cuda::OptionalCUDAGuard(device_of(<tensor>))")
            continue
        if guard.group(1) not in tensors:
            problems.append(f"{name}: the guard is on {guard.group(1)!r}, not one of its tensors {sorted(tensors)}")
        first_use = re.search(r"\bat::empty\w*\(|\bkcu::\w+\(|\bstream\w*\(|\.contiguous\(", body)
        if first_use is not None and first_use.start() < guard.start():
            problems.append(f"{name}: {first_use.group(0)} comes before the device guard")
        if not re.search(r"\bkcu::\w+\(", body):
            problems.append(f"{name}: launches no kernel (kcu::...) — is the parser still right?")
        if re.search(r"\bstream\(\s*\)", body):
            problems.append(f"{name}: launches on stream(), not stream_of(<tensor>)")
    helper = funcs.get("stream_of")
    if helper is None or not re.search(r"c10::cuda::getCurrentCUDAStream\(\s*\w+\.get_device\(\)\s*\)",
                                       helper[1]):
        problems.append("stream_of(t) must return c10::cuda::getCurrentCUDAStream(t.get_device()).stream()")
    return problems


def test_cuda_bindings_guard_the_device_before_launching():
    src = _read("csrc/cuda_bindings.inc")
    registered = _cuda_registered(_strip_comments(src))
    assert {"rms_norm_cuda", "fused_add_rms_norm_cuda", "apply_rope_cuda", "silu_and_mul_cuda",
            "reshape_and_cache_cuda", "copy_blocks_cuda"} <= set(registered), registered
    assert _binding_problems(src) == []


@pytest.mark.parametrize("fn", ["rms_norm_cuda", "apply_rope_cuda", "copy_blocks_cuda"])
def test_binding_check_fails_without_the_guard(fn):
    """The source check is not vacuous: the same file with one binding's guard deleted (or moved after the
    allocation) is reported."""
    src = _read("csrc/cuda_bindings.inc")
    start = src.index(f" {fn}(")
    line = _GUARD.search(src, start)
    assert line is not None
    eol = src.index("\n", line.start())
    sol = src.rindex("\n", 0, line.start())
    removed = src[:sol] + src[eol:]
    assert any(p.startswith(f"{fn}:") for p in _binding_problems(removed)), _binding_problems(removed)
    guard_line = src[sol:eol]
    body_end = src.index("\n}\n", start)
    moved = src[:sol] + src[eol:body_end] + guard_line + src[body_end:]
    assert any(p.startswith(f"{fn}:") for p in _binding_problems(moved)), _binding_problems(moved)


def test_cuda_sources_stay_in_c10_and_launch_on_the_given_stream():
    sources = {p: _read(p) for p in ("csrc/torch_bindings.cpp", "csrc/cuda_bindings.inc")}
    cuda_dir = os.path.join(ROOT, "csrc", "cuda")
    for f in sorted(os.listdir(cuda_dir)):
        sources[f"csrc/cuda/{f}"] = _read(f"csrc/cuda/{f}")
    for path, src in sources.items():
        assert "ATen/cuda/CUDAContext.h" not in _strip_comments(src), f"{path} includes ATen/cuda/CUDAContext.h"
    assert "#include <c10/cuda/CUDAGuard.h>" in sources["csrc/torch_bindings.cpp"]
    launches = [(p, m.group(1)) for p, s in sources.items() if p.endswith(".cu")
                for m in re.finditer(r"<<<([^>]*)>>>", _strip_comments(s))]
    assert launches
    # grid, block, shared memory, stream: the stream is the launcher's stream argument, never the default stream.
    bad = [(p, cfg) for p, cfg in launches
           if len(cfg.split(",")) != 4 or cfg.split(",")[3].strip() not in ("stream", "s")]
    assert not bad, f"kernel launches not on the stream they were given: {bad}"


# --------------------------------------------------------------------------------------------------------------------
# (3) On two GPUs: every op on cuda:1 while cuda:0 is current


def _run_ops(device) -> dict:
    torch.manual_seed(0)
    cpu = torch.device("cpu")
    f16 = dict(dtype=torch.float16)

    def on(t):
        return t.to(device)

    out = {}
    x, r, w = torch.randn(3, 256, **f16), torch.randn(3, 256, **f16), torch.randn(256, **f16)
    out["rms_norm"] = ops.rms_norm(on(x), on(w), 1e-6)
    out["fused_add_rms_norm"] = ops.fused_add_rms_norm(on(x), on(r), on(w), 1e-6)
    q, k = torch.randn(2, 8, 5, 64, **f16), torch.randn(2, 2, 5, 64, **f16)
    cos, sin = torch.randn(1, 5, 64, **f16), torch.randn(1, 5, 64, **f16)
    out["apply_rope"] = ops.apply_rope(on(q), on(k), on(cos), on(sin))
    g, u = torch.randn(3, 512, **f16), torch.randn(3, 512, **f16)
    out["silu_and_mul"] = ops.silu_and_mul(on(g), on(u))
    lw = torch.randn(128, 256, **f16)
    out["linear"] = ops.linear(on(x), on(lw))
    kc, vc, bt, lens = (on(t) for t in _paged_inputs(cpu, torch.float16, Hq=8, Hkv=2))
    key, value = torch.randn(3, 2, 64, **f16), torch.randn(3, 2, 64, **f16)
    paged_ops.reshape_and_cache(on(key), on(value), kc, vc, on(torch.tensor([3, 40, 100])))
    paged_ops.copy_blocks(kc, vc, on(torch.tensor([0, 1])), on(torch.tensor([7, 6])))
    out["caches"] = (kc.clone(), vc.clone())
    qd = on(torch.randn(2, 8, 64, **f16))
    for n in (1, 3):
        out[f"paged_decode_attention/{n}"] = paged_ops.paged_decode_attention(qd, kc, vc, bt, lens, 0.125,
                                                                              num_splits=n)
    out["paged_decode_attention/auto"] = paged_ops.paged_decode_attention(qd, kc, vc, bt, lens, 0.125)
    qp = on(torch.randn(2, 8, 3, 64, **f16))
    out["paged_prefill_attention"] = paged_ops.paged_prefill_attention(qp, kc, vc, bt, lens,
                                                                       on(torch.tensor([3, 2], dtype=I32)), 0.125)
    return out


def _flat(out: dict) -> dict:
    flat = {}
    for k, v in out.items():
        for i, t in enumerate(v if isinstance(v, tuple) else (v,)):
            flat[f"{k}[{i}]"] = t
    return flat


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices: ops on cuda:1 with cuda:0 current")
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_every_op_runs_on_cuda1_with_cuda0_current(backend):
    torch.cuda.set_device(0)
    with torch.no_grad(), llmkern.use_backend(backend):
        want = _flat(_run_ops(torch.device("cuda", 0)))
        torch.cuda.set_device(0)
        got = _flat(_run_ops(torch.device("cuda", 1)))
        assert torch.cuda.current_device() == 0, "an op left another device current"
        torch.cuda.synchronize(1)
    assert want.keys() == got.keys()
    for name in want:
        assert got[name].device == torch.device("cuda", 1), f"{name} returned on {got[name].device}"
        assert torch.equal(got[name].cpu(), want[name].cpu()), f"{name}: cuda:1 differs from cuda:0"


# --------------------------------------------------------------------------------------------------------------------
# (4) Inputs on two devices: a ValueError naming both


def _mixed_cases():
    """``(op, call(cpu tensors, meta tensor factory), the argument placed on meta)``."""
    def t(*shape, dtype=torch.float32, dev="cpu"):
        return torch.randn(*shape).to(dtype).to(dev) if dtype.is_floating_point else \
            torch.zeros(*shape, dtype=dtype, device=dev)

    def paged(dev_of):
        kc, vc, bt, lens = _paged_inputs("cpu")
        d = dict(q=t(2, 4, 64), k_cache=kc, v_cache=vc, block_tables=bt, seq_lens=lens)
        return {k: (v.to("meta") if k == dev_of else v) for k, v in d.items()}

    return [
        ("rms_norm", lambda: ops.rms_norm(t(3, 64), t(64, dev="meta"), 1e-6), "weight"),
        ("fused_add_rms_norm", lambda: ops.fused_add_rms_norm(t(3, 64), t(3, 64, dev="meta"), t(64), 1e-6),
         "residual"),
        ("apply_rope", lambda: ops.apply_rope(t(1, 4, 5, 32), t(1, 2, 5, 32), t(1, 5, 32, dev="meta"),
                                              t(1, 5, 32)), "cos"),
        ("silu_and_mul", lambda: ops.silu_and_mul(t(3, 64), t(3, 64, dev="meta")), "up"),
        ("linear", lambda: ops.linear(t(3, 64), t(32, 64, dev="meta")), "weight"),
        ("linear+bias", lambda: ops.linear(t(3, 64), t(32, 64), t(32, dev="meta")), "bias"),
        ("reshape_and_cache", lambda: paged_ops.reshape_and_cache(
            t(3, 2, 64), t(3, 2, 64), *_paged_inputs("cpu")[:2], t(3, dtype=torch.int64, dev="meta")),
         "slot_mapping"),
        ("copy_blocks", lambda: paged_ops.copy_blocks(
            *_paged_inputs("cpu")[:2], t(2, dtype=torch.int64), t(2, dtype=torch.int64, dev="meta")), "dst"),
        ("paged_decode_attention", lambda: paged_ops.paged_decode_attention(**paged("block_tables"), scale=0.125),
         "block_tables"),
        ("paged_prefill_attention", lambda: paged_ops.paged_prefill_attention(
            **{**paged("none"), "q": t(2, 4, 3, 64)}, q_lens=t(2, dtype=I32, dev="meta"), scale=0.125), "q_lens"),
    ]


@pytest.mark.parametrize("op, call, arg", _mixed_cases(), ids=[c[0] for c in _mixed_cases()])
def test_mixed_devices_raise_naming_both(op, call, arg):
    with torch.no_grad(), pytest.raises(ValueError) as e:
        call()
    msg = str(e.value)
    assert "cpu" in msg and "meta" in msg, f"{op}: {msg!r} does not name both devices"
    assert re.search(rf"\b{arg} on meta\b", msg), f"{op}: {msg!r} does not say {arg} is on meta"
