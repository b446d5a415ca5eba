"""llmkern on a model spread over several processes or devices (issue #10).

* Tensor parallelism: a tiny model saved with ``save_pretrained`` is loaded with ``tp_plan="auto"`` on 2 ranks
  (gloo, CPU), patched, and generates greedily on a ragged left-padded batch; every rank's tokens must equal
  single-process eager's. The ranks run this very file as a script (``--tp-worker``), started the way ``torchrun``
  starts them (RANK, WORLD_SIZE, MASTER_ADDR/PORT) but by this test, so that each can be killed by its pid: torchrun
  puts every worker in a session of its own, and a hung rank outlives a killed torchrun. A rank that does not finish
  in time, or whose peer failed, is killed and fails the test. The workers run without ``TRITON_INTERPRET``: the
  CPU kernels a user gets run, not the Triton interpreter.
* device_map: the cache keeps each layer's pages on the device given (or handed) for it, with the step's tables and
  lengths once per device. On CPU the second device is ``meta`` (the ops' fake implementations write there) and an
  accelerate disk offload stands in for a multi-device map; a 2-GPU run is under the ``gpu`` marker.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import warnings

import pytest
import torch

import llmkern
from llmkern import testing
from llmkern.cache import PagedKVCache

# name -> (tiny layout, overrides): Llama 8 query / 2 KV heads (1 KV head, group 4 per rank); Qwen2.5's 14 / 2
# (1 KV head, group 7 per rank), with Qwen2's qkv bias sharded along with the weights.
TP_LAYOUTS = {
    "llama": ("llama-tiny", dict(num_attention_heads=8, num_key_value_heads=2, hidden_size=256,
                                 intermediate_size=512)),
    "qwen2": ("qwen2-tiny", dict(num_attention_heads=14, num_key_value_heads=2, hidden_size=448,
                                 intermediate_size=896)),
}
RANKS = 2
NEW_TOKENS = 32
TP_TIMEOUT_S = 300  # both layouts, 2 ranks on 2 shared cores: ~30-60 s when healthy
PAGED_OPS = {"reshape_and_cache", "paged_decode_attention"}
# The prompt's attention: on CPU a fresh prefill (nothing cached yet) runs torch's SDPA over the step's K/V after
# writing them to the pages (llmkern/attention.py, _dense_prefill_ok); elsewhere the paged prefill kernel.
PREFILL_OPS = {"paged_prefill_attention", "dense_prefill_attention"}
ROW_OPS = {"rms_norm", "fused_add_rms_norm", "apply_rope", "silu_and_mul"}


def _prompts(vocab_size: int, pad=(0, 4, 9), s=11, seed=1):
    """A ragged batch: row i has ``pad[i]`` left-padding tokens (id 0)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab_size, (len(pad), s), generator=g)
    mask = torch.ones_like(ids)
    for i, p in enumerate(pad):
        mask[i, :p] = 0
    return ids.masked_fill(mask == 0, 0), mask


def _generate(model, ids, mask, **kw):
    kw = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0) | kw
    with torch.inference_mode():
        return model.generate(input_ids=ids, attention_mask=mask, **kw)


def _cache_of(out):
    """The cache generate returned (``cache`` from transformers 5.24, ``past_key_values`` before)."""
    return out.get("cache") or out.get("past_key_values")


# ---------------------------------------------------------------------------------------------------------------------
# Tensor parallelism: the worker (run by torchrun) and the tests


