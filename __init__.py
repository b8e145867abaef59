"""dynamic_llava: Dynamic-LLaVA as a transformers model (installed-package entry point).

The files beside this one are also the Hub remote-code files; this `__init__` is not shipped to the Hub. It
registers the model with the Auto classes so that an installed package loads exported folders without
`trust_remote_code`.
"""

from transformers import AutoConfig, AutoModelForImageTextToText

from .configuration_dynamic_llava import DynamicLlavaConfig
from .modeling_dynamic_llava import (
    DynamicLlavaCausalLMOutput,
    DynamicLlavaForConditionalGeneration,
    DynamicLlavaModel,
    DynamicLlavaModelOutput,
)
from .sparse_cache import DynamicLlavaCache, DynamicLlavaStaticCache, SparseLayer
from .transformers_compat import cache_from_output

__all__ = [
    "DynamicLlavaConfig",
    "DynamicLlavaForConditionalGeneration",
    "DynamicLlavaCausalLMOutput",
    "DynamicLlavaModel",
    "DynamicLlavaModelOutput",
    "DynamicLlavaCache",
    "DynamicLlavaStaticCache",
    "SparseLayer",
    "cache_from_output",
]

AutoConfig.register("dynamic_llava", DynamicLlavaConfig, exist_ok=True)
AutoModelForImageTextToText.register(DynamicLlavaConfig, DynamicLlavaForConditionalGeneration, exist_ok=True)
