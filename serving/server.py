"""The server behind `dynamic-llava serve`: transformers' own serving code, with Dynamic-LLaVA made loadable, through
one adapter per server generation of transformers. The installed one is found by what its modules hold (feature
detection, never the version number), newest first:

| adapter | found by | transformers |
|---|---|---|
| `engine_process` | `transformers.cli.serving.model_manager.ModelLoader` (models in engine processes) | 5.25+ |
| `in_process_manager` | `transformers.cli.serving.model_manager.ModelManager._load_model` | 5.5 - 5.24 |
| `serve_class` | `transformers.cli.serve.Serve._load_model_and_data_processor` | 5.0 - 5.4 |
| `serve_command` | `transformers.commands.serving.ServeCommand._load_model_and_data_processor` | 4.57 |

Every generation's stock loader takes the class as an attribute of the `transformers` module and classifies the
model (LLM / VLM) by its class name in transformers' own mapping tables, so a remote-code class is neither loaded
nor classified; each adapter replaces only those two, by subclassing (nothing in transformers is patched). The model's
registration, checks and loading are shared (`serving.model`). A transformers whose server is none of these is
refused with the version and what to do instead.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
from types import ModuleType

from .model import check_served_model, register_auto_classes

__all__ = ["GENERATIONS", "serve", "server_generation"]

# adapter module -> (transformers module, attribute path that tells its generation apart), newest first
GENERATIONS: tuple[tuple[str, str, str], ...] = (
    ("engine_process", "transformers.cli.serving.model_manager", "ModelLoader"),
    ("in_process_manager", "transformers.cli.serving.model_manager", "ModelManager._load_model"),
    ("serve_class", "transformers.cli.serve", "Serve._load_model_and_data_processor"),
    ("serve_command", "transformers.commands.serving", "ServeCommand._load_model_and_data_processor"),
)
# the adapters that pass --chat-template-kwargs to the server
CHAT_TEMPLATE_KWARGS = ("engine_process", "in_process_manager")


def _has(module_name: str, path: str) -> bool:
    try:
        if importlib.util.find_spec(module_name) is None:
            return False
    except ModuleNotFoundError:  # a parent package is missing
        return False
    found: object = importlib.import_module(module_name)
    for name in path.split("."):
        found = getattr(found, name, None)
        if found is None:
            return False
    return True


def server_generation() -> str:
    """The adapter (a module of this package) for the installed transformers' server."""
    for adapter, module_name, path in GENERATIONS:
        if _has(module_name, path):
            return adapter
    import transformers

    known = "; ".join(f"{module}.{path}" for _, module, path in GENERATIONS)
    raise ImportError(
        f"transformers {transformers.__version__}'s server is none of the server generations dynamic-llava serve "
        f"knows (it looks for {known}), so it cannot load this model there; install a transformers version listed "
        'in docs/integrations.md (e.g. pip install "transformers==5.25.0"), or run the model without a server '
        "(dynamic-llava chat / generate, or generate() in Python)"
    )


def adapter_module(adapter: str) -> ModuleType:
    return importlib.import_module(f"{__package__}.{adapter}")


def serve(opts: argparse.Namespace) -> int:
    """Start the server for the parsed flags (`dynamic_llava.serving.build_parser`); blocks until it stops."""
    adapter = server_generation()
    if opts.chat_template_kwargs and adapter not in CHAT_TEMPLATE_KWARGS:
        raise ValueError("--chat-template-kwargs needs transformers >= 5.5 (the installed server has no such option)")
    check_served_model(opts.model)
    register_auto_classes()

    from transformers.utils import logging

    if opts.log_level not in logging.log_levels:
        raise ValueError(f"--log-level {opts.log_level!r} is not one of {sorted(logging.log_levels)}")
    logging.get_logger("transformers").setLevel(logging.log_levels[opts.log_level])
    adapter_module(adapter).run(opts)
    return 0
