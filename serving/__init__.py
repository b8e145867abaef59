"""`dynamic-llava serve MODEL`: transformers' own OpenAI-compatible server (`POST /v1/chat/completions`, streaming or
not, `GET /v1/models`, `GET /health`) serving a Dynamic-LLaVA folder or Hub repository.

Stock `transformers serve MODEL --trust-remote-code` cannot serve this model on any transformers version: its loader
takes the class as an attribute of the `transformers` module (`getattr(transformers, config.architectures[0])`) and
classifies the model as LLM / VLM by looking its class name up in transformers' own mapping tables, so a remote-code
or third-party class is neither loaded nor classified. This command runs transformers' own app and handlers and
replaces only those two look-ups, by subclassing (nothing in transformers is patched), with one adapter per server
generation of transformers (`serving.server` picks it by feature detection; `serving.model` is what they share); see
docs/integrations.md.

This module parses the flags without importing torch or transformers.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys

__all__ = ["build_parser", "main"]

PROG = "dynamic-llava serve"

CONTINUOUS_BATCHING_REFUSAL = (
    f"{PROG}: error: --continuous-batching is not supported: its paged-attention cache would replace Dynamic-LLaVA's "
    "sparse KV cache (vision-token pruning, decode-time KV admission); run without it (requests are then served one "
    "generate() at a time)."
)
COMPILE_REFUSAL = (
    f"{PROG}: error: --compile is not supported: it asks generate() for a static cache, while each request builds "
    "Dynamic-LLaVA's own growing sparse cache (compiling only made each request about 9x slower on CPU); run without "
    "it."
)
# what transformers' serving code imports (transformers.utils.import_utils.is_serve_available) -> pip name
SERVE_MODULES = {"fastapi": "fastapi", "uvicorn": "uvicorn", "pydantic": "pydantic", "openai": "openai"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=(
            "Serve a Dynamic-LLaVA model with transformers' OpenAI-compatible server: POST /v1/chat/completions "
            "(images as image_url parts: data: URLs or http(s) URLs; stream true or false), GET /v1/models, "
            'GET /health. Flags as `transformers serve`. Needs `pip install -e ".[serve]"`.'
        ),
    )
    parser.add_argument("model", help="Dynamic-LLaVA folder or Hub id (owner/name[@revision]); every request uses it")
    parser.add_argument("--host", default="localhost", help="listen address (default localhost)")
    parser.add_argument("--port", type=int, default=8000, help="listen port (default 8000)")
    parser.add_argument("--device", default="auto", help="'auto' (default), 'cpu', 'cuda', 'cuda:0', ...")
    parser.add_argument(
        "--dtype", default="auto", help="'auto' (default: the stored dtype), 'float32', 'bfloat16', 'float16'"
    )
    parser.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="use the folder's own code files (auto_map); without it the installed dynamic_llava classes load it",
    )
    parser.add_argument("--attn-implementation", default=None, help="'sdpa' (default) or 'eager'")
    parser.add_argument("--quantization", default=None, choices=["bnb-4bit", "bnb-8bit"], help="bitsandbytes")
    parser.add_argument(
        "--model-timeout", type=int, default=-1, help="accepted for compatibility; the served model is never unloaded"
    )
    parser.add_argument("--log-level", default="warning", help="transformers' log level (default warning)")
    parser.add_argument("--default-seed", type=int, default=None, help="torch seed set once at start")
    parser.add_argument("--enable-cors", action="store_true", help="permissive CORS headers")
    parser.add_argument(
        "--chat-template-kwargs",
        default=None,
        help="JSON object passed to apply_chat_template (transformers >= 5.5 only)",
    )
    parser.add_argument("--compile", action="store_true", help="refused: see the message")
    parser.add_argument("--continuous-batching", action="store_true", help="refused: see the message")
    return parser


def _fail(message: str) -> int:
    print(message, file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    """Run the server (blocks until it is stopped); returns the exit status (2: a usage error or a refusal)."""
    parser = build_parser()
    try:
        opts = parser.parse_args(sys.argv[1:] if argv is None else argv)
    except SystemExit as stop:  # --help (0) or a usage error (2): argparse has printed it
        return stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 2)
    if opts.continuous_batching:
        return _fail(CONTINUOUS_BATCHING_REFUSAL)
    if opts.compile:
        return _fail(COMPILE_REFUSAL)
    chat_template_kwargs = {}
    if opts.chat_template_kwargs:
        try:
            chat_template_kwargs = json.loads(opts.chat_template_kwargs)
        except ValueError as error:
            return _fail(f"{PROG}: error: --chat-template-kwargs is not JSON ({error})")
        if not isinstance(chat_template_kwargs, dict):
            return _fail(f"{PROG}: error: --chat-template-kwargs must be a JSON object")
    opts.chat_template_kwargs = chat_template_kwargs
    opts.log_level = opts.log_level.lower()
    missing = [pip for module, pip in SERVE_MODULES.items() if importlib.util.find_spec(module) is None]
    if missing:
        return _fail(
            f'{PROG}: error: the serving dependencies are missing ({", ".join(missing)}): pip install -e ".[serve]"'
        )

    from . import server

    try:
        return server.serve(opts)
    except (ValueError, OSError, ImportError, RuntimeError) as error:
        message = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
        return _fail(f"{PROG}: error: {message or type(error).__name__}")
