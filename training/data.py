"""LLaVA conversation data for training: the JSON format of LLaVA-1.5's mix665k, labels on the assistant answers only.

A sample: `{"id": ..., "image": "file.png", "conversations": [{"from": "human", "value": "<image>\\nQ"},
{"from": "gpt", "value": "A"}, ...]}`, for every base:

* LLaVA-1.5 (`image_seq_length` given): the vicuna_v1 prompt, as the original trains,
  `SYSTEM USER: <image>\\nQ ASSISTANT: A</s>USER: Q2 ASSISTANT: A2</s>`. Segments are tokenized one by one so the
  answer spans are known exactly; labels are -100 everywhere but on the answers and their `</s>`.
* other bases (`image_seq_length=None`, `encode_with_chat_template`): the conversation as chat messages in the
  base's own chat template (the one its processor ships), the image an image item where `<image>` stood; the
  processor expands the image into its tokens (per image: LLaVA-NeXT's tiles, Qwen2.5-VL's grid) and the labels
  cover what each assistant turn adds to the rendered text (its answer and end-of-turn tokens).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from ..processor import DynamicLlavaProcessor

from ..processor.processing_dynamic_llava import VICUNA_V1_SYSTEM

IGNORE_INDEX = -100
IMAGE = "<image>"


class DataError(ValueError):
    """A training sample that cannot be used; the message names the sample and the fix."""


class LlavaConversationDataset(torch.utils.data.Dataset):
    """
    Args:
        data: path of the JSON list, or the list itself.
        image_folder: where the samples' `image` files are.
        processor: the folder's processor (LLaVA-1.5: a `DynamicLlavaProcessor`, its tokenizer knows `<image>`).
        image_seq_length: LLaVA-1.5's tokens per image (`config.image_seq_length`); None for another base (its
            chat template and processor, `encode_with_chat_template`).
        max_length: samples longer than this are cut (labels too).
    Every sample is checked when the dataset is built: bad ones raise `DataError` naming the sample.
    """

    def __init__(
        self,
        data: str | os.PathLike | list[dict[str, Any]],
        image_folder: str | os.PathLike | None,
        processor: DynamicLlavaProcessor,
        image_seq_length: int | None,
        max_length: int = 2048,
    ) -> None:
        if isinstance(data, (str, Path)):
            path = Path(data)
            if not path.exists():
                raise DataError(f"{path} does not exist; pass the LLaVA conversation JSON (--data).")
            try:
                data = json.loads(path.read_text())
            except json.JSONDecodeError as error:
                raise DataError(f"{path} is not valid JSON: {error}") from error
        if not isinstance(data, list) or not data:
            raise DataError("the data must be a non-empty JSON list of samples")
        self.samples = data
        self.image_folder = Path(image_folder) if image_folder is not None else None
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.image_seq_length = image_seq_length
        self.max_length = max_length
        self.image_token_id = (
            self.tokenizer.convert_tokens_to_ids(IMAGE) if image_seq_length is not None else processor.image_token_id
        )
        for index, sample in enumerate(self.samples):
            self._check(index, sample)

    def _name(self, index, sample) -> str:
        ident = sample.get("id") if isinstance(sample, dict) else None
        return f"sample {index}" + (f" (id {ident!r})" if ident is not None else "")

    def _check(self, index, sample) -> None:
        name = self._name(index, sample)
        if not isinstance(sample, dict):
            raise DataError(f"{name} is not an object with 'conversations'")
        turns = sample.get("conversations")
        if not turns:
            raise DataError(f"{name} has no conversations; remove it or add a human/gpt exchange")
        for i, turn in enumerate(turns):
            expected = "human" if i % 2 == 0 else "gpt"
            if not isinstance(turn, dict) or turn.get("from") != expected or not isinstance(turn.get("value"), str):
                raise DataError(f"{name}: turn {i} must be {{'from': '{expected}', 'value': text}} (turns alternate)")
        if len(turns) % 2:
            raise DataError(f"{name} ends with a human turn; every question needs an answer")
        count = sum(turn["value"].count(IMAGE) for turn in turns)
        if "image" in sample:
            if count != 1:
                raise DataError(
                    f"{name} has an image but {count} '<image>' in its text; put one '<image>' in the first question"
                )
            if self.image_folder is None or not (self.image_folder / sample["image"]).is_file():
                raise DataError(f"{name}: image file {sample['image']!r} not found in {self.image_folder}")
        elif count:
            raise DataError(f"{name} has '<image>' in its text but no 'image' file")

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        sample = self.samples[index]
        if self.image_seq_length is None:
            return self._chat_item(index, sample)
        input_ids, labels = encode_conversation(self.tokenizer, sample["conversations"], self.image_seq_length)
        input_ids, labels = input_ids[: self.max_length], labels[: self.max_length]
        item = {"input_ids": torch.tensor(input_ids), "labels": torch.tensor(labels)}
        if "image" in sample:
            if self.image_token_id not in input_ids:
                raise DataError(f"{self._name(index, sample)}: max_length {self.max_length} cuts the image out")
            pixels = self.processor.image_processor(str(self.image_folder / sample["image"]), return_tensors="pt")
            item["pixel_values"] = pixels["pixel_values"][0]
        return item

    def _chat_item(self, index: int, sample: dict[str, Any]) -> dict[str, torch.Tensor]:
        image = str(self.image_folder / sample["image"]) if "image" in sample else None
        item = encode_with_chat_template(self.processor, sample["conversations"], image)
        if item["input_ids"].numel() > self.max_length:
            cut = item["input_ids"][: self.max_length]
            if int((cut == self.image_token_id).sum()) != int((item["input_ids"] == self.image_token_id).sum()):
                raise DataError(f"{self._name(index, sample)}: max_length {self.max_length} cuts into the image")
            item["input_ids"], item["labels"] = cut, item["labels"][: self.max_length]
        return item


def chat_messages(turns: list[dict[str, str]]) -> list[dict[str, Any]]:
    """LLaVA turns as chat messages: `human` -> user (an image item first where `<image>` stood), `gpt` -> assistant."""
    messages = []
    for turn in turns:
        text = turn["value"]
        if turn["from"] == "human":
            content = [{"type": "image"}] if IMAGE in text else []
            content.append({"type": "text", "text": text.replace(IMAGE, "").strip()})
            messages.append({"role": "user", "content": content})
        else:
            messages.append({"role": "assistant", "content": [{"type": "text", "text": text.strip()}]})
    return messages


def encode_with_chat_template(
    processor: Any, turns: list[dict[str, str]], image: Any = None
) -> dict[str, torch.Tensor]:
    """
    One training item of a base other than LLaVA-1.5: the conversation rendered by the processor's chat template,
    ids and image inputs from the processor (its own image expansion), labels on what each assistant turn adds.

    Returns `input_ids` and `labels` `[seq]` (long; -100 off the answers) and the processor's image inputs for the
    one image (Qwen2.5-VL: `pixel_values` `[patches, dim]`, `image_grid_thw` `[1, 3]`; LLaVA-NeXT: `pixel_values`
    `[1, tiles, 3, side, side]`, `image_sizes` `[1, 2]`). A template whose rendering of a shorter conversation is
    not a prefix of the longer one cannot give exact spans and is a `DataError`.
    """
    messages = chat_messages(turns)
    images = [image] if image is not None else None
    encoded_texts: dict[str, dict[str, Any]] = {}  # each rendering through the processor once

    def ids_of(text: str) -> dict[str, Any]:
        if text not in encoded_texts:
            encoded_texts[text] = processor(text=[text], images=images, return_tensors="pt")
        return encoded_texts[text]

    spans, previous = [], ""
    for end in range(2, len(messages) + 1, 2):
        prompt = processor.apply_chat_template(messages[: end - 1], add_generation_prompt=True, tokenize=False)
        answered = processor.apply_chat_template(messages[:end], tokenize=False)
        if not (prompt.startswith(previous) and answered.startswith(prompt)):
            raise DataError(
                "the chat template does not render a conversation as a prefix of its continuation, so the answer "
                "spans cannot be found: train this base with a template that appends turns (its stock one does)"
            )
        spans.append((prompt, answered))
        previous = answered
    encoded = ids_of(previous)
    input_ids = encoded["input_ids"][0]
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    for prompt, answered in spans:
        start, answered_ids = ids_of(prompt)["input_ids"].shape[1], ids_of(answered)["input_ids"][0]
        stop = answered_ids.numel()
        if not torch.equal(answered_ids, input_ids[:stop]):
            raise DataError("the tokenizer merges tokens across a turn boundary: the answer spans are not exact")
        labels[start:stop] = input_ids[start:stop]
    image_inputs = {k: v for k, v in encoded.items() if k not in ("input_ids", "attention_mask", "mm_token_type_ids")}
    return {"input_ids": input_ids, "labels": labels, **image_inputs}


def collate_chat(batch: list[dict[str, torch.Tensor]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """`collate`'s right-padded ids, with each image input concatenated over the rows' images in row order (the
    processors' batch layout; LLaVA-NeXT's tiles padded with zeros to the most tiles, as its processor pads)."""
    out = collate([{k: item[k] for k in ("input_ids", "labels")} for item in batch], pad_token_id=pad_token_id)
    for key in sorted({k for item in batch for k in item} - {"input_ids", "labels"}):
        parts = [item[key] for item in batch if key in item]
        if key == "pixel_values" and parts[0].dim() == 5:  # [images, tiles, 3, side, side]
            tiles = max(part.shape[1] for part in parts)
            parts = [torch.nn.functional.pad(p, (0, 0, 0, 0, 0, 0, 0, tiles - p.shape[1])) for p in parts]
        out[key] = torch.cat(parts)
    return out


def encode_conversation(
    tokenizer: PreTrainedTokenizerBase, turns: list[dict[str, str]], image_seq_length: int
) -> tuple[list[int], list[int]]:
    """
    vicuna_v1 token ids of a conversation and its labels (-100 but on the answers and their `</s>`); each
    `<image>` is expanded to `image_seq_length` tokens. Segments are tokenized one by one, so spans are exact.
    """
    image_id = tokenizer.convert_tokens_to_ids(IMAGE)
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    input_ids, labels = list(bos), [IGNORE_INDEX] * len(bos)
    for i in range(0, len(turns), 2):
        question = turns[i]["value"]
        if IMAGE in question:  # the original puts the image first: "<image>\nQ"
            question = IMAGE + "\n" + question.replace(IMAGE, "").strip()
        prompt = (VICUNA_V1_SYSTEM + " " if i == 0 else "") + "USER: " + question + " ASSISTANT:"
        prompt_ids = []
        for piece in tokenizer(prompt, add_special_tokens=False)["input_ids"]:
            prompt_ids.extend([piece] * image_seq_length if piece == image_id else [piece])
        answer_ids = tokenizer(" " + turns[i + 1]["value"].strip() + "</s>", add_special_tokens=False)["input_ids"]
        input_ids += prompt_ids + answer_ids
        labels += [IGNORE_INDEX] * len(prompt_ids) + answer_ids
    return input_ids, labels


def collate(batch: list[dict[str, torch.Tensor]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch (training): `input_ids`, `attention_mask`, `labels` (-100 on padding), `pixel_values`
    stacked for the rows that have an image (in row order, as the model assigns images to `<image>` spans)."""
    width = max(item["input_ids"].numel() for item in batch)
    input_ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, item in enumerate(batch):
        n = item["input_ids"].numel()
        input_ids[row, :n], labels[row, :n], attention_mask[row, :n] = item["input_ids"], item["labels"], 1
    out = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    pixels = [item["pixel_values"] for item in batch if "pixel_values" in item]
    if pixels:
        out["pixel_values"] = torch.stack(pixels)
    return out
