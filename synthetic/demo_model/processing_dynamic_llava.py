"""Processor of Dynamic-LLaVA: the stock `LlavaProcessor` plus the original `vicuna_v1` chat template.

`DynamicLlavaProcessor` reuses `LlavaProcessor` (each `<image>` in the text is expanded to the number of image
tokens given `patch_size`, `num_additional_image_tokens` and `vision_feature_select_strategy`; with the defaults
336 / 14 / 1 / "default" that is 576) and adds:

- a default chat template that renders the original LLaVA-1.5 `conv_vicuna_v1` prompt (`SeparatorStyle.TWO`,
  `sep=" "`, `sep2="</s>"`) exactly, e.g. for one turn::

      A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful,
      detailed, and polite answers to the user's questions. USER: <image>\\nWhat is this? ASSISTANT:

  (one line; `\\n` is a real newline), and for two turns
  ``... USER: <image>\\nWhat is this? ASSISTANT: A cat.</s>USER: And its colour? ASSISTANT:``;
- loading of image paths with clear errors, and clear errors for an `<image>` / image count mismatch and for an
  empty prompt;
- no `token_type_ids` (the tokenizer is called so that it does not return them).

This file is also a Hub remote-code module: sibling imports must stay flat, and nothing heavy runs at import.
"""

from typing import Any

from transformers import LlavaProcessor
from transformers.feature_extraction_utils import BatchFeature

from .image_processing_dynamic_llava import flatten_images, load_image_input

VICUNA_V1_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)

# The original `conv_vicuna_v1.get_prompt()` (SeparatorStyle.TWO): system + sep, then for each message
# role + ": " + message + (sep after USER, sep2 after ASSISTANT); an open assistant turn is "ASSISTANT:".
# sep = " ", sep2 = "</s>". Images are rendered first in a user turn ("<image>\n" each), as the original eval code
# does (`DEFAULT_IMAGE_TOKEN + "\n" + question`); several text items are joined with "\n". A leading "system"
# message replaces the default system prompt.
DEFAULT_CHAT_TEMPLATE = (
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- if messages[0]['content'] is string -%}"
    "{%- set system_message = messages[0]['content'] -%}"
    "{%- else -%}"
    "{%- set system_message = messages[0]['content'] | selectattr('type', 'equalto', 'text') "
    "| map(attribute='text') | join('\\n') -%}"
    "{%- endif -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    '{%- set system_message = "' + VICUNA_V1_SYSTEM + '" -%}'
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{{- system_message + ' ' -}}"
    "{%- for message in loop_messages -%}"
    "{%- if message['role'] == 'user' -%}"
    "{{- 'USER: ' -}}"
    "{%- if message['content'] is string -%}"
    "{{- message['content'] -}}"
    "{%- else -%}"
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{- '<image>\\n' -}}{%- endif -%}"
    "{%- endfor -%}"
    "{{- message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('\\n') -}}"
    "{%- endif -%}"
    "{{- ' ' -}}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{- 'ASSISTANT: ' -}}"
    "{%- generation -%}"
    "{%- if message['content'] is string -%}"
    "{{- message['content'] -}}"
    "{%- else -%}"
    "{{- message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('\\n') -}}"
    "{%- endif -%}"
    "{{- '</s>' -}}"
    "{%- endgeneration -%}"
    "{%- else -%}"
    "{{- raise_exception('Unsupported message role ' + message['role'] + ': use \"user\" and \"assistant\" "
    '(and an optional first "system" message).\') -}}'
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}"
)


def _normalize_message(message: Any) -> Any:
    """Copy a chat message, turning plain-string content into `[{"type": "text", "text": ...}]`."""
    if isinstance(message, dict) and isinstance(message.get("content"), str):
        return {**message, "content": [{"type": "text", "text": message["content"]}]}
    if isinstance(message, dict) and isinstance(message.get("content"), (list, tuple)):
        return {**message, "content": [dict(item) if isinstance(item, dict) else item for item in message["content"]]}
    return message


def _is_empty(value: Any) -> bool:
    """An empty list/tuple (possibly nested: one empty list per row)."""
    return isinstance(value, (list, tuple)) and all(_is_empty(item) for item in value)


