"""The capturable decode step (reserved PagedKVCache, llmkern/cache/__init__.py module docstring): torch.compile with
fullgraph=True, no recompiles across page boundaries, no host sync, transformers' compile path through generate,
and, on a CUDA runner, CUDA-graph capture and replay.

Compiled runs use the ``aot_eager`` backend (dynamo's graph capture + functionalization + fake tensors: everything
that decides graph breaks, guards and recompiles) except the generate test, which runs inductor, the backend users
get. Step counts and page sizes are chosen so that every run crosses several page boundaries. The uncompiled
equality tests run the default backends (here the Triton kernels, in the interpreter); the long compiled runs, the
beam and crop test and the sync count run the C++ CPU kernels (``use_backend("cpp")``), which take the same
arguments from the same plan and are ~50x faster than the interpreter.
"""

from __future__ import annotations

import contextlib
import inspect

import pytest
import torch
from torch._dynamo.utils import counters
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import LlamaForCausalLM

import llmkern
from llmkern import paged_ops, testing
from llmkern.cache import CacheExhaustedError, PagedKVCache

B, P = 2, 9  # a ragged batch: row 1 is left-padded by 3
# The models' cache argument: ``cache`` from transformers 5.24 on, ``past_key_values`` before (5.17 on the H200 image,
# where ``cache=`` would land in **kwargs unused and the step would run without a cache).
CACHE = "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"


@pytest.fixture
def cpp():
    with llmkern.use_backend("cpp"):
        yield


def _inputs(batch: int, seed: int = 0):
    ids = torch.randint(3, 500, (batch, P), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones(batch, P, dtype=torch.long)
    if batch > 1:
        mask[1, :3] = 0
    return ids, mask


def _decode_loop(model, cache, ids, mask, steps: int, *, forward=None, pad_to: int | None = None):
    """Prefill eagerly, then ``steps`` greedy decode steps through ``forward`` (the model's by default) with the
    inputs generate would give: one token, its position, and the 2-D mask (right-padded to ``pad_to`` columns, as
    generate pads it for a reserved cache). Returns the tokens [batch, steps + 1]."""
    forward = forward or model.forward
    with torch.inference_mode():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0),
                       **{CACHE: cache}, use_cache=True).logits
        tok, pos, toks = logits[:, -1:].argmax(-1), mask.sum(1, keepdim=True), []
        toks.append(tok)
        for _ in range(steps):
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            m = mask if pad_to is None else torch.nn.functional.pad(mask, (0, pad_to - mask.shape[1]))
            logits = forward(input_ids=tok, attention_mask=m, position_ids=pos, **{CACHE: cache}, use_cache=True).logits
            tok, pos = logits[:, -1:].argmax(-1), pos + 1
            toks.append(tok)
    return torch.cat(toks, 1)


def _patched(model):
    llmkern.patch(model)
    return model


def _eager_tokens(layout, dtype, batch, steps):
    from transformers import DynamicCache

    model = testing.tiny_model(layout, dtype=dtype)
    ids, mask = _inputs(batch)
    return _decode_loop(model, DynamicCache(config=model.config), ids, mask, steps)


# -- the reserved cache ------------------------------------------------------------------------------------------------


def test_reserved_cache_sizes_and_arguments():
    cfg = testing.tiny_config("llama-tiny")
    cache = PagedKVCache(cfg, block_size=16, max_batch_size=3, max_cache_len=40)
    assert cache.reserved and cache.is_compileable and not cache.growable
    assert cache.pages_per_sequence == 3 and cache.allocator.num_blocks == 9
    assert all(layer.is_compileable for layer in cache.layers)
    assert "reserved 3 x 40" in repr(cache)
    assert not PagedKVCache(cfg).is_compileable
    with pytest.raises(ValueError, match="max_cache_len=40 reserves pages per sequence: pass max_batch_size"):
        PagedKVCache(cfg, max_cache_len=40)
    for extra in (dict(num_blocks=8), dict(max_memory_bytes=1 << 20), dict(growable=True)):
        with pytest.raises(ValueError, match="cannot be combined with"):
            PagedKVCache(cfg, max_batch_size=2, max_cache_len=40, **extra)
    with pytest.raises(ValueError, match="max_cache_len must be a positive int"):
        PagedKVCache(cfg, max_batch_size=2, max_cache_len=0)


