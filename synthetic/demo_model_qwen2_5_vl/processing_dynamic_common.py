"""Input checks shared by the processors of the Dynamic LLaVA-NeXT and Dynamic Qwen2.5-VL folders.

The stock processors of those bases are reused as they are; these helpers only run in front of them so that bad
input is a clear one-line error instead of a silent wrong answer or a deep traceback:

- videos and audio are refused (the Dynamic models read images and text only); empty media lists, which generic
  callers pass, are dropped;
- image references (paths, `os.PathLike`, http(s) / data URLs, base64) are loaded the way transformers'
  `load_image` loads them (EXIF orientation applied, RGB), with a clear error when a file is missing or unreadable;
- the number of image placeholders in the text must equal the number of images (per row when the images are given
  as one list per prompt, in total otherwise);
- chat messages with plain-string content are accepted by `apply_chat_template` on every transformers version.

This file is also a Hub remote-code module: sibling imports stay flat (`from .x import`), nothing heavy runs at
import, and nothing imports torchvision.
"""

import os
from typing import Any

from .image_processing_dynamic_llava import flatten_images, is_url, load_image_file

MEDIA_HINT = "Pass `images` (PIL images, arrays, paths or URLs) and `text` only."


def is_empty_media(value: Any) -> bool:
    """None, or an empty list/tuple (possibly nested: one empty list per row)."""
    if value is None:
        return True
    return isinstance(value, (list, tuple)) and all(is_empty_media(item) for item in value)


def refuse_unsupported_media(model_name: str, **media: Any) -> None:
    """Raise a `ValueError` naming every non-empty media argument in `media` (e.g. `videos=..., audio=...`)."""
    given = [name for name, value in media.items() if not is_empty_media(value)]
    if given:
        raise ValueError(
            f"{model_name} reads images and text only; got {', '.join(given)} (video frames and audio are not "
            f"supported). {MEDIA_HINT}"
        )


def as_text_batch(text: Any) -> list[str] | None:
    """`text` as a list of prompts (a str becomes a one-item list); None stays None."""
    if text is None:
        return None
    if isinstance(text, str):
        return [text]
    if isinstance(text, (list, tuple)) and all(isinstance(sample, str) for sample in text):
        if not text:
            raise ValueError("`text` is an empty list: pass at least one prompt.")
        return list(text)
    raise ValueError(
        f"`text` must be a string or a list of strings, got {type(text).__name__}. For chat messages use "
        "`processor.apply_chat_template(messages, ...)`."
    )


def refuse_placeholder(texts: list[str] | None, token: str, what: str) -> None:
    """Raise when a prompt holds `token` (a placeholder of an input kind the model does not read)."""
    if not texts or not token:
        return
    count = sum(sample.count(token) for sample in texts)
    if count:
        raise ValueError(
            f"The text has {count} '{token}' placeholder(s), but {what} are not supported by this model. Remove "
            f"them (a chat message with a {{'type': 'video'}} item renders one). {MEDIA_HINT}"
        )


def load_image_reference(image: Any, timeout: float | None = None) -> Any:
    """Load a str / PathLike image reference as transformers' `load_image` does; other inputs are returned as they
    are.

    Local files: opened with PIL (a clear error when missing or unreadable), EXIF orientation applied, converted to
    RGB. http(s) URLs, ``data:image/...`` URLs and base64 strings go to transformers' `load_image`.
    """
    if not isinstance(image, (str, os.PathLike)):
        return image
    if isinstance(image, os.PathLike) or os.path.isfile(image):
        from PIL import ImageOps

        return ImageOps.exif_transpose(load_image_file(image)).convert("RGB")
    from transformers.image_utils import load_image

    if is_url(image) or image.startswith("data:image/"):
        try:
            return load_image(image, timeout=timeout)
        except Exception as error:
            raise ValueError(
                f"Could not load the image from {image[:200]!r} ({type(error).__name__}: {error})."
            ) from error
    try:  # not a file: transformers reads such a string as base64
        return load_image(image, timeout=timeout)
    except Exception:
        raise ValueError(
            f"Image file not found: {image[:200]!r} (nor is it a base64-encoded image). Fix the path, or pass an "
            "http(s) URL, a data:image URL or a PIL.Image.Image."
        ) from None


