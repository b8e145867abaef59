"""dynamic_llava.processor: the processors of the Dynamic folders of each base.

- LLaVA-1.5: `DynamicLlavaImageProcessor` (LLaVA-1.5 pad preprocessing) and `DynamicLlavaProcessor` (vicuna_v1);
- LLaVA-NeXT: `DynamicLlavaNextProcessor` (the stock `LlavaNextProcessor` with clear input errors);
- Qwen2.5-VL: `DynamicQwen2_5_VLProcessor` (the stock `Qwen2_5_VLProcessor` without its video processor, so it runs
  without torchvision).

The modules beside this file are also Hub remote-code files (flat, sibling imports only); this `__init__` is only
for the installed package. The LLaVA-NeXT and Qwen2.5-VL classes are imported on first use.
"""

from .image_processing_dynamic_llava import DynamicLlavaImageProcessor
from .processing_dynamic_llava import DEFAULT_CHAT_TEMPLATE, VICUNA_V1_SYSTEM, DynamicLlavaProcessor

_LAZY = {
    "DynamicLlavaNextProcessor": "processing_dynamic_llava_next",
    "DynamicQwen2_5_VLProcessor": "processing_dynamic_qwen2_5_vl",
    "QWEN2_5_VL_CHAT_TEMPLATE": "processing_dynamic_qwen2_5_vl",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DynamicLlavaImageProcessor",
    "DynamicLlavaProcessor",
    "DEFAULT_CHAT_TEMPLATE",
    "VICUNA_V1_SYSTEM",
    "DynamicLlavaNextProcessor",
    "DynamicQwen2_5_VLProcessor",
    "QWEN2_5_VL_CHAT_TEMPLATE",
]