@pytest.mark.parametrize("layout", ["llama-tiny", "qwen2-tiny"])
def test_reserved_decode_equals_eager(layout):
    """Uncompiled: the device-side decode step gives eager's tokens over a ragged batch, across page boundaries,
    and the host mirror read back afterwards matches what was stored."""
    steps = 20
    want = _eager_tokens(layout, torch.float32, B, steps)
    model = _patched(testing.tiny_model(layout))
    ids, mask = _inputs(B)
    cache = PagedKVCache(model.config, block_size=4, max_batch_size=B, max_cache_len=P + steps)
    got = _decode_loop(model, cache, ids, mask, steps, pad_to=P + steps)
    assert torch.equal(got, want)
    assert cache.seq_lens() == [P + steps, P - 3 + steps] and cache._seen == P + steps
    assert cache.memory().num_tokens == 2 * (P + steps) - 3


def test_reserved_cache_full_is_an_error_that_keeps_the_cache():
    model = _patched(testing.tiny_model("llama-tiny"))
    ids, mask = _inputs(B)
    cache = PagedKVCache(model.config, block_size=4, max_batch_size=B, max_cache_len=P + 2)
    _decode_loop(model, cache, ids, mask, 2)
    held = cache.seq_lens()
    with pytest.raises(CacheExhaustedError, match=r"max_cache_len=11\) is full.*Nothing was written"):
        with torch.inference_mode():
            model(input_ids=ids[:, :1], attention_mask=torch.ones(B, P + 3, dtype=torch.long),
                  position_ids=torch.zeros(B, 1, dtype=torch.long), **{CACHE: cache}, use_cache=True)
    assert cache.seq_lens() == held
    with pytest.raises(CacheExhaustedError, match="this step's 4 more do not fit"):
        with torch.inference_mode():
            model(input_ids=ids[:, :4], attention_mask=torch.ones(B, P + 6, dtype=torch.long), **{CACHE: cache},
                  use_cache=True)
    assert cache.seq_lens() == held


def test_reserved_crop_and_beam_reorder_keep_sequences_private(cpp):
    """crop and a beam reorder between decode steps: each row gets private pages from its next token on, so rows
    that shared a prefix never write into each other's pages (compared against the growable cache, which is tested
    against eager elsewhere)."""
    model = _patched(testing.tiny_model("llama-tiny"))
    ids, mask = _inputs(B)
    results = []
    for kw in (dict(num_blocks=64), dict(max_batch_size=B, max_cache_len=40)):
        cache = PagedKVCache(model.config, block_size=4, **kw)
        _decode_loop(model, cache, ids, mask, 6)
        cache.crop(-3)
        cache.reorder_cache(torch.tensor([0, 0]))  # both rows continue row 0, mid-page
        m = torch.ones(B, cache._seen, dtype=torch.long)
        tok, outs = torch.tensor([[7], [9]]), []
        with torch.inference_mode():
            for i in range(6):
                m = torch.cat([m, torch.ones(B, 1, dtype=torch.long)], 1)
                out = model(input_ids=tok, attention_mask=m, position_ids=torch.full((B, 1), P + 3 + i),
                            **{CACHE: cache},
                            use_cache=True).logits
                outs.append(out)
                tok = out[:, -1:].argmax(-1)
        results.append((torch.cat(outs, 1), cache.seq_lens()))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=0, atol=0)
    assert results[1][1] == results[0][1]


@pytest.mark.parametrize("num_beams", [1, 2])
def test_generate_static_cache_implementation_is_the_reserved_paged_cache(num_beams, cpp):
    model = testing.tiny_model("llama-tiny")
    ids, mask = _inputs(B)
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=12, min_new_tokens=12, do_sample=False,
              pad_token_id=0, num_beams=num_beams, return_dict_in_generate=True)
    with torch.inference_mode():
        want = model.generate(**kw).sequences
        llmkern.patch(model)
        out = model.generate(cache_implementation="static", **kw)
    cache = out.cache if hasattr(out, "cache") else out.past_key_values
    assert isinstance(cache, PagedKVCache) and cache.reserved and cache.max_cache_len == P + 12 - 1  # the last token is not stored
    assert torch.equal(out.sequences, want)


