"""`dynamic-llava export`: write a Hub-ready folder (remote code, auto_map, safetensors, processor, card)."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..files import atomic_output_dir
from .bases import base_of
from .folder import (
    set_dtype_field,
    write_base_processor_files,
    write_code_files,
    write_model_config,
    write_state_dict,
)
from .loading import load_local
from .model_card import write_model_card

if TYPE_CHECKING:
    from ..modeling_dynamic_llava import DynamicLlavaForConditionalGeneration
    from ..processor import DynamicLlavaProcessor

__all__ = ["export_model", "full_state_dict"]


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """
    `model.state_dict()` with every sharded (DTensor) entry gathered into a full tensor: a collective under FSDP2 or
    tensor parallelism, so every process calls it (the same order of keys on each); plain entries are as they are.
    """
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # (a torch without DTensor has no sharded entries)
        return model.state_dict()
    return {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in model.state_dict().items()}


def has_sharded_weights(state_dict: dict[str, torch.Tensor]) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return False
    return any(isinstance(v, DTensor) for v in state_dict.values())


def export_model(
    model: DynamicLlavaForConditionalGeneration | str | os.PathLike,
    out: str | os.PathLike,
    processor: DynamicLlavaProcessor | None = None,
    overwrite: bool = False,
    max_shard_size: int | str = "5GB",
    dtype: torch.dtype | None = None,
    base_model: str | None = None,
    repo_id: str = "REPO_ID",
    about: str | None = None,
    results: str | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """
    Write `model` (a `DynamicLlavaForConditionalGeneration` or a folder) and its processor as a Hub-ready folder:
    config.json with auto_map, sharded safetensors in the layout both transformers majors load, the flat
    remote-code files, generation config, processor/tokenizer files with the chat template, model card, notebook.
    Atomic: a temporary folder is renamed into place; a non-empty `out` is refused unless `overwrite`.
    `about` and `results` (markdown) describe this model and its own measured numbers on the card
    (`hub.model_card.write_model_card`). `state_dict`: the weights to write instead of `model.state_dict()` (the
    full state dict gathered from a sharded model, e.g. after FSDP training).
    """
    source_card = None
    if isinstance(model, (str, Path)):
        card = Path(model) / "README.md"
        if card.is_file() and about is None and results is None:
            source_card = card.read_text()  # (the source's own description and results are kept)
        model, loaded_processor = load_local(str(model), dtype=dtype)
        processor = processor or loaded_processor
    config = copy.deepcopy(model.config)
    state_dict = model.state_dict() if state_dict is None else state_dict
    if has_sharded_weights(state_dict):
        raise ValueError(
            "the model's weights are sharded (FSDP2 or tensor parallel): gather them on every process with "
            "`state_dict = dynamic_llava.hub.export.full_state_dict(model)` and pass `export_model(..., "
            "state_dict=state_dict)` from the main process."
        )
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        write_state_dict(state_dict, tmp, max_shard_size=max_shard_size, dtype=dtype)
        set_dtype_field(config, dtype or model.dtype)
        write_model_config(config, tmp)
        write_code_files(tmp, base_of(config))
        model.generation_config.save_pretrained(tmp)
        if processor is not None:
            write_base_processor_files(processor, config, tmp)
        write_model_card(
            tmp,
            config,
            base_model=base_model,
            has_tokenizer=processor is not None,
            repo_id=repo_id,
            about=about,
            results=results,
        )
        if source_card is not None:
            (tmp / "README.md").write_text(source_card)
    return Path(out)
