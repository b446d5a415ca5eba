"""pytest plugin of the mutation check (tests/mutation/run.py loads it with ``-p mutation_plugin`` in the mutated
copy): records, per test, its outcome and the dtypes it ran the kernels in, as JSON lines in ``$MUTATION_OUT``.

A test's dtypes are those it ran the kernels in: the dtype of the first floating-point tensor handed to each
``llmkern.ops`` / ``llmkern.paged_ops`` function it called (a test whose dtype is a default, e.g. fp32 caches, is
labelled by what it ran; one with an fp32 weight for bf16 activations is bf16). A test that called none (it failed
first, or calls the extension's ops directly) is labelled by its parameters that are dtypes (``torch.bfloat16``, or
the names ``"bf16"`` / ``"bfloat16"`` ...), whatever ids pytest gave them (``dtype0`` says nothing).

A "start" line is written before each test, so a crash of the interpreter names the test that was running. With
``$MUTATION_DTYPES`` (comma-separated) and ``$MUTATION_STOP_AFTER`` = n, the session stops once every listed dtype
has n failing tests: a mutant caught in every dtype need not run the rest of its selection.
"""

import functools
import json
import os

import pytest

_NAMES = {"fp32": "fp32", "float32": "fp32", "torch.float32": "fp32", "fp16": "fp16", "float16": "fp16",
          "torch.float16": "fp16", "half": "fp16", "bf16": "bf16", "bfloat16": "bf16", "torch.bfloat16": "bf16"}

_state = {"current": set(), "by_node": {}, "fails": {}, "session": None, "out": None}


def _dtype_name(v):
    import torch

    if isinstance(v, torch.dtype):
        return _NAMES.get(str(v))
    if isinstance(v, str):
        return _NAMES.get(v)
    return None


def _first_float_dtype(args, kwargs):
    import torch

    for a in list(args) + list(kwargs.values()):
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            return _dtype_name(a.dtype)
    return None


def _wrap(fn):
    import torch

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if not torch.compiler.is_compiling():  # traced by torch.compile: no side effects in the graph
            d = _first_float_dtype(args, kwargs)
            if d:
                _state["current"].add(d)
        return fn(*args, **kwargs)

    wrapper.__mutation_wrapped__ = True
    return wrapper


def _install_wrappers():
    """Wrap the public functions of llmkern.ops / llmkern.paged_ops (module attributes: tests call them as
    ``ops.rms_norm``), to record the dtypes each test runs."""
    import inspect

    from llmkern import ops, paged_ops

    for mod in (ops, paged_ops):
        for name, fn in list(vars(mod).items()):
            if (not name.startswith("_") and inspect.isfunction(fn) and fn.__module__ == mod.__name__
                    and not getattr(fn, "__mutation_wrapped__", False)):
                setattr(mod, name, _wrap(fn))


def _write(rec):
    if _state["out"] is None:
        return
    with open(_state["out"], "a") as f:
        f.write(json.dumps(rec) + "\n")


def pytest_configure(config):
    _state["out"] = os.environ.get("MUTATION_OUT")


def pytest_sessionstart(session):
    _state["session"] = session


def pytest_collection_modifyitems(session, config, items):
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        _state["by_node"][item.nodeid] = {d for d in map(_dtype_name, params.values()) if d}
    _install_wrappers()  # after the test modules (and conftest.py, which sets TRITON_INTERPRET) are imported


def pytest_runtest_logstart(nodeid, location):
    _state["current"] = set()
    _write({"event": "start", "nodeid": nodeid})


def pytest_runtest_logreport(report):
    if report.when == "call" or report.outcome != "passed":
        dtypes = sorted(_state["current"] or _state["by_node"].get(report.nodeid, set()))
        msg = ""
        if report.failed:
            msg = getattr(report.longrepr, "reprcrash", None)
            msg = msg.message if msg is not None else str(report.longrepr)
            msg = msg.splitlines()[0][:300] if msg else ""
        _write({"event": "report", "nodeid": report.nodeid, "when": report.when, "outcome": report.outcome,
                "dtypes": dtypes, "message": msg})
        if report.failed:
            _stop_when_every_dtype_failed(report.nodeid, dtypes)


def _stop_when_every_dtype_failed(nodeid, dtypes):
    want = [d for d in os.environ.get("MUTATION_DTYPES", "").split(",") if d]
    n = int(os.environ.get("MUTATION_STOP_AFTER", "0") or 0)
    for d in dtypes:
        _state["fails"][d] = _state["fails"].get(d, 0) + 1
    if want and n > 0 and all(_state["fails"].get(d, 0) >= n for d in want) and _state["session"] is not None:
        _state["session"].shouldstop = f"mutation check: every dtype ({', '.join(want)}) has {n} failing tests"
        _write({"event": "stop"})


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session, exitstatus):
    _write({"event": "finish", "exitstatus": int(exitstatus)})
