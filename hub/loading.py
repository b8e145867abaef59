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

__all__ = [
    "check_model_folder",
    "is_hub_id",
    "load_for_eval",
    "load_local",
    "load_model",
    "load_processor",
    "model_folder",
    "resolve_model",
]

# What a model folder holds (the messages below name it)
_EXPECTED = (
    "a Dynamic-LLaVA folder written by `dynamic-llava convert`, `dynamic-llava export` or save_pretrained "
    "(config.json with model_type dynamic_llava, *.safetensors weights, tokenizer and processor files)"
)


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


def check_model_folder(folder: str | os.PathLike, name: str | os.PathLike | None = None) -> Path:
    """
    `folder` as a `Path` if it holds a Dynamic-LLaVA model: config.json with model_type `dynamic_llava`, and weights.
    Otherwise one clear line naming what was expected: `NotADirectoryError` (a file), `FileNotFoundError` (no such
    folder, no config.json, no weights), `ValueError` (an unreadable config.json, another model type). `name`: how the
    user called it (default: the folder).
    """
    folder = Path(folder).expanduser()
    name = folder if name is None else name
    if not folder.exists():
        raise FileNotFoundError(f"{name} does not exist; pass {_EXPECTED}, or a Hub repository id (owner/name).")
    if not folder.is_dir():
        raise NotADirectoryError(f"{name} is a file, not a model folder; pass {_EXPECTED}.")
    config = folder / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{name} is not a model folder: it has no config.json. Expected {_EXPECTED}.")
    try:
        model_type = json.loads(config.read_text()).get("model_type")
    except (ValueError, AttributeError) as error:
        raise ValueError(f"{config} is not a JSON object ({error}); expected {_EXPECTED}.") from None
    from .bases import BASES

    dynamic_types = {base.model_type: base for base in BASES.values()}
    if model_type not in dynamic_types:
        stock = {base.stock_model_type for base in BASES.values()}
        hint = (
            f" A stock {model_type} model: `dynamic-llava init --base {name} --out DIR` makes a Dynamic one (an "
            "original Dynamic-LLaVA checkpoint is converted with `dynamic-llava convert`)."
            if model_type in stock
            else " An original Dynamic-LLaVA checkpoint is converted with `dynamic-llava convert`."
        )
        raise ValueError(f"{name} holds a {model_type!r} model, not one of {sorted(dynamic_types)}.{hint}")
    if not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")):
        raise FileNotFoundError(f"{name} has a config.json but no weights (*.safetensors); expected {_EXPECTED}.")
    return folder


def model_folder(name: str | os.PathLike | None) -> Path:
    """
    The checked folder (`check_model_folder`) of `name`: a local folder, a Hub repository id (downloaded, see
    `resolve_model`), or None for the embedded demo model.
    """
    from ..package_data import DEMO_MODEL

    if name is None:
        if not (DEMO_MODEL / "model.safetensors").is_file():
            raise FileNotFoundError(
                f"the embedded demo model is missing from {DEMO_MODEL}; reinstall the package or pass --model DIR"
            )
        return DEMO_MODEL
    text = str(name)
    if Path(text).expanduser().exists() or not is_hub_id(text):
        return check_model_folder(text)  # a local folder; or says what is wrong and what a model folder is
    return check_model_folder(resolve_model(text), name)


def load_model(
    folder: str | os.PathLike,
    dtype: torch.dtype | str | None = None,
    device_map: str | dict | None = None,
    quantization_config: object | None = None,
) -> DynamicLlavaForConditionalGeneration:
    """The model of a checked folder (`model_folder`) with this package's classes, in eval mode. `dtype` None or
    "auto": the stored dtype; `device_map` and `quantization_config` as in `from_pretrained`."""
    from .bases import base_of_folder

    model_class = base_of_folder(folder).load_model_class()
    kwargs: dict = {"dtype": dtype or "auto"}
    if device_map is not None:
        kwargs["device_map"] = device_map
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    return model_class.from_pretrained(str(folder), **kwargs).eval()


def load_local(
    model_dir: str | os.PathLike, dtype: torch.dtype | None = None
) -> tuple[DynamicLlavaForConditionalGeneration, DynamicLlavaProcessor | None]:
    """Model and (if present) processor of a folder, with this package's classes."""
    folder = check_model_folder(model_dir)
    model = load_model(folder, dtype=dtype)
    return model, load_processor(folder)


def load_processor(folder: str | os.PathLike) -> DynamicLlavaProcessor | None:
    """The processor of a folder with this package's classes (no remote code runs), or None without a tokenizer."""
    from transformers import AutoTokenizer

    from .. import register_auto_classes
    from ..processor import DynamicLlavaImageProcessor, DynamicLlavaProcessor

    register_auto_classes()  # (AutoTokenizer reads the folder's config: its model type must be known)
    folder = Path(folder)
    if not (folder / "tokenizer_config.json").exists():
        return None
    from .bases import base_of_folder

    base = base_of_folder(folder)
    if base.stock_model_type != "llava":  # (the stock image processor, the base's Dynamic processor class)
        return base.load_processor_class().from_pretrained(str(folder))
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
    dtype: torch.dtype | str | None = torch.float32,
    device_map: str | dict | None = None,
    quantization_config: object | None = None,
) -> tuple[DynamicLlavaForConditionalGeneration, DynamicLlavaProcessor]:
    """(model, processor) of `model_dir` (a folder or Hub id; None: the embedded demo model) in eval mode, float32
    unless `dtype` says otherwise ("auto": the stored dtype); `device_map`, `quantization_config` as in
    `from_pretrained`."""
    folder = model_folder(model_dir)
    processor = load_processor(folder)
    if processor is None:
        raise ValueError(
            f"{model_dir or folder} has no tokenizer/processor files (tokenizer_config.json); pass a folder written by "
            "train-synthetic or export, or convert with --tokenizer"
        )
    model = load_model(folder, dtype=dtype, device_map=device_map, quantization_config=quantization_config)
    return model, processor
