"""The supported bases, in one registry: for each stock `model_type`, the Dynamic config and model classes, their
remote-code files and `auto_map`, and the processor side. Export, `init`, loading and the Auto registration all read
it; adding a base is one entry here (see docs/adding_a_base.md)."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["BASES", "CORE_CODE_FILES", "Base", "base_of", "base_of_folder", "base_of_model_type"]

PACKAGE_ROOT = Path(__file__).resolve().parent.parent

# the base-agnostic remote-code files every folder carries
CORE_CODE_FILES = (
    "sparse_cache.py",
    "sparse_flow.py",
    "sparse_model.py",
    "sparse_scorers.py",
    "sparse_training.py",
    "sparse_masks.py",
    "sparse_predictors.py",
    "sparse_settings.py",
    "transformers_compat.py",
)


@dataclass(frozen=True)
class Base:
    """
    One base model family.

    stock_model_type: the stock transformers `model_type` (`llava`, `llava_next`, `qwen2_5_vl`).
    model_type: the Dynamic config's `model_type`. module: the stem shared by the configuration_/modeling_ files.
    config_class, model_class: the Dynamic classes (in configuration_<module>.py / modeling_<module>.py).
    processor_class: the Dynamic processor (processor/processing_<module>.py).
    stock_name: how the README and messages name it.
    """

    stock_model_type: str
    model_type: str
    module: str
    config_class: str
    model_class: str
    processor_class: str
    stock_name: str

    @property
    def code_files(self) -> dict[str, Path]:
        """The model-side remote-code files of a folder of this base: its two files and the core."""
        files = {f"configuration_{self.module}.py": PACKAGE_ROOT / f"configuration_{self.module}.py"}
        files[f"modeling_{self.module}.py"] = PACKAGE_ROOT / f"modeling_{self.module}.py"
        files.update({name: PACKAGE_ROOT / name for name in CORE_CODE_FILES})
        return files

    @property
    def auto_map(self) -> dict[str, str]:
        """config.json's `auto_map` (generic harnesses load with AutoModel: the generation class)."""
        model = f"modeling_{self.module}.{self.model_class}"
        return {
            "AutoConfig": f"configuration_{self.module}.{self.config_class}",
            "AutoModel": model,
            "AutoModelForImageTextToText": model,
            "AutoModelForVision2Seq": model,
        }

    def load_config_class(self) -> Any:
        return getattr(importlib.import_module(f"dynamic_llava.configuration_{self.module}"), self.config_class)

    def load_model_class(self) -> Any:
        return getattr(importlib.import_module(f"dynamic_llava.modeling_{self.module}"), self.model_class)

    def load_processor_class(self) -> Any:
        return getattr(
            importlib.import_module(f"dynamic_llava.processor.processing_{self.module}"), self.processor_class
        )


BASES: dict[str, Base] = {
    "llava": Base(
        "llava",
        "dynamic_llava",
        "dynamic_llava",
        "DynamicLlavaConfig",
        "DynamicLlavaForConditionalGeneration",
        "DynamicLlavaProcessor",
        "LLaVA-1.5",
    ),
    "llava_next": Base(
        "llava_next",
        "dynamic_llava_next",
        "dynamic_llava_next",
        "DynamicLlavaNextConfig",
        "DynamicLlavaNextForConditionalGeneration",
        "DynamicLlavaNextProcessor",
        "LLaVA-NeXT",
    ),
    "qwen2_5_vl": Base(
        "qwen2_5_vl",
        "dynamic_qwen2_5_vl",
        "dynamic_qwen2_5_vl",
        "DynamicQwen2_5_VLConfig",
        "DynamicQwen2_5_VLForConditionalGeneration",
        "DynamicQwen2_5_VLProcessor",
        "Qwen2.5-VL",
    ),
}


def base_of_model_type(model_type: str | None, where: str = "") -> Base:
    """The base of a stock or Dynamic `model_type`; a clear error naming the supported ones otherwise."""
    for base in BASES.values():
        if model_type in (base.stock_model_type, base.model_type):
            return base
    supported = ", ".join(f"{b.stock_model_type} ({b.stock_name})" for b in BASES.values())
    raise ValueError(f"{where}model_type {model_type!r} is not a supported base; supported: {supported}.")


def base_of(config: Any) -> Base:
    """The base of a config (stock or Dynamic)."""
    return base_of_model_type(getattr(config, "model_type", None))


def base_of_folder(folder: str | Path) -> Base:
    """The base of a model folder, from its config.json's `model_type` (read as JSON: no class is resolved)."""
    import json

    path = Path(folder) / "config.json"
    return base_of_model_type(json.loads(path.read_text()).get("model_type"), where=f"{folder}: ")
