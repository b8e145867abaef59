"""dynamic_llava: Dynamic-LLaVA as a transformers model (installed-package entry point).

The files beside this one are also the Hub remote-code files; this `__init__` is not shipped to the Hub. Importing
the package is cheap (torch and transformers load on first use, so `dynamic-llava --help` answers at once). The
first access to a model or config class registers them with the transformers Auto classes, so the installed package
then loads exported folders without `trust_remote_code`; `register_auto_classes()` does that explicitly.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "DynamicLlavaConfig",
    "DynamicLlavaForConditionalGeneration",
    "DynamicLlavaNextConfig",
    "DynamicLlavaNextForConditionalGeneration",
    "DynamicQwen2_5_VLConfig",
    "DynamicQwen2_5_VLForConditionalGeneration",
    "DynamicLlavaCausalLMOutput",
    "DynamicLlavaModel",
    "DynamicLlavaModelOutput",
    "DynamicLlavaCache",
    "DynamicLlavaStaticCache",
    "SparseLayer",
    "cache_from_output",
    "register_auto_classes",
]

_EXPORTS = {
    "DynamicLlavaConfig": "configuration_dynamic_llava",
    "DynamicLlavaForConditionalGeneration": "modeling_dynamic_llava",
    "DynamicLlavaCausalLMOutput": "modeling_dynamic_llava",
    "DynamicLlavaModel": "modeling_dynamic_llava",
    "DynamicLlavaModelOutput": "modeling_dynamic_llava",
    "DynamicLlavaNextConfig": "configuration_dynamic_llava_next",
    "DynamicLlavaNextForConditionalGeneration": "modeling_dynamic_llava_next",
    "DynamicQwen2_5_VLConfig": "configuration_dynamic_qwen2_5_vl",
    "DynamicQwen2_5_VLForConditionalGeneration": "modeling_dynamic_qwen2_5_vl",
    "DynamicLlavaCache": "sparse_cache",
    "DynamicLlavaStaticCache": "sparse_cache",
    "SparseLayer": "sparse_cache",
    "cache_from_output": "transformers_compat",
}
_registered = False


def register_auto_classes() -> None:
    """Register every base's config and model with `AutoConfig`, `AutoModel` and `AutoModelForImageTextToText`
    (`hub/bases.py`; idempotent)."""
    global _registered
    if _registered:
        return
    from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText

    from .hub.bases import BASES

    for base in BASES.values():
        config_class, model_class = base.load_config_class(), base.load_model_class()
        AutoConfig.register(base.model_type, config_class, exist_ok=True)
        AutoModelForImageTextToText.register(config_class, model_class, exist_ok=True)
        AutoModel.register(config_class, model_class, exist_ok=True)
    _registered = True


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'dynamic_llava' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    register_auto_classes()
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
