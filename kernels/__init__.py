"""Triton kernels and their launchers, installed as ``llmkern.kernels``.

Each module holds the ``@triton.jit`` kernels of one op family, a ``*_config`` heuristic that picks the launch
configuration from the problem shape, and a ``*_fwd`` launcher that takes already-validated tensors. Nothing here
validates user input or knows about Hugging Face: that is ``llmkern.ops``' job.
"""
