"""``python -m llmkern serve MODEL [options]``: transformers' own OpenAI-compatible server (``transformers serve``)
with the model it loads patched by llmkern.

``transformers serve`` loads each model in a process it spawns (``transformers.cli.serving.model_manager``:
``ModelLoader.load_model_and_processor``, run in that process), so patching a model in the caller's process changes
nothing it serves. This command runs the same ``Serve`` command with the same options, and only the loader differs:
``PatchingModelLoader`` (a subclass, importable by name in the spawned process, which unpickles it there) calls
``llmkern.patch`` on each model right after transformers loads it. Everything else (the HTTP API, request
validation, continuous batching with ``--continuous-batching``, streaming) is transformers', with one check added to
the app transformers builds: a token limit (``max_tokens``, ``max_completion_tokens``, ``max_output_tokens``) that is
not a positive integer is a 400 (transformers' continuous-batching path answers it with an empty 200). With
``--api-server-count`` > 1 the API servers run in processes transformers spawns, without that check. Under continuous
batching the patched model runs llmkern's row ops, Linear and paged attention kernels over the engine's own pages
(``llmkern/continuous.py``); without it, ``generate`` runs llmkern's paged attention over llmkern's cache.

Needs transformers' serving extras (``pip install "transformers[serving]"``: fastapi, uvicorn, openai); a release
without ``transformers.cli.serve.Serve`` or with another loader is an error that names what is missing.
"""

from __future__ import annotations

import json
import sys

PROG = "python -m llmkern serve"

try:  # the serving module imports without its extras installed; Serve() itself checks them
    from transformers.cli.serving import model_manager as _mm
except ImportError as e:  # pragma: no cover - depends on the installed release
    _mm = None
    _IMPORT_ERROR = e
else:
    _IMPORT_ERROR = None

_Base = getattr(_mm, "ModelLoader", object)


class PatchingModelLoader(_Base):  # type: ignore[misc, valid-type]
    """transformers' ModelLoader, with ``llmkern.patch`` applied to every model it loads (in the model's process)."""

    def load_model_and_processor(self, model_id, *args, **kwargs):
        import llmkern

        model, processor = super().load_model_and_processor(model_id, *args, **kwargs)
        report = llmkern.patch(model)
        print(f"llmkern: patched {model_id} in the model's process\n{report}", file=sys.stderr, flush=True)
        return model, processor


def _check_release():
    """transformers' Serve command and the loader it builds, or a RuntimeError that says what this release lacks."""
    if _mm is None or not hasattr(_mm, "ModelLoader"):
        raise RuntimeError(f"{PROG}: this transformers has no transformers.cli.serving.model_manager.ModelLoader "
                           f"({_IMPORT_ERROR or 'attribute missing'}); llmkern's serve hook supports the releases "
                           "whose `transformers serve` loads models with it (5.2x)")
    if not callable(getattr(_mm.ModelLoader, "load_model_and_processor", None)):
        raise RuntimeError(f"{PROG}: transformers' ModelLoader has no load_model_and_processor: the serve hook does "
                           "not know this release; run `transformers serve` unpatched, or pin transformers")
    try:
        from transformers.cli.serve import Serve
    except ImportError as e:
        raise RuntimeError(f"{PROG}: this transformers has no transformers.cli.serve.Serve ({e})") from e
    return Serve


# Request bodies whose length limit transformers' continuous-batching path lets through: a chat/text completion with
# max_tokens <= 0 gets a 200 and an empty answer there (5.25), while its generate path answers 400. The serve hook
# answers 400 on both paths, before the request reaches transformers' handlers.
_LIMITED = ("/v1/chat/completions", "/v1/completions", "/v1/responses")
_LIMIT_KEYS = ("max_tokens", "max_completion_tokens", "max_output_tokens")


def _with_request_checks(build_server):
    """transformers' ``build_server``, and on the app it builds a middleware that answers 400 to a non-positive (or
    non-integer) token limit."""

    def build(*args, **kwargs):
        app = build_server(*args, **kwargs)
        from fastapi.responses import JSONResponse

        @app.middleware("http")
        async def check_token_limits(request, call_next):
            if request.method == "POST" and request.url.path in _LIMITED:
                try:
                    data = json.loads(await request.body())
                except ValueError:
                    data = None  # malformed JSON: transformers' own validation answers it (422)
                if isinstance(data, dict):
                    for key in _LIMIT_KEYS:
                        v = data.get(key)
                        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v <= 0):
                            return JSONResponse({"detail": f"`{key}` must be a positive integer, got {v!r}"},
                                                status_code=400)
            return await call_next(request)

        return app

    return build


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        serve_cls = _check_release()
    except RuntimeError as e:
        print(e, file=sys.stderr)
        return 2
    from transformers.utils.import_utils import is_serve_available

    if not is_serve_available():
        print(f"{PROG}: transformers' server needs its serving extras: pip install \"transformers[serving]\" "
              "(fastapi, uvicorn, openai)", file=sys.stderr)
        return 2
    import typer

    # Serve() builds its loader from the module's ModelLoader when it is constructed: that name is ours for the
    # duration, so the loader (and its copy in the model's process) is a PatchingModelLoader.
    from transformers.cli.serving import server as _server

    original, original_build = _mm.ModelLoader, _server.build_server
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.command(name="serve", help="transformers serve, with each loaded model patched by llmkern")(serve_cls)
    _mm.ModelLoader = PatchingModelLoader
    _server.build_server = _with_request_checks(original_build)
    try:
        app(argv, prog_name=PROG)
    except SystemExit as e:
        return int(e.code or 0)
    finally:
        _mm.ModelLoader, _server.build_server = original, original_build
    return 0


if __name__ == "__main__":
    sys.exit(main())
