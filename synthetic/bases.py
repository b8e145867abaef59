"""The synthetic task on each base it is trained on: the processor, the model config, the prompt's image
placeholder, one training item, a batch, and the image features the vision phase trains.

Both bases see the same 64 x 64 images as an 8 x 8 grid of image tokens, each covering one 8 x 8-pixel cell (so
`task.object_patches(box, IMAGE_SIZE, PATCH)` names the object's tokens on both), with the same word-level tokenizer
and the same vicuna_v1 prompt; only the image placeholder and the vision side differ:

* LLaVA-1.5 (`SyntheticLlava`): a CLIP tower with 8-pixel patches, `<image>` expanded to 64 tokens;
* Qwen2.5-VL (`SyntheticQwen2_5_VL`): Qwen's vision tower with 4-pixel patches merged 2 x 2 (16 x 16 patches -> 64
  tokens), windowed and full-attention blocks, M-RoPE in the language model; the placeholder is
  `<|vision_start|><|image_pad|><|vision_end|>`.

`SYNTHETIC_BASES` maps a Dynamic config's `model_type` to its entry; `synthetic_base(name)` takes either the stock
`model_type` (`llava`, `qwen2_5_vl`) or the Dynamic one.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..training.data import IGNORE_INDEX, collate
from . import IMAGE_SIZE, PATCH
from .task import IMAGE_TOKEN, build_tokenizer, sample_conversation, vicuna_prompt

__all__ = ["SYNTHETIC_BASES", "SyntheticLlava", "SyntheticQwen2_5_VL", "synthetic_base"]

TOKENS_PER_IMAGE = (IMAGE_SIZE // PATCH) ** 2  # 64 on both bases

# the predictors of both demo models: the original's shapes narrowed with the hidden-128 model
PREDICTOR = dict(predictor_d_model=32, predictor_nhead=2, predictor_dim_feedforward=64, predictor_num_layers=1)
BUDGETS = dict(sparse_layer=2, vision_keep_rate=0.2, output_text_keep_rate=0.5, output_text_len_for_training=50)


def _vocab_size(tokenizer: Any) -> int:
    return int(math.ceil(len(tokenizer) / 64) * 64)


class SyntheticLlava:
    """LLaVA-1.5 (the embedded demo model): a 4-layer, hidden-128 Llama and a 4-layer CLIP tower."""

    stock_model_type = "llava"
    model_type = "dynamic_llava"
    image_placeholder = IMAGE_TOKEN
    vision_batch_size = 32  # images per step of the vision phase
    about = """A small Dynamic-LLaVA trained from scratch by `dynamic-llava train-synthetic` on the
package's synthetic shapes task: 64 x 64 images holding one shape (circle, square, triangle or cross) in one of
eight colours, in one cell of a 3 x 3 grid on a textured background; it answers questions about the shape's colour,
kind and position with a 60-word answer. A 4-layer, hidden-128 LLaMA language model, a 4-layer CLIP tower and the
two predictors (1.3 M parameters). It knows nothing else: it is a demonstration of the method, not a general
model."""

    def processor(self) -> Any:
        from ..processor import DynamicLlavaImageProcessor, DynamicLlavaProcessor

        image_processor = DynamicLlavaImageProcessor(
            size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
        )
        return DynamicLlavaProcessor(image_processor=image_processor, tokenizer=build_tokenizer(), patch_size=PATCH)

    def config(self, tokenizer: Any, vision_hidden: int = 128, vision_layers: int = 4) -> Any:
        from ..configuration_dynamic_llava import DynamicLlavaConfig

        return DynamicLlavaConfig(
            text_config=dict(
                model_type="llama",
                hidden_size=128,
                intermediate_size=256,
                num_hidden_layers=4,
                num_attention_heads=4,
                num_key_value_heads=4,
                vocab_size=_vocab_size(tokenizer),
                max_position_embeddings=512,
                pad_token_id=tokenizer.pad_token_id,
                bos_token_id=1,
                eos_token_id=2,
            ),
            vision_config=dict(
                model_type="clip_vision_model",
                hidden_size=vision_hidden,
                intermediate_size=2 * vision_hidden,
                num_hidden_layers=vision_layers,
                num_attention_heads=4,
                image_size=IMAGE_SIZE,
                patch_size=PATCH,
                projection_dim=vision_hidden,
            ),
            vision_feature_layer=-1,
            image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
            image_seq_length=TOKENS_PER_IMAGE,
            pad_token_id=tokenizer.pad_token_id,
            **BUDGETS,
            **PREDICTOR,
        )

    def model_class(self) -> Any:
        from ..modeling_dynamic_llava import DynamicLlavaForConditionalGeneration

        return DynamicLlavaForConditionalGeneration

    def encode(self, sample: dict[str, Any], processor: Any) -> dict[str, torch.Tensor]:
        """A training item: vicuna_v1 ids with labels on the answer, and the image's pixel values `[3, 64, 64]`."""
        from ..training.data import encode_conversation

        ids, labels = encode_conversation(processor.tokenizer, sample_conversation(sample), TOKENS_PER_IMAGE)
        pixels = processor.image_processor(sample["image"], return_tensors="pt")["pixel_values"][0]
        return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "pixel_values": pixels}

    def collate(self, items: list[dict[str, torch.Tensor]], pad_token_id: int) -> dict[str, torch.Tensor]:
        return collate(items, pad_token_id=pad_token_id)

    def vision_tower(self, model: Any) -> torch.nn.Module:
        return model.model.vision_tower

    def feature_size(self, model: Any) -> int:
        return model.config.vision_config.hidden_size

    def image_features(self, model: Any, processor: Any, images: list[Any]) -> torch.Tensor:
        """`[images, 64, vision hidden]`: the tower's features the projector reads (class token left out)."""
        pixels = processor.image_processor(images, return_tensors="pt")["pixel_values"]
        hidden = model.model.vision_tower(pixel_values=pixels, output_hidden_states=True).hidden_states
        return hidden[model.config.vision_feature_layer][:, 1:]


