"""dynamic_llava.processor: LLaVA-1.5 pad image processor and the vicuna_v1 processor of Dynamic-LLaVA.

The two modules beside this file are also Hub remote-code files (flat, sibling imports only); this `__init__` is
only for the installed package.
"""

from .image_processing_dynamic_llava import DynamicLlavaImageProcessor
from .processing_dynamic_llava import DEFAULT_CHAT_TEMPLATE, VICUNA_V1_SYSTEM, DynamicLlavaProcessor

__all__ = ["DynamicLlavaImageProcessor", "DynamicLlavaProcessor", "DEFAULT_CHAT_TEMPLATE", "VICUNA_V1_SYSTEM"]
