"""Processor of Dynamic Qwen2.5-VL: the stock `Qwen2_5_VLProcessor` for images and text, without a video processor.

The stock processor cannot be constructed without torchvision: it holds a video processor, and transformers' video
processors need torchvision. `DynamicQwen2_5_VLProcessor` keeps the stock class and its code for images and text
(`<|image_pad|>` expansion, outputs, decoding) and drops only the video processor, so it runs on a CPU-only
install. Where torchvision is installed nothing changes: the image processor is whatever `AutoImageProcessor`
gives for the folder, the same one the stock processor would use.

For a prompt with one ``<|vision_start|><|image_pad|><|vision_end|>`` per image it returns what the stock processor
returns for images:

- ``input_ids`` / ``attention_mask`` ``[batch, seq]``: each ``<|image_pad|>`` expanded to ``t * h * w / merge_size**2``
  tokens, with ``(t, h, w)`` the image's row of ``image_grid_thw``;
- ``pixel_values`` ``[sum of t * h * w over the images, channels * temporal_patch_size * patch_size**2]`` (float32;
  ``1176`` columns for 3 channels, 2, 14);
- ``image_grid_thw`` ``[images, 3]`` (int64);
- ``mm_token_type_ids`` ``[batch, seq]`` (0 text, 1 image) where the stock processor returns it by default (5.25;
  4.57 and 5.0 return it with ``return_mm_token_type_ids=True``).

On top of the stock behaviour, bad input is a clear error: a video (``videos=`` or a ``<|video_pad|>`` in the
text), a mismatch between images and ``<|image_pad|>`` placeholders, a missing or unreadable image file. The default
chat template is the stock Qwen2.5-VL-Instruct one.

This file is also a Hub remote-code module: sibling imports stay flat, nothing heavy runs at import, and nothing
imports torchvision.
"""

from typing import Any

from transformers import Qwen2_5_VLProcessor
from transformers.processing_utils import ProcessorMixin

# transformers 4.57 copies, from a local folder, only the siblings that the auto_map module itself imports: import
# here every sibling that the modules below need too
from .image_processing_dynamic_llava import load_image_file  # noqa: F401  (used by processing_dynamic_common)
from .processing_dynamic_common import (
    as_text_batch,
    check_image_placeholders,
    images_only_kwargs,
    load_images,
    normalize_conversation,
    refuse_placeholder,
    refuse_unsupported_media,
)

# The chat template of the Qwen2.5-VL-Instruct checkpoints (their chat_template.json): a default system turn, one
# `<|vision_start|><|image_pad|><|vision_end|>` per image item, `add_vision_id` numbering ("Picture 1: ").
QWEN2_5_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] "
    "== 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content "
    "%}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}"
)

MODEL_NAME = "Dynamic Qwen2.5-VL"


class DynamicQwen2_5_VLProcessor(Qwen2_5_VLProcessor):
    r"""
    The stock Qwen2.5-VL processor with an image processor and a tokenizer only (no video processor).

    Args:
        image_processor ([`Qwen2VLImageProcessor`]):
            The image processor: the PIL one (`Qwen2VLImageProcessorPil` where transformers has it, as 5.25; the
            slow `Qwen2VLImageProcessor` on 4.57 and 5.0) works without torchvision; a torchvision-backed one works
            too.
        tokenizer ([`Qwen2TokenizerFast`] / [`Qwen2Tokenizer`]):
            The tokenizer; it must know `<|image_pad|>` (or define `image_token`).
        chat_template (`str`, *optional*):
            Jinja chat template; defaults to `QWEN2_5_VL_CHAT_TEMPLATE` (the stock Qwen2.5-VL-Instruct one).
    """

    # transformers 4.57 reads the sub-processors from `attributes`; newer versions from the `__init__` signature
    attributes = ["image_processor", "tokenizer"]
    # the tokenizer class the folder's tokenizer_config.json names (4.57 would build its fixed Qwen2 classes from
    # any tokenizer.json, with a warning when the folder names another one); a Qwen checkpoint names Qwen2Tokenizer
    tokenizer_class = "AutoTokenizer"

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        if kwargs.get("video_processor") is not None:
            raise ValueError(f"{MODEL_NAME} reads images and text only: do not pass a `video_processor`.")
        kwargs.pop("video_processor", None)
        if chat_template is None:
            chat_template = QWEN2_5_VL_CHAT_TEMPLATE
        if tokenizer is None:
            raise ValueError(f"{MODEL_NAME}: a tokenizer is required.")
        # as the stock `Qwen2_5_VLProcessor.__init__` does, without its video processor
        self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
        self.video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
        self.image_token_id = getattr(tokenizer, "image_token_id", None) or tokenizer.convert_tokens_to_ids(
            self.image_token
        )
        self.video_token_id = getattr(tokenizer, "video_token_id", None) or tokenizer.convert_tokens_to_ids(
            self.video_token
        )
        if self.image_token_id is None or self.image_token_id == getattr(tokenizer, "unk_token_id", object()):
            raise ValueError(f"The tokenizer does not know the image token {self.image_token!r}: add it first.")
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template, **kwargs)

    def num_image_tokens(self, image_grid_thw: Any) -> list[int]:
        """Image tokens of each image: `t * h * w // merge_size**2` for each row of `image_grid_thw` `[images, 3]`."""
        merge = self.image_processor.merge_size**2
        return [int(t) * int(h) * int(w) // merge for t, h, w in (list(map(int, row)) for row in image_grid_thw)]

    def __call__(self, images=None, text=None, videos=None, audio=None, **kwargs):
        """Tokenize `text` (str or list of str, each `<|image_pad|>` expanded) and preprocess `images`.

        `images`: a PIL image, numpy array / torch tensor, path or URL, a list of them, or one list per prompt; one
        image per `<|image_pad|>` in the text, in order. Returns `input_ids`, `attention_mask`, `pixel_values`,
        `image_grid_thw` (and `mm_token_type_ids` where the stock processor returns it). Videos are refused.
        """
        refuse_unsupported_media(MODEL_NAME, videos=videos, audio=audio, audios=kwargs.pop("audios", None))
        texts = as_text_batch(text)
        refuse_placeholder(texts, self.video_token, "videos")
        flat_images, per_row = load_images(images, None if texts is None else len(texts), kwargs.pop("timeout", None))
        if texts is None and not flat_images:
            raise ValueError(
                "Nothing to process: pass `text` (a prompt with one '<|image_pad|>' per image) and `images`."
            )
        if texts is None:  # images only: the image processor's output
            return self.image_processor(flat_images, **images_only_kwargs(kwargs))
        check_image_placeholders(texts, self.image_token, len(flat_images), per_row)
        return super().__call__(images=flat_images or None, text=texts, **kwargs)

    def apply_chat_template(self, conversation, chat_template=None, **kwargs):
        """The stock `apply_chat_template`, also accepting plain-string message content on every version.

        Messages are `{"role": ..., "content": str | list}` with items `{"type": "text", "text": ...}` and
        `{"type": "image", "image" | "url" | "path": ...}`. The input is not modified.
        """
        return super().apply_chat_template(normalize_conversation(conversation), chat_template=chat_template, **kwargs)


__all__ = ["DynamicQwen2_5_VLProcessor", "QWEN2_5_VL_CHAT_TEMPLATE"]
