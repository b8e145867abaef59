"""The server generation whose models run in processes of their own (`transformers/cli/serving/model_manager.py`:
`ModelLoader` loads a model in its engine process, `EngineClient` talks to it; transformers 5.25 and later).

The stock look-ups replaced (5.25.0): `ModelLoader._load_model` ends in `getattr(transformers,
config.architectures[0])` (`model_manager.py:833`), and `EngineClient.modality` asks `ModelLoader.get_model_modality`,
which returns None ("Unknown modality") for a class name outside transformers' own mapping tables
(`model_manager.py:337-343`, `746-780`). Here:

- `DynamicLlavaModelLoader` (a `ModelLoader` subclass, defined at module level: the engine process is spawned and
  receives the loader by pickling) registers the classes in that process and loads a Dynamic-LLaVA model with them
  (`AutoModelForImageTextToText`); any other model loads as stock;
- `DynamicLlavaModelManager` (a `ModelManager` subclass) gives a Dynamic-LLaVA model's engine its modality, VLM:
  `EngineClient.modality` is a `functools.cached_property`, so setting the attribute fills what it would compute.

It runs in transformers' own app (`transformers_app`). Each engine runs one request at a time: no lock is needed.
"""

from __future__ import annotations

import argparse
import functools
import inspect

from transformers.cli.serving.model_manager import EngineClient, ModelLoader, ModelManager
from transformers.cli.serving.utils import GenerationState, Modality, parse_model_id, set_serve_log_level
from transformers.utils import logging

from .model import MODEL_TYPES, accepted, is_dynamic_llava, load_model, model_type_of, register_auto_classes
from .transformers_app import build_app, run_app

__all__ = ["DynamicLlavaModelLoader", "DynamicLlavaModelManager", "build_manager", "run"]


class DynamicLlavaModelLoader(ModelLoader):
    """transformers' `ModelLoader`, loading Dynamic-LLaVA with the installed classes; any other model as stock."""

    def load_model_and_processor(self, model_id, on_progress=None):
        register_auto_classes()  # in the engine process, which starts fresh
        return super().load_model_and_processor(model_id, on_progress)

    def _load_model(self, model_id, tqdm_class=None, progress_callback=None):
        repo, revision, gguf_file = parse_model_id(model_id)
        if gguf_file is not None or model_type_of(repo, revision) not in MODEL_TYPES:
            return super()._load_model(model_id, tqdm_class=tqdm_class, progress_callback=progress_callback)
        if progress_callback is not None:
            progress_callback({"status": "loading", "model": model_id, "stage": "config"})
        return load_model(
            repo,
            revision=revision,
            attn_implementation=self.attn_implementation,
            dtype=self.dtype,
            device_map=self.device,
            trust_remote_code=self.trust_remote_code,
            quantization_config=self.get_quantization_config(),
            tqdm_class=tqdm_class,
        )


class DynamicLlavaModelManager(ModelManager):
    """transformers' `ModelManager`; a Dynamic-LLaVA model's engine is a VLM (image_url parts become images)."""

    def get_engine(self, model):
        engine = super().get_engine(model)
        if "modality" not in vars(engine) and is_dynamic_llava(engine.model_config):
            engine.modality = Modality.VLM
        return engine


def _check_modality_is_cached() -> None:
    if not isinstance(inspect.getattr_static(EngineClient, "modality", None), functools.cached_property):
        raise ImportError(
            "this transformers' EngineClient.modality is not a cached property, so dynamic-llava serve cannot give "
            "the model its modality; install a transformers version listed in docs/integrations.md"
        )


def build_manager(opts: argparse.Namespace) -> tuple[DynamicLlavaModelManager, GenerationState]:
    """The model manager (the model's engine started now, never stopped for idling, every request pinned to it)."""
    _check_modality_is_cached()
    loader_settings = {
        "device": opts.device,
        "dtype": opts.dtype,
        "trust_remote_code": opts.trust_remote_code,
        "attn_implementation": opts.attn_implementation,
        "quantization": opts.quantization,
        "continuous_batching": False,
    }
    loader = DynamicLlavaModelLoader(**accepted(DynamicLlavaModelLoader.__init__, loader_settings))
    state = {"continuous_batching": False, "compile": False, "cb_config": None, "seed": opts.default_seed}
    generation_state = GenerationState(**accepted(GenerationState.__init__, state))
    manager_settings = {
        "loader": loader,
        "generation_state": generation_state,
        "model_timeout": -1,
        "force_model": opts.model,
    }
    manager = DynamicLlavaModelManager(**accepted(DynamicLlavaModelManager.__init__, manager_settings))
    return manager, generation_state


def run(opts: argparse.Namespace) -> None:
    set_serve_log_level(logging.log_levels[opts.log_level])  # the engine process takes this level too
    manager, generation_state = build_manager(opts)
    try:
        run_app(build_app(manager, generation_state, opts), manager, opts)
    finally:
        manager.shutdown()  # the engine process (build_server's lifespan does it too, once the app started)
