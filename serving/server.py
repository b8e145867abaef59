"""The server behind `dynamic-llava serve`: transformers' own serving app, with Dynamic-LLaVA made loadable.

transformers has three serving implementations; `transformers_layout()` finds the installed one by its modules:

- "modular", transformers 5.5 and later (`transformers/cli/serving/{model_manager,server,chat_completion,...}.py`):
  a `ModelManager` subclass (`_load_model`, `get_model_modality`) wired into transformers' own `build_server()` and
  handlers as `transformers.cli.serve.Serve.__init__` wires them (that constructor builds its `ModelManager` itself,
  so the app is assembled here from the same pieces; handlers and keywords are matched to the installed signatures).
- "serve-class", transformers 5.0 - 5.4 (`transformers/cli/serve.py`, one `Serve` class) and "serve-command",
  transformers 4.57 (`transformers/commands/serving.py`, `ServeCommand`): a subclass overriding
  `_load_model_and_data_processor` and `get_model_modality`; the server is otherwise the stock one.

The stock look-ups replaced (source lines of 5.24.0 / 5.0.0 / 4.57.6): the loader ends in
`getattr(transformers, config.architectures[0])` (`cli/serving/model_manager.py:319` / `cli/serve.py:1826` /
`commands/serving.py:1625`), and `get_model_modality` raises "Unknown modality" for a class name outside
transformers' own mapping tables (`model_manager.py:466-496` / `serve.py:929-945` / `serving.py:907-914`).
Registering with the Auto classes does not reach either: the server never asks them.

Fixes for stock behaviour this model would hit (5.0 - 5.4 and 4.57 only; 5.5+ needs none):

- concurrent requests run `generate()` in one thread each, at the same time on one model, and transformers 5.0's
  output capture is not thread-safe (a stock `LlavaForConditionalGeneration` mixes images between requests too):
  `generate()` is serialized per model instance (`serialize_generate`);
- 4.57's `TimedModel` treats the default timeout -1 as "unload at once": the served model is kept instead;
- 5.0 raises `max_new_tokens` to 1024 only when `max_length == 20`, which a 5.x generation config is not, and a
  request without `max_tokens` then failed (HTTP 500): the default is set as 5.5+ sets it.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import importlib.util
import inspect
import os
import threading
from pathlib import Path
from typing import Any

__all__ = ["build_modular_app", "check_served_model", "register_auto_classes", "serve", "transformers_layout"]

MODEL_TYPE = "dynamic_llava"
DEFAULT_MAX_NEW_TOKENS = 1024  # what transformers 5.5+ serves when a request sets no max_tokens


# ---- the model: registration, detection, loading --------------------------------------------------------------------


def register_auto_classes() -> None:
    """
    Register the installed package's classes with the Auto classes (transformers' public `register`): the config and
    the model (`dynamic_llava.register_auto_classes`), and the processors. A folder then loads without
    `--trust-remote-code` (with the installed code) and a folder without `auto_map` loads at all; with the flag,
    `AutoProcessor` takes the folder's code files.
    """
    from transformers import AutoImageProcessor, AutoProcessor

    from .. import register_auto_classes as register_model_classes
    from ..configuration_dynamic_llava import DynamicLlavaConfig
    from ..processor import DynamicLlavaImageProcessor, DynamicLlavaProcessor

    register_model_classes()  # AutoConfig and AutoModelForImageTextToText

    AutoProcessor.register(DynamicLlavaConfig, DynamicLlavaProcessor, exist_ok=True)
    if "slow_image_processor_class" in inspect.signature(AutoImageProcessor.register).parameters:  # 4.57
        AutoImageProcessor.register(
            DynamicLlavaConfig, slow_image_processor_class=DynamicLlavaImageProcessor, exist_ok=True
        )
    else:
        AutoImageProcessor.register(DynamicLlavaConfig, DynamicLlavaImageProcessor, exist_ok=True)


def split_model_id(model_id_and_revision: str) -> tuple[str, str | None]:
    """`'owner/name@rev'` -> `('owner/name', 'rev')`; a local path (the server may add `@main`) has no revision."""
    if os.path.exists(model_id_and_revision):
        return model_id_and_revision, None
    model_id, _, revision = model_id_and_revision.partition("@")
    if os.path.exists(model_id):
        return model_id, None
    return model_id, revision or None


def model_type_of(model_id: str, revision: str | None) -> str | None:
    """The `model_type` in the config of `model_id`, read as JSON (no class is resolved); None if unreadable."""
    from transformers import PretrainedConfig

    try:
        config_dict, _ = PretrainedConfig.get_config_dict(model_id, revision=revision)
    except Exception:  # not a transformers repo, GGUF, offline ...: the stock loader reports it its own way
        return None
    return config_dict.get("model_type")


def check_served_model(model: str) -> None:
    """Refuse, before anything starts, what is not a Dynamic-LLaVA model (one clear line)."""
    model_id, revision = split_model_id(model)
    path = Path(model_id).expanduser()
    if path.exists():
        if not path.is_dir():
            raise NotADirectoryError(f"{model} is a file; pass a Dynamic-LLaVA folder (with config.json)")
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{model} has no config.json; pass a folder written by save_pretrained/export")
    model_type = model_type_of(model_id, revision)
    if model_type is None:
        raise FileNotFoundError(f"cannot read the config of {model} (not a folder or a reachable Hub repository)")
    if model_type != MODEL_TYPE:
        raise ValueError(f"{model} holds a {model_type!r} model, not dynamic_llava; serve it with `transformers serve`")


def is_dynamic_llava(model: Any) -> bool:
    return getattr(getattr(model, "config", None), "model_type", None) == MODEL_TYPE


def load_model(model_id: str, **kwargs: Any):
    """`AutoModelForImageTextToText.from_pretrained` with the server's settings (None values left out)."""
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(model_id, **{k: v for k, v in kwargs.items() if v is not None})


