"""Packaging: ``kernels/`` ships as ``llmkern.kernels`` only, and ``import llmkern`` has no side effects.

``kernels`` is the import name of Hugging Face's ``kernels`` package (transformers imports it when installed), so
this repository's ``kernels/`` must never be importable under that name. The checks run in fresh interpreters with
a neutral working directory and no PYTHONPATH, i.e. as a user who installed llmkern sees it.
"""

import importlib.util
import json
import os
import site
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
OURS = REPO / "kernels"  # the directory that must never be the top-level `kernels` (a venv inside REPO may hold HF's)


def _is_ours(path) -> bool:
    """Whether ``path`` is in this repository's ``kernels/``."""
    if not path:
        return False
    try:
        return Path(path).resolve().is_relative_to(OURS)
    except (OSError, ValueError):
        return False


def _clean_env(**extra) -> dict:
    """The parent's environment minus what the test run added (TRITON_INTERPRET is set by conftest.py) and minus
    PYTHONPATH, so that only the installation decides what is importable."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PYTHONPATH", "LLMKERN_BACKEND")}
    env.update(extra)
    return env


def _python(code: str, cwd, **env) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=_clean_env(**env), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, f"subprocess failed:\n{r.stderr}"
    return r


# --------------------------------------------------------------------------------------------------------------------
# kernels/ is llmkern.kernels, never a top-level `kernels`


def test_top_level_kernels_is_not_this_repo(tmp_path):
    r = _python("import importlib.util as u; print(u.find_spec('kernels'))", cwd=tmp_path)
    found = r.stdout.strip()
    assert found == "None" or f"{OURS}{os.sep}" not in found, f"`kernels` resolves into this repository: {found}"


def test_import_kernels_does_not_load_ours(tmp_path):
    code = (
        "import json\n"
        "try:\n"
        "    import kernels\n"
        "    origin = getattr(kernels, '__file__', None)\n"
        "except ModuleNotFoundError:\n"
        "    origin = None\n"
        "print(json.dumps(origin))\n"
    )
    origin = json.loads(_python(code, cwd=tmp_path).stdout)
    assert origin is None or not _is_ours(origin), f"`import kernels` loaded {origin}"


def test_llmkern_kernels_importable(tmp_path):
    code = (
        "import json, llmkern.kernels.rms_norm as m, llmkern.kernels.rope as r, llmkern.kernels.swiglu as s\n"
        "print(json.dumps([m.__name__, m.__file__, callable(m.rms_norm_fwd), callable(r.rope_fwd),"
        " callable(s.silu_and_mul_fwd)]))\n"
    )
    name, path, *callables = json.loads(_python(code, cwd=tmp_path).stdout)
    assert name == "llmkern.kernels.rms_norm"
    assert Path(path).name == "rms_norm.py"
    assert all(callables)


def test_import_kernels_from_the_repository_root_is_never_ours():
    """From the checkout's root (``python -m llmkern demo``, a script there) ``./kernels`` is on sys.path first.
    ``import kernels`` must then give Hugging Face's package when it is installed (transformers >= 5.25 requires it
    and imports it at load time) and, when it is not, an empty stand-in with no ``__file__`` (transformers 5.17
    imports the name and counts such a module as absent; an exception would break its model imports), never this
    repository's directory."""
    code = (
        "import json, importlib.metadata as md\n"
        "try:\n"
        "    md.distribution('kernels'); hf = True\n"
        "except md.PackageNotFoundError:\n"
        "    hf = False\n"
        "try:\n"
        "    import kernels\n"
        "    origin = kernels.__file__\n"
        "    assert origin is not None or not hasattr(kernels, 'get_kernel'), vars(kernels)\n"
        "except ModuleNotFoundError as e:\n"
        "    assert e.name == 'kernels', e\n"
        "    origin = None\n"
        "import transformers.models.auto.modeling_auto\n"  # transformers' own import of `kernels` must work here
        "print(json.dumps([hf, origin]))\n"
    )
    hf, origin = json.loads(_python(code, cwd=REPO).stdout)
    assert not _is_ours(origin), f"`import kernels` loaded {origin}"
    assert (origin is not None) == hf, (hf, origin)