def _tp_worker(root: str) -> None:
    from transformers import AutoModelForCausalLM

    rank = int(os.environ["RANK"])
    prompts = json.loads(open(os.path.join(root, "prompts.json")).read())
    result = {}
    for name in TP_LAYOUTS:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # tp_plan= as a keyword: deprecated for a config in 5.2x
            model = AutoModelForCausalLM.from_pretrained(os.path.join(root, name), tp_plan="auto",
                                                         dtype=torch.float32).eval()
        ids, mask = (torch.tensor(t) for t in prompts[name])
        report = llmkern.patch(model)
        with llmkern.track() as ran:
            out = _generate(model, ids, mask, return_dict_in_generate=True)
        cache = _cache_of(out)
        result[name] = {
            "tokens": out.sequences.tolist(),
            "ran": sorted({f"{op}/{backend}" for op, backend in ran}),
            "placement": dict(report.placement),
            "report": str(report),
            "skipped": report.skipped,
            "cache": type(cache).__name__,
            "page_heads": [cache.pages(i)[0].shape[2] for i in range(cache.num_layers)],
            "num_kv_heads": cache.num_kv_heads,
        }
        llmkern.unpatch(model)
        # 8-bit pages (issue #21): each rank's cache holds its shard's codes and scales.
        # The C++ backend forced, as in the single-process run: the prompt then attends over the int8 pages too (the
        # automatic choice runs a fresh prompt on SDPA over its unquantized K/V, which the interpreter-bound test
        # process cannot).
        from llmkern import backends

        llmkern.patch(model, kv_dtype="int8")
        with llmkern.track() as ran, backends.use_backend("cpp"):
            out = _generate(model, ids, mask, return_dict_in_generate=True, output_scores=True)
        cache = _cache_of(out)
        result[name]["int8"] = {
            "tokens": out.sequences.tolist(), "kv_dtype": str(cache.kv_dtype),
            "scores": torch.stack(out.scores, 1).tolist(),
            "ran": sorted({f"{op}/{backend}" for op, backend in ran}),
            "k_codes": str(cache.layer_pages(0).k.dtype),
            "scale_heads": [cache.layer_pages(i).k_scales.shape[2] for i in range(cache.num_layers)],
        }
        llmkern.unpatch(model)
    with open(os.path.join(root, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)


@pytest.fixture(scope="module")
def tp_run():
    """Save the tiny models, run eager and the single-process patched model over int8 pages (C++ kernels and torch's
    Linear, as the ranks run) in this process, launch the 2-rank patched run; ``(eager, per-rank results)``; eager[name + "/int8"]
    holds the single-process int8 tokens."""
    from llmkern import backends

    with tempfile.TemporaryDirectory(prefix="llmkern-tp-") as root:
        eager, prompts = {}, {}
        for name, (layout, overrides) in TP_LAYOUTS.items():
            model = testing.tiny_model(layout, **overrides)
            model.save_pretrained(os.path.join(root, name))
            ids, mask = _prompts(model.config.vocab_size)
            prompts[name] = [ids.tolist(), mask.tolist()]
            eager[name] = _generate(model, ids, mask).tolist()
            # torch's Linear, as the ranks' sharded Linears (the C++ Linear would round K/V differently in the last
            # bits, which can move an int8 code by a step and flip a near-tie token of a random tiny model).
            llmkern.patch(model, kv_dtype="int8", linear=False)
            threads = torch.get_num_threads()
            torch.set_num_threads(1)  # as each rank (OMP_NUM_THREADS=1): the C++ attention splits by threads
            try:
                with backends.use_backend("cpp"):
                    out = _generate(model, ids, mask, return_dict_in_generate=True, output_scores=True)
                eager[name + "/int8"] = (out.sequences, torch.stack(out.scores, 1))
            finally:
                torch.set_num_threads(threads)
            llmkern.unpatch(model)
        with open(os.path.join(root, "prompts.json"), "w") as f:
            json.dump(prompts, f)
        failure = _run_ranks(root, RANKS, TP_TIMEOUT_S)
        if failure:
            logs = "".join(f"\n--- rank {r} ---\n" + open(os.path.join(root, f"rank{r}.log")).read()[-4000:]
                           for r in range(RANKS))
            pytest.fail(f"the {RANKS}-rank run {failure}; output:{logs}")
        ranks = [json.loads(open(os.path.join(root, f"rank{r}.json")).read()) for r in range(RANKS)]
    return eager, ranks


def _run_ranks(root: str, n: int, timeout_s: float) -> str | None:
    """Run ``n`` ranks of this file's worker with torchrun's environment; None when all exit 0, else what went
    wrong. Every rank still running at the deadline, or once a peer has failed (it would wait in a collective), is
    killed by its pid."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(OMP_NUM_THREADS="1", WORLD_SIZE=str(n), LOCAL_WORLD_SIZE=str(n), MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(port))
    procs = []
    for r in range(n):
        with open(os.path.join(root, f"rank{r}.log"), "w") as log:
            procs.append(subprocess.Popen([sys.executable, os.path.abspath(__file__), "--tp-worker", root], cwd=root,
                                          env=env | dict(RANK=str(r), LOCAL_RANK=str(r)), stdout=log,
                                          stderr=subprocess.STDOUT))
    deadline, failure = time.monotonic() + timeout_s, None
    while failure is None and any(p.poll() is None for p in procs):
        failed = [r for r, p in enumerate(procs) if p.returncode not in (None, 0)]
        if failed:
            failure = f"failed: rank(s) {failed} exited with {[procs[r].returncode for r in failed]}"
        elif time.monotonic() > deadline:
            hung = [r for r, p in enumerate(procs) if p.poll() is None]
            failure = f"did not finish within {timeout_s} s: rank(s) {hung} hung"
        else:
            time.sleep(0.2)
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()
    if failure is None and any(p.returncode for p in procs):
        failure = f"failed: exit codes {[p.returncode for p in procs]}"
    return failure


@pytest.mark.parametrize("name", list(TP_LAYOUTS))
def test_tensor_parallel_generate_equals_single_process_eager(tp_run, name):
    eager, ranks = tp_run
    _layout, overrides = TP_LAYOUTS[name]
    q, kv = overrides["num_attention_heads"], overrides["num_key_value_heads"]
    for rank, results in enumerate(ranks):
        got = results[name]
        assert got["tokens"] == eager[name], f"rank {rank}: tokens differ from single-process eager"
        # The paged cache holds this rank's shard: pages of kv / RANKS heads, sized so by generate's hook.
        assert got["cache"] == "PagedKVCache"
        assert got["page_heads"] == [kv // RANKS] * 2 and got["num_kv_heads"] == kv // RANKS, got
        ran = {entry.split("/")[0] for entry in got["ran"]}
        assert PAGED_OPS | ROW_OPS <= ran and ran & PREFILL_OPS, got["ran"]
        # The report says the model is sharded, and how.
        note = got["placement"].get("tensor parallel", "")
        assert f"sharded over {RANKS} ranks" in note and f"this is rank {rank}" in note, got["report"]
        assert f"{q // RANKS} of {q} query heads and {kv // RANKS} of {kv} KV heads" in note, note
        assert "k_proj" in note and "colwise" in note and "rowwise" in note, note
        # The TP plan wraps the sharded Linears' forwards on the instance: the C++ Linear cannot run there, and the
        # report (and a warning) says so for each of them instead of listing a kernel that would not run.
        assert got["skipped"], got["report"]
        assert all(what.endswith("(linear)") and "set on the instance" in why for what, why in got["skipped"]), \
            got["skipped"]
        # int8 pages on each rank's shard: the single-process int8 run's tokens, scales of the shard's heads.
        assert got["int8"]["kv_dtype"] == got["int8"]["k_codes"] == "torch.int8", got["int8"]
        assert got["int8"]["scale_heads"] == [kv // RANKS] * 2, got["int8"]
        # head_dim 32: no C++ prefill kernel, the prompt runs the reference over the dequantized pages.
        assert {"paged_prefill_attention/reference", "paged_decode_attention/cpp"} <= set(got["int8"]["ran"]), \
            got["int8"]
        _check_same_greedy_run(torch.tensor(got["int8"]["tokens"]), torch.tensor(got["int8"]["scores"]),
                               *eager[name + "/int8"], what=f"{name} rank {rank} int8")


# The ranks' logits over int8 pages against one process's: the ranks' sharded Linears and row-parallel sums differ
# from one process's matmuls in the last bits, which can move a K/V code by one step (1/127 of its row's amax) and the
# logits by up to ~1e-2 (6e-3 seen on these models). A wrong scale or a shard's codes read with another's scales moves
# them by O(1). Greedy tokens may part only where one process's top two logits are this close.
TP_LOGIT_ATOL = 0.03
NEAR_TIE = 0.03


def _check_same_greedy_run(tokens, scores, ref_tokens, ref_scores, what):
    """The same greedy run as one process's, step by step: equal logits (within TP_LOGIT_ATOL) while the tokens
    agree; a row may part from one process's tokens only at a near-tie of its logits (random tiny models have some),
    after which its logits are of another text and are not compared."""
    prompt = ref_tokens.shape[1] - ref_scores.shape[1]
    for row in range(ref_tokens.shape[0]):
        for step in range(ref_scores.shape[1]):
            a, b = scores[row, step], ref_scores[row, step]
            finite = torch.isfinite(b)  # min_new_tokens masks EOS with -inf
            assert torch.equal(torch.isfinite(a), finite), f"{what}: row {row} step {step}: other logits masked"
            diff = (a[finite] - b[finite]).abs().max().item()
            assert diff <= TP_LOGIT_ATOL, f"{what}: row {row} step {step}: logits differ by {diff:.2e}"
            if tokens[row, prompt + step] != ref_tokens[row, prompt + step]:
                top = ref_scores[row, step].double().topk(2).values
                gap = (top[0] - top[1]).item()
                assert gap <= NEAR_TIE, f"{what}: row {row} parts from one process's tokens at step {step} where " \
                                        f"its top logits are {gap:.2e} apart (not a near-tie)"
                break


# ---------------------------------------------------------------------------------------------------------------------
# device_map: pages on each layer's device

CFG3 = testing.tiny_config("llama-tiny", num_hidden_layers=3)  # 2 KV heads, head_dim 32
HKV, D = 2, 32


def _kv(b, s, device, heads=HKV, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, heads, s, D, generator=g).to(device), torch.randn(b, heads, s, D, generator=g).to(device))


def test_cache_honours_a_layer_to_device_map():
    devices = {0: "cpu", 1: "meta", 2: "cpu"}
    cache = PagedKVCache(CFG3, block_size=4, num_blocks=8, device=devices)
    assert cache.devices == [torch.device(devices[i]) for i in range(3)]  # allocated up front, each on its own
    for step, mask in enumerate((torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]), torch.ones(2, 6, dtype=torch.long))):
        plans, written = {}, {}
        new_columns = mask.shape[1] - cache.get_seq_length()
        for layer in range(3):
            k, v = _kv(2, new_columns, devices[layer], seed=10 * step + layer)
            h, _ = cache.update(k, v, layer)
            plan = cache.plan(h, mask.to(devices[layer]))
            assert plan is cache.plan(h, mask)  # once per step and device
            assert {plan.device, plan.block_tables.device, plan.seq_lens.device,
                    plan.slot_mapping.device} == {torch.device(devices[layer])}
            cache.write(h, plan)
            plans[layer], written[layer] = plan, k
        assert plans[0] is plans[2] and plans[1] is not plans[0]  # the cpu layers share the step's plan
        assert plans[1].seq_lens.shape == plans[0].seq_lens.shape
        for layer in (0, 2):  # what was written landed in the layer's own pages
            kc, _ = cache.pages(layer)
            t = cache.block_tables()[1]
            n = cache.seq_lens()[1]
            assert torch.equal(kc[t[(n - 1) // 4], (n - 1) % 4], written[layer][1, :, -1])
    assert cache.seq_lens() == [4, 6]
    assert [cache.pages(i)[0].device for i in range(3)] == [torch.device(devices[i]) for i in range(3)]
    # K/V on another device than the map gives for the layer: an error naming the layer and both devices.
    with pytest.raises(ValueError, match=r"device=meta for layer 1 but the model's keys of that layer are on cpu"):
        cache.update(*_kv(2, 1, "cpu"), 1)
    with pytest.raises(ValueError, match=r"device, as a mapping, must name every layer index 0\.\.2"):
        PagedKVCache(CFG3, device={0: "cpu", 1: "cpu"})


def test_pages_made_lazily_from_the_kv_each_layer_is_handed():
    # None entries: pages appear at a layer's first K/V, with its heads (a tensor-parallel shard), dtype and device.
    cache = PagedKVCache(CFG3, block_size=4, num_blocks=4, device=dict.fromkeys(range(3)))
    assert cache.devices == [None] * 3 and cache.memory().reserved_bytes == 0
    mask = torch.ones(1, 3, dtype=torch.long)
    for layer in range(3):
        h, _ = cache.update(*_kv(1, 3, "cpu", heads=1), layer)
        cache.write(h, cache.plan(h, mask))
    assert [cache.pages(i)[0].shape[2] for i in range(3)] == [1, 1, 1] and cache.num_kv_heads == 1
    assert cache.memory().reserved_bytes == 3 * 2 * 4 * 4 * 1 * D * 4
    # A layer holding tokens keeps its pages: other K/V is an error that says what it holds.
    with pytest.raises(RuntimeError, match=r"layer 0 holds tokens as torch.float32 with 1 KV heads"):
        cache.update(*_kv(1, 1, "cpu", heads=2), 0)
    with pytest.raises(ValueError, match=r"the config's 2 KV heads or fewer .* got shape \(1, 3, 1, 32\)"):
        cache.update(*_kv(1, 1, "cpu", heads=3), 0)
    # num_kv_heads given (a rank's shard): K/V with another count is refused.
    sharded = PagedKVCache(CFG3, num_blocks=2, num_kv_heads=1)
    assert sharded.num_kv_heads == 1 and sharded.pages(0)[0].shape[2] == 1
    with pytest.raises(ValueError, match="created with num_kv_heads=1 but the keys of layer 0 hold 2 KV heads"):
        sharded.update(*_kv(1, 1, "cpu"), 0)
    with pytest.raises(ValueError, match=r"num_kv_heads must be an int in 1\.\.2"):
        PagedKVCache(CFG3, num_kv_heads=4)


@pytest.mark.parametrize("kv_dtype", ["int8", "fp8_e4m3"])
def test_8bit_pages_and_scales_live_on_each_layers_device(kv_dtype):
    """8-bit pages (issue #21) under a layer-to-device map: codes and fp16 scales of a layer are made, written and read
    on that layer's device (meta included, where the ops' fakes run), and what a cpu layer reads back is its K/V
    within the format's rounding."""
    from llmkern import reference as R

    devices = {0: "cpu", 1: "meta", 2: "cpu"}
    cache = PagedKVCache(CFG3, block_size=4, num_blocks=8, device=devices, kv_dtype=kv_dtype)
    code = cache.kv_dtype
    mask = torch.ones(2, 5, dtype=torch.long)
    written = {}
    for layer in range(3):
        k, v = _kv(2, 5, devices[layer], seed=layer)
        h, _ = cache.update(k, v, layer)
        plan = cache.plan(h, mask.to(devices[layer]))
        cache.write(h, plan)
        written[layer] = (k, v)
        pages = cache.layer_pages(layer)
        assert {t.device for t in pages} == {torch.device(devices[layer])}, layer
        assert pages.k.dtype == pages.v.dtype == code and pages.k_scales.dtype == R.SCALE_DTYPE
        assert pages.k_scales.shape == pages.k.shape[:3] == (8, 4, HKV)
    for layer in (0, 2):
        k_read, v_read = cache.dense(layer)
        for got, want in ((k_read, written[layer][0]), (v_read, written[layer][1])):
            assert got.dtype == torch.float32 and got.shape == want.shape
            # One code step of the row's scale (amax / QMAX) at most: half a step for int8, an e4m3 spacing for fp8.
            step = want.abs().amax(-1, keepdim=True) / R.KV_QMAX[code]
            assert ((got - want).abs() <= step * (0.5 if code == torch.int8 else 32.0) + 1e-6).all(), layer
    mem = cache.memory()
    assert mem.reserved_bytes == 3 * 2 * 8 * 4 * HKV * (D * 1 + 2), mem  # codes + an fp16 scale per row, K and V


def test_8bit_pages_made_lazily_hold_a_shards_heads():
    """A tensor-parallel rank hands each layer a shard of the KV heads: lazily made 8-bit pages and their scales take
    that head count (what a TP run's per-rank cache does)."""
    cache = PagedKVCache(CFG3, block_size=4, num_blocks=4, device=dict.fromkeys(range(3)), kv_dtype="int8")
    mask = torch.ones(1, 3, dtype=torch.long)
    for layer in range(3):
        h, _ = cache.update(*_kv(1, 3, "cpu", heads=1), layer)
        cache.write(h, cache.plan(h, mask))
        pages = cache.layer_pages(layer)
        assert pages.k.shape[2] == 1 and pages.k_scales.shape == (4, 4, 1) and pages.k.dtype == torch.int8
    assert cache.num_kv_heads == 1 and cache.memory().reserved_bytes == 3 * 2 * 4 * 4 * 1 * (D + 2)


def test_offloaded_layer_generates_like_eager_and_is_reported(tmp_path):
    # An accelerate device map on CPU: layer 1's weights on disk, brought in by its hook for each forward (the
    # hook's execution device is where its K/V, hence its pages, are).
    from transformers import AutoModelForCausalLM

    testing.tiny_model("llama-tiny").save_pretrained(tmp_path / "model")
    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
                  "model.layers.1": "disk", "model.norm": "cpu", "lm_head": "cpu"}
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model", device_map=device_map, dtype=torch.float32,
                                                 offload_folder=str(tmp_path / "offload")).eval()
    ids, mask = _prompts(model.config.vocab_size)
    n = 12  # the paged ops run in the Triton interpreter in this process (conftest): a short run
    eager = _generate(model, ids, mask, max_new_tokens=n, min_new_tokens=n)
    report = llmkern.patch(model)
    with llmkern.track() as ran:
        out = _generate(model, ids, mask, max_new_tokens=n, min_new_tokens=n, return_dict_in_generate=True)
    assert torch.equal(out.sequences, eager)
    assert PAGED_OPS <= ran.ops() and ran.ops() & PREFILL_OPS, dict(ran)
    assert _cache_of(out).devices == [torch.device("cpu")] * 2
    placement = dict(report.placement)
    assert "layers [1] have offloaded weights" in placement["device_map"], str(report)
    # accelerate's hooks set forward on the instances and call _old_forward: patch() points that at the kernels. A
    # post-attention norm with a hook of its own (offload loads its weight there) is not fused into the layer.
    assert ROW_OPS - {"fused_add_rms_norm"} <= ran.ops(), dict(ran)
    assert report.skipped == [], report.skipped
    hooked_norms = [w for w, why in report.notes if w.endswith("(fused_add_rms_norm)") and "hook" in why]
    assert len(hooked_norms) + report.counts().get("fused_add_rms_norm", 0) == model.config.num_hidden_layers
    llmkern.unpatch(model)
    assert all(m._old_forward.__func__ is type(m).forward for m in model.modules() if "_old_forward" in vars(m))
    assert torch.equal(_generate(model, ids, mask, max_new_tokens=n, min_new_tokens=n), eager)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices for a device_map across GPUs")
