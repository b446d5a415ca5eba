"""llmkern: fused Triton kernels for Hugging Face Llama-family decoders.

    >>> import llmkern
    >>> report = llmkern.patch(model)   # this model instance only; llmkern.unpatch(model) undoes it
    >>> model.generate(...)
"""

from llmkern import ops
from llmkern.backends import track, use_backend
from llmkern.patching import PatchReport, is_patched, patch, patch_report, unpatch

__version__ = "0.1.0"

__all__ = ["ops", "patch", "unpatch", "is_patched", "patch_report", "PatchReport", "track", "use_backend",
           "__version__"]
