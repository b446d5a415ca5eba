"""The ``llmkern`` torch library: one place that defines op schemas and binds their implementations.

Registered with the low-level ``torch.library.Library`` API rather than ``torch.library.custom_op``: the latter adds
~80 µs of Python per call on this CPU, more than a decode-sized RMSNorm costs in eager torch. The dispatcher path
used here costs a few µs. Each op gets one Python implementation for the CPU and CUDA keys (it picks the backend,
see ``llmkern.backends``) and a fake implementation for torch.compile / FakeTensor tracing.
"""

import torch

LIB = torch.library.Library("llmkern", "FRAGMENT")


def define(schema: str, impl, fake) -> None:
    """Define ``llmkern::<schema>`` with ``impl`` for CPU and CUDA tensors and ``fake`` for tracing."""
    name = schema.split("(", 1)[0]
    LIB.define(schema)
    LIB.impl(name, impl, "CPU")
    LIB.impl(name, impl, "CUDA")
    torch.library.register_fake(f"llmkern::{name}", fake, lib=LIB)
