"""The synthetic VQA task of `dynamic_llava.synthetic.task` (fast, CPU only, no downloads)."""

import random
from collections import Counter

import numpy as np
import pytest

from dynamic_llava.synthetic.task import (
    COLOURS,
    MIN_ANSWER_WORDS,
    POSITIONS,
    QUESTION_TYPES,
    SHAPES,
    VICUNA_V1_SYSTEM,
    build_tokenizer,
    first_answer,
    is_correct,
    make_sample,
    object_patches,
    position_of,
    tokenize_words,
    vicuna_prompt,
    vocabulary,
)

SEEDS = list(range(40))


@pytest.fixture(scope="module")
def samples():
    rng = random.Random(1234)
    return [make_sample(rng) for _ in range(500)]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def test_constants():
    assert len(SHAPES) >= 4 and len(set(SHAPES)) == len(SHAPES)
    assert len(COLOURS) >= 8 and len(set(COLOURS.values())) == len(COLOURS)
    assert POSITIONS == (
        "top left",
        "top",
        "top right",
        "left",
        "centre",
        "right",
        "bottom left",
        "bottom",
        "bottom right",
    )


@pytest.mark.parametrize("seed", [0, 1, 7, 12345])
@pytest.mark.parametrize("image_size", [32, 64, 96])
def test_deterministic(seed, image_size):
    a, b = make_sample(random.Random(seed), image_size), make_sample(random.Random(seed), image_size)
    assert a["image"].mode == "RGB" and a["image"].size == (image_size, image_size)
    assert np.array_equal(np.asarray(a["image"]), np.asarray(b["image"]))
    assert {k: v for k, v in a.items() if k != "image"} == {k: v for k, v in b.items() if k != "image"}


def test_samples_differ():
    images = [np.asarray(make_sample(random.Random(s))["image"]) for s in range(5)]
    assert all(not np.array_equal(images[0], other) for other in images[1:])


def test_answer_text(samples):
    for sample in samples:
        words = sample["answer_text"].split()
        assert len(words) >= MIN_ANSWER_WORDS
        n = len(sample["answer"].split())
        assert " ".join(words[:n]).rstrip(".") == sample["answer"]
        assert (
            sample["answer"]
            == {"colour": sample["colour"], "kind": sample["shape"], "position": sample["position"]}[
                sample["question_type"]
            ]
        )
        assert sample["question"].endswith("?")


def test_every_kind_occurs(samples):
    assert set(Counter(s["question_type"] for s in samples)) == set(QUESTION_TYPES)
    assert {s["shape"] for s in samples} == set(SHAPES)
    assert {s["colour"] for s in samples} == set(COLOURS)
    assert {s["position"] for s in samples} == set(POSITIONS)
    assert {s["texture"] for s in samples} == {"noise", "stripes", "checker"}
    assert len({s["question"] for s in samples}) > len(QUESTION_TYPES)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("image_size", [64, 48])
def test_object_visible(seed, image_size):
    sample = make_sample(random.Random(seed), image_size)
    pixels = np.asarray(sample["image"]).astype(int)
    x0, y0, x1, y1 = sample["object_box"]
    assert 0 <= x0 < x1 <= image_size and 0 <= y0 < y1 <= image_size
    assert x1 - x0 >= 4 and y1 - y0 >= 4
    inside = np.zeros(pixels.shape[:2], bool)
    inside[y0:y1, x0:x1] = True
    background = np.median(pixels[~inside], axis=0)
    distance = np.abs(pixels - background).max(axis=-1)
    # the background is textured (not flat) but low contrast; the object stands out clearly
    assert pixels[~inside].std(axis=0).max() > 1.5
    assert (distance[~inside] > 40).mean() < 0.005
    far = distance[inside] > 40
    assert far.mean() > 0.3
    assert np.abs(pixels[inside][far] - background).max(axis=-1).mean() > 60
    # the box is tight: each of its edge rows / columns holds object pixels
    obj = np.zeros_like(inside)
    obj[inside] = far
    assert obj[y0].any() and obj[y1 - 1].any() and obj[:, x0].any() and obj[:, x1 - 1].any()
    # and it lies in the named grid cell
    assert position_of(x0, y0, image_size) == position_of(x1 - 1, y1 - 1, image_size) == sample["position"]


