"""The server generation whose `transformers/cli/serving/model_manager.py` `ModelManager` loads each model in the
server's own process (`ModelManager._load_model`; transformers 5.5 to 5.24).

Its loader ends in `getattr(transformers, config.architectures[0])` (5.24.0: `model_manager.py:319`) and its
`get_model_modality` raises "Unknown modality" for a class name outside transformers' own mapping tables
(`model_manager.py:466-496`). A `ModelManager` subclass replaces those two for a Dynamic-LLaVA model (any other model
loads as stock); it runs in transformers' own app (`transformers_app`). Requests run on one thread per model already:
no lock is needed.
"""

from __future__ import annotations

import argparse

from transformers.cli.serving.model_manager import ModelManager
from transformers.cli.serving.utils import GenerationState, Modality

from .model import accepted, is_dynamic_llava, load_model, serves_dynamic_llava, split_model_id
from .transformers_app import build_app, run_app

__all__ = ["DynamicLlavaModelManager", "build_manager", "run"]


class DynamicLlavaModelManager(ModelManager):
    """transformers' `ModelManager`, loading and classifying Dynamic-LLaVA; any other model as stock."""

    def _load_model(self, model_id_and_revision, *args, **kwargs):
        if kwargs.get("gguf_file") is not None or not serves_dynamic_llava(model_id_and_revision):
            return super()._load_model(model_id_and_revision, *args, **kwargs)
        model_id, revision = split_model_id(model_id_and_revision)
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


def build_manager(opts: argparse.Namespace) -> tuple[DynamicLlavaModelManager, GenerationState]:
    """The model manager (the model loaded now, never unloaded, every request pinned to it) and its generation state."""
    settings = {
        "device": opts.device,
        "dtype": opts.dtype,
        "trust_remote_code": opts.trust_remote_code,
        "attn_implementation": opts.attn_implementation,
        "continuous_batching": False,
        "quantization": opts.quantization,
        "model_timeout": -1,
        "force_model": opts.model,
    }
    manager = DynamicLlavaModelManager(**accepted(DynamicLlavaModelManager.__init__, settings))
    state = {"continuous_batching": False, "compile": False, "cb_config": None}
    return manager, GenerationState(**accepted(GenerationState.__init__, state))


def run(opts: argparse.Namespace) -> None:
    if opts.default_seed is not None:
        import torch

        torch.manual_seed(opts.default_seed)
    manager, generation_state = build_manager(opts)
    run_app(build_app(manager, generation_state, opts), manager, opts)
