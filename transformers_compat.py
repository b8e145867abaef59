"""Every difference between the transformers versions Dynamic-LLaVA supports (4.57.x and 5.x), in one place.

Each entry says what differs and the version that lets it go. Everything is detected from the installed API (a
signature, a field), never from the version number, so a 5.x minor release that renames something again is noticed
here and nowhere else. The one exception is `processor/image_processing_dynamic_llava.py`, which picks
`CLIPImageProcessorPil` (5.x) or `CLIPImageProcessor` (4.57) by itself: processor modules are flattened into Hub
folders and cannot import this module from the installed package's layout.

This file is a Hub remote-code module (flat imports only, nothing runs at import beyond these detections).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import transformers
from transformers.cache_utils import DynamicLayer
from transformers.masking_utils import create_causal_mask
from transformers.models.llava.modeling_llava import LlavaCausalLMOutputWithPast

__all__ = [
    "CACHE_KEY",
    "CHUNKED_PREFILL_POSITIONS_FROM_CACHE",
    "GENERATION_CONFIG_HAS_MAX_CACHE_LEN",
    "GENERATE_CONTINUES_A_CACHE_WITHOUT_USE_CACHE",
    "SDPA_SLICES_4D_MASKS",
    "PASSES_CACHE_POSITION",
    "TRANSFORMERS_MAJOR",
    "cache_from_output",
    "config_dtype_field",
    "dense_causal_mask",
    "decoder_layer_kwargs",
    "hub_key",
    "predictor_keys_kept",
    "legacy_rope_fields",
    "rope_index_takes_token_types",
    "image_features_list",
    "keep_in_fp32_names",
    "layer_output",
    "lazy_initialization_takes_values",
    "qwen_rope_index",
    "query_length",
    "rotate_queries",
    "supported_generation_modes",
    "trainer_warmup_kwargs",
]

TRANSFORMERS_MAJOR = int(transformers.__version__.split(".")[0])

# The cache argument of forward() and field of model outputs: `past_key_values` up to 5.23, `cache` from 5.24
# (the old name still warns in the model until 5.40 and in generate() until 6.0).
# Goes when the minimum supported version is >= 5.24.
CACHE_KEY = "cache" if "cache" in LlavaCausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"

_MASK_PARAMETERS = inspect.signature(create_causal_mask).parameters
# 4.57's `create_causal_mask` and decoder layers take `cache_position`; 5.x derive it. Goes with 4.57.
PASSES_CACHE_POSITION = "cache_position" in _MASK_PARAMETERS
# 4.57 names the mask's embeddings argument `input_embeds`, 5.x `inputs_embeds`. Goes with 4.57.
_MASK_EMBEDS_KEY = "inputs_embeds" if "inputs_embeds" in _MASK_PARAMETERS else "input_embeds"


def dense_causal_mask(
    config: Any,
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor | None,
    cache: Any,
    position_ids: torch.Tensor,
    past_length: int,
) -> Any:
    """
    The stock causal mask of the dense layers (`create_causal_mask` with the installed version's arguments).

    Args:
        inputs_embeds: `[batch, q, H]` this call's chunk.
        attention_mask: `[batch, past + q]` 2D padding mask, or None.
        position_ids: `[batch, q]`.
        past_length: tokens already in `cache` (the logical length).
    Returns:
        what the installed version's attention functions take for the dense layers (a 4D mask or None).
    """
    kwargs = {
        "config": config,
        _MASK_EMBEDS_KEY: inputs_embeds,
        "attention_mask": attention_mask,
        CACHE_KEY: cache,
        "position_ids": position_ids,
    }
    if PASSES_CACHE_POSITION:
        q = inputs_embeds.shape[1]
        kwargs["cache_position"] = torch.arange(past_length, past_length + q, device=inputs_embeds.device)
    return create_causal_mask(**kwargs)


def decoder_layer_kwargs(
    mask: Any,
    position_ids: torch.Tensor,
    rope: tuple[torch.Tensor, torch.Tensor],
    cache: Any,
    use_cache: bool,
    cache_position: torch.Tensor | None,
) -> dict:
    """Keyword arguments of a stock `LlamaDecoderLayer` call (4.57: `past_key_values` and `cache_position`)."""
    kwargs = {
        "attention_mask": mask,
        "position_ids": position_ids,
        "position_embeddings": rope,
        CACHE_KEY: cache,
        "use_cache": use_cache,
    }
    if PASSES_CACHE_POSITION:
        kwargs["cache_position"] = cache_position
    return kwargs


def _generate_continues_a_given_cache_without_use_cache() -> bool:
    """generate(use_cache=False) with a filled cache passed in: the newer generate() slices the inputs by the
    cache's length (`next_sequence_length`) and runs; 4.57 and 5.0's fail inside with an IndexError (the stock LLaVA
    too). Goes when the minimum supported version has `next_sequence_length`."""
    from transformers.generation.utils import GenerationMixin

    return "next_sequence_length" in inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters


GENERATE_CONTINUES_A_CACHE_WITHOUT_USE_CACHE = _generate_continues_a_given_cache_without_use_cache()


def _sdpa_slices_every_4d_mask() -> bool:
    """4.57's `sdpa_attention_forward` slices a 4D mask to the key length in every layer: one dispatched op per layer
    and step that the stock model at batch 1, passing no mask, does not pay (a 3D mask, which it would not slice,
    sends CPU sdpa to its math kernel: worse). 5.x does not slice. Goes with 4.57."""
    from transformers.integrations import sdpa_attention

    return "attention_mask[:, :, :, : key.shape[-2]]" in inspect.getsource(sdpa_attention.sdpa_attention_forward)


SDPA_SLICES_4D_MASKS = _sdpa_slices_every_4d_mask()


def query_length(query: Any) -> int:
    """`get_mask_sizes` receives `cache_position` (a tensor) in 4.57 and the query length (an int) in 5.x."""
    return query if isinstance(query, int) else query.shape[0]


# 4.57's `DynamicLayer.lazy_initialization(key_states)` takes the keys only; 5.x takes keys and values.
# Cache layers here accept both (`values` optional). Goes with 4.57.
lazy_initialization_takes_values = "value_states" in inspect.signature(DynamicLayer.lazy_initialization).parameters


def keep_in_fp32_names(names: list[str], parent: str) -> list[str]:
    """
    `_keep_in_fp32_modules(_strict)` entries for submodules `names` of the child `parent` of the top model: 4.57
    matches single path components (and checks them in `post_init`); 5.x matches from the root (bitsandbytes too,
    `quantizers_utils.should_convert_module`), so a bare name deeper down would be quantized. Goes with 4.57.
    """
    return list(names) if TRANSFORMERS_MAJOR < 5 else [f"{parent}.{name}" for name in names]


def predictor_keys_kept(mapping: dict[str, str] | None, names: list[str]) -> dict[str, str]:
    """
    A base class's `_checkpoint_conversion_mapping` that leaves the predictors' keys (`model.<name>.*`) as they are.
    4.57's and 5.0's Qwen2.5-VL map every `model.*` key that is neither the language model nor the tower into
    `model.language_model.*` (`^model(?!\\.(language_model|visual))`, for the old checkpoint layout), which would
    load a trained folder's predictors nowhere: the predictors join that pattern's exclusions. Loading applies the
    patterns first-match (4.57) or one after another (5.0); saving (4.57) reverses each by dropping its group, so
    the edited pattern saves as the stock one does. No effect where no pattern has such an exclusion (5.x after 5.0
    do not use the mapping). Goes with 5.0.
    """
    exclusion = "(?!\\.("
    return {
        pattern.replace(exclusion, exclusion + "|".join(names) + "|", 1): target
        for pattern, target in (mapping or {}).items()
    }


def image_features_list(output: Any) -> list[torch.Tensor]:
    """`get_image_features` returns a list in 4.57 and `BaseModelOutputWithPooling(pooler_output=list)` in 5.x."""
    return list(output.pooler_output if hasattr(output, "pooler_output") else output)


def supported_generation_modes() -> list | None:
    """5.x refuses other generation modes with its own clear message when a model lists the ones it supports.
    4.57 has no such list (assisted decoding is refused there by `_is_stateful`). Goes with 4.57."""
    try:
        from transformers.generation.utils import GenerationMode
    except ImportError:
        return None
    if TRANSFORMERS_MAJOR < 5:
        return None
    return [GenerationMode.GREEDY_SEARCH, GenerationMode.SAMPLE, GenerationMode.BEAM_SEARCH, GenerationMode.BEAM_SAMPLE]


def cache_from_output(output: Any) -> Any:
    """The cache of a model output or of `generate(..., return_dict_in_generate=True)`: `cache` in 5.24+,
    `past_key_values` before."""
    for key in ("cache", "past_key_values"):
        if key in output and output[key] is not None:
            return output[key]
    raise ValueError(
        "This output holds no cache; call generate(..., return_dict_in_generate=True) with the cache on "
        "(use_cache is not False)."
    )


def hub_key(key: str) -> str:
    """
    The 4.57 module-layout key of a state-dict key of the installed version: the one layout both 4.57 and 5.x load
    exactly (5.x names the CLIP tower's modules without `vision_model.`). Goes with 4.57.
    """
    prefix = "model.vision_tower."
    if key.startswith(prefix) and not key.startswith(prefix + "vision_model."):
        return prefix + "vision_model." + key[len(prefix) :]
    return key


def legacy_rope_fields(config: dict[str, Any]) -> dict[str, Any]:
    """
    The rotary fields 4.57 reads (`rope_theta`, and `rope_scaling` where the rope is not the default one or has
    M-RoPE sections) for a config dict written by 5.x, which keeps them in `rope_parameters` only; {} where the dict
    has them already or has no `rope_parameters`. 5.x reads the legacy fields of real Hub configs the same way, so a
    file with both loads alike on both majors. Goes with 4.57.
    """
    rope = config.get("rope_parameters")
    if not isinstance(rope, dict) or "rope_theta" in config:
        return {}
    fields = {"rope_theta": rope["rope_theta"]} if "rope_theta" in rope else {}
    scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
    special = scaling.get("rope_type", "default") != "default" or "mrope_section" in scaling
    if "rope_scaling" not in config and special:
        fields["rope_scaling"] = scaling
    return fields


def config_dtype_field(config: Any) -> str:
    """The config.json entry of the weights' dtype: `dtype` in 5.x, `torch_dtype` in 4.57. Goes with 4.57."""
    if hasattr(type(config), "dtype") or "dtype" in getattr(config, "__dataclass_fields__", {}):
        return "dtype"
    return "torch_dtype"


# 5.x writes `tokenizer_class: "TokenizersBackend"`, which 4.57 cannot load; exported folders name the fast
# tokenizer class both read instead. Goes with 4.57.
TOKENIZER_CLASS_REWRITES = {"TokenizersBackend": "PreTrainedTokenizerFast", None: "PreTrainedTokenizerFast"}


def trainer_warmup_kwargs(ratio: float) -> dict:
    """The Trainer's warm-up share: `warmup_ratio` in 4.57; a float `warmup_steps` < 1 in 5.x. Goes with 4.57."""
    from transformers import TrainingArguments

    fields = getattr(TrainingArguments, "__dataclass_fields__", {})
    return {"warmup_ratio": ratio} if "warmup_ratio" in fields else {"warmup_steps": ratio}


def _chunked_prefill_positions_from_cache() -> bool:
    """4.57's `_prefill_chunking` passes each chunk `position_ids` = its cache positions, ignoring left padding (5.x
    derives them from the padding mask). Goes with 4.57."""
    from transformers.generation.utils import GenerationMixin

    chunking = getattr(GenerationMixin, "_prefill_chunking", None)
    if chunking is None:
        return False
    return 'model_kwargs["position_ids"] = model_kwargs["cache_position"]' in inspect.getsource(chunking)


CHUNKED_PREFILL_POSITIONS_FROM_CACHE = _chunked_prefill_positions_from_cache()


def _generation_config_has_max_cache_len() -> bool:
    """`GenerationConfig.max_cache_len` (the static cache's size across calls) is a field from 5.25 on; before, the
    model's generate() takes it itself. Goes when the minimum supported version has it."""
    from transformers import GenerationConfig

    return "max_cache_len" in GenerationConfig().__dict__


GENERATION_CONFIG_HAS_MAX_CACHE_LEN = _generation_config_has_max_cache_len()


def rotate_queries(attention: Any, queries: torch.Tensor, rope: tuple, keys: torch.Tensor | None = None) -> Any:
    """
    Apply a decoder attention module's own rotary embedding to `queries` (and `keys`), `[batch, heads, q, D]`, with
    the `(cos, sin)` its model's `rotary_emb` returned. 4.57's Qwen2.5-VL applies M-RoPE inside the attention
    (`apply_multimodal_rotary_pos_emb`, cos `[3, batch, q, D]`); 5.x and the Llama-style bases apply
    `apply_rotary_pos_emb` to cos `[batch, q, D]`. Returns the rotated queries, or `(queries, keys)`.
    """
    import sys

    module = sys.modules[type(attention).__module__]
    cos, sin = rope
    other = queries if keys is None else keys
    if cos.dim() == 4 and hasattr(module, "apply_multimodal_rotary_pos_emb"):  # (4.57's Qwen2.5-VL; goes with it)
        section = (getattr(attention, "rope_scaling", None) or {}).get("mrope_section")
        if section is None:
            section = attention.config.rope_scaling["mrope_section"]
        rotated = module.apply_multimodal_rotary_pos_emb(queries, other, cos, sin, section)
    else:
        rotated = module.apply_rotary_pos_emb(queries, other, cos, sin)
    return rotated[0] if keys is None else rotated


def rope_index_takes_token_types() -> bool:
    """Whether the installed `Qwen2_5_VLModel.get_rope_index` takes `mm_token_type_ids` (5.x after 5.0; its
    processor returns them by default, and the stock model finds images by them). Goes with 4.57 and 5.0."""
    from transformers import Qwen2_5_VLModel

    return "mm_token_type_ids" in inspect.signature(Qwen2_5_VLModel.get_rope_index).parameters


def qwen_rope_index(model: Any, input_ids: torch.Tensor, image_grid_thw: torch.Tensor, attention_mask: torch.Tensor):
    """
    The stock M-RoPE positions of a Qwen2.5-VL chunk (`get_rope_index`, as if the chunk started the sequence): 5.x
    takes the modality of each token (`mm_token_type_ids`: 1 at image tokens), 4.57 finds images by their
    vision-start tokens. Returns `([3, batch, q]` positions, `[batch, 1]` offsets). Goes with 4.57.
    """
    if rope_index_takes_token_types():
        types = (input_ids == model.config.image_token_id).int()
        return model.get_rope_index(
            input_ids, mm_token_type_ids=types, image_grid_thw=image_grid_thw, attention_mask=attention_mask
        )
    return model.get_rope_index(input_ids, image_grid_thw=image_grid_thw, attention_mask=attention_mask)


def layer_output(output: Any) -> torch.Tensor:
    """A decoder layer's hidden states: 4.57's Qwen2.5-VL layers return a tuple `(hidden_states, ...)`, the others
    (and every 5.x layer) the tensor itself. Goes with 4.57."""
    return output[0] if isinstance(output, tuple) else output