@pytest.mark.parametrize("seed", SEEDS[:10])
def test_background_image_is_the_image_without_the_object(seed):
    plain = make_sample(random.Random(seed))
    sample = make_sample(random.Random(seed), with_background=True)
    # the same draws either way: the same sample, plus the object-free image
    assert np.array_equal(np.asarray(plain["image"]), np.asarray(sample["image"]))
    assert {k: v for k, v in plain.items() if k != "image"} == {
        k: v for k, v in sample.items() if k not in ("image", "background_image")
    }
    image, background = np.asarray(sample["image"]), np.asarray(sample["background_image"])
    x0, y0, x1, y1 = sample["object_box"]
    inside = np.zeros(image.shape[:2], bool)
    inside[y0:y1, x0:x1] = True
    assert np.array_equal(image[~inside], background[~inside])
    assert (np.abs(image[inside].astype(int) - background[inside]).max(axis=-1) > 40).mean() > 0.3


@pytest.mark.parametrize("patch_size", [8, 16])
@pytest.mark.parametrize("seed", SEEDS)
def test_object_patches_cover_box(seed, patch_size):
    size = 64
    sample = make_sample(random.Random(seed), size)
    x0, y0, x1, y1 = sample["object_box"]
    patches = object_patches(sample["object_box"], size, patch_size)
    per_row = size // patch_size
    assert patches == sorted(set(patches)) and all(0 <= p < per_row * per_row for p in patches)
    covered = np.zeros((size, size), bool)
    for p in patches:
        r, c = divmod(p, per_row)
        covered[r * patch_size : (r + 1) * patch_size, c * patch_size : (c + 1) * patch_size] = True
    assert covered[y0:y1, x0:x1].all()
    # minimal: each listed patch overlaps the box
    for p in patches:
        r, c = divmod(p, per_row)
        assert c * patch_size < x1 and (c + 1) * patch_size > x0 and r * patch_size < y1 and (r + 1) * patch_size > y0


@pytest.mark.parametrize(
    "box, patch_size, expected",
    [
        ((0, 0, 1, 1), 8, [0]),
        ((7, 7, 9, 9), 8, [0, 1, 8, 9]),
        ((8, 8, 16, 16), 8, [9]),
        ((0, 0, 64, 64), 16, list(range(16))),
        ((60, 50, 64, 64), 16, [15]),
        ((16, 0, 33, 16), 16, [1, 2]),
    ],
)
def test_object_patches_examples(box, patch_size, expected):
    assert object_patches(box, 64, patch_size) == expected


def test_object_patches_errors():
    with pytest.raises(ValueError):
        object_patches((0, 0, 10, 10), 64, 10)
    with pytest.raises(ValueError):
        object_patches((5, 5, 5, 9), 64, 8)
    with pytest.raises(ValueError):
        object_patches((0, 0, 65, 9), 64, 8)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("user's questions.", ["user", "'", "s", "questions", "."]),
        ("USER: <image>\nWhat?", ["USER", ":", "<image>", "What", "?"]),
        ("a,b  c", ["a", ",", "b", "c"]),
        ("", []),
    ],
)
def test_tokenize_words(text, expected):
    assert tokenize_words(text) == expected


def test_vocabulary_covers_samples(samples):
    vocab = set(vocabulary())
    assert len(vocab) == len(vocabulary())
    for sample in samples:
        for text in (sample["question"], sample["answer_text"], sample["answer"]):
            assert set(tokenize_words(text)) <= vocab
    assert set(tokenize_words(VICUNA_V1_SYSTEM + " USER: ASSISTANT:")) <= vocab


