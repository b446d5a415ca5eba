"""What a user meets outside the happy path (issue 13): multi-turn generation with the cache generate returned, a
transformers cache handed to a patched model, a PagedKVCache handed to an unpatched one, the CLI, and the wording
of error messages."""

import re
import subprocess
import sys
import warnings

import pytest
import torch
from transformers import DynamicCache, StaticCache

import llmkern
from llmkern import ops, paged_ops, testing
from llmkern.cache import PagedKVCache


def _ids(n, seed=0, vocab=512):
    return torch.randint(3, vocab, (1, n), generator=torch.Generator().manual_seed(seed))


def _gen(model, ids, n, **kw):
    with torch.inference_mode():
        return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                              min_new_tokens=n, do_sample=False, pad_token_id=0, **kw)


def _returned_cache(out):
    # `past_key_values` on transformers 5.0-5.2x, `cache` where it was renamed.
    return getattr(out, "past_key_values", None) or getattr(out, "cache", None)


# -- item 4: multi-turn with the cache generate created ----------------------------------------------------------------


def _two_turns(model):
    out = _gen(model, _ids(8), 4, return_dict_in_generate=True)
    cache = _returned_cache(out)
    turn2 = torch.cat([out.sequences, _ids(31, seed=1)], dim=1)  # 31 tokens longer than the first turn's cache
    out2 = _gen(model, turn2, 6, past_key_values=cache, return_dict_in_generate=True)
    return out.sequences, out2.sequences, cache


def test_multi_turn_reuses_the_cache_generate_created():
    model = testing.tiny_model("llama-tiny")
    eager1, eager2, _ = _two_turns(model)
    llmkern.patch(model)
    with llmkern.track() as ran:
        paged1, paged2, cache = _two_turns(model)
    assert isinstance(cache, PagedKVCache) and cache.growable
    assert {"paged_prefill_attention", "paged_decode_attention"} <= ran.ops()
    assert torch.equal(paged1, eager1) and torch.equal(paged2, eager2)
    assert cache.seq_lens() == [paged2.shape[1] - 1]  # every token but the last generated one is cached