def serialize_generate(model: Any) -> None:
    """
    One `generate()` at a time on this model instance (an instance attribute: the class is untouched). The 5.0 - 5.4
    and 4.57 servers run each request's generate() in its own thread; 5.5+ already runs them on one thread per model.
    """
    lock = threading.Lock()
    generate = model.generate

    @functools.wraps(generate)
    def locked_generate(*args: Any, **kwargs: Any):
        with lock:
            return generate(*args, **kwargs)

    model.generate = locked_generate


def _accepted(function: Any, pool: dict) -> dict:
    """The entries of `pool` that `function` takes as keyword parameters."""
    parameters = inspect.signature(function).parameters
    return {key: value for key, value in pool.items() if key in parameters}


def transformers_layout() -> str:
    """Which serving implementation the installed transformers has."""

    def has(name: str) -> bool:
        try:
            return importlib.util.find_spec(name) is not None
        except ModuleNotFoundError:  # a parent package is missing
            return False

    if has("transformers.cli.serving.model_manager"):
        return "modular"
    if has("transformers.cli.serve"):
        return "serve-class"
    if has("transformers.commands.serving"):
        return "serve-command"
    raise ImportError("this transformers has no `transformers serve`; install transformers>=4.57")


# ---- transformers 5.5+: a ModelManager subclass in transformers' own app ---------------------------------------------


def modular_model_manager_class() -> type:
    from transformers.cli.serving.model_manager import ModelManager
    from transformers.cli.serving.utils import Modality

    class DynamicLlavaModelManager(ModelManager):
        """transformers' `ModelManager`, loading and classifying Dynamic-LLaVA; any other model as stock."""

        def _load_model(self, model_id_and_revision, *args, **kwargs):
            model_id, revision = split_model_id(model_id_and_revision)
            if kwargs.get("gguf_file") is not None or model_type_of(model_id, revision) != MODEL_TYPE:
                return super()._load_model(model_id_and_revision, *args, **kwargs)
            progress_callback = kwargs.get("progress_callback")
            if progress_callback is not None:
                progress_callback({"status": "loading", "model": model_id_and_revision, "stage": "config"})
            return load_model(
                model_id,
                revision=revision,
                attn_implementation=self.attn_implementation,
                dtype=self.dtype,
                device_map=self.device,
                trust_remote_code=self.trust_remote_code,
                quantization_config=self.get_quantization_config(),
                tqdm_class=kwargs.get("tqdm_class"),
            )

        @staticmethod
        def get_model_modality(model, processor=None):
            if is_dynamic_llava(model):
                return Modality.VLM  # image + text in, text out: image_url parts become images
            return ModelManager.get_model_modality(model, processor=processor)

    return DynamicLlavaModelManager