def test_transformers_does_not_mistake_ours_for_hf_kernels():
    """Worst case, cwd = the repository root (``./kernels`` is then on sys.path through the script directory):
    transformers decides ``kernels`` is available from the installed distribution's metadata, which ours has not."""
    code = (
        "import importlib.metadata as md\n"
        "from transformers.utils.import_utils import is_kernels_available\n"
        "try:\n"
        "    md.distribution('kernels'); hf = True\n"
        "except md.PackageNotFoundError:\n"
        "    hf = False\n"
        "print(is_kernels_available(), hf)\n"
    )
    available, hf_installed = _python(code, cwd=REPO).stdout.split()
    assert available == "False" or hf_installed == "True"


def test_no_top_level_kernels_in_process(monkeypatch):
    # Nothing in this test process imported our kernels/ as a top-level `kernels`.
    mod = sys.modules.get("kernels")
    assert mod is None or not _is_ours(getattr(mod, "__file__", None)), f"`kernels` is {mod}"
    # `python -m pytest` puts its working directory on sys.path (python -m semantics, not the installation); from
    # the repository root that makes ./kernels findable. Judge the installation, so leave that one entry out.
    invocation = {"", os.getcwd()}
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in invocation])
    spec = importlib.util.find_spec("kernels")
    assert spec is None or not _is_ours(spec.origin), f"`kernels` resolves into this repository: {spec}"


def test_no_pth_puts_the_repo_root_on_sys_path():
    """An old-style editable install (a .pth line naming the repository root) would expose ./kernels everywhere."""
    dirs = [*site.getsitepackages(), site.getusersitepackages()]
    for d in dirs:
        for pth in Path(d).glob("*.pth") if os.path.isdir(d) else []:
            for line in pth.read_text().splitlines():
                line = line.strip()
                if line and not line.startswith(("#", "import ")):
                    assert Path(d, line).resolve() != REPO, f"{pth} puts {REPO} on sys.path"


# --------------------------------------------------------------------------------------------------------------------
# import llmkern has no side effects


def test_import_llmkern_has_no_side_effects(tmp_path):
    report = tmp_path / "report.json"
    code = (
        "import json, os, sys, torch\n"
        "dtype, threads = torch.get_default_dtype(), torch.get_num_threads()\n"
        "import llmkern\n"
        f"open({str(report)!r}, 'w').write(json.dumps({{\n"
        "    'default_dtype_unchanged': torch.get_default_dtype() == dtype,\n"
        "    'threads_unchanged': torch.get_num_threads() == threads,\n"
        "    'TRITON_INTERPRET': os.environ.get('TRITON_INTERPRET'),\n"
        "    'LLMKERN_BACKEND': os.environ.get('LLMKERN_BACKEND'),\n"
        "}))\n"
    )
    r = _python(code, cwd=tmp_path)
    assert r.stdout == "", f"import llmkern printed to stdout: {r.stdout!r}"
    assert r.stderr == "", f"import llmkern printed to stderr: {r.stderr!r}"
    got = json.loads(report.read_text())
    assert got == {"default_dtype_unchanged": True, "threads_unchanged": True, "TRITON_INTERPRET": None,
                   "LLMKERN_BACKEND": None}


@pytest.mark.parametrize("dtype", ["float64", "float16"])
def test_import_llmkern_keeps_a_user_default_dtype(tmp_path, dtype):
    code = (
        "import torch\n"
        f"torch.set_default_dtype(torch.{dtype})\n"
        "import llmkern\n"
        f"assert torch.get_default_dtype() == torch.{dtype}, torch.get_default_dtype()\n"
    )
    r = _python(code, cwd=tmp_path)
    assert r.stdout == ""


def test_the_repository_stands_alone():
    """Docstrings, comments and docs cite files that are in the repository: no design notes kept elsewhere."""
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True)
    if tracked.returncode != 0:
        pytest.skip(f"not a git checkout: {tracked.stderr.strip()}")
    outside = ("DESIGN.md", "STYLE.md", "../shared")
    hits = []
    for rel in tracked.stdout.split():
        path = REPO / rel
        if path.suffix not in (".py", ".cpp", ".h", ".cu", ".cuh", ".inc", ".md", ".toml", ".yml", ".txt") \
                or rel == "tests/test_packaging.py" or not path.is_file():
            continue
        text = path.read_text(errors="replace")
        hits += [f"{rel}: {name}" for name in outside if name in text]
    assert hits == [], hits
    assert (REPO / "docs" / "design.md").is_file()