# -- torch.compile ----------------------------------------------------------------------------------------------------


def test_paged_ops_take_symbolic_ints_under_compile():
    """The fake implementations accept SymInts wherever the schema takes an int (dynamic=True makes the Python ints
    symbolic), and the compiled call equals the eager one."""
    torch.manual_seed(0)
    kc, vc = torch.randn(6, 4, 2, 32), torch.randn(6, 4, 2, 32)
    q = torch.randn(2, 4, 32)
    bt = torch.arange(6, dtype=torch.int32).view(2, 3)

    def f(q, lens, n, window):
        return paged_ops.paged_decode_attention(q, kc, vc, bt, lens, 0.2, sliding_window=window, num_splits=2,
                                                max_seq_len=n)

    compiled = torch.compile(f, dynamic=True, fullgraph=True, backend="aot_eager")
    for n in (5, 9, 12):
        lens = torch.tensor([n, n - 2], dtype=torch.int32)
        torch.testing.assert_close(compiled(q, lens, n, n - 1), f(q, lens, n, n - 1))


@pytest.mark.parametrize("dtype,batch", [(torch.float32, B), (torch.float32, 1), (torch.bfloat16, B),
                                         (torch.bfloat16, 1)], ids=["fp32-ragged", "fp32-b1", "bf16-ragged", "bf16-b1"])
def test_decode_step_compiles_fullgraph_once(dtype, batch, cpp):
    """torch.compile(fullgraph=True) of a patched model's forward with a reserved cache: one graph, no graph break
    (fullgraph raises on one), no recompile over 64 decode steps that cross 8 page boundaries; tokens equal
    eager's (fp32: transformers' eager; bf16: the uncompiled patched model, the same kernels)."""
    steps, width = 64, P + 64
    if dtype == torch.float32:
        want = _eager_tokens("llama-tiny", dtype, batch, steps)
    model = _patched(testing.tiny_model("llama-tiny", dtype=dtype))
    ids, mask = _inputs(batch)
    if dtype != torch.float32:
        cache = PagedKVCache(model.config, block_size=8, max_batch_size=batch, max_cache_len=width)
        want = _decode_loop(model, cache, ids, mask, steps, pad_to=width)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model.forward, fullgraph=True, backend="aot_eager")
    cache = PagedKVCache(model.config, block_size=8, max_batch_size=batch, max_cache_len=width)
    got = _decode_loop(model, cache, ids, mask, steps, forward=compiled, pad_to=width)
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert not counters["recompiles"] and not counters["graph_break"], (counters["recompiles"],
                                                                         counters["graph_break"])
    assert torch.equal(got, want)


def test_generate_with_transformers_compile_path_inductor(cpp):
    """The user's recipe: generate(cache_implementation="static", compile_config=...) on a patched model compiles
    the decode step once (inductor, fullgraph), gives eager's tokens, and a second call reuses the graph."""
    from transformers import CompileConfig

    model = testing.tiny_model("llama-tiny")
    ids, mask = _inputs(B)
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=24, min_new_tokens=24, do_sample=False,
              pad_token_id=0)
    with torch.inference_mode():
        want = model.generate(**kw)
    llmkern.patch(model)
    config = CompileConfig(fullgraph=True, backend="inductor")
    config._compile_all_devices = True  # transformers compiles only on accelerators unless told
    torch._dynamo.reset()
    counters.clear()
    with torch.inference_mode():
        first = model.generate(cache_implementation="static", compile_config=config, **kw)
        second = model.generate(cache_implementation="static", compile_config=config, **kw)
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert torch.equal(first, want) and torch.equal(second, want)


# -- no host sync -----------------------------------------------------------------------------------------------------


