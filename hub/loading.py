"""Finding and loading models: the one resolver (a local folder or a Hub id), and loading a folder with this package's
classes (no remote code runs)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from ..modeling_dynamic_llava import DynamicLlavaForConditionalGeneration
    from ..processor import DynamicLlavaProcessor

__all__ = ["is_hub_id", "load_for_eval", "load_local", "load_processor", "resolve_model"]


def is_hub_id(name: str) -> bool:
    """Whether `name` has the shape of a Hub repository id (`owner/name`, not a path)."""
    return name.count("/") == 1 and not name.startswith((".", "/", "~"))


def resolve_model(name: str, allow_patterns: list[str] | None = None) -> Path:
    """
    A local folder as is (`~` expanded); otherwise a Hub repository id, downloaded with huggingface_hub (its
    progress bars; only `allow_patterns` if given). Every failure is one line: `FileNotFoundError` for what is not
    there, `NotADirectoryError` for a file, `OSError` for a failed download.
    """
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise NotADirectoryError(f"{name} is a file; pass a folder (with config.json) or a Hub repository id.")
        return path
    if not is_hub_id(name):
        raise FileNotFoundError(f"{name} is neither an existing folder nor a Hub repository id (owner/name).")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(name, allow_patterns=allow_patterns))
    except RepositoryNotFoundError:
        raise FileNotFoundError(f"Hub repository {name} was not found (or is private: run `hf auth login`)") from None
    except LocalEntryNotFoundError:
        raise FileNotFoundError(f"cannot download {name}: offline and not in the local cache") from None
    except OSError as error:
        raise OSError(f"cannot download {name}: {type(error).__name__}: {error}") from None


def load_local(
    model_dir: str | os.PathLike, dtype: torch.dtype | None = None
) -> tuple[DynamicLlavaForConditionalGeneration, DynamicLlavaProcessor | None]:
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


def load_processor(folder: str | os.PathLike) -> DynamicLlavaProcessor | None:
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


def load_for_eval(
    model_dir: str | os.PathLike | None,
) -> tuple[DynamicLlavaForConditionalGeneration, DynamicLlavaProcessor]:
    """(model, processor) of `model_dir` in eval mode, float32; the embedded demo model when it is None."""
    from ..synthetic import DEMO_MODEL

    if model_dir is None:
        if not (DEMO_MODEL / "model.safetensors").is_file():
            raise FileNotFoundError(
                f"the embedded demo model is missing from {DEMO_MODEL}; reinstall the package or pass --model DIR"
            )
        model_dir = str(DEMO_MODEL)
    model, processor = load_local(model_dir, dtype=torch.float32)
    if processor is None:
        raise ValueError(f"{model_dir} has no tokenizer/processor files; pass a folder written by train-synthetic")
    return model.eval(), processor