# build_server() keyword -> (module under transformers.cli.serving, class); the set differs between 5.x releases
_MODULAR_HANDLERS = (
    ("completion_handler", "completion", "CompletionHandler"),
    ("response_handler", "response", "ResponseHandler"),
    ("transcription_handler", "transcription", "TranscriptionHandler"),
    ("systemone_handler", "systemone", "SystemOneHandler"),
)


def build_modular_app(opts: argparse.Namespace) -> tuple[Any, Any]:
    """transformers' FastAPI app (`build_server`) with `DynamicLlavaModelManager`; returns (app, model manager)."""
    from transformers.cli.serving import server as server_module
    from transformers.cli.serving.chat_completion import ChatCompletionHandler
    from transformers.cli.serving.utils import GenerationState

    manager_class = modular_model_manager_class()
    settings = {
        "device": opts.device,
        "dtype": opts.dtype,
        "trust_remote_code": opts.trust_remote_code,
        "attn_implementation": opts.attn_implementation,
        "continuous_batching": False,
        "quantization": opts.quantization,
        "model_timeout": -1,
        "force_model": opts.model,  # loaded now, never unloaded, every request pinned to it
    }
    manager = manager_class(**_accepted(manager_class.__init__, settings))
    state_settings = {"continuous_batching": False, "compile": False, "cb_config": None}
    generation_state = GenerationState(**_accepted(GenerationState.__init__, state_settings))
    pool = {
        "model_manager": manager,
        "generation_state": generation_state,
        "chat_template_kwargs": dict(opts.chat_template_kwargs),
        "decision_config": None,
    }
    chat_handler = ChatCompletionHandler(**_accepted(ChatCompletionHandler.__init__, pool))
    build_parameters = inspect.signature(server_module.build_server).parameters
    kwargs: dict[str, Any] = {}
    for name, module_name, class_name in _MODULAR_HANDLERS:
        if name in build_parameters:
            handler_class = getattr(importlib.import_module(f"transformers.cli.serving.{module_name}"), class_name)
            kwargs[name] = handler_class(**_accepted(handler_class.__init__, pool))
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
    return server_module.build_server(manager, chat_handler, **kwargs), manager


def run_modular(opts: argparse.Namespace) -> None:
    import uvicorn

    app, _ = build_modular_app(opts)
    uvicorn.Server(uvicorn.Config(app, host=opts.host, port=opts.port, log_level="info")).run()


# ---- transformers 5.0 - 5.4 (`Serve`) and 4.57 (`ServeCommand`): subclasses ------------------------------------------


def _load_monolithic(model_id_and_revision, trust_remote_code, attn_implementation, dtype, device, quantization):
    """(model, processor) for the 5.0 - 5.4 and 4.57 servers."""
    import torch
    from transformers import AutoProcessor

    model_id, revision = split_model_id(model_id_and_revision)
    processor = AutoProcessor.from_pretrained(model_id, revision=revision, trust_remote_code=trust_remote_code)
    if dtype not in ("auto", None):
        dtype = getattr(torch, dtype)
    model = load_model(
        model_id,
        revision=revision,
        attn_implementation=attn_implementation,
        dtype=dtype,
        device_map=device,
        trust_remote_code=trust_remote_code,
        quantization_config=quantization,
    )
    generation_config = model.generation_config
    if generation_config.max_new_tokens is None or generation_config.max_new_tokens < DEFAULT_MAX_NEW_TOKENS:
        generation_config.max_new_tokens = DEFAULT_MAX_NEW_TOKENS
    serialize_generate(model)
    return model, processor