class _HostTraffic(TorchFunctionMode):
    """Counts what would be a host sync or a host<->device copy on a GPU: reading a tensor's value on the host
    (item, tolist, bool/int/float of a tensor, numpy), making a tensor from host data (torch.tensor, as_tensor,
    from_numpy), and moving a tensor to the host (.cpu(), .to("cpu")). On this CPU-only machine every tensor is on
    the host, so a move is recognised by the code naming the host ("cpu" as a string), as host-side code does; a
    move to the cache's device (a torch.device) is a device-to-device copy on a GPU and is not counted."""

    READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.__bool__, torch.Tensor.__int__,
             torch.Tensor.__float__, torch.Tensor.__index__, torch.Tensor.cpu}
    FROM_HOST = {torch.tensor, torch.as_tensor, torch.from_numpy}

    def __init__(self):
        super().__init__()
        self.events: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        if func in self.READS or func in self.FROM_HOST:
            self.events.append(name)
        elif func is torch.Tensor.to and "cpu" in (*args[1:], *kwargs.values()):
            self.events.append("to(cpu)")
        return func(*args, **kwargs)


class _ScalarReads(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


def _one_step_traffic(cache_kw: dict) -> tuple[list, int]:
    model = _patched(testing.tiny_model("llama-tiny"))
    ids, mask = _inputs(B)
    width = P + 40
    cache = PagedKVCache(model.config, block_size=4, **cache_kw)
    _decode_loop(model, cache, ids, mask, 6, pad_to=width if cache.reserved else None)  # warm-up, crosses a page
    mask = torch.ones(B, P + 7, dtype=torch.long)
    mask[1, :3] = 0
    if cache.reserved:
        mask = torch.nn.functional.pad(mask, (0, width - mask.shape[1]))
    inputs = dict(input_ids=torch.tensor([[5], [6]]), attention_mask=mask, position_ids=torch.tensor([[P + 6], [P + 3]]),
                  **{CACHE: cache}, use_cache=True)
    traffic, scalars = _HostTraffic(), _ScalarReads()
    with torch.inference_mode(), traffic, scalars:
        model(**inputs)
    return traffic.events, scalars.count


def test_reserved_decode_step_makes_no_host_sync(cpp):
    events, scalars = _one_step_traffic(dict(max_batch_size=B, max_cache_len=P + 40))
    assert events == [] and scalars == 0, (events, scalars)


def test_the_sync_counter_sees_the_growable_cache_syncs(cpp):
    """The counter above can fail: the growable cache's host-side plan reads the mask back and uploads tables."""
    events, scalars = _one_step_traffic(dict(num_blocks=64))
    assert events and any(e in events for e in ("tolist", "item")) and "tensor" in events, events


# -- CUDA runner ------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_capture_replays_the_decode_step():
    """On a GPU: the decode step runs under set_sync_debug_mode("error"), and a CUDAGraph capture of the step
    replays 32 steps to the logits of the uncaptured steps."""
    dev = torch.device("cuda")
    steps, width = 32, P + 40
    model = _patched(testing.tiny_model("llama-tiny", device=dev))
    ids, mask = (t.to(dev) for t in _inputs(B))

    def run(capture: bool) -> torch.Tensor:
        cache = PagedKVCache(model.config, block_size=8, max_batch_size=B, max_cache_len=width, device=dev)
        _decode_loop(model, cache, ids, mask, 2, pad_to=width)  # prefill and two decode steps, uncaptured
        tok = torch.full((B, 1), 5, dtype=torch.long, device=dev)
        pos = mask.sum(1, keepdim=True) + 2
        m = torch.nn.functional.pad(mask, (0, width - P))
        m[:, P:P + 2] = 1
        static = dict(input_ids=tok, attention_mask=m, position_ids=pos, **{CACHE: cache}, use_cache=True)
        outs = []
        with torch.inference_mode():
            for i in range(steps):
                m[:, P + 2 + i] = 1  # the step's column, written outside the captured region
                if not capture:
                    torch.cuda.set_sync_debug_mode("error")
                    try:
                        outs.append(model(**static).logits.clone())
                    finally:
                        torch.cuda.set_sync_debug_mode("default")
                elif i == 0:  # one step on a side stream (lazy initialisation), then capture the next
                    side = torch.cuda.Stream()
                    side.wait_stream(torch.cuda.current_stream())
                    with torch.cuda.stream(side):
                        outs.append(model(**static).logits.clone())
                    torch.cuda.current_stream().wait_stream(side)
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph):
                        logits = model(**static).logits
                else:
                    graph.replay()
                    outs.append(logits.clone())
                tok.copy_(outs[-1][:, -1:].argmax(-1))
                pos.add_(1)
        return torch.cat(outs, 1)

    torch.testing.assert_close(run(True), run(False))
