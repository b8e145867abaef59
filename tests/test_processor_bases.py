"""The processors of the LLaVA-NeXT and Qwen2.5-VL Dynamic folders (`DynamicLlavaNextProcessor`,
`DynamicQwen2_5_VLProcessor`): equal to the stock processors on images and text, without torchvision, through
`apply_chat_template`, the pipeline, save / load and `AutoProcessor` from a remote-code folder in a fresh process,
with clear errors for bad input. Tiny local processors (`fixtures.bases`), offline, on transformers 4.57 and 5.x
(5.0 and 5.25)."""

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoImageProcessor, AutoProcessor, LlavaNextProcessor, Qwen2_5_VLProcessor, pipeline

from dynamic_llava.hub.folder import (
    BASE_IMAGE_PROCESSOR_AUTO_MAPS,
    BASE_PROCESSOR_AUTO_MAPS,
    CODE_FILES,
    PROCESSOR_CODE_FILES,
    _normalize_processor_files,
    add_auto_map,
)
from dynamic_llava.processor import DynamicQwen2_5_VLProcessor
from dynamic_llava.processor.processing_dynamic_qwen2_5_vl import QWEN2_5_VL_CHAT_TEMPLATE

from fixtures import FIXTURES
from fixtures.bases import (
    LLAVA_NEXT_BOS_TOKEN_ID,
    LLAVA_NEXT_CASES,
    LLAVA_NEXT_GRID_PINPOINTS,
    LLAVA_NEXT_IMAGE_SIZE,
    LLAVA_NEXT_IMAGE_TOKEN_ID,
    LLAVA_NEXT_PATCH_SIZE,
    LLAVA_NEXT_VOCAB_SIZE,
    QWEN_CASES,
    QWEN_EOS_TOKEN_ID,
    QWEN_IMAGE_TOKEN_ID,
    QWEN_PAD_TOKEN_ID,
    QWEN_PATCH_DIM,
    QWEN_SPECIAL_TOKENS,
    QWEN_VIDEO_TOKEN_ID,
    QWEN_VISION_END_ID,
    QWEN_VISION_START_ID,
    QWEN_VOCAB_SIZE,
    llava_next_processor_kwargs,
    tiny_llava_next_config,
    tiny_llava_next_image_processor,
    tiny_llava_next_processor,
    tiny_llava_next_tokenizer,
    tiny_qwen2_5_vl_config,
    tiny_qwen2_5_vl_processor,
    tiny_qwen2_vl_image_processor,
    tiny_qwen_tokenizer,
)
from fixtures.processor_inputs import noise_image

REPO_ROOT = Path(__file__).resolve().parents[1]
IS_V5 = int(transformers.__version__.split(".")[0]) >= 5
# the versions with separate PIL image processor classes (5.25; not 4.57 nor 5.0, whose default classes are PIL)
HAS_PIL_CLASSES = hasattr(transformers, "LlavaNextImageProcessorPil")
HAS_TORCHVISION = importlib.util.find_spec("torchvision") is not None
QWEN_IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
QWEN_SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"


def image_hw(height: int, width: int, seed: int = 0) -> Image.Image:
    return noise_image(width, height, seed=seed)


def assert_same_value(a, b, key) -> None:
    """Tensors: same shape, dtype and values; lists / tuples: element by element; the rest: as arrays."""
    if isinstance(b, torch.Tensor):
        assert isinstance(a, torch.Tensor), key
        assert a.dtype == b.dtype and a.shape == b.shape, (key, a.dtype, b.dtype, a.shape, b.shape)
        assert torch.equal(a, b), key
    elif isinstance(b, (list, tuple)):
        assert isinstance(a, (list, tuple)) and len(a) == len(b), key
        for x, y in zip(a, b, strict=True):
            assert_same_value(x, y, key)
    else:
        assert type(a) is type(b) and np.array_equal(np.asarray(a), np.asarray(b)), key


def assert_same_batch(ours, stock) -> None:
    """Same keys, and every value equal."""
    assert sorted(ours.keys()) == sorted(stock.keys()), (sorted(ours.keys()), sorted(stock.keys()))
    for key in stock.keys():
        assert_same_value(ours[key], stock[key], key)


class StockQwen2_5_VLProcessorWithoutVideo(Qwen2_5_VLProcessor):
    """The stock `Qwen2_5_VLProcessor`, built with `video_processor=None`: only its class check of that argument is
    skipped (a video processor needs torchvision); every method that processes images and text is the stock one."""

    def check_argument_for_proper_class(self, argument_name, argument):
        if argument_name == "video_processor" and argument is None:
            return None
        return super().check_argument_for_proper_class(argument_name, argument)


def stock_qwen() -> Qwen2_5_VLProcessor:
    return StockQwen2_5_VLProcessorWithoutVideo(
        image_processor=tiny_qwen2_vl_image_processor(),
        tokenizer=tiny_qwen_tokenizer(),
        video_processor=None,
        chat_template=QWEN2_5_VL_CHAT_TEMPLATE,
    )


def stock_llava_next() -> LlavaNextProcessor:
    return LlavaNextProcessor(
        image_processor=tiny_llava_next_image_processor(),
        tokenizer=tiny_llava_next_tokenizer(),
        **llava_next_processor_kwargs(),
    )


@pytest.fixture
def qwen():
    return tiny_qwen2_5_vl_processor()


@pytest.fixture
def llava_next():
    return tiny_llava_next_processor()