def load_images(images: Any, n_rows: int | None, timeout: float | None = None) -> tuple[list, list[int] | None]:
    """Flatten and load `images`.

    Returns the flat list of images in order, and the number of images of each row when `images` was given as one
    list per prompt (a list of `n_rows` lists), else None.
    """
    if is_empty_media(images):
        return [], None
    per_row = None
    if (
        n_rows is not None
        and isinstance(images, (list, tuple))
        and len(images) == n_rows
        and all(isinstance(row, (list, tuple)) for row in images)
    ):
        per_row = [len(flatten_images(row)) for row in images]
    flat = [load_image_reference(image, timeout=timeout) for image in flatten_images(images)]
    return flat, per_row


def check_image_placeholders(texts: list[str], image_token: str, n_images: int, per_row: list[int] | None) -> None:
    """One `image_token` in the text for each image, in order: raise a `ValueError` on any mismatch."""
    counts = [sample.count(image_token) for sample in texts]
    if sum(counts) != n_images:
        raise ValueError(
            f"The text has {sum(counts)} '{image_token}' placeholder(s) but {n_images} image(s) were given. Put "
            f"exactly one '{image_token}' in the text for each image (in order), or pass as many images as "
            "placeholders."
        )
    if per_row is not None and counts != per_row:
        raise ValueError(
            f"The prompts have {counts} '{image_token}' placeholder(s) per row but the images were given as "
            f"{per_row} per row. Give each prompt as many images as it has placeholders."
        )


TEXT_ONLY_KWARGS = (
    "padding",
    "truncation",
    "max_length",
    "add_special_tokens",
    "return_attention_mask",
    "return_token_type_ids",
    "return_mm_token_type_ids",
    "padding_side",
    "text_kwargs",
    "common_kwargs",
)


def images_only_kwargs(kwargs: dict) -> dict:
    """The image processor's kwargs of a processor call without text: `images_kwargs` merged with the flat keys that
    are not text-only (`return_tensors`, `min_pixels`, ...)."""
    merged = dict(kwargs.get("images_kwargs") or {})
    for key, value in kwargs.items():
        if key != "images_kwargs" and key not in TEXT_ONLY_KWARGS:
            merged.setdefault(key, value)
    return merged


def _normalize_message(message: Any) -> Any:
    """Copy a chat message, turning plain-string content into `[{"type": "text", "text": ...}]`."""
    if isinstance(message, dict) and isinstance(message.get("content"), str):
        return {**message, "content": [{"type": "text", "text": message["content"]}]}
    if isinstance(message, dict) and isinstance(message.get("content"), (list, tuple)):
        return {**message, "content": [dict(item) if isinstance(item, dict) else item for item in message["content"]]}
    return message


def normalize_conversation(conversation: Any) -> Any:
    """A copy of one conversation or a batch of conversations with plain-string contents made into text items.

    transformers 4.57's `apply_chat_template(tokenize=True)` iterates every message's content as a list of items;
    the copy lets string contents through on every version. The caller's messages are not modified.
    """
    if isinstance(conversation, (list, tuple)) and conversation:
        if isinstance(conversation[0], (list, tuple)):
            return [[_normalize_message(m) for m in conv] for conv in conversation]
        return [_normalize_message(m) for m in conversation]
    return conversation


__all__ = [
    "as_text_batch",
    "check_image_placeholders",
    "images_only_kwargs",
    "is_empty_media",
    "load_image_reference",
    "load_images",
    "normalize_conversation",
    "refuse_placeholder",
    "refuse_unsupported_media",
]