def test_device_map_across_two_gpus(tmp_path):
    from transformers import AutoModelForCausalLM

    testing.tiny_model("llama-tiny", num_hidden_layers=4).save_pretrained(tmp_path / "model")
    device_map = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.layers.0": 0, "model.layers.1": 0,
                  "model.layers.2": 1, "model.layers.3": 1, "model.norm": 1, "lm_head": 1}
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model", device_map=device_map,
                                                 dtype=torch.float32).eval()
    ids, mask = (t.to("cuda:0") for t in _prompts(model.config.vocab_size))
    eager = _generate(model, ids, mask)
    report = llmkern.patch(model)
    with llmkern.track() as ran:
        out = _generate(model, ids, mask, return_dict_in_generate=True)
    assert torch.equal(out.sequences.cpu(), eager.cpu())
    assert PAGED_OPS <= ran.ops() and ran.ops() & PREFILL_OPS, dict(ran)
    want = [torch.device("cuda", i) for i in (0, 0, 1, 1)]
    assert _cache_of(out).devices == want
    assert "cuda:0 (0-1), cuda:1 (2-3)" in dict(report.placement)["device_map"], str(report)


if __name__ == "__main__" and sys.argv[1:2] == ["--tp-worker"]:
    _tp_worker(sys.argv[2])
