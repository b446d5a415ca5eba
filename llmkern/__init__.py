"""llmkern: fused Triton kernels for Hugging Face Llama-family decoders.

    >>> import llmkern
    >>> report = llmkern.patch(model)   # this model instance only; llmkern.unpatch(model) undoes it
    >>> model.generate(...)
"""

from llmkern import ops, paged_ops
from llmkern.backends import track, use_backend
from llmkern.patching import PatchError, PatchReport, is_patched, patch, patch_report, unpatch
from llmkern.warmup import WarmupReport, warmup  # the function shadows its module's name on the package

__version__ = "0.1.0"

__all__ = ["ops", "paged_ops", "patch", "unpatch", "is_patched", "patch_report", "PatchReport", "PatchError",
           "PagedKVCache", "CacheExhaustedError", "track", "use_backend", "warmup", "WarmupReport", "__version__"]


def __getattr__(name):
    # The cache imports transformers; keep `import llmkern` light until it is asked for.
    if name in ("PagedKVCache", "CacheExhaustedError"):
        from llmkern import cache

        return getattr(cache, name)

    raise AttributeError(f"module 'llmkern' has no attribute {name!r}")
