"""Tests of `dynamic_llava.processor`: LLaVA-1.5 pad preprocessing, the vicuna_v1 chat template, `<image>`
expansion and the input errors. Runs offline with a tiny local tokenizer, on transformers 4.57 and 5.x."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoTokenizer

from dynamic_llava.processor.image_processing_dynamic_llava import DynamicLlavaImageProcessor
from dynamic_llava.processor.processing_dynamic_llava import DEFAULT_CHAT_TEMPLATE, DynamicLlavaProcessor

from fixtures.processor_inputs import IMAGE_TOKEN_ID, ONE_TURN, TWO_TURNS, make_tokenizer, noise_image

REPO_ROOT = Path(__file__).resolve().parents[1]
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


# ----------------------------------------------------------------------------------------------------------------
# Independent implementations of the recipe (written from the description, not from the package)
# ----------------------------------------------------------------------------------------------------------------


def recipe_pixel_values(image, size=336, crop=336, mean=CLIP_MEAN, std=CLIP_STD, pad=True):
    """LLaVA-1.5 'pad': RGB, centred square with int(255 * mean), bicubic shortest edge, centre crop, rescale, norm."""
    rgb = np.asarray(image.convert("RGB"), dtype=np.uint8)
    h, w = rgb.shape[:2]
    if pad and h != w:
        side = max(h, w)
        square = np.empty((side, side, 3), dtype=np.uint8)
        square[:] = np.array([int(m * 255) for m in mean], dtype=np.uint8)
        top, left = (side - h) // 2, (side - w) // 2
        square[top : top + h, left : left + w] = rgb
        rgb = square
    h, w = rgb.shape[:2]
    # shortest edge -> size, keeping the aspect ratio (transformers rounds the long side down with int())
    if h <= w:
        new_h, new_w = size, int(size * w / h)
    else:
        new_h, new_w = int(size * h / w), size
    resized = np.asarray(Image.fromarray(rgb).resize((new_w, new_h), Image.Resampling.BICUBIC), dtype=np.uint8)
    top, left = (new_h - crop) // 2, (new_w - crop) // 2
    cropped = resized[top : top + crop, left : left + crop]
    x = cropped.astype(np.float64) / 255.0
    x = (x - np.array(mean)) / np.array(std)
    return torch.from_numpy(x.transpose(2, 0, 1).astype(np.float32))[None]


def original_vicuna_v1_prompt(turns, system=SYSTEM):
    """`conv_vicuna_v1.get_prompt()` of LLaVA (SeparatorStyle.TWO, sep=' ', sep2='</s>').

    `turns`: list of (question, answer or None); the first question gets '<image>\\n' in front.
    """
    messages = []
    for i, (question, answer) in enumerate(turns):
        messages.append(("USER", ("<image>\n" + question) if i == 0 else question))
        messages.append(("ASSISTANT", answer))
    seps = [" ", "</s>"]
    ret = system + seps[0]
    for i, (role, message) in enumerate(messages):
        if message:
            ret += role + ": " + message + seps[i % 2]
        else:
            ret += role + ":"
    return ret


def chat_messages(turns, shape="image"):
    """HF chat messages for `turns`; `shape` picks how the image and text items are written."""
    messages = []
    for i, (question, answer) in enumerate(turns):
        if i == 0:
            image_item = {
                "image": {"type": "image", "image": Image.new("RGB", (4, 4))},
                "url": {"type": "image", "url": "unused.png"},
            }[shape]
            content = [image_item, {"type": "text", "text": question}]
        else:
            content = question if shape == "url" else [{"type": "text", "text": question}]
        messages.append({"role": "user", "content": content})
        if answer is not None:
            messages.append(
                {"role": "assistant", "content": answer if shape == "url" else [{"type": "text", "text": answer}]}
            )
    return messages


# ----------------------------------------------------------------------------------------------------------------
# Fixtures
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    # token_type_ids listed on purpose: the processor must drop it
    return make_tokenizer(["input_ids", "token_type_ids", "attention_mask"])


@pytest.fixture(scope="module")
def tiny_processor(tokenizer):
    image_processor = DynamicLlavaImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return DynamicLlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=8)


@pytest.fixture(scope="module")
def default_image_processor():
    return DynamicLlavaImageProcessor()


# ----------------------------------------------------------------------------------------------------------------
# Image processor
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sample,filename", [(0, "shapes_500x300_rgb.png"), (1, "grey_96x160_l.png")])
@pytest.mark.parametrize("source", ["reference_config", "defaults", "path"])
def test_reference_pixel_parity(sample, filename, source, original_reference):
    expected = load_file(str(original_reference / "inputs.safetensors"))[f"s{sample}.pixel_values"]
    image_path = original_reference / "images" / filename
    if source == "reference_config":
        processor = DynamicLlavaImageProcessor.from_pretrained(str(original_reference / "vision_tower"))
        out = processor(Image.open(image_path), return_tensors="pt")["pixel_values"]
    elif source == "defaults":
        out = DynamicLlavaImageProcessor()(Image.open(image_path), return_tensors="pt")["pixel_values"]
    else:
        out = DynamicLlavaImageProcessor()(str(image_path), return_tensors="pt")["pixel_values"]
    assert out.dtype == torch.float32
    assert out.shape == expected.shape == (1, 3, 336, 336)
    assert (out - expected).abs().max().item() <= 1e-5
    # the independent recipe agrees too
    assert (recipe_pixel_values(Image.open(image_path)) - expected).abs().max().item() <= 1e-5


@pytest.mark.parametrize(
    "width,height,mode",
    [
        (500, 300, "RGB"),  # wide
        (60, 170, "RGB"),  # tall
        (64, 64, "RGB"),  # square
        (1, 1, "RGB"),
        (3, 7, "RGB"),
        (7, 3, "RGB"),
        (3000, 200, "RGB"),  # huge and very wide
        (90, 50, "RGBA"),
        (50, 90, "L"),
        (77, 41, "P"),
    ],
)
@pytest.mark.parametrize("config", ["llava_336", "tiny_32"])
def test_matches_independent_recipe(width, height, mode, config, default_image_processor):
    image = noise_image(width, height, mode)
    if config == "llava_336":
        processor, size, crop = default_image_processor, 336, 336
    else:
        processor = DynamicLlavaImageProcessor(size={"shortest_edge": 40}, crop_size={"height": 32, "width": 32})
        size, crop = 40, 32
    out = processor(image, return_tensors="pt")["pixel_values"]
    expected = recipe_pixel_values(image, size=size, crop=crop)
    assert out.dtype == torch.float32 and out.shape == (1, 3, crop, crop)
    assert (out - expected).abs().max().item() <= 1e-5


def test_alpha_is_dropped_not_composited(default_image_processor):
    rgba = np.zeros((20, 20, 4), dtype=np.uint8)
    rgba[..., 0] = 200  # red, fully transparent: the original drops alpha, so it stays red
    out = default_image_processor(Image.fromarray(rgba, mode="RGBA"), return_tensors="pt")["pixel_values"]
    red = (200 / 255 - CLIP_MEAN[0]) / CLIP_STD[0]
    assert torch.allclose(out[0, 0], torch.full_like(out[0, 0], red), atol=1e-5)


def test_pad_colour_comes_from_image_mean():
    mean = (0.5, 0.25, 0.75)
    processor = DynamicLlavaImageProcessor(
        image_mean=list(mean),
        image_std=[1.0, 1.0, 1.0],
        size={"shortest_edge": 32},
        crop_size={"height": 32, "width": 32},
    )
    black_wide = Image.new("RGB", (64, 16), (0, 0, 0))
    out = processor(black_wide, return_tensors="pt")["pixel_values"][0]
    # top rows are pure padding: value = int(255 * m) / 255 - m
    for c, m in enumerate(mean):
        assert abs(out[c, 0, 16].item() - (int(255 * m) / 255 - m)) < 1e-5
    assert processor.to_dict()["do_pad_to_square"] is True
    assert (
        processor(black_wide, return_tensors="pt")["pixel_values"]
        - recipe_pixel_values(black_wide, 32, 32, mean, (1, 1, 1))
    ).abs().max() <= 1e-5


def test_no_pad_option_is_plain_clip():
    processor = DynamicLlavaImageProcessor(
        do_pad_to_square=False, size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    )
    image = noise_image(70, 40)
    out = processor(image, return_tensors="pt")["pixel_values"]
    assert (out - recipe_pixel_values(image, 32, 32, pad=False)).abs().max().item() <= 1e-5
    # per-call override
    padded = processor(image, do_pad_to_square=True, return_tensors="pt")["pixel_values"]
    assert (padded - recipe_pixel_values(image, 32, 32)).abs().max().item() <= 1e-5


@pytest.mark.parametrize(
    "layout", ["numpy_hwc", "numpy_chw", "numpy_grey_2d", "numpy_float01", "torch_chw", "list", "nested"]
)
def test_array_and_batch_inputs(layout):
    processor = DynamicLlavaImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    image = noise_image(45, 20)
    hwc = np.asarray(image)
    expected = recipe_pixel_values(image, 32, 32)
    n = 1
    if layout == "numpy_hwc":
        inputs = hwc
    elif layout == "numpy_chw":
        inputs = np.ascontiguousarray(hwc.transpose(2, 0, 1))
    elif layout == "numpy_grey_2d":
        inputs = hwc[:, :, 0]
        expected = recipe_pixel_values(Image.fromarray(hwc[:, :, 0], mode="L"), 32, 32)
    elif layout == "numpy_float01":
        inputs = hwc.astype(np.float32) / 255.0
    elif layout == "torch_chw":
        inputs = torch.from_numpy(np.ascontiguousarray(hwc.transpose(2, 0, 1)))
    elif layout == "list":
        inputs, n = [image, hwc], 2
    else:
        inputs, n = [[image], [hwc]], 2
    out = processor(inputs, return_tensors="pt")["pixel_values"]
    assert out.dtype == torch.float32 and out.shape == (n, 3, 32, 32)
    for i in range(n):
        assert (out[i : i + 1] - expected).abs().max().item() <= 1e-5


def test_image_processor_save_load_round_trip(tmp_path):
    processor = DynamicLlavaImageProcessor(
        do_pad_to_square=False, size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    )
    processor.save_pretrained(str(tmp_path))
    config = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert config["do_pad_to_square"] is False and config["image_processor_type"] == "DynamicLlavaImageProcessor"
    loaded = DynamicLlavaImageProcessor.from_pretrained(str(tmp_path))
    assert loaded.do_pad_to_square is False
    image = noise_image(30, 50)
    assert torch.equal(
        loaded(image, return_tensors="pt")["pixel_values"], processor(image, return_tensors="pt")["pixel_values"]
    )


# ----------------------------------------------------------------------------------------------------------------
# Chat template
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", ["image", "url"])
@pytest.mark.parametrize(
    "turns,expected",
    [
        ([("What is this?", None)], ONE_TURN),
        ([("What is this?", "A cat."), ("And its colour?", None)], TWO_TURNS),
        ([("What is this?", "A cat."), ("And its colour?", "Grey."), ("Describe it .", None)], None),
    ],
)
def test_chat_template_is_vicuna_v1(tiny_processor, turns, expected, shape):
    messages = chat_messages(turns, shape)
    prompt = tiny_processor.apply_chat_template(messages, add_generation_prompt=True)
    assert prompt == original_vicuna_v1_prompt(turns)
    if expected is not None:
        assert prompt == expected


def test_chat_template_matches_reference_manifest(tiny_processor, original_reference):
    manifest = json.loads((original_reference / "manifest.json").read_text())
    for sample in manifest["samples"]:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": sample["question"]}]}]
        assert tiny_processor.apply_chat_template(messages, add_generation_prompt=True) == sample["prompt"]


def test_chat_template_details(tiny_processor):
    messages = [{"role": "user", "content": "hello"}]
    assert tiny_processor.apply_chat_template(messages) == SYSTEM + " USER: hello "
    # a leading system message replaces the default system prompt
    with_system = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"}]
    assert (
        tiny_processor.apply_chat_template(with_system, add_generation_prompt=True)
        == "Be brief. USER: hello ASSISTANT:"
    )
    # a closed assistant turn ends with </s>; continue_final_message leaves it open
    closed = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "A cat."}]
    assert tiny_processor.apply_chat_template(closed).endswith("ASSISTANT: A cat.</s>")
    assert tiny_processor.apply_chat_template(closed, continue_final_message=True).endswith("ASSISTANT: A cat.")
    # images first in a user turn, as the original eval code does
    text_first = [{"role": "user", "content": [{"type": "text", "text": "What is this?"}, {"type": "image"}]}]
    assert tiny_processor.apply_chat_template(text_first, add_generation_prompt=True) == ONE_TURN
    # the caller's messages are not modified
    assert closed == [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "A cat."}]
    assert tiny_processor.chat_template == DEFAULT_CHAT_TEMPLATE


@pytest.mark.parametrize("shape", ["image", "url"])
def test_chat_template_tokenized(tiny_processor, tmp_path, shape):
    turns = [("What is this?", "A cat."), ("And its colour?", None)]
    messages = chat_messages(turns, shape)
    if shape == "url":
        path = tmp_path / "img.png"
        noise_image(40, 20).save(path)
        messages[0]["content"][0]["url"] = str(path)
    out = tiny_processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    assert set(out.keys()) == {"input_ids", "attention_mask", "pixel_values"}
    assert out["pixel_values"].shape == (1, 3, 32, 32) and out["pixel_values"].dtype == torch.float32
    assert int((out["input_ids"] == IMAGE_TOKEN_ID).sum()) == 16
    direct = tiny_processor(
        images=messages[0]["content"][0].get("image") or str(tmp_path / "img.png"),
        text=original_vicuna_v1_prompt(turns),
        return_tensors="pt",
    )
    assert torch.equal(direct["input_ids"], out["input_ids"])


# ----------------------------------------------------------------------------------------------------------------
# Processor: <image> expansion, outputs, save/load
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "image_size,patch,strategy,expected",
    [(32, 8, "default", 16), (32, 8, "full", 17), (48, 16, "default", 9), (336, 14, "default", 576)],
)
def test_image_token_expansion(tokenizer, image_size, patch, strategy, expected):
    image_processor = DynamicLlavaImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    processor = DynamicLlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=patch, vision_feature_select_strategy=strategy
    )
    assert processor.num_image_tokens() == expected
    out = processor(images=noise_image(50, 30), text="USER: <image>\nWhat is this? ASSISTANT:", return_tensors="pt")
    ids = out["input_ids"][0]
    assert int((ids == IMAGE_TOKEN_ID).sum()) == expected
    positions = (ids == IMAGE_TOKEN_ID).nonzero().flatten()
    assert torch.equal(positions, torch.arange(positions[0], positions[0] + expected))  # one contiguous span
    assert ids[0].item() == 1  # BOS from the tokenizer


def test_outputs_have_no_token_type_ids(tiny_processor):
    assert "token_type_ids" not in tiny_processor.model_input_names
    assert tiny_processor.model_input_names == ["input_ids", "attention_mask", "pixel_values"]
    out = tiny_processor(images=noise_image(10, 10), text="<image>\nhello", return_tensors="pt")
    assert set(out.keys()) == {"input_ids", "attention_mask", "pixel_values"}
    assert set(tiny_processor(text="hello").keys()) == {"input_ids", "attention_mask"}


def test_batch_of_prompts(tiny_processor):
    out = tiny_processor(
        images=[noise_image(40, 20), noise_image(20, 40)],
        text=["USER: <image>\nWhat is this? ASSISTANT:", "USER: <image>\nhello ASSISTANT:"],
        padding=True,
        return_tensors="pt",
    )
    assert out["pixel_values"].shape == (2, 3, 32, 32)
    assert ((out["input_ids"] == IMAGE_TOKEN_ID).sum(dim=1) == 16).all()


def test_images_only_call(tiny_processor):
    out = tiny_processor(images=noise_image(40, 20), return_tensors="pt")
    assert list(out.keys()) == ["pixel_values"] and out["pixel_values"].shape == (1, 3, 32, 32)


@pytest.mark.parametrize("with_text", [True, False])
@pytest.mark.parametrize("how", ["flat", "images_kwargs"])
def test_processor_passes_do_pad_to_square(tiny_processor, with_text, how):
    image = noise_image(40, 20)
    kwargs = {"do_pad_to_square": False} if how == "flat" else {"images_kwargs": {"do_pad_to_square": False}}
    text = "<image>\nhello" if with_text else None
    out = tiny_processor(images=image, text=text, return_tensors="pt", **kwargs)["pixel_values"]
    assert (out - recipe_pixel_values(image, 32, 32, pad=False)).abs().max().item() <= 1e-5
    default = tiny_processor(images=image, text=text, return_tensors="pt")["pixel_values"]
    assert (default - recipe_pixel_values(image, 32, 32)).abs().max().item() <= 1e-5


def test_tokenizer_round_trip(tmp_path):
    tokenizer = make_tokenizer(["input_ids", "attention_mask"])
    tokenizer.save_pretrained(str(tmp_path))
    loaded = AutoTokenizer.from_pretrained(str(tmp_path))
    text = "USER: <image>\nWhat is this? ASSISTANT: A cat.</s>"
    assert loaded(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert loaded.convert_tokens_to_ids("<image>") == IMAGE_TOKEN_ID
    assert loaded.bos_token_id == 1 and loaded.eos_token_id == 2 and loaded.pad_token_id == 3


def test_processor_attributes_survive_save(tiny_processor, tmp_path):
    tiny_processor.save_pretrained(str(tmp_path))
    saved = {}
    for name in ("processor_config.json", "preprocessor_config.json"):
        if (tmp_path / name).exists():
            saved.update(json.loads((tmp_path / name).read_text()))
    assert saved["patch_size"] == 8
    assert saved["num_additional_image_tokens"] == 1
    assert saved["vision_feature_select_strategy"] == "default"
    assert saved["image_token"] == "<image>"
    template = (tmp_path / "chat_template.jinja").read_text() if (tmp_path / "chat_template.jinja").exists() else None
    template = template or json.loads((tmp_path / "chat_template.json").read_text())["chat_template"]
    assert template == DEFAULT_CHAT_TEMPLATE


@pytest.mark.slow
def test_remote_code_export_round_trip(tmp_path):
    """Flat remote-code folder: register_for_auto_class + save_pretrained, then AutoProcessor with
    trust_remote_code in a fresh process (its own HF_HOME, offline)."""
    script = textwrap.dedent(
        f"""
        import sys, json
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from fixtures.processor_inputs import make_tokenizer, noise_image, TWO_TURNS
        from dynamic_llava.processor.image_processing_dynamic_llava import DynamicLlavaImageProcessor
        from dynamic_llava.processor.processing_dynamic_llava import DynamicLlavaProcessor
        from transformers import AutoProcessor
        DynamicLlavaImageProcessor.register_for_auto_class("AutoImageProcessor")
        DynamicLlavaProcessor.register_for_auto_class("AutoProcessor")
        ip = DynamicLlavaImageProcessor(size={{"shortest_edge": 32}}, crop_size={{"height": 32, "width": 32}})
        tok = make_tokenizer(["input_ids", "attention_mask"])
        proc = DynamicLlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=8)
        folder = {str(tmp_path / "export")!r}
        proc.save_pretrained(folder)
        loaded = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
        assert type(loaded).__name__ == "DynamicLlavaProcessor", type(loaded)
        assert type(loaded.image_processor).__name__ == "DynamicLlavaImageProcessor", type(loaded.image_processor)
        assert type(loaded).__module__.startswith("transformers_modules"), type(loaded).__module__
        image = noise_image(40, 20)
        a = proc(images=image, text=TWO_TURNS, return_tensors="pt")
        b = loaded(images=image, text=TWO_TURNS, return_tensors="pt")
        assert sorted(a.keys()) == sorted(b.keys()) == ["attention_mask", "input_ids", "pixel_values"], b.keys()
        assert all((a[k] == b[k]).all() for k in a), "outputs differ"
        msgs = [{{"role": "user", "content": [{{"type": "image"}}, {{"type": "text", "text": "What is this?"}}]}}]
        prompt = proc.apply_chat_template(msgs, add_generation_prompt=True)
        assert loaded.apply_chat_template(msgs, add_generation_prompt=True) == prompt
        print("OK")
        """
    )
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=300
    )
    assert result.returncode == 0 and "OK" in result.stdout, result.stdout[-3000:] + result.stderr[-3000:]
    exported = sorted(p.name for p in (tmp_path / "export").iterdir())
    assert "processing_dynamic_llava.py" in exported and "image_processing_dynamic_llava.py" in exported


def test_processor_files_are_flat_remote_code():
    """Only flat sibling imports (the export flattens processor/ into a Hub folder)."""
    import re

    for name in ("processing_dynamic_llava.py", "image_processing_dynamic_llava.py"):
        source = (REPO_ROOT / "processor" / name).read_text()
        relative = re.findall(r"^\s*from\s+(\.+)(\S*)\s+import", source, flags=re.MULTILINE)
        for dots, module in relative:
            assert dots == "." and module in ("image_processing_dynamic_llava",), (name, dots, module)
        assert not re.search(r"^\s*from\s+\.\s+import", source, flags=re.MULTILINE)


# ----------------------------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text,n_images",
    [
        ("USER: <image>\nWhat is this? ASSISTANT:", 0),
        ("USER: What is this? ASSISTANT:", 1),
        ("USER: <image>\nWhat is this? ASSISTANT:", 2),
        ("USER: <image><image>\nWhat is this? ASSISTANT:", 1),
        (["<image>\nhello", "hello"], 2),
    ],
)
def test_image_count_mismatch(tiny_processor, text, n_images):
    images = [noise_image(10, 10, seed=i) for i in range(n_images)] or None
    with pytest.raises(ValueError, match=r"'<image>' placeholder\(s\) but \d+ image\(s\)"):
        tiny_processor(images=images, text=text, return_tensors="pt")


@pytest.mark.parametrize("text", ["", "   ", "\n\t ", ["hello", " "], []])
def test_empty_prompt(tiny_processor, text):
    with pytest.raises(ValueError, match="empty"):
        tiny_processor(text=text, return_tensors="pt")


def test_missing_image_file(tiny_processor, tmp_path):
    missing = str(tmp_path / "does_not_exist.png")
    with pytest.raises(ValueError, match="Image file not found"):
        tiny_processor(images=missing, text="<image>\nhello", return_tensors="pt")
    with pytest.raises(ValueError, match="Image file not found"):
        DynamicLlavaImageProcessor()(missing)
    messages = [{"role": "user", "content": [{"type": "image", "path": missing}, {"type": "text", "text": "hello"}]}]
    with pytest.raises(ValueError, match="Image file not found"):
        tiny_processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)


@pytest.mark.parametrize("content", [b"this is not an image", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "truncated"])
def test_corrupt_image_file(tiny_processor, tmp_path, content):
    path = tmp_path / "broken.png"
    if content == "truncated":
        noise_image(64, 64).save(path)
        path.write_bytes(path.read_bytes()[:200])
    else:
        path.write_bytes(content)
    with pytest.raises(ValueError, match="Could not read the image file"):
        tiny_processor(images=str(path), text="<image>\nhello", return_tensors="pt")
    with pytest.raises(ValueError, match="Could not read the image file"):
        DynamicLlavaImageProcessor()(path)


def test_bad_array_inputs():
    processor = DynamicLlavaImageProcessor()
    with pytest.raises(ValueError, match="channel"):
        processor(np.zeros((5, 6, 7), dtype=np.uint8))
    with pytest.raises(ValueError, match="Unsupported image input"):
        processor(12345)
