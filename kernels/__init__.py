"""Triton kernels and their launchers, installed as ``llmkern.kernels``.

Each module holds the ``@triton.jit`` kernels of one op family, a ``*_config`` heuristic that picks the launch
configuration from the problem shape, and a ``*_fwd`` launcher that takes already-validated tensors. Nothing here
validates user input or knows about Hugging Face: that is ``llmkern.ops``' job.
"""

if __name__ == "kernels":
    # This directory was found as a top-level package: the repository root is on sys.path (a script or
    # ``python -m llmkern`` run from the checkout puts the working directory there). ``kernels`` is the import name
    # of Hugging Face's ``kernels`` package, which transformers requires from 5.25 and imports at load time; this
    # directory is only ever ``llmkern.kernels``. Hand the name to the installed package, or be absent.
    import importlib.util as _util
    import os as _os
    import sys as _sys
    from importlib.machinery import PathFinder as _PathFinder

    _root = _os.path.dirname(_os.path.dirname(_os.path.realpath(__file__)))
    _path = [p for p in _sys.path if _os.path.realpath(p or _os.getcwd()) != _root]
    _spec = _PathFinder.find_spec("kernels", _path)
    del _sys.modules["kernels"]
    if _spec is None or _spec.loader is None:  # not installed (None), or only namespace directories
        # Stand in as what a directory shadowing the name looks like, an empty namespace package (no __file__, no
        # __version__, nothing to import from it). transformers before 5.25 imports `kernels` when it finds the name
        # without distribution metadata and counts such a module as absent; an exception here would instead break
        # every model import ("Could not import module 'LlamaConfig'", transformers 5.17).
        import types as _types

        _stub = _types.ModuleType("kernels", "Not installed: Hugging Face's `kernels` package is absent; "
                                  f"{_os.path.join(_root, 'kernels')} is llmkern's, imported as llmkern.kernels.")
        _stub.__file__ = None
        _stub.__path__ = []
        _sys.modules["kernels"] = _stub
    else:
        _hf = _util.module_from_spec(_spec)
        _sys.modules["kernels"] = _hf
        try:
            _spec.loader.exec_module(_hf)
        except BaseException:
            _sys.modules.pop("kernels", None)
            raise
