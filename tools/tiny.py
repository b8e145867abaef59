"""Tiny random Dynamic-LLaVA models, built locally (tests), and the output-text threshold calibration."""

from __future__ import annotations

from typing import Optional

import torch

from ..configuration_dynamic_llava import DynamicLlavaConfig
from ..modeling_dynamic_llava import DynamicLlavaForConditionalGeneration
from ..sparse_cache import cache_from_output

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


def init_by_name(model, seed: int) -> None:
    """
    Set every parameter from a generator seeded by (seed, its name in the 4.57 layout): the same weights on
    transformers 4.57 and 5.x (their module construction orders differ). Matrices are widened (std 0.3, embeddings
    1.0) so greedy choices are well separated; norm weights 1, biases and other vectors small and random.
    """
    import zlib

    from .hub_folder import hub_key

    with torch.no_grad():
        for name, param in model.named_parameters():
            generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(hub_key(name).encode()))
            if param.dim() > 1:
                std = 1.0 if "embed" in name else 0.3
                param.copy_(torch.randn(param.shape, generator=generator) * std)
            elif "norm" in name and name.endswith("weight") or name.endswith(("down_mlp.0.weight", "output_mlp.0.weight")):
                param.fill_(1.0)
            else:
                param.copy_(torch.randn(param.shape, generator=generator) * (1.0 if "class_embedding" in name else 0.1))


def tiny_model(seed: int = 0, attn_implementation: str = "sdpa", suppress_eos: bool = True, **overrides) -> DynamicLlavaForConditionalGeneration:
    """
    A tiny random model in eval mode, float32. The weights are widened so greedy choices are well separated;
    with `suppress_eos` generation always runs `max_new_tokens` (a random model says EOS at random).
    """
    config = tiny_config(**overrides)
    config._attn_implementation = attn_implementation
    config.text_config._attn_implementation = attn_implementation
    config.vision_config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    model = DynamicLlavaForConditionalGeneration(config)
    init_by_name(model, seed)
    # a random model could emit the image token; it must not end up inside generated text
    model.generation_config.suppress_tokens = [IMAGE_TOKEN_ID] + ([config.text_config.eos_token_id] if suppress_eos else [])
    model.generation_config.pad_token_id = 0
    return model.eval()


def calibrate_output_text_bias(model, inputs: dict, max_new_tokens: int = 30, rounds: int = 3,
                               seed: Optional[int] = None, keep_rate: float = 0.5, **generate_kwargs) -> float:  # fmt: skip
    """
    Shift the last bias of the output-text predictor so that a `keep_rate` share of the generated tokens is kept
    (the margin `logit0 - logit1` at that quantile -> 0). Random weights otherwise keep all or none; a trained
    predictor keeps more than its training rate at inference, where the Gumbel coin flips of the tokens it is
    indifferent about become a fixed threshold. Each round generates from `inputs` with `generate_kwargs` (greedy by
    default; `seed` reseeds torch before each run, for sampling). Returns the keep rate of a final run.
    """
    if not 0.0 < keep_rate < 1.0:
        raise ValueError(f"keep_rate must be in (0, 1), got {keep_rate}")
    generate_kwargs.setdefault("do_sample", False)
    head = model.output_text_score_predictor.output_mlp[-1]

    def run(**extra):
        if seed is not None:
            torch.manual_seed(seed)
        return model.generate(**inputs, max_new_tokens=max_new_tokens, **generate_kwargs, **extra)

    for _ in range(rounds):
        margins = []
        hook = head.register_forward_hook(
            lambda mod, args, out: margins.append((out[..., 0] - out[..., 1]).flatten().float())
        )
        try:
            run()
        finally:
            hook.remove()
        # shift to the midpoint of the two margins around the quantile: a keep_rate share kept, and no margin
        # left at the threshold itself (a decision at margin ~0 would flip with float noise)
        ordered = torch.cat(margins).sort().values
        middle = min(max(1, int(ordered.numel() * (1.0 - keep_rate))), ordered.numel() - 1)
        shift = (ordered[middle - 1] + ordered[middle]) / 2 if ordered.numel() > 1 else ordered[0]
        with torch.no_grad():
            head.bias[0] -= (shift / 2).to(head.bias.dtype)
            head.bias[1] += (shift / 2).to(head.bias.dtype)
    cache = cache_from_output(run(return_dict_in_generate=True))
    keep = torch.cat(cache.output_text_keep)
    return float(keep.float().mean())


def tiny_inputs(batch_prompts=((5, 6, 7),), num_images=None, seed: int = 0, image_position: int = 1):
    """
    Left-padded `input_ids`, `attention_mask` and `pixel_values` for the tiny model: row i is
    `[BOS] + prompt[:image_position] + <image> x 16 + prompt[image_position:]`, one image per row.
    """
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for prompt in batch_prompts:
        prompt = list(prompt)
        rows.append([1] + prompt[:image_position] + [IMAGE_TOKEN_ID] * 16 + prompt[image_position:])
    width = max(len(r) for r in rows)
    input_ids = torch.zeros(len(rows), width, dtype=torch.long)
    attention_mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, width - len(row) :] = torch.tensor(row)
        attention_mask[i, width - len(row) :] = 1
    pixel_values = torch.randn(len(rows), 3, 32, 32, generator=generator)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values}


def tiny_tokenizer(vocab_size: int = 120, with_image_token: bool = False):
    """
    A word-level tokenizer built locally: `<unk>`=0, `<s>`=1, `</s>`=2, words `w3`..`w{vocab_size-1}` (Llama's
    special ids). Adds BOS like Vicuna's. With `with_image_token`, `<image>` and `<pad>` are appended (llava-hf).
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"w{i}": i for i in range(3, vocab_size)})
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
        model_input_names=["input_ids", "attention_mask"],
    )  # fmt: skip
    if with_image_token:
        tokenizer.add_tokens(["<image>"], special_tokens=True)
        tokenizer.add_special_tokens({"pad_token": "<pad>"})
    return tokenizer