class DynamicLlavaProcessor(LlavaProcessor):
    r"""
    Dynamic-LLaVA processor: a [`DynamicLlavaImageProcessor`] (LLaVA-1.5 pad-to-square + CLIP) and a LLaMA
    tokenizer, with the original `vicuna_v1` prompt format as the default chat template.

    Args:
        image_processor ([`DynamicLlavaImageProcessor`]):
            The image processor.
        tokenizer ([`PreTrainedTokenizerBase`]):
            The tokenizer; it must know `image_token` (a single token). `token_type_ids` is removed from its
            `model_input_names`.
        patch_size (`int`, *optional*, defaults to 14):
            Patch size of the vision tower.
        vision_feature_select_strategy (`str`, *optional*, defaults to `"default"`):
            `"default"` drops the CLS token (LLaVA-1.5), `"full"` keeps it.
        chat_template (`str`, *optional*):
            Jinja chat template; defaults to `DEFAULT_CHAT_TEMPLATE` (original `vicuna_v1` format).
        image_token (`str`, *optional*, defaults to `"<image>"`):
            The image placeholder in the text.
        num_additional_image_tokens (`int`, *optional*, defaults to 1):
            Tokens the vision tower adds to the patches (CLIP's CLS: 1).
    """

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        patch_size=14,
        vision_feature_select_strategy="default",
        chat_template=None,
        image_token="<image>",
        num_additional_image_tokens=1,
        **kwargs,
    ):
        if chat_template is None:
            chat_template = DEFAULT_CHAT_TEMPLATE
        names = getattr(tokenizer, "model_input_names", None)
        if names is not None and "token_type_ids" in names:
            tokenizer.model_input_names = [name for name in names if name != "token_type_ids"]
        super().__init__(
            image_processor=image_processor,
            tokenizer=tokenizer,
            patch_size=patch_size,
            vision_feature_select_strategy=vision_feature_select_strategy,
            chat_template=chat_template,
            image_token=image_token,
            num_additional_image_tokens=num_additional_image_tokens,
            **kwargs,
        )

    @property
    def model_input_names(self):
        names = list(getattr(self.tokenizer, "model_input_names", ["input_ids", "attention_mask"]))
        names += list(getattr(self.image_processor, "model_input_names", ["pixel_values"]))
        return [name for name in dict.fromkeys(names) if name != "token_type_ids"]

    def num_image_tokens(self, height: int | None = None, width: int | None = None) -> int:
        """Number of `image_token`s one image is expanded to (576 for 336 / 14 / CLS dropped)."""
        if height is None or width is None:
            crop = self.image_processor.crop_size
            height, width = crop["height"], crop["width"]
        n = (height // self.patch_size) * (width // self.patch_size) + self.num_additional_image_tokens
        if self.vision_feature_select_strategy == "default":
            n -= 1
        return n

    def __call__(self, images=None, text=None, audio=None, videos=None, **kwargs) -> BatchFeature:
        """Tokenize `text` (str or list of str, each `<image>` expanded) and preprocess `images`.

        `images`: a PIL image, numpy array / torch tensor, path or URL, or a (nested) list of them; one image per
        `<image>` in the text, in order. Returns `input_ids`, `attention_mask` and `pixel_values`.
        """
        # Callers built for audio/video models pass empty media lists (lmms-eval's generic model calls
        # `processor(..., videos=[], audios=[])`, and transformers 5.x rejects the old `audios` key): drop empty
        # ones, refuse real ones (this model reads images and text only).
        media = {"audio": audio, "videos": videos, "audios": kwargs.pop("audios", None)}
        given = [name for name, value in media.items() if value is not None and not _is_empty(value)]
        if given:
            raise ValueError(
                f"Dynamic-LLaVA reads images and text only; got {', '.join(given)}. Pass `images` and `text`."
            )
        if images is None and text is None:
            raise ValueError("Nothing to process: pass `text` (a prompt with one '<image>' per image) and `images`.")

        flat_images = flatten_images(images) if images is not None else []
        timeout = kwargs.pop("timeout", None)
        flat_images = [load_image_input(image, timeout=timeout) for image in flat_images]

        if "do_pad_to_square" in kwargs:
            # not a stock images kwarg: route it explicitly (transformers 4.x would drop it with a warning)
            images_kwargs = dict(kwargs.get("images_kwargs") or {})
            images_kwargs.setdefault("do_pad_to_square", kwargs.pop("do_pad_to_square"))
            kwargs["images_kwargs"] = images_kwargs

        if text is None:
            # images only: just the image processor output
            image_kwargs = dict(kwargs.pop("images_kwargs", None) or {})
            for key in ("return_tensors", "do_pad_to_square"):
                if key in kwargs:
                    image_kwargs.setdefault(key, kwargs.pop(key))
            for key, value in kwargs.items():
                if key not in ("padding", "truncation", "max_length", "text_kwargs", "common_kwargs"):
                    image_kwargs.setdefault(key, value)
            return self.image_processor(flat_images, **image_kwargs)

        if isinstance(text, str):
            texts = [text]
        elif isinstance(text, (list, tuple)) and all(isinstance(t, str) for t in text):
            texts = list(text)
        else:
            raise ValueError(
                f"`text` must be a string or a list of strings, got {type(text).__name__}. For chat messages use "
                "`processor.apply_chat_template(messages, ...)`."
            )
        if not texts:
            raise ValueError("`text` is an empty list: pass at least one prompt.")
        for index, sample in enumerate(texts):
            if not sample.strip():
                raise ValueError(
                    f"Prompt {index} is empty (or only whitespace). Pass a non-empty prompt, e.g. built with "
                    "`processor.apply_chat_template(messages, add_generation_prompt=True)`."
                )

        n_tokens = sum(sample.count(self.image_token) for sample in texts)
        if n_tokens != len(flat_images):
            raise ValueError(
                f"The text has {n_tokens} '{self.image_token}' placeholder(s) but {len(flat_images)} image(s) were "
                f"given. Put exactly one '{self.image_token}' in the text for each image (in order), or pass as many "
                "images as placeholders."
            )

        if "token_type_ids" not in self.model_input_names:
            kwargs.setdefault("return_token_type_ids", False)
        return super().__call__(images=flat_images or None, text=texts, **kwargs)

    def apply_chat_template(self, conversation, chat_template=None, **kwargs):
        """`ProcessorMixin.apply_chat_template`, also accepting plain-string message content.

        Messages are `{"role": "user" | "assistant" | "system", "content": str | list}` with content items
        `{"type": "text", "text": ...}` and `{"type": "image", "image" | "url" | "path": ...}`. The input is not
        modified.
        """
        if isinstance(conversation, (list, tuple)) and conversation:
            if isinstance(conversation[0], (list, tuple)):
                conversation = [[_normalize_message(m) for m in conv] for conv in conversation]
            else:
                conversation = [_normalize_message(m) for m in conversation]
        return super().apply_chat_template(conversation, chat_template=chat_template, **kwargs)


__all__ = ["DynamicLlavaProcessor", "DEFAULT_CHAT_TEMPLATE", "VICUNA_V1_SYSTEM"]
