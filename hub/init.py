"""`dynamic-llava init`: a Dynamic model folder from a stock base (a Hub id or a `save_pretrained` folder).

The stock weights are kept exactly; the two predictors are new (freshly initialised, untrained). Until they are
trained (`dynamic-llava train`), the folder's config ranks image tokens with the training-free attention scorer
(`image_scorer="attention"`) and leaves the output-text predictor off, and its model card says so. With sparsity off
(`use_vision_predictor=False`) the model computes what the stock model does.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from .bases import base_of_model_type
from .export import export_model
from .loading import resolve_model

__all__ = ["UNTRAINED_SETTINGS", "init_model"]

# the config of a folder whose predictors are untrained: the training-free image scorer, no output-text predictor
UNTRAINED_SETTINGS: dict[str, Any] = {"image_scorer": "attention", "use_output_text_predictor": False}

UNTRAINED_NOTE = (
    "The predictors of this model are **untrained** (made by `dynamic-llava init`): image tokens are ranked by the "
    'training-free attention scorer (`image_scorer="attention"`) and the output-text predictor is off. Train the '
    "predictors with `dynamic-llava train` for the learned method."
)


def init_model(
    base: str | os.PathLike,
    out: str | os.PathLike,
    overwrite: bool = False,
    dtype: torch.dtype | None = None,
    **sparsity: Any,
) -> Path:
    """
    Write a Dynamic folder of `base` (a stock LLaVA-1.5 / LLaVA-NeXT / Qwen2.5-VL folder or Hub id) to `out`.

    sparsity: config fields to set (`sparse_layer`, `vision_keep_rate`, ...; checked like every config field);
        `UNTRAINED_SETTINGS` unless given.
    Returns the folder (written atomically; a non-empty `out` is refused unless `overwrite`).
    """
    folder = resolve_model(str(base))
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{base} has no config.json: pass a stock model folder (save_pretrained) or Hub id.")
    model_type = json.loads(config_file.read_text()).get("model_type")
    spec = base_of_model_type(model_type, where=f"{base}: ")
    if model_type == spec.model_type:
        raise ValueError(f"{base} is already a Dynamic model ({model_type}); `dynamic-llava export` copies it.")
    stock = json.loads(config_file.read_text())
    stock.pop("model_type", None)
    stock.pop("auto_map", None)
    stock.pop("architectures", None)
    settings = {**UNTRAINED_SETTINGS, **sparsity}
    config_class, model_class = spec.load_config_class(), spec.load_model_class()
    config = config_class(**stock, **settings)
    model = _with_stock_weights(model_class, config, folder, dtype)
    processor = _stock_processor(folder, spec)
    trained = not (settings.get("image_scorer") == "attention" and not settings.get("use_output_text_predictor"))
    return export_model(
        model,
        out,
        processor=processor,
        overwrite=overwrite,
        base_model=str(base),
        about=None if trained else UNTRAINED_NOTE,
    )


def _with_stock_weights(model_class: Any, config: Any, folder: Path, dtype: torch.dtype | None) -> Any:
    """
    The Dynamic model with the stock model's weights, loaded by the stock class (which knows every checkpoint layout
    of its `model_type`: transformers 5.x saves some bases in their original key names) and copied over; only the
    predictors are new. Anything else missing or left over is refused.
    """
    from transformers import AutoModelForImageTextToText

    stock = AutoModelForImageTextToText.from_pretrained(str(folder), dtype=dtype or "auto")
    model = model_class(config).to(stock.dtype)
    missing, unexpected = model.load_state_dict(stock.state_dict(), strict=False)
    missing = [key for key in missing if "score_predictor" not in key]
    if missing or unexpected:
        raise ValueError(
            f"{folder}: the stock weights do not match the Dynamic model (missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}); pass a stock model of a supported base."
        )
    return model.eval()


def _stock_processor(folder: Path, spec: Any) -> Any:
    """
    The folder's processor as the base's Dynamic processor (a subclass of the stock one, reading the same files; for
    Qwen2.5-VL without the video processor, which needs torchvision), or None without tokenizer files (the new folder
    then has no processor either).
    """
    if not (folder / "tokenizer_config.json").exists():
        return None
    if spec.stock_model_type == "llava":
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(str(folder))
    return spec.load_processor_class().from_pretrained(str(folder))
