"""`dynamic-llava export`: write a Hub-ready folder (remote code, auto_map, safetensors, processor, card)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Optional

import torch

from .hub_folder import (
    atomic_output_dir,
    set_dtype_field,
    write_code_files,
    write_model_config,
    write_processor_files,
    write_state_dict,
)
from .model_card import write_model_card

__all__ = ["export_model", "load_local", "load_processor"]


def load_local(model_dir: str, dtype: Optional[torch.dtype] = None):
    """Model and (if present) processor of a folder, with this package's classes."""
    from ..modeling_dynamic_llava import DynamicLlavaForConditionalGeneration

    folder = Path(model_dir)
    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"{model_dir} has no config.json; pass a folder written by save_pretrained/export.")
    model_type = json.loads((folder / "config.json").read_text()).get("model_type")
    if model_type != "dynamic_llava":
        raise ValueError(
            f"{model_dir} holds a {model_type!r} model, not dynamic_llava. An original Dynamic-LLaVA checkpoint is "
            "converted with `dynamic-llava convert`."
        )
    model = DynamicLlavaForConditionalGeneration.from_pretrained(str(folder), dtype=dtype or "auto")
    return model, load_processor(folder)


def load_processor(folder):
    """The processor of a folder with this package's classes (no remote code runs), or None without a tokenizer."""
    from transformers import AutoTokenizer

    from ..processor import DynamicLlavaImageProcessor, DynamicLlavaProcessor

    folder = Path(folder)
    if not (folder / "tokenizer_config.json").exists():
        return None
    settings = {}
    if (folder / "processor_config.json").exists():
        data = json.loads((folder / "processor_config.json").read_text())
        keys = ("patch_size", "vision_feature_select_strategy", "image_token", "num_additional_image_tokens")
        settings = {k: data[k] for k in keys if k in data}
    template = folder / "chat_template.jinja"
    if template.exists():
        settings["chat_template"] = template.read_text()
    return DynamicLlavaProcessor(
        image_processor=DynamicLlavaImageProcessor.from_pretrained(str(folder)),
        tokenizer=AutoTokenizer.from_pretrained(str(folder)),
        **settings,
    )


def export_model(
    model,
    out: str,
    processor=None,
    overwrite: bool = False,
    max_shard_size="5GB",
    dtype: Optional[torch.dtype] = None,
    base_model: Optional[str] = None,
    repo_id: str = "REPO_ID",
) -> Path:
    """
    Write `model` (a `DynamicLlavaForConditionalGeneration` or a folder) and its processor as a Hub-ready folder:
    config.json with auto_map, sharded safetensors in the layout both transformers majors load, the flat
    remote-code files, generation config, processor/tokenizer files with the chat template, model card, notebook.
    Atomic: a temporary folder is renamed into place; a non-empty `out` is refused unless `overwrite`.
    """
    if isinstance(model, (str, Path)):
        model, loaded_processor = load_local(str(model), dtype=dtype)
        processor = processor or loaded_processor
    config = copy.deepcopy(model.config)
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        write_state_dict(model.state_dict(), tmp, max_shard_size=max_shard_size, dtype=dtype)
        set_dtype_field(config, dtype or model.dtype)
        write_model_config(config, tmp)
        write_code_files(tmp)
        model.generation_config.save_pretrained(tmp)
        if processor is not None:
            write_processor_files(processor.image_processor, processor.tokenizer, config, tmp)
        write_model_card(tmp, config, base_model=base_model, has_tokenizer=processor is not None, repo_id=repo_id)
    return Path(out)