def test_dynamic_cache_on_a_patched_model_is_said_once():
    model = testing.tiny_model("qwen2-tiny")
    eager = _gen(model, _ids(6), 5)
    llmkern.patch(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = _gen(model, _ids(6), 5, past_key_values=DynamicCache())
        second = _gen(model, _ids(6), 5, past_key_values=DynamicCache())
    said = [w for w in caught if "paged attention kernels are not used" in str(w.message)]
    assert len(said) == 1, [str(w.message) for w in caught]
    assert "DynamicCache" in str(said[0].message) and "PagedKVCache" in str(said[0].message)
    assert torch.equal(first, eager) and torch.equal(second, eager)  # the fallback still computes the same


# -- item 5: static caches and a PagedKVCache on an unpatched model ---------------------------------------------------


def test_static_cache_implementations_other_than_static_run_on_sdpa_with_a_warning():
    """'static' gives a reserved PagedKVCache (tests/test_graph_ready.py); transformers' other static layouts run
    transformers' own cache with SDPA (their masks are built for SDPA ahead of the forward), with the same warning as
    a dynamic cache, and the tokens of the unpatched model (tests/test_conformance.py runs every implementation)."""
    model = testing.tiny_model("llama-tiny")
    want = _gen(model, _ids(6), 3, cache_implementation="sliding_window")
    llmkern.patch(model)
    with pytest.warns(UserWarning, match=r"cache_implementation=.sliding_window.: llmkern's paged attention "
                                         r"kernels are not used"):
        got = _gen(model, _ids(6), 3, cache_implementation="sliding_window")
    assert torch.equal(got, want)


def test_static_cache_object_on_a_patched_model_runs_on_sdpa_with_a_warning():
    model = testing.tiny_model("llama-tiny")
    want = _gen(model, _ids(6), 3, past_key_values=StaticCache(config=model.config, max_cache_len=32))
    llmkern.patch(model)
    with pytest.warns(UserWarning, match=r"StaticCache: llmkern's paged attention kernels are not used.*Pass no "
                                         r"cache"):
        got = _gen(model, _ids(6), 3, past_key_values=StaticCache(config=model.config, max_cache_len=32))
    assert torch.equal(got, want)


def test_paged_cache_on_an_unpatched_model_is_a_clear_error():
    model = testing.tiny_model("llama-tiny")
    with pytest.raises(TypeError, match=r"PagedKVCache works only on a model whose attention runs llmkern's.*"
                                        r"llmkern\.patch\(model\)"):
        _gen(model, _ids(6), 3, past_key_values=PagedKVCache(model.config))


# -- item 9: error messages in words -----------------------------------------------------------------------------------

_CODE_LIKE = re.compile(r"\[1 or|\.shape\[|\.dtype=|\.shape=|\[\w+, >=")


@pytest.mark.parametrize("call,names", [
    (lambda: ops.apply_rope(torch.randn(1, 4, 5, 64), torch.randn(1, 2, 5, 64), torch.randn(1, 4, 64),
                            torch.randn(1, 4, 64)), ("cos and sin", "(1, 4, 64)", "seq equal to q's (5)")),
    (lambda: ops.apply_rope(torch.randn(1, 4, 5, 64), torch.randn(1, 2, 5, 64), torch.randn(1, 5, 66),
                            torch.randn(1, 5, 66)), ("rotary dim", "q's head_dim (64)", "got 66")),
    (lambda: ops.rms_norm(torch.randn(2, 8), torch.randn(7), 1e-6), ("weight", "(7,)", "last dimension (8)")),
    (lambda: ops.fused_add_rms_norm(torch.randn(2, 8), torch.randn(3, 8), torch.randn(8), 1e-6),
     ("x shape (2, 8)", "residual shape (3, 8)")),
    (lambda: ops.silu_and_mul(torch.randn(2, 8), torch.randn(2, 8, dtype=torch.bfloat16)),
     ("gate float32", "up bfloat16")),
    (lambda: ops.linear(torch.randn(2, 8), torch.randn(4, 7)), ("in_features (7)", "x of shape (2, 8)")),
    (lambda: paged_ops.paged_decode_attention(torch.randn(2, 4, 32), torch.randn(4, 16, 2, 32),
                                              torch.randn(4, 16, 2, 32), torch.zeros(1, 2, dtype=torch.int32),
                                              torch.ones(2, dtype=torch.int32), 0.2),
     ("block_tables", "per sequence of q", "got (1, 2)")),
    (lambda: PagedKVCache(testing.tiny_config("llama-tiny"), max_memory_bytes=100),
     ("max_memory_bytes", "at least one block of every layer", "got 100")),
])
def test_error_messages_name_argument_expected_and_actual_in_words(call, names):
    with pytest.raises((TypeError, ValueError)) as e:
        call()
    msg = str(e.value)
    assert not _CODE_LIKE.search(msg), msg
    for n in names:
        assert n in msg, (n, msg)


# -- item 7: the CLI ---------------------------------------------------------------------------------------------------


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "llmkern", *args], capture_output=True, text=True, timeout=300)


def test_cli_version():
    r = _cli("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"python -m llmkern {llmkern.__version__}", r


@pytest.mark.parametrize("command", ["demo", "bench"])
def test_cli_every_option_has_help_and_default(command):
    import argparse

    from llmkern import bench, demo

    parser = {"demo": demo, "bench": bench}[command].build_parser()
    assert parser.prog == f"python -m llmkern {command}"
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help, f"{command} {action.option_strings} has no help text"
    text = _cli(command, "--help").stdout
    assert text.startswith(f"usage: python -m llmkern {command}"), text
    # Every option's help shows its default (argparse's ArgumentDefaultsHelpFormatter: "(default: ...)").
    n_opts = sum(1 for a in parser._actions if a.option_strings and not isinstance(a, argparse._HelpAction))
    assert parser.format_help().count("(default:") == n_opts, parser.format_help()


def test_cli_one_program_name_in_every_usage_line():
    texts = [_cli("--help").stdout, _cli("demo", "--help").stdout, _cli("bench", "--help").stdout,
             _cli("nonsense").stderr]
    for t in texts:
        for line in t.splitlines():
            if line.lower().startswith("usage:"):
                assert line.startswith("usage: python -m llmkern"), line


def test_demo_is_short_and_ends_with_the_comparison():
    import os

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the C++ kernels, as `make demo` runs
    r = subprocess.run([sys.executable, "-m", "llmkern", "demo", "--random", "--max-new-tokens", "4"],
                       capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = (r.stdout + r.stderr).splitlines()
    assert len(lines) < 40, "\n".join(lines)
    tail = "\n".join(r.stdout.splitlines()[-5:])
    assert "decode ms/token" in tail and "identical" in tail, r.stdout