def serve_class_subclass() -> type:
    """transformers 5.0 - 5.4."""
    from transformers.cli.serve import Modality, Serve

    class DynamicLlavaServe(Serve):
        def _load_model_and_data_processor(self, model_id_and_revision):
            model_id, revision = split_model_id(model_id_and_revision)
            if model_type_of(model_id, revision) != MODEL_TYPE:
                return super()._load_model_and_data_processor(model_id_and_revision)
            return _load_monolithic(
                model_id_and_revision,
                self.trust_remote_code,
                self.attn_implementation,
                self.dtype,
                self.device,
                self.get_quantization_config(),
            )

        @staticmethod
        def get_model_modality(model, processor=None):
            if is_dynamic_llava(model):
                return Modality.VLM
            return Serve.get_model_modality(model, processor=processor)

    return DynamicLlavaServe


def serve_command_subclass() -> type:
    """transformers 4.57."""
    from transformers.commands.serving import Modality, ServeCommand

    class DynamicLlavaServeCommand(ServeCommand):
        def _load_model_and_data_processor(self, model_id_and_revision):
            model_id, revision = split_model_id(model_id_and_revision)
            if model_type_of(model_id, revision) != MODEL_TYPE:
                return super()._load_model_and_data_processor(model_id_and_revision)
            return _load_monolithic(
                model_id_and_revision,
                self.args.trust_remote_code,
                self.args.attn_implementation,
                self.args.dtype,
                self.args.device,
                self.get_quantization_config(self.args),
            )

        @staticmethod
        def get_model_modality(model, processor=None):
            if is_dynamic_llava(model):
                return Modality.VLM
            return ServeCommand.get_model_modality(model)

    return DynamicLlavaServeCommand


def run_serve_class(opts: argparse.Namespace) -> None:
    server_class = serve_class_subclass()
    settings = {
        "continuous_batching": False,
        "device": opts.device,
        "dtype": opts.dtype,
        "trust_remote_code": opts.trust_remote_code,
        "attn_implementation": opts.attn_implementation,
        "quantization": opts.quantization,
        "host": opts.host,
        "port": opts.port,
        "model_timeout": -1,
        "log_level": opts.log_level,
        "default_seed": opts.default_seed,
        "enable_cors": opts.enable_cors,
        "force_model": opts.model,  # loaded in __init__
    }
    server_class(**_accepted(server_class.__init__, settings))  # runs uvicorn until stopped


def run_serve_command(opts: argparse.Namespace) -> None:
    from transformers.commands.serving import ServeArguments

    quantization = {"bnb-4bit": {"load_in_4bit": True}, "bnb-8bit": {"load_in_8bit": True}, None: {}}
    arguments = ServeArguments(
        continuous_batching=False,
        device=opts.device,
        dtype=opts.dtype,
        trust_remote_code=opts.trust_remote_code,
        attn_implementation=opts.attn_implementation,
        host=opts.host,
        port=opts.port,
        # 4.57's TimedModel has no "never": Timer(-1) fires at once, so the model was unloaded after every request
        # and concurrent requests raced to reload it ("Cannot copy out of meta tensor"). Keep it ~3 years instead.
        model_timeout=10**8,
        log_level=opts.log_level,
        default_seed=opts.default_seed,
        enable_cors=opts.enable_cors,
        force_model=opts.model,
        **quantization[opts.quantization],
    )
    server = serve_command_subclass()(arguments)
    server.load_model_and_processor(server.process_model_name(opts.model))  # 4.57 loads lazily: load before listening
    server.run()


# ---- entry -----------------------------------------------------------------------------------------------------------


def serve(opts: argparse.Namespace) -> int:
    """Start the server for the parsed flags (`dynamic_llava.serving.build_parser`); blocks until it stops."""
    layout = transformers_layout()
    if layout != "modular" and opts.chat_template_kwargs:
        raise ValueError("--chat-template-kwargs needs transformers >= 5.5 (the installed server has no such option)")
    check_served_model(opts.model)
    register_auto_classes()

    from transformers.utils import logging

    if opts.log_level not in logging.log_levels:
        raise ValueError(f"--log-level {opts.log_level!r} is not one of {sorted(logging.log_levels)}")
    logging.get_logger("transformers").setLevel(logging.log_levels[opts.log_level])
    if opts.default_seed is not None and layout == "modular":
        import torch

        torch.manual_seed(opts.default_seed)
    {"modular": run_modular, "serve-class": run_serve_class, "serve-command": run_serve_command}[layout](opts)
    return 0
