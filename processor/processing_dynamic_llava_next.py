"""Processor of Dynamic LLaVA-NeXT: the stock `LlavaNextProcessor`, with clear errors for bad input.

The stock processor already works without torchvision on both transformers majors: on 4.57 and 5.0 its image
processor is the slow (PIL / NumPy) `LlavaNextImageProcessor`, and on 5.25 `AutoImageProcessor` falls back from the
torchvision-backed `LlavaNextImageProcessor` to `LlavaNextImageProcessorPil` when torchvision is missing. Where
torchvision is installed nothing changes. `DynamicLlavaNextProcessor` keeps the stock code for everything it
returns: for a prompt with one `<image>` per image,

- ``input_ids`` / ``attention_mask`` ``[batch, seq]``: each `<image>` expanded to the image's feature count (the base
  tile's patches, the unpadded high-resolution patches of the best `image_grid_pinpoints` resolution, one newline
  token per row of those patches; minus the CLS with `vision_feature_select_strategy="default"`);
- ``pixel_values`` ``[images, tiles, 3, crop, crop]`` (float32; tiles = 1 base tile + the high-resolution tiles,
  padded with zero tiles to the largest count of the batch);
- ``image_sizes`` ``[images, 2]`` (the original ``(height, width)``, int64).

It adds, in front of the stock call: videos and audio refused, image paths loaded as transformers' `load_image` does
with a clear error for a missing or unreadable file, and a clear error when the number of `<image>` placeholders and
of images differ (the stock processor either fails deep inside or silently leaves images unused). Plain-string chat
message content is accepted on every version.

This file is also a Hub remote-code module: sibling imports stay flat, nothing heavy runs at import, and nothing
imports torchvision.
"""

from transformers import LlavaNextProcessor

# transformers 4.57 copies, from a local folder, only the siblings that the auto_map module itself imports: import
# here every sibling that the modules below need too
from .image_processing_dynamic_llava import load_image_file  # noqa: F401  (used by processing_dynamic_common)
from .processing_dynamic_common import (
    as_text_batch,
    check_image_placeholders,
    images_only_kwargs,
    load_images,
    normalize_conversation,
    refuse_unsupported_media,
)

MODEL_NAME = "Dynamic LLaVA-NeXT"


class DynamicLlavaNextProcessor(LlavaNextProcessor):
    r"""
    The stock LLaVA-NeXT processor (anyres tiling, `<image>` expansion with the newline tokens) with clear input
    errors. Arguments are the stock ones: `image_processor` (`LlavaNextImageProcessor`, or
    `LlavaNextImageProcessorPil` where transformers has it), `tokenizer`, `patch_size`,
    `vision_feature_select_strategy`, `chat_template`, `image_token` (`"<image>"`) and `num_additional_image_tokens`
    (1 for a CLIP tower's CLS).
    """

    def __call__(self, images=None, text=None, videos=None, audio=None, **kwargs):
        """Tokenize `text` (str or list of str, each `<image>` expanded) and preprocess `images`.

        `images`: a PIL image, numpy array / torch tensor, path or URL, a list of them, or one list per prompt; one
        image per `<image>` in the text, in order. Returns `input_ids`, `attention_mask`, `pixel_values`
        `[images, tiles, 3, H, W]` and `image_sizes` `[images, 2]`.
        """
        refuse_unsupported_media(MODEL_NAME, videos=videos, audio=audio, audios=kwargs.pop("audios", None))
        texts = as_text_batch(text)
        flat_images, per_row = load_images(images, None if texts is None else len(texts), kwargs.pop("timeout", None))
        if texts is None and not flat_images:
            raise ValueError("Nothing to process: pass `text` (a prompt with one '<image>' per image) and `images`.")
        if texts is None:  # images only: the image processor's output
            return self.image_processor(flat_images, **images_only_kwargs(kwargs))
        check_image_placeholders(texts, self.image_token, len(flat_images), per_row)
        return super().__call__(images=flat_images or None, text=texts, **kwargs)

    def apply_chat_template(self, conversation, chat_template=None, **kwargs):
        """The stock `apply_chat_template`, also accepting plain-string message content on every version (the input
        is not modified)."""
        return super().apply_chat_template(normalize_conversation(conversation), chat_template=chat_template, **kwargs)


__all__ = ["DynamicLlavaNextProcessor"]