def qwen_messages(images, question="What is this?"):
    return [
        {
            "role": "user",
            "content": [*({"type": "image", "image": im} for im in images), {"type": "text", "text": question}],
        }
    ]


# ----------------------------------------------------------------------------------------------------------------
# The tiny processors: token ids and counts a tiny model must match
# ----------------------------------------------------------------------------------------------------------------


def test_tiny_qwen_tokenizer_ids():
    tokenizer = tiny_qwen_tokenizer()
    assert type(tokenizer).__name__ == ("Qwen2Tokenizer" if IS_V5 else "Qwen2TokenizerFast")
    assert len(tokenizer) == QWEN_VOCAB_SIZE == 264
    assert tokenizer.convert_tokens_to_ids(QWEN_SPECIAL_TOKENS) == list(range(256, 264))
    assert tokenizer.convert_tokens_to_ids("<|image_pad|>") == QWEN_IMAGE_TOKEN_ID == 262
    assert tokenizer.convert_tokens_to_ids("<|video_pad|>") == QWEN_VIDEO_TOKEN_ID == 263
    assert (tokenizer.eos_token_id, tokenizer.pad_token_id) == (QWEN_EOS_TOKEN_ID, QWEN_PAD_TOKEN_ID) == (258, 256)
    assert tokenizer.bos_token_id is None and tokenizer.unk_token_id is None
    text = "<|im_start|>user\nHé, 12?<|image_pad|><|im_end|>"
    ids = tokenizer(text)["input_ids"]
    assert ids == [257, *"user\nHé, 12?".encode(), 262, 258]  # one token per UTF-8 byte, id = byte value
    assert tokenizer.decode(ids) == text


def test_tiny_llava_next_tokenizer_ids():
    tokenizer = tiny_llava_next_tokenizer()
    assert len(tokenizer) == LLAVA_NEXT_VOCAB_SIZE == 261
    assert tokenizer.convert_tokens_to_ids(["<unk>", "<s>", "</s>", "<image>", "<pad>"]) == [0, 1, 2, 259, 260]
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (1, 2, 260)
    ids = tokenizer("[INST] <image>\nHi")["input_ids"]
    assert ids == [
        LLAVA_NEXT_BOS_TOKEN_ID,
        *(3 + b for b in b"[INST] "),
        LLAVA_NEXT_IMAGE_TOKEN_ID,
        3 + 10,
        3 + 72,
        3 + 105,
    ]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "[INST] \nHi"


@pytest.mark.parametrize("height,width", sorted(QWEN_CASES))
def test_qwen_image_tokens_and_shapes_per_image_size(qwen, height, width):
    grid, n_tokens = QWEN_CASES[(height, width)]
    t, h, w = grid
    assert n_tokens == t * h * w // 4
    out = qwen(images=image_hw(height, width), text=QWEN_IMAGE + "What is this?", return_tensors="pt")
    assert out["image_grid_thw"].tolist() == [list(grid)] and out["image_grid_thw"].dtype == torch.int64
    assert out["pixel_values"].shape == (t * h * w, QWEN_PATCH_DIM) and out["pixel_values"].dtype == torch.float32
    ids = out["input_ids"][0]
    image_positions = (ids == QWEN_IMAGE_TOKEN_ID).nonzero().flatten()
    assert len(image_positions) == n_tokens == qwen.num_image_tokens(out["image_grid_thw"])[0]
    # one contiguous span between <|vision_start|> and <|vision_end|>
    start, end = image_positions[0].item(), image_positions[-1].item()
    assert end - start + 1 == n_tokens
    assert ids[start - 1] == QWEN_VISION_START_ID and ids[end + 1] == QWEN_VISION_END_ID
    # the stock count without processing (what serving code asks)
    assert qwen._get_num_multimodal_tokens(image_sizes=[(height, width)])["num_image_tokens"] == [n_tokens]


