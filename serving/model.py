"""What every server generation's adapter shares: registering the model with the Auto classes, telling a Dynamic-LLaVA
model id from another, the checks before anything starts, and loading the model as a server loads it.

torch and transformers are imported inside the functions only.
"""

from __future__ import annotations

import functools
import inspect
import os
import threading
from pathlib import Path
from typing import Any

__all__ = [
    "DEFAULT_MAX_NEW_TOKENS",
    "MODEL_TYPE",
    "ThreadedServerLoading",
    "accepted",
    "check_served_model",
    "is_dynamic_llava",
    "load_for_threaded_server",
    "load_model",
    "model_type_of",
    "register_auto_classes",
    "serves_dynamic_llava",
    "serialize_generate",
    "split_model_id",
]

MODEL_TYPE = "dynamic_llava"  # (LLaVA-1.5's; every base's Dynamic model type: `MODEL_TYPES`)


def _model_types() -> frozenset[str]:
    from ..hub.bases import BASES

    return frozenset(base.model_type for base in BASES.values())


MODEL_TYPES = _model_types()
DEFAULT_MAX_NEW_TOKENS = 1024  # what transformers 5.5+ serves when a request sets no max_tokens


def register_auto_classes() -> None:
    """
    Register the installed package's classes with the Auto classes (transformers' public `register`): the config and
    the model (`dynamic_llava.register_auto_classes`), and the processors. A folder then loads without
    `--trust-remote-code` (with the installed code) and a folder without `auto_map` loads at all; with the flag,
    `AutoProcessor` takes the folder's code files. Every process that loads the model calls it (idempotent).
    """
    from transformers import AutoImageProcessor, AutoProcessor

    from .. import register_auto_classes as register_model_classes
    from ..configuration_dynamic_llava import DynamicLlavaConfig
    from ..processor import DynamicLlavaImageProcessor, DynamicLlavaProcessor

    register_model_classes()  # AutoConfig and AutoModelForImageTextToText, every base

    from ..hub.bases import BASES

    for base in BASES.values():
        if base.stock_model_type != "llava":  # (the stock image processor: only the processor is ours)
            AutoProcessor.register(base.load_config_class(), base.load_processor_class(), exist_ok=True)
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


def serves_dynamic_llava(model_id_and_revision: str) -> bool:
    """Whether the server's model id names a Dynamic-LLaVA model (then the adapter loads it; else stock does)."""
    return model_type_of(*split_model_id(model_id_and_revision)) in MODEL_TYPES


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
    if model_type not in MODEL_TYPES:
        raise ValueError(
            f"{model} holds a {model_type!r} model, not one of {sorted(MODEL_TYPES)}; serve it with "
            "`transformers serve`"
        )


def is_dynamic_llava(model_or_config: Any) -> bool:
    """Whether a loaded model (or its config) is Dynamic-LLaVA."""
    config = getattr(model_or_config, "config", model_or_config)
    return getattr(config, "model_type", None) in MODEL_TYPES


def load_model(model_id: str, **kwargs: Any):
    """`AutoModelForImageTextToText.from_pretrained` with the server's settings (None values left out)."""
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(model_id, **{k: v for k, v in kwargs.items() if v is not None})


def serialize_generate(model: Any) -> None:
    """
    One `generate()` at a time on this model instance (an instance attribute: the class is untouched), for the
    servers that run each request's generate() in a thread of its own, at the same time on one model (transformers
    5.0's output capture is not thread-safe: a stock `LlavaForConditionalGeneration` mixes images between requests).
    """
    lock = threading.Lock()
    generate = model.generate

    @functools.wraps(generate)
    def locked_generate(*args: Any, **kwargs: Any):
        with lock:
            return generate(*args, **kwargs)

    model.generate = locked_generate


def load_for_threaded_server(
    model_id_and_revision: str,
    trust_remote_code: bool,
    attn_implementation: str | None,
    dtype: Any,
    device: Any,
    quantization: Any,
) -> tuple[Any, Any]:
    """
    (model, processor) for the servers with one generate() thread per request (`serve_class`, `serve_command`):
    `generate()` serialized (`serialize_generate`), and a request without `max_tokens` gets up to 1024 new tokens as
    5.5+ gives it (5.0 raises `max_new_tokens` only when `max_length == 20`, which a 5.x generation config is not, so
    such a request failed with HTTP 500).
    """
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


class ThreadedServerLoading:
    """
    For the servers whose one class loads models and classifies them (`serve_class`, `serve_command`): put it before
    the stock class. A Dynamic-LLaVA model loads with `load_for_threaded_server` (the stock loader ends in
    `getattr(transformers, config.architectures[0])`) and is a VLM (the stock `get_model_modality` knows only
    transformers' own class names); any other model as stock. A subclass sets `VLM` (its server's `Modality.VLM`)
    and `loading_settings()` (the keywords of `load_for_threaded_server` after the model id).
    """

    VLM: Any = None

    def loading_settings(self) -> dict[str, Any]:
        raise NotImplementedError

    def _load_model_and_data_processor(self, model_id_and_revision):
        if not serves_dynamic_llava(model_id_and_revision):
            return super()._load_model_and_data_processor(model_id_and_revision)
        return load_for_threaded_server(model_id_and_revision, **self.loading_settings())

    def get_model_modality(self, model, *args, **kwargs):
        if is_dynamic_llava(model):
            return self.VLM  # image + text in, text out: image_url parts become images
        return super().get_model_modality(model, *args, **kwargs)


def accepted(function: Any, pool: dict) -> dict:
    """The entries of `pool` that `function` takes as keyword parameters (signatures differ between releases)."""
    parameters = inspect.signature(function).parameters
    return {key: value for key, value in pool.items() if key in parameters}