def test_tokenizer_layout(tokenizer):
    words = vocabulary()
    assert tokenizer.convert_ids_to_tokens([0, 1, 2]) == ["<unk>", "<s>", "</s>"]
    assert (tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    assert tokenizer.convert_tokens_to_ids(["<image>", "<pad>"]) == [len(words) + 3, len(words) + 4]
    assert tokenizer.pad_token_id == len(words) + 4 and len(tokenizer) == len(words) + 5
    assert tokenizer.model_input_names == ["input_ids", "attention_mask"]
    encoded = tokenizer("What colour is the object?")
    assert set(encoded) == {"input_ids", "attention_mask"}
    tokens = tokenizer.convert_ids_to_tokens(encoded["input_ids"])
    assert tokens == ["<s>", "What", "colour", "is", "the", "object", "?"]


def test_tokenizer_matches_tokenize_words(tokenizer, samples):
    for sample in samples[:50]:
        for text in (sample["question"], sample["answer_text"]):
            assert tokenizer.tokenize(text) == tokenize_words(text)


def test_tokenizer_no_unk(tokenizer, samples):
    texts = [VICUNA_V1_SYSTEM, "USER:", "ASSISTANT:", vicuna_prompt("Where is the shape?")]
    texts += [t for s in samples for t in (s["question"], s["answer_text"])]
    texts += [vicuna_prompt(s["question"], s["answer_text"]) for s in samples[:20]]
    ids = tokenizer(texts)["input_ids"]
    assert all(row[0] == tokenizer.bos_token_id for row in ids)
    assert not any(tokenizer.unk_token_id in row for row in ids)
    prompt_ids = tokenizer(vicuna_prompt(samples[0]["question"], samples[0]["answer_text"]))["input_ids"]
    assert prompt_ids.count(tokenizer.convert_tokens_to_ids("<image>")) == 1 and prompt_ids[-1] == 2
    assert tokenizer("zebra")["input_ids"] == [1, 0]


def test_tokenizer_round_trip(tokenizer, samples, tmp_path):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tokenizer.save_pretrained(tmp_path)
    texts = [vicuna_prompt(s["question"], s["answer_text"]) for s in samples[:30]]
    for loaded in (AutoTokenizer.from_pretrained(tmp_path), PreTrainedTokenizerFast.from_pretrained(tmp_path)):
        assert loaded.get_vocab() == tokenizer.get_vocab()
        assert (loaded.unk_token_id, loaded.bos_token_id, loaded.eos_token_id, loaded.pad_token_id) == (
            0,
            1,
            2,
            tokenizer.pad_token_id,
        )
        assert loaded.model_input_names == ["input_ids", "attention_mask"]
        assert loaded.padding_side == "left"
        assert loaded(texts)["input_ids"] == tokenizer(texts)["input_ids"]
        batch = loaded(texts[:3], padding=True)
        assert batch["input_ids"][0][0] in (1, tokenizer.pad_token_id)
        assert loaded.decode(loaded(texts[0])["input_ids"]) == tokenizer.decode(tokenizer(texts[0])["input_ids"])


@pytest.mark.parametrize(
    "text, answer, expected",
    [
        ("red. The red circle ...", "red", True),
        ("Red", "red", True),
        ("  RED!", "red", True),
        ("blue. The red circle", "red", False),
        ("", "red", False),
        ("the red circle", "red", False),
        ("top left. The object", "top left", True),
        ("Top Left, it is", "top left", True),
        ("top left. The object", "top", False),
        ("top. The object", "top", True),
        ("top", "top left", False),
        ("top right", "top left", False),
        ("centre.", "centre", True),
        ("cross", "cross", True),
        ("crosses", "cross", False),
    ],
)
def test_is_correct(text, answer, expected):
    assert is_correct(text, {"answer": answer}) is expected


def test_is_correct_on_answer_texts(samples):
    for sample in samples[:100]:
        assert is_correct(sample["answer_text"], sample)
        assert first_answer(sample["answer_text"]) == sample["answer"]
    wrong = next(s for s in samples if s["question_type"] == "colour")
    other = next(c for c in COLOURS if c != wrong["answer"])
    assert not is_correct(other + ". " + wrong["answer_text"], wrong)