def llava_next_expected(height: int, width: int) -> tuple[int, int]:
    """(tiles, image tokens) of one image, written from the LLaVA-NeXT anyres description (not from transformers):
    the pinpoint that keeps the most of the image's pixels (then the least padding), cut into 56-px tiles after the
    base tile; the high-resolution patch grid loses the rows / columns that are padding; one newline per row."""
    best, best_kept, best_waste = None, -1, None
    for pin_h, pin_w in LLAVA_NEXT_GRID_PINPOINTS:
        scale = min(pin_w / width, pin_h / height)
        kept = min(int(width * scale) * int(height * scale), width * height)
        waste = pin_h * pin_w - kept
        if kept > best_kept or (kept == best_kept and waste < best_waste):
            best, best_kept, best_waste = (pin_h, pin_w), kept, waste
    per_tile = LLAVA_NEXT_IMAGE_SIZE // LLAVA_NEXT_PATCH_SIZE  # 4 patches a side
    tiles = 1 + (best[0] // LLAVA_NEXT_IMAGE_SIZE) * (best[1] // LLAVA_NEXT_IMAGE_SIZE)
    rows, cols = best[0] // LLAVA_NEXT_IMAGE_SIZE * per_tile, best[1] // LLAVA_NEXT_IMAGE_SIZE * per_tile
    if width / height > cols / rows:
        rows -= 2 * ((rows - int(round(height * cols / width, 7))) // 2)
    else:
        cols -= 2 * ((cols - int(round(width * rows / height, 7))) // 2)
    return tiles, per_tile * per_tile + rows * cols + rows


@pytest.mark.parametrize("height,width", sorted(LLAVA_NEXT_CASES))
def test_llava_next_image_tokens_and_shapes_per_image_size(llava_next, height, width):
    tiles, n_tokens = LLAVA_NEXT_CASES[(height, width)]
    assert llava_next_expected(height, width) == (tiles, n_tokens)
    out = llava_next(images=image_hw(height, width), text="[INST] <image>\nWhat is this? [/INST]", return_tensors="pt")
    assert out["pixel_values"].shape == (1, tiles, 3, 56, 56) and out["pixel_values"].dtype == torch.float32
    assert out["image_sizes"].tolist() == [[height, width]]
    ids = out["input_ids"][0]
    positions = (ids == LLAVA_NEXT_IMAGE_TOKEN_ID).nonzero().flatten()
    assert len(positions) == n_tokens and positions[-1] - positions[0] + 1 == n_tokens
    assert ids[0] == LLAVA_NEXT_BOS_TOKEN_ID
    assert llava_next._get_num_multimodal_tokens(image_sizes=[(height, width)])["num_image_tokens"] == [n_tokens]


def test_llava_next_batch_pads_tiles_and_counts_per_image(llava_next):
    sizes = [(56, 56), (90, 60), (200, 30)]
    out = llava_next(
        images=[image_hw(h, w, seed=i) for i, (h, w) in enumerate(sizes)],
        text=["[INST] <image>\nOne [/INST]", "[INST] <image><image>\nTwo [/INST]"],
        padding=True,
        return_tensors="pt",
    )
    assert out["pixel_values"].shape == (3, 5, 3, 56, 56)  # padded to the largest tile count of the batch
    assert out["pixel_values"][0, 3:].abs().sum() == 0 and out["pixel_values"][2, 3:].abs().sum() == 0
    assert out["image_sizes"].tolist() == [list(s) for s in sizes]
    counts = (out["input_ids"] == LLAVA_NEXT_IMAGE_TOKEN_ID).sum(dim=1).tolist()
    assert counts == [LLAVA_NEXT_CASES[sizes[0]][1], LLAVA_NEXT_CASES[sizes[1]][1] + LLAVA_NEXT_CASES[sizes[2]][1]]


def test_tiny_configs_match_the_processors():
    qwen_config = tiny_qwen2_5_vl_config()
    assert (qwen_config.image_token_id, qwen_config.video_token_id) == (QWEN_IMAGE_TOKEN_ID, QWEN_VIDEO_TOKEN_ID)
    assert (qwen_config.vision_start_token_id, qwen_config.vision_end_token_id) == (259, 260)
    text = qwen_config.text_config if hasattr(qwen_config, "text_config") else qwen_config
    assert text.vocab_size == QWEN_VOCAB_SIZE
    assert qwen_config.vision_config.patch_size == 14 and qwen_config.vision_config.spatial_merge_size == 2
    next_config = tiny_llava_next_config()
    assert next_config.image_token_index == LLAVA_NEXT_IMAGE_TOKEN_ID
    assert next_config.text_config.vocab_size == LLAVA_NEXT_VOCAB_SIZE
    assert next_config.image_grid_pinpoints == LLAVA_NEXT_GRID_PINPOINTS
    assert next_config.vision_config.image_size == 56 and next_config.vision_config.patch_size == 14


# ----------------------------------------------------------------------------------------------------------------
# Parity with the stock processors
# ----------------------------------------------------------------------------------------------------------------


def qwen_parity_inputs():
    a, b, c = image_hw(90, 60, 1), image_hw(40, 120, 2), image_hw(112, 112, 3)
    return {
        "one_image": dict(images=a, text=QWEN_SYSTEM + "<|im_start|>user\n" + QWEN_IMAGE + "Hi<|im_end|>\n"),
        "two_images_one_prompt": dict(images=[a, b], text=[QWEN_IMAGE + QWEN_IMAGE + "Compare."]),
        "batch_padded": dict(
            images=[a, b, c], text=[QWEN_IMAGE + "One.", "Two: " + QWEN_IMAGE + " and " + QWEN_IMAGE], padding=True
        ),
        "nested_per_prompt": dict(images=[[a], [b, c]], text=[QWEN_IMAGE, QWEN_IMAGE + QWEN_IMAGE], padding=True),
        "arrays_and_tensors": dict(
            images=[np.asarray(a), torch.from_numpy(np.asarray(b).transpose(2, 0, 1).copy())],
            text=QWEN_IMAGE + QWEN_IMAGE,
        ),
        "text_only": dict(text=["Hello there.", "Hi"], padding=True),
        "pixel_kwargs": dict(images=c, text=QWEN_IMAGE, max_pixels=56 * 56),
        "mm_token_type_ids_requested": dict(images=a, text=QWEN_IMAGE, return_mm_token_type_ids=True),
    }


@pytest.mark.parametrize("case", sorted(qwen_parity_inputs()))
def test_qwen_matches_stock_processor(qwen, case):
    kwargs = qwen_parity_inputs()[case]
    ours = qwen(**kwargs, return_tensors="pt")
    stock = stock_qwen()(**kwargs, return_tensors="pt")
    assert_same_batch(ours, stock)
    if "images" in kwargs:
        assert {"input_ids", "attention_mask", "pixel_values", "image_grid_thw"} <= set(ours.keys())
    # mm_token_type_ids exactly where the stock processor returns it: by default on 5.25, on request on 4.57 / 5.0
    stock_default = "mm_token_type_ids" in stock_qwen()(text="x")
    assert ("mm_token_type_ids" in ours) == (stock_default or case == "mm_token_type_ids_requested")


def test_qwen_matches_stock_image_processor_tokenizer_and_expansion_rule(qwen):
    """Without the stock processor: the stock image processor, the stock tokenizer and the stock rule (each
    `<|image_pad|>` becomes t*h*w / merge_size**2 copies, images in order)."""
    images = [image_hw(90, 60, 4), image_hw(300, 200, 5), image_hw(20, 20, 6)]
    texts = ["A " + QWEN_IMAGE + " B " + QWEN_IMAGE, "C " + QWEN_IMAGE]
    out = qwen(images=images, text=texts, padding=True, return_tensors="pt")
    image_processor, tokenizer = tiny_qwen2_vl_image_processor(), tiny_qwen_tokenizer()
    pixels = image_processor(images=images, return_tensors="pt")
    assert torch.equal(out["pixel_values"], pixels["pixel_values"])
    assert torch.equal(out["image_grid_thw"], pixels["image_grid_thw"])
    counts = iter([int(g.prod()) // 4 for g in pixels["image_grid_thw"]])
    expanded = [re.sub(re.escape("<|image_pad|>"), lambda _: "<|image_pad|>" * next(counts), t) for t in texts]
    tokens = tokenizer(expanded, padding=True, return_tensors="pt")
    assert torch.equal(out["input_ids"], tokens["input_ids"])
    assert torch.equal(out["attention_mask"], tokens["attention_mask"])
    assert ("mm_token_type_ids" in out) == ("mm_token_type_ids" in stock_qwen()(text="x"))
    if "mm_token_type_ids" in out:
        assert torch.equal(out["mm_token_type_ids"], (tokens["input_ids"] == QWEN_IMAGE_TOKEN_ID).long())


@pytest.mark.parametrize("batched", [False, True])
def test_qwen_chat_template_tokenized_matches_stock(qwen, batched, tmp_path):
    path = tmp_path / "photo.png"
    image_hw(60, 90, 7).save(path)
    first = qwen_messages([image_hw(90, 60, 8), image_hw(40, 120, 9)])
    second = [{"role": "user", "content": [{"type": "image", "path": str(path)}, {"type": "text", "text": "And?"}]}]
    conversation = [first, second] if batched else first
    kwargs = dict(add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")
    if batched:
        kwargs["padding"] = True
    ours = qwen.apply_chat_template(conversation, **kwargs)
    stock = stock_qwen().apply_chat_template(conversation, **kwargs)
    assert_same_batch(ours, stock)
    assert ours["image_grid_thw"].shape == ((3, 3) if batched else (2, 3))


def test_qwen_chat_template_is_the_stock_qwen2_5_vl_one(qwen):
    assert qwen.chat_template == QWEN2_5_VL_CHAT_TEMPLATE
    one = qwen_messages([None])
    one[0]["content"][0] = {"type": "image"}
    assert qwen.apply_chat_template(one, add_generation_prompt=True) == (
        QWEN_SYSTEM + "<|im_start|>user\n" + QWEN_IMAGE + "What is this?<|im_end|>\n<|im_start|>assistant\n"
    )
    turns = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Same?"}]},
        {"role": "assistant", "content": "No."},
        {"role": "user", "content": "Why?"},
    ]
    assert qwen.apply_chat_template(turns, add_generation_prompt=True, add_vision_id=True) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nPicture 1: "
        + QWEN_IMAGE
        + "Picture 2: "
        + QWEN_IMAGE
        + "Same?<|im_end|>\n<|im_start|>assistant\nNo.<|im_end|>\n<|im_start|>user\nWhy?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    # plain-string content tokenizes on every version, and the caller's messages are not modified
    text_only = [{"role": "user", "content": "Hi"}]
    out = qwen.apply_chat_template(text_only, add_generation_prompt=True, tokenize=True, return_dict=True)
    assert (
        qwen.tokenizer.decode(out["input_ids"][0])
        == QWEN_SYSTEM + "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert text_only == [{"role": "user", "content": "Hi"}]


def llava_next_parity_inputs():
    a, b, c = image_hw(90, 60, 1), image_hw(50, 120, 2), image_hw(200, 30, 3)
    return {
        "one_image": dict(images=a, text="[INST] <image>\nWhat is this? [/INST]"),
        "batch_mixed_tiles": dict(
            images=[a, b, c], text=["[INST] <image>\nOne [/INST]", "<image> and <image> [INST]"], padding=True
        ),
        "nested_per_prompt": dict(images=[[b], [a, c]], text=["<image>", "<image><image>"], padding=True),
        "arrays": dict(images=[np.asarray(b), np.asarray(c)], text="<image><image>"),
        "text_only": dict(text="[INST] Hello [/INST]"),
        "no_pad": dict(images=[a, b], text="<image><image>", do_pad=False),
    }


@pytest.mark.parametrize("case", sorted(llava_next_parity_inputs()))
def test_llava_next_matches_stock_processor(llava_next, case):
    kwargs = llava_next_parity_inputs()[case]
    if case == "no_pad":  # unpadded tiles cannot be stacked into one tensor: compare lists
        ours, stock = llava_next(**kwargs), stock_llava_next()(**kwargs)
    else:
        ours, stock = llava_next(**kwargs, return_tensors="pt"), stock_llava_next()(**kwargs, return_tensors="pt")
    assert_same_batch(ours, stock)


def test_llava_next_chat_template_tokenized_matches_stock(llava_next, tmp_path):
    path = tmp_path / "photo.png"
    image_hw(50, 120, 4).save(path)
    conversation = [
        [{"role": "user", "content": [{"type": "image", "path": str(path)}, {"type": "text", "text": "What?"}]}],
        [{"role": "user", "content": [{"type": "image", "image": image_hw(90, 60)}, {"type": "text", "text": "Hm"}]}],
    ]
    kwargs = dict(add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt", padding=True)
    ours = llava_next.apply_chat_template(conversation, **kwargs)
    assert_same_batch(ours, stock_llava_next().apply_chat_template(conversation, **kwargs))
    assert llava_next.apply_chat_template(conversation[0]) == "[INST] <image>\nWhat? [/INST]"


def test_images_only_calls_give_the_image_processor_output(qwen, llava_next):
    images = [image_hw(90, 60), image_hw(40, 120)]
    assert_same_batch(
        qwen(images=images, return_tensors="pt"), tiny_qwen2_vl_image_processor()(images, return_tensors="pt")
    )
    assert_same_batch(
        llava_next(images=images, return_tensors="pt"), tiny_llava_next_image_processor()(images, return_tensors="pt")
    )


# ----------------------------------------------------------------------------------------------------------------
# The stock models and the pipeline take these outputs
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("base", ["qwen2_5_vl", "llava_next"])
def test_stock_tiny_model_and_pipeline_run_on_the_processor_outputs(base, qwen, llava_next):
    from transformers import LlavaNextForConditionalGeneration, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(0)
    if base == "qwen2_5_vl":
        processor, model = qwen, Qwen2_5_VLForConditionalGeneration(tiny_qwen2_5_vl_config()).eval()
    else:
        processor, model = llava_next, LlavaNextForConditionalGeneration(tiny_llava_next_config()).eval()
    # the second image has as many tiles as the first (LLaVA-NeXT: 5): the stock pipeline concatenates the rows'
    # pixel_values, which fails for rows of different tile counts whatever the processor
    images = [image_hw(90, 60, 1), image_hw(112, 112, 2)]
    messages = [{"role": "user", "content": [{"type": "image", "image": images[0]}, {"type": "text", "text": "Hm?"}]}]
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape == (1, inputs["input_ids"].shape[1], model.config.get_text_config().vocab_size)
    generated = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    pipe = pipeline("image-text-to-text", model=model, processor=processor)
    out = pipe(text=messages, max_new_tokens=3, do_sample=False, return_full_text=False)
    new_tokens = generated[0, inputs["input_ids"].shape[1] :]
    assert out[0]["generated_text"] == processor.decode(new_tokens, skip_special_tokens=True)
    # batched chat, two images
    batch = [
        messages,
        [{"role": "user", "content": [{"type": "image", "image": images[1]}, {"type": "text", "text": "So?"}]}],
    ]
    assert len(pipe(text=batch, max_new_tokens=2, do_sample=False, batch_size=2)) == 2


# ----------------------------------------------------------------------------------------------------------------
# Save / load
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("base", ["qwen2_5_vl", "llava_next"])
def test_save_load_round_trip(base, qwen, llava_next, tmp_path):
    processor = qwen if base == "qwen2_5_vl" else llava_next
    cls = type(processor)
    processor.save_pretrained(str(tmp_path))
    loaded = cls.from_pretrained(str(tmp_path))
    assert type(loaded) is cls
    # the image processor the folder's files name, resolved as for the stock processor
    auto = AutoImageProcessor.from_pretrained(str(tmp_path))
    assert type(loaded.image_processor) is type(auto)
    assert loaded.chat_template == processor.chat_template
    assert not hasattr(loaded, "video_processor") or base == "llava_next"
    images = [image_hw(90, 60), image_hw(300, 200)]
    token = "<|vision_start|><|image_pad|><|vision_end|>" if base == "qwen2_5_vl" else "<image>"
    text = ["x " + token, token + " y"]
    a = loaded(images=images, text=text, padding=True, return_tensors="pt")
    b = processor(images=images, text=text, padding=True, return_tensors="pt")
    if type(auto) is type(processor.image_processor):  # without torchvision: the same PIL image processor
        assert_same_batch(a, b)
    else:  # torchvision installed: its backend, the stock default (pixels differ slightly from PIL resizing)
        assert sorted(a.keys()) == sorted(b.keys())
        assert all(a[k].shape == b[k].shape for k in b) and torch.equal(a["input_ids"], b["input_ids"])
    if base == "llava_next":
        assert (loaded.patch_size, loaded.num_additional_image_tokens) == (14, 1)
        assert loaded.vision_feature_select_strategy == "default"
        assert loaded.image_processor.image_grid_pinpoints == LLAVA_NEXT_GRID_PINPOINTS
    else:
        assert loaded.image_processor.merge_size == 2 and loaded.image_processor.patch_size == 14
        small = image_hw(300, 200)
        assert loaded(images=small, text=token)["image_grid_thw"].tolist() == [[1, 8, 6]]  # min / max pixels kept


def test_stock_llava_next_processor_needs_no_torchvision_through_auto_processor(tmp_path):
    """Finding: the stock `LlavaNextProcessor` works here on both majors, also through `AutoProcessor` from a folder
    the stock processor saved (5.25's `AutoImageProcessor` falls back to the PIL backend without torchvision)."""
    stock = stock_llava_next()
    stock.save_pretrained(str(tmp_path))
    loaded = AutoProcessor.from_pretrained(str(tmp_path))
    assert type(loaded) is LlavaNextProcessor
    kwargs = llava_next_parity_inputs()["batch_mixed_tiles"]
    if not HAS_TORCHVISION:
        assert type(loaded.image_processor).__name__ == (
            "LlavaNextImageProcessorPil" if HAS_PIL_CLASSES else "LlavaNextImageProcessor"
        )
        assert_same_batch(loaded(**kwargs, return_tensors="pt"), stock(**kwargs, return_tensors="pt"))
    else:  # the torchvision backend where transformers defaults to it: the text side is the same
        a, b = loaded(**kwargs, return_tensors="pt"), stock(**kwargs, return_tensors="pt")
        assert torch.equal(a["input_ids"], b["input_ids"]) and a["pixel_values"].shape == b["pixel_values"].shape


# ----------------------------------------------------------------------------------------------------------------
# A remote-code folder, loaded with AutoProcessor in a fresh process
# ----------------------------------------------------------------------------------------------------------------


def write_base_folder(base: str, processor, model, folder: Path) -> None:
    """What a Dynamic folder of `base` holds on the processor side (plus the stock tiny model for the pipeline):
    the processor files in the layout both majors read, the base's remote-code files and its auto_maps."""
    model.save_pretrained(str(folder))
    processor.save_pretrained(str(folder))
    _normalize_processor_files(folder)
    for name, source in PROCESSOR_CODE_FILES[base].items():
        shutil.copyfile(source, folder / name)
    for name in ("processor_config.json", "tokenizer_config.json"):
        if (folder / name).exists():
            add_auto_map(folder / name, BASE_PROCESSOR_AUTO_MAPS[base])
    add_auto_map(folder / "preprocessor_config.json", BASE_IMAGE_PROCESSOR_AUTO_MAPS[base])


@pytest.mark.slow
@pytest.mark.parametrize("base", ["qwen2_5_vl", "llava_next"])
def test_auto_processor_from_remote_code_folder_in_a_fresh_process(base, qwen, llava_next, tmp_path):
    from transformers import LlavaNextForConditionalGeneration, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(0)
    if base == "qwen2_5_vl":
        processor, model = qwen, Qwen2_5_VLForConditionalGeneration(tiny_qwen2_5_vl_config()).eval()
        token = QWEN_IMAGE
    else:
        processor, model = llava_next, LlavaNextForConditionalGeneration(tiny_llava_next_config()).eval()
        token = "<image>"
    folder = tmp_path / "repo"
    write_base_folder(base, processor, model, folder)
    assert {p.name for p in folder.iterdir()} >= set(PROCESSOR_CODE_FILES[base])
    paths = []
    for i, (h, w) in enumerate([(90, 60), (40, 120), (112, 112)]):
        paths.append(str(tmp_path / f"image{i}.png"))
        image_hw(h, w, seed=i).save(paths[-1])
    spec = {
        "images": paths,
        "texts": ["One " + token, token + " two " + token],
        "messages": [
            {"role": "user", "content": [{"type": "image", "path": paths[0]}, {"type": "text", "text": "Hm?"}]}
        ],
    }
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"))
    run = subprocess.run(
        [
            sys.executable,
            str(FIXTURES / "base_processor_load_script.py"),
            str(folder),
            str(tmp_path / "spec.json"),
            str(tmp_path / "outputs.safetensors"),
            REPO_ROOT.name,
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=str(tmp_path),
        timeout=600,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    result = json.loads(run.stdout.split("RESULT ", 1)[1])
    assert result["processor_module"].startswith("transformers_modules"), result
    assert result["processor_class"] == result["pipeline_processor_class"] == type(processor).__name__
    assert result["has_video_processor"] is False or base == "llava_next"
    if not HAS_TORCHVISION:  # where it is installed, transformers itself may import it
        assert not result["torchvision_imported"]
    assert "reads images and text only" in result["video_error"]
    # the same outputs as this process's processor (which was tested against the stock one above)
    outputs = load_file(str(tmp_path / "outputs.safetensors"))
    direct = processor(images=paths, text=spec["texts"], padding=True, return_tensors="pt")
    chat = processor.apply_chat_template(
        spec["messages"], add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    assert_same_batch({k[7:]: v for k, v in outputs.items() if k.startswith("direct.")}, direct)
    assert_same_batch({k[5:]: v for k, v in outputs.items() if k.startswith("chat.")}, chat)
    assert result["prompt"] == processor.apply_chat_template(spec["messages"], add_generation_prompt=True)
    pipe = pipeline("image-text-to-text", model=model, processor=processor)
    ours = pipe(text=spec["messages"], max_new_tokens=4, do_sample=False, return_full_text=False)
    assert result["pipeline_text"] == ours[0]["generated_text"]


def test_processor_folder_data_per_base():
    """The LLaVA entry is the LLaVA folder's processor files unchanged; every base's files exist, import only flat
    siblings of the same set, import no torchvision, and pass transformers' own remote-code import check."""
    from transformers.dynamic_module_utils import check_imports, get_imports

    assert PROCESSOR_CODE_FILES["llava"] == {
        name: CODE_FILES[name] for name in ("processing_dynamic_llava.py", "image_processing_dynamic_llava.py")
    }
    for base, files in PROCESSOR_CODE_FILES.items():
        module, cls = BASE_PROCESSOR_AUTO_MAPS[base]["AutoProcessor"].split(".")
        assert f"{module}.py" in files, base
        assert BASE_IMAGE_PROCESSOR_AUTO_MAPS[base]["AutoProcessor"] == BASE_PROCESSOR_AUTO_MAPS[base]["AutoProcessor"]
        for name, source in files.items():
            assert source.is_file() and source.name == name, source
            text = source.read_text()
            for dots, sibling in re.findall(r"^\s*from\s+(\.+)(\S*)\s+import", text, flags=re.MULTILINE):
                assert dots == "." and f"{sibling}.py" in files, (base, name, sibling)
            assert "torchvision" not in get_imports(str(source)), name
            check_imports(str(source))
        # transformers 4.57 copies from a local folder only the siblings the auto_map module imports itself
        direct = re.findall(r"^from \.(\S+) import", (files[f"{module}.py"]).read_text(), flags=re.MULTILINE)
        assert {f"{name}.py" for name in direct} | {f"{module}.py"} == set(files), (base, direct)
    assert "AutoImageProcessor" not in BASE_IMAGE_PROCESSOR_AUTO_MAPS["qwen2_5_vl"]  # the stock image processor
    assert "AutoImageProcessor" not in BASE_IMAGE_PROCESSOR_AUTO_MAPS["llava_next"]


@pytest.mark.slow
def test_processing_without_torchvision_in_a_fresh_process(tmp_path):
    """Construct, process and save both processors in a process of their own: torchvision is never imported."""
    script = (
        "import sys\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from fixtures.bases import tiny_qwen2_5_vl_processor, tiny_llava_next_processor\n"
        "from fixtures.processor_inputs import noise_image\n"
        "q, n = tiny_qwen2_5_vl_processor(), tiny_llava_next_processor()\n"
        "im = noise_image(60, 90)\n"
        "a = q(images=[im], text='<|vision_start|><|image_pad|><|vision_end|>x', return_tensors='pt')\n"
        "b = n(images=[im], text='<image> x', return_tensors='pt')\n"
        f"q.save_pretrained({str(tmp_path / 'q')!r}); n.save_pretrained({str(tmp_path / 'n')!r})\n"
        "assert a['pixel_values'].shape == (24, 1176) and b['pixel_values'].shape == (1, 5, 3, 56, 56)\n"
        "print('TORCHVISION', 'torchvision' in sys.modules)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    if not HAS_TORCHVISION:  # where it is installed, transformers itself may import it
        assert "TORCHVISION False" in run.stdout


# ----------------------------------------------------------------------------------------------------------------
# Where torchvision is installed: the stock behaviour
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.skipif(not HAS_TORCHVISION, reason="torchvision is not installed")
@pytest.mark.parametrize("base", ["qwen2_5_vl", "llava_next"])
def test_with_torchvision_the_folder_gets_the_stock_image_processor(base, qwen, llava_next, tmp_path):
    """With torchvision, the processor from a folder uses the image processor `AutoImageProcessor` gives for that
    folder (the torchvision backend where transformers defaults to it, as for the stock processor), and equals the
    stock processor built on it."""
    processor = qwen if base == "qwen2_5_vl" else llava_next
    processor.save_pretrained(str(tmp_path))
    loaded = type(processor).from_pretrained(str(tmp_path))
    auto = AutoImageProcessor.from_pretrained(str(tmp_path))
    assert type(loaded.image_processor) is type(auto)
    images = [image_hw(90, 60), image_hw(40, 120)]
    if base == "qwen2_5_vl":
        from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

        # with torchvision the complete stock processor can be built, video processor included
        stock = Qwen2_5_VLProcessor(
            image_processor=auto,
            tokenizer=loaded.tokenizer,
            video_processor=Qwen2VLVideoProcessor(),
            chat_template=QWEN2_5_VL_CHAT_TEMPLATE,
        )
        text = [QWEN_IMAGE + QWEN_IMAGE + "x"]
    else:
        stock = LlavaNextProcessor(image_processor=auto, tokenizer=loaded.tokenizer, **llava_next_processor_kwargs())
        text = ["<image><image> x"]
    assert_same_batch(
        loaded(images=images, text=text, return_tensors="pt"), stock(images=images, text=text, return_tensors="pt")
    )


# ----------------------------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("base", ["qwen2_5_vl", "llava_next"])
def test_videos_and_audio_are_refused(base, qwen, llava_next):
    processor = qwen if base == "qwen2_5_vl" else llava_next
    token = QWEN_IMAGE if base == "qwen2_5_vl" else "<image>"
    frames = [np.zeros((4, 28, 28, 3), dtype=np.uint8)]
    with pytest.raises(ValueError, match="reads images and text only; got videos"):
        processor(images=image_hw(56, 56), text=token, videos=frames)
    with pytest.raises(ValueError, match="reads images and text only; got audio"):
        processor(text="x", audio=[np.zeros(160, dtype=np.float32)])
    # generic callers pass empty media lists: dropped
    out = processor(images=image_hw(56, 56), text=token, videos=[], audios=[[]], return_tensors="pt")
    assert "pixel_values" in out


def test_qwen_video_placeholders_and_chat_videos_are_refused(qwen):
    with pytest.raises(ValueError, match=r"1 '<\|video_pad\|>' placeholder\(s\), but videos are not supported"):
        qwen(text="<|vision_start|><|video_pad|><|vision_end|>What happens?")
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What happens?"}]}]
    with pytest.raises(ValueError, match="videos are not supported"):
        qwen.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    messages[0]["content"][0] = {"type": "video", "video": [np.zeros((28, 28, 3), dtype=np.uint8)] * 2}
    with pytest.raises(ValueError, match="reads images and text only; got videos"):
        qwen.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    with pytest.raises(ValueError, match="do not pass a `video_processor`"):
        DynamicQwen2_5_VLProcessor(
            image_processor=tiny_qwen2_vl_image_processor(), tokenizer=tiny_qwen_tokenizer(), video_processor=object()
        )


@pytest.mark.parametrize("base", ["qwen2_5_vl", "llava_next"])
@pytest.mark.parametrize(
    "texts,n_images,message",
    [
        (["{t} x"], 0, r"1 '{tok}' placeholder\(s\) but 0 image\(s\)"),
        (["x"], 1, r"0 '{tok}' placeholder\(s\) but 1 image\(s\)"),
        (["{t}{t} x"], 1, r"2 '{tok}' placeholder\(s\) but 1 image\(s\)"),
        (["{t} x", "y"], 2, r"1 '{tok}' placeholder\(s\) but 2 image\(s\)"),
    ],
)
def test_image_and_placeholder_count_mismatch(base, qwen, llava_next, texts, n_images, message):
    processor = qwen if base == "qwen2_5_vl" else llava_next
    token = QWEN_IMAGE if base == "qwen2_5_vl" else "<image>"
    pad = "<|image_pad|>" if base == "qwen2_5_vl" else "<image>"
    texts = [t.format(t=token) for t in texts]
    images = [image_hw(56, 56, seed=i) for i in range(n_images)] or None
    with pytest.raises(ValueError, match=message.format(tok=re.escape(pad))):
        processor(images=images, text=texts)


@pytest.mark.parametrize("base", ["qwen2_5_vl", "llava_next"])
def test_per_prompt_image_lists_must_match_each_prompt(base, qwen, llava_next):
    processor = qwen if base == "qwen2_5_vl" else llava_next
    token = QWEN_IMAGE if base == "qwen2_5_vl" else "<image>"
    a, b = image_hw(56, 56, 1), image_hw(90, 60, 2)
    with pytest.raises(ValueError, match=r"\[2, 0\] .* per row but the images were given as \[1, 1\] per row"):
        processor(images=[[a], [b]], text=[token + token, "no image"])
    # the same images as a flat list: assigned in order, as the stock processor does
    flat = processor(images=[a, b], text=[token + token, "no image"], padding=True, return_tensors="pt")
    assert flat["pixel_values"].shape[0] == (2 if base == "llava_next" else 16 + 24)


@pytest.mark.parametrize("base", ["qwen2_5_vl", "llava_next"])
def test_missing_and_unreadable_image_files(base, qwen, llava_next, tmp_path):
    processor = qwen if base == "qwen2_5_vl" else llava_next
    token = QWEN_IMAGE if base == "qwen2_5_vl" else "<image>"
    missing = str(tmp_path / "missing.png")
    with pytest.raises(ValueError, match="Image file not found"):
        processor(images=missing, text=token)
    with pytest.raises(ValueError, match="Image file not found"):
        processor(images=tmp_path / "missing.png", text=token)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    with pytest.raises(ValueError, match="Could not read the image file"):
        processor(images=str(broken), text=token)
    messages = [{"role": "user", "content": [{"type": "image", "path": str(broken)}, {"type": "text", "text": "x"}]}]
    with pytest.raises(ValueError, match="Could not read the image file"):
        processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    with pytest.raises(ValueError, match="Unsupported image input of type int"):
        processor(images=12345, text=token)


def test_image_files_load_as_transformers_load_image_does(qwen, tmp_path):
    """A path gives the same pixels as the PIL image transformers' `load_image` makes of it (EXIF orientation
    applied, RGB), for an EXIF-rotated JPEG and a greyscale PNG."""
    from transformers.image_utils import load_image

    rotated = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    image_hw(40, 120).save(rotated, exif=exif.tobytes(), quality=95)
    grey = tmp_path / "grey.png"
    noise_image(70, 30, mode="L").save(grey)
    for path in (rotated, grey):
        ours = qwen(images=str(path), text=QWEN_IMAGE, return_tensors="pt")
        reference = qwen(images=load_image(str(path)), text=QWEN_IMAGE, return_tensors="pt")
        assert_same_batch(ours, reference)
    assert qwen(images=str(rotated), text=QWEN_IMAGE)["image_grid_thw"].tolist() == [[1, 8, 2]]  # 120 x 40 upright


@pytest.mark.parametrize("base", ["qwen2_5_vl", "llava_next"])
def test_bad_text_and_empty_calls(base, qwen, llava_next):
    processor = qwen if base == "qwen2_5_vl" else llava_next
    with pytest.raises(ValueError, match="Nothing to process"):
        processor()
    with pytest.raises(ValueError, match="must be a string or a list of strings"):
        processor(text=[["nested"]])
    with pytest.raises(ValueError, match="empty list"):
        processor(text=[])
