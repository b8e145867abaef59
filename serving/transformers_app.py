"""transformers' own FastAPI app (`transformers.cli.serving.server.build_server`) around a model manager, for the two
generations whose server is built from `transformers/cli/serving/` pieces (`engine_process`, `in_process_manager`).

`transformers serve` (`transformers.cli.serve.Serve`) builds its `ModelManager` itself, so the app is assembled here
from the same pieces as `Serve.run` assembles it: each handler that the installed `build_server` takes, constructed
with the keywords its installed `__init__` takes.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
from typing import Any

from .model import accepted

__all__ = ["build_app", "run_app"]

# build_server() keyword -> (module under transformers.cli.serving, class); the set differs between 5.x releases
_HANDLERS = (
    ("completion_handler", "completion", "CompletionHandler"),
    ("response_handler", "response", "ResponseHandler"),
    ("transcription_handler", "transcription", "TranscriptionHandler"),
    ("systemone_handler", "systemone", "SystemOneHandler"),
)


def build_app(manager: Any, generation_state: Any, opts: argparse.Namespace) -> Any:
    """transformers' FastAPI app serving `manager`'s models, with the handlers the installed release has."""
    from transformers.cli.serving import server as server_module
    from transformers.cli.serving.chat_completion import ChatCompletionHandler

    pool = {
        "model_manager": manager,
        "generation_state": generation_state,
        "chat_template_kwargs": dict(opts.chat_template_kwargs),
        "decision_config": None,
    }
    chat_handler = ChatCompletionHandler(**accepted(ChatCompletionHandler.__init__, pool))
    build_parameters = inspect.signature(server_module.build_server).parameters
    kwargs: dict[str, Any] = {}
    for name, module_name, class_name in _HANDLERS:
        if name in build_parameters:
            handler_class = getattr(importlib.import_module(f"transformers.cli.serving.{module_name}"), class_name)
            kwargs[name] = handler_class(**accepted(handler_class.__init__, pool))
    if "generation_state" in build_parameters:
        kwargs["generation_state"] = generation_state
    if "enable_cors" in build_parameters:
        kwargs["enable_cors"] = opts.enable_cors
    unknown = [
        name
        for name, parameter in build_parameters.items()
        if parameter.default is inspect.Parameter.empty
        and name not in kwargs
        and name not in ("model_manager", "chat_handler")
    ]
    if unknown:
        raise ImportError(
            f"this transformers' build_server() needs {unknown}, which dynamic-llava serve does not know yet; "
            "install a transformers version listed in docs/integrations.md"
        )
    return server_module.build_server(manager, chat_handler, **kwargs)


def run_app(app: Any, manager: Any, opts: argparse.Namespace) -> None:
    """uvicorn on `opts.host:opts.port` until stopped; where the manager reports a dead engine, the server stops."""
    import uvicorn

    settings: dict[str, Any] = {"host": opts.host, "port": opts.port, "log_level": "info"}
    if hasattr(manager, "is_dead"):  # models in engine processes: stop when one died, as `transformers serve` does

        async def stop_if_an_engine_died() -> None:
            if manager.is_dead:
                server.should_exit = True

        settings.update(callback_notify=stop_if_an_engine_died, timeout_notify=5)
    server = uvicorn.Server(uvicorn.Config(app, **settings))
    server.run()
    if getattr(manager, "is_dead", False):
        raise RuntimeError("the model's engine process died (see the error above): the server stopped")
