"""Tiny random Dynamic-LLaVA models, built locally (tests, `dynamic-llava demo`)."""

from __future__ import annotations

import torch

from ..configuration_dynamic_llava import DynamicLlavaConfig
from ..modeling_dynamic_llava import DynamicLlavaForConditionalGeneration

IMAGE_TOKEN_ID = 127
VOCAB_SIZE = 128


def tiny_config(**overrides) -> DynamicLlavaConfig:
    """A 4-layer Llama (hidden 32, GQA 4/2 heads) + a 2-layer CLIP on 32x32 images (16 image tokens, 8x8 patches)."""
    text_config = dict(
        model_type="llama",
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB_SIZE,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    text_config.update(overrides.pop("text_config", {}))
    vision_config = dict(
        model_type="clip_vision_model",
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
        projection_dim=16,
    )
    vision_config.update(overrides.pop("vision_config", {}))
    kwargs = dict(
        text_config=text_config,
        vision_config=vision_config,
        image_token_index=IMAGE_TOKEN_ID,
        image_seq_length=16,
        sparse_layer=2,
        vision_keep_rate=0.25,
        predictor_d_model=16,
        predictor_nhead=2,
        predictor_dim_feedforward=32,
        predictor_num_layers=1,
        pad_token_id=0,
    )
    kwargs.update(overrides)
    return DynamicLlavaConfig(**kwargs)


def tiny_model(seed: int = 0, attn_implementation: str = "sdpa", **overrides) -> DynamicLlavaForConditionalGeneration:
    """A tiny random model in eval mode, float32. The weights are widened so greedy choices are well separated."""
    config = tiny_config(**overrides)
    config._attn_implementation = attn_implementation
    config.text_config._attn_implementation = attn_implementation
    config.vision_config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    model = DynamicLlavaForConditionalGeneration(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() > 1:
                param.normal_(0.0, 0.3 if "embed" not in name else 1.0)
    model.generation_config.suppress_tokens = [IMAGE_TOKEN_ID]  # a random model could emit it
    model.generation_config.pad_token_id = 0
    return model.eval()