class SyntheticQwen2_5_VL:
    """Qwen2.5-VL: a 4-layer, hidden-128 Qwen2 language model (M-RoPE sections [4, 6, 6] of head_dim 32) and a
    2-layer Qwen vision tower (hidden 128, 4-pixel patches, 2 x 2 merge, temporal patch 2; block 0 attends within
    windows of 4 x 4 merged tokens, as the released models' 112-pixel windows, block 1 over the whole image), the
    image processor fixed at 64 x 64 pixels."""

    stock_model_type = "qwen2_5_vl"
    model_type = "dynamic_qwen2_5_vl"
    image_placeholder = "<|vision_start|><|image_pad|><|vision_end|>"
    extra_tokens = ("<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>")
    patch, merge, temporal = PATCH // 2, 2, 2
    vision_batch_size = 16  # (256 patches an image: a step of 32 takes a second on 2 CPU cores)
    about = """A small Dynamic-LLaVA on the Qwen2.5-VL architecture (`Qwen2_5_VLForConditionalGeneration`'s
classes: Qwen's windowed vision tower with 2 x 2 patch merging, a Qwen2 language model with M-RoPE), trained from
scratch by `dynamic-llava train-synthetic --base qwen2_5_vl` on the package's synthetic shapes task: 64 x 64 images
holding one shape (circle, square, triangle or cross) in one of eight colours, in one cell of a 3 x 3 grid on a
textured background, 64 image tokens each; it answers questions about the shape's colour, kind and position with a
60-word answer, in the synthetic task's vicuna_v1 prompt with Qwen's image placeholder. A 4-layer, hidden-128
language model, a 2-layer vision tower and the two predictors (1.4 M parameters). It knows nothing else: it is a
demonstration of the method on this base, not a general model."""

    def processor(self) -> Any:
        from ..processor.processing_dynamic_qwen2_5_vl import DynamicQwen2_5_VLProcessor

        try:  # the PIL image processor (5.x after 5.0 names it; 4.57 and 5.0's default class is the PIL one)
            from transformers import Qwen2VLImageProcessorPil as ImageProcessor
        except ImportError:
            from transformers import Qwen2VLImageProcessor as ImageProcessor
        pixels = IMAGE_SIZE * IMAGE_SIZE
        image_processor = ImageProcessor(
            patch_size=self.patch,
            merge_size=self.merge,
            temporal_patch_size=self.temporal,
            min_pixels=pixels,
            max_pixels=pixels,
            size={"shortest_edge": pixels, "longest_edge": pixels},
        )
        tokenizer = build_tokenizer(extra_special_tokens=self.extra_tokens)
        template = self.chat_template()
        return DynamicQwen2_5_VLProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=template)

    def chat_template(self) -> str:
        """The LLaVA demo's vicuna_v1 template with this base's image placeholder."""
        from ..processor.processing_dynamic_llava import DEFAULT_CHAT_TEMPLATE

        return DEFAULT_CHAT_TEMPLATE.replace("'<image>\\n'", f"'{self.image_placeholder}\\n'")

    def config(self, tokenizer: Any) -> Any:
        from ..configuration_dynamic_qwen2_5_vl import DynamicQwen2_5_VLConfig

        ids = {name: tokenizer.convert_tokens_to_ids(name) for name in self.extra_tokens}
        return DynamicQwen2_5_VLConfig(
            text_config=dict(
                vocab_size=_vocab_size(tokenizer),
                hidden_size=128,
                intermediate_size=256,
                num_hidden_layers=4,
                num_attention_heads=4,
                num_key_value_heads=4,
                max_position_embeddings=512,
                rope_scaling={"type": "mrope", "mrope_section": [4, 6, 6]},
                rope_theta=10000.0,
                bos_token_id=1,
                eos_token_id=2,
                pad_token_id=tokenizer.pad_token_id,
                tie_word_embeddings=False,
            ),
            vision_config=dict(
                depth=2,
                hidden_size=128,
                intermediate_size=256,
                num_heads=4,
                in_channels=3,
                patch_size=self.patch,
                spatial_merge_size=self.merge,
                temporal_patch_size=self.temporal,
                window_size=32,  # 4 x 4 merged tokens per window: block 0 sees a quarter of the image
                fullatt_block_indexes=[1],
                out_hidden_size=128,
            ),
            image_token_id=ids["<|image_pad|>"],
            video_token_id=ids["<|video_pad|>"],
            vision_start_token_id=ids["<|vision_start|>"],
            vision_end_token_id=ids["<|vision_end|>"],
            tie_word_embeddings=False,
            pad_token_id=tokenizer.pad_token_id,
            **BUDGETS,
            **PREDICTOR,
        )

    def model_class(self) -> Any:
        from ..modeling_dynamic_qwen2_5_vl import DynamicQwen2_5_VLForConditionalGeneration

        return DynamicQwen2_5_VLForConditionalGeneration

    def encode(self, sample: dict[str, Any], processor: Any) -> dict[str, torch.Tensor]:
        """A training item: the processor's ids of the answered prompt (labels on the answer and its `</s>`), the
        image's patches `[256, 96]` and its grid `[1, 3]`."""
        prompt = vicuna_prompt(sample["question"], image=self.image_placeholder)
        full = vicuna_prompt(sample["question"], sample["answer_text"], image=self.image_placeholder)
        encoded = processor(images=[sample["image"]], text=[full], return_tensors="pt")
        answer_from = len(processor(images=[sample["image"]], text=[prompt])["input_ids"][0])
        ids = encoded["input_ids"][0]
        labels = ids.clone()
        labels[:answer_from] = IGNORE_INDEX
        return {
            "input_ids": ids,
            "labels": labels,
            "pixel_values": encoded["pixel_values"],
            "image_grid_thw": encoded["image_grid_thw"],
        }

    def collate(self, items: list[dict[str, torch.Tensor]], pad_token_id: int) -> dict[str, torch.Tensor]:
        """Right-padded ids as `training.data.collate`; patches and grids concatenated in row order."""
        batch = collate([{k: item[k] for k in ("input_ids", "labels")} for item in items], pad_token_id=pad_token_id)
        batch["pixel_values"] = torch.cat([item["pixel_values"] for item in items])
        batch["image_grid_thw"] = torch.cat([item["image_grid_thw"] for item in items])
        return batch

    def vision_tower(self, model: Any) -> torch.nn.Module:
        return model.model.visual

    def feature_size(self, model: Any) -> int:
        return model.config.vision_config.out_hidden_size

    def image_features(self, model: Any, processor: Any, images: list[Any]) -> torch.Tensor:
        """`[images, 64, 128]`: the merged tokens the language model reads (the merger is Qwen's projector)."""
        from ..transformers_compat import image_features_list

        encoded = processor.image_processor(images, return_tensors="pt")
        output = model.model.get_image_features(encoded["pixel_values"], encoded["image_grid_thw"])
        return torch.stack(image_features_list(output))


SYNTHETIC_BASES: dict[str, Any] = {base.model_type: base for base in (SyntheticLlava(), SyntheticQwen2_5_VL())}


def synthetic_base(name: str) -> Any:
    """The entry of a stock (`llava`, `qwen2_5_vl`) or Dynamic `model_type`; a clear error for any other."""
    for base in SYNTHETIC_BASES.values():
        if name in (base.stock_model_type, base.model_type):
            return base
    known = ", ".join(base.stock_model_type for base in SYNTHETIC_BASES.values())
    raise ValueError(f"the synthetic task is trained on the bases {known}, not {name!r}")
