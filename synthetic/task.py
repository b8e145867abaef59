"""A synthetic visual question-answering task, generated on the fly, for training small Dynamic-LLaVA models.

Each sample is one object (a `SHAPES` kind in one of `COLOURS`) drawn at a random place inside one cell of a 3x3
grid (`POSITIONS`) on a low-contrast textured background (noise, stripes or a checker board), with a question about
its colour, kind or position. The answer text starts with the answer word(s) and goes on with >= 60 words of
descriptive filler built from a small fixed vocabulary, so that an output-text predictor has predictable tokens to
learn while the first words carry the answer.

The whole task lives in a closed word-level vocabulary (`vocabulary()`), and `build_tokenizer()` makes a matching
`PreTrainedTokenizerFast` locally (no downloads). `sample_conversation()` and `prompt_inputs()` turn samples into
LLaVA conversation turns and model inputs (`synthetic.train.write_synthetic_dataset` writes a data set).

Everything is deterministic given the `random.Random` passed in.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageDraw

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

    from ..processor import DynamicLlavaProcessor

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 25, 25),
    "green": (20, 200, 40),
    "blue": (30, 60, 235),
    "yellow": (245, 230, 20),
    "purple": (150, 30, 190),
    "orange": (250, 140, 0),
    "white": (255, 255, 255),
    "black": (0, 0, 0),
}

# Row-major 3x3 grid: POSITIONS[row * 3 + col].
POSITIONS: tuple[str, ...] = (
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

QUESTION_TYPES: tuple[str, ...] = ("colour", "kind", "position")

TEXTURES: tuple[str, ...] = ("noise", "stripes", "checker")

QUESTIONS: dict[str, tuple[str, ...]] = {
    "colour": (
        "What colour is the object?",
        "What is the colour of the shape?",
        "Which colour does the shape have?",
        "What colour is the shape in the image?",
    ),
    "kind": (
        "What shape is shown in the image?",
        "Which shape can you see?",
        "What kind of object is in the image?",
        "What is the shape of the object?",
    ),
    "position": (
        "Where is the object in the image?",
        "In which part of the image is the shape?",
        "Where is the shape?",
        "What is the position of the object?",
    ),
}

VICUNA_V1_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
CHAT_WORDS: tuple[str, ...] = ("USER:", "ASSISTANT:")

SPECIAL_TOKENS: tuple[str, ...] = ("<unk>", "<s>", "</s>")  # ids 0, 1, 2
IMAGE_TOKEN = "<image>"
PAD_TOKEN = "<pad>"

MIN_ANSWER_WORDS = 60
# The object's side is drawn from [MIN_FILL, 1] x the largest side that fits inside its grid cell.
MIN_FILL = 0.7

# Descriptive sentences of the answer text; fields: colour, shape, position, texture, area (a size word).
_DESCRIPTION = (
    "The {colour} {shape} is in the {position} part of the image.",
    "It is a {area} {shape} drawn in {colour}.",
    "The background is a soft pattern of {texture} with low contrast.",
    "There is only one object in the image, and it is easy to see.",
)
# Fixed filler sentences, used in order after the description until the text is long enough.
_FILLER = (
    "The image is small and simple.",
    "The object has sharp edges and a flat colour.",
    "Nothing else is shown in the picture.",
    "The shape does not touch the border of its part of the image.",
    "The image is split into nine parts, in three rows and three columns.",
    "Each part of the image can hold the object.",
    "The colour of the object is clear against the background.",
    "This is the answer to the question.",
)
_AREA_WORDS = ("small", "medium", "large")
_TEXTURE_WORDS = {"noise": "noise", "stripes": "stripes", "checker": "squares"}

_PUNCTUATION = ".,?:'"
_TOKEN_RE = re.compile(r"[^\s.,?:']+|[.,?:']")
# The same split as a `tokenizers` pre-tokenizer: whitespace, then each punctuation mark isolated.
_PUNCTUATION_PATTERN = r"[.,?:']"


# ----------------------------------------------------------------------------------------------- images


def _background(np_rng: np.random.Generator, size: int, texture: str) -> np.ndarray:
    """A low-contrast textured background (uint8, size x size x 3) around a mid grey."""
    base = np_rng.integers(100, 157, size=3).astype(np.float32)  # slightly tinted mid grey
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    if texture == "stripes":
        period = float(np_rng.integers(4, 13))
        direction = int(np_rng.integers(0, 3))
        coord = (xs, ys, xs + ys)[direction]
        pattern = np.where((coord // (period / 2)) % 2 == 0, 1.0, -1.0)
        amplitude = float(np_rng.integers(6, 13))
    elif texture == "checker":
        period = int(np_rng.integers(4, 13))
        pattern = np.where(((xs // period) + (ys // period)) % 2 == 0, 1.0, -1.0)
        amplitude = float(np_rng.integers(6, 13))
    else:
        pattern = np.zeros((size, size), np.float32)
        amplitude = 0.0
    noise = np_rng.uniform(-1.0, 1.0, size=(size, size, 3)) * (14.0 if texture == "noise" else 5.0)
    pixels = base[None, None, :] + amplitude * pattern[:, :, None] + noise
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)


def _shape_mask(shape: str, size: int, box: tuple[int, int, int, int]) -> Image.Image:
    """An "L" mask (255 = object) of `shape` filling the inclusive pixel box (x0, y0, x1, y1)."""
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=255)
    elif shape == "square":
        draw.rectangle((x0, y0, x1, y1), fill=255)
    elif shape == "triangle":
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=255)
    elif shape == "cross":
        w, h = x1 - x0 + 1, y1 - y0 + 1
        tx, ty = max(2, round(w / 3)), max(2, round(h / 3))
        cx0 = x0 + (w - tx) // 2
        cy0 = y0 + (h - ty) // 2
        draw.rectangle((cx0, y0, cx0 + tx - 1, y1), fill=255)
        draw.rectangle((x0, cy0, x1, cy0 + ty - 1), fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    return mask


def _cell_bounds(index: int, size: int) -> tuple[int, int, int, int]:
    """Pixel bounds (x0, y0, x1, y1), x1/y1 exclusive, of grid cell `index` (row-major) in a size x size image."""
    row, col = divmod(index, 3)
    edges = [round(size * k / 3) for k in range(4)]
    return edges[col], edges[row], edges[col + 1], edges[row + 1]


def position_of(x: float, y: float, image_size: int) -> str:
    """The `POSITIONS` name of the grid cell holding the pixel (x, y)."""
    for index in range(9):
        cx0, cy0, cx1, cy1 = _cell_bounds(index, image_size)
        if cx0 <= x < cx1 and cy0 <= y < cy1:
            return POSITIONS[index]
    raise ValueError(f"({x}, {y}) is outside a {image_size}x{image_size} image")


def object_patches(box: Sequence[int], image_size: int, patch_size: int) -> list[int]:
    """Row-major indices of the `patch_size` vision patches that the pixel box (x0, y0, x1, y1) covers.

    The box is a PIL-style box: x1 and y1 are exclusive (as in `sample["object_box"]`). The image is
    `image_size` x `image_size` with `image_size // patch_size` patches per row.
    """
    if image_size % patch_size:
        raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
    x0, y0, x1, y1 = (int(v) for v in box)
    if not (0 <= x0 < x1 <= image_size and 0 <= y0 < y1 <= image_size):
        raise ValueError(f"box {tuple(box)} is empty or outside a {image_size}x{image_size} image")
    per_row = image_size // patch_size
    rows = range(y0 // patch_size, (y1 - 1) // patch_size + 1)
    cols = range(x0 // patch_size, (x1 - 1) // patch_size + 1)
    return [r * per_row + c for r in rows for c in cols]


# ------------------------------------------------------------------------------------------------- text


def _answer_text(answer: str, colour: str, shape: str, position: str, texture: str, area: str) -> str:
    fields = dict(colour=colour, shape=shape, position=position, texture=_TEXTURE_WORDS[texture], area=area)
    sentences = [answer + "."] + [s.format(**fields) for s in _DESCRIPTION]
    i = 0
    while sum(len(s.split()) for s in sentences) < MIN_ANSWER_WORDS:
        sentences.append(_FILLER[i % len(_FILLER)])
        i += 1
    return " ".join(sentences)


def make_sample(rng: random.Random, image_size: int = 64, with_background: bool = False) -> dict:
    """One sample drawn from `rng` (deterministic given its state).

    Returns a dict with `image` (PIL RGB, image_size x image_size), `question`, `question_type` (one of
    `QUESTION_TYPES`), `answer` (the colour / shape / position name), `answer_text` (the answer, a full stop and
    descriptive filler; >= `MIN_ANSWER_WORDS` words), `colour`, `shape`, `position`, `texture`, and `object_box`
    (x0, y0, x1, y1 pixel box of the object, x1 / y1 exclusive, as PIL's `getbbox`). With `with_background`, also
    `background_image`: the same image without the object (the same draws from `rng` either way).
    """
    if image_size < 24:
        raise ValueError(f"image_size must be at least 24, got {image_size}")
    shape = rng.choice(SHAPES)
    colour = rng.choice(sorted(COLOURS))
    cell = rng.randrange(9)
    texture = rng.choice(TEXTURES)
    question_type = rng.choice(QUESTION_TYPES)
    question = rng.choice(QUESTIONS[question_type])
    np_rng = np.random.default_rng(rng.getrandbits(64))

    cx0, cy0, cx1, cy1 = _cell_bounds(cell, image_size)
    cell_w, cell_h = cx1 - cx0, cy1 - cy0
    margin = 1
    max_side = min(cell_w, cell_h) - 2 * margin
    side = rng.randint(max(6, round(max_side * MIN_FILL)), max_side)
    x0 = rng.randint(cx0 + margin, cx1 - margin - side)
    y0 = rng.randint(cy0 + margin, cy1 - margin - side)
    mask = _shape_mask(shape, image_size, (x0, y0, x0 + side - 1, y0 + side - 1))
    box = mask.getbbox()
    assert box is not None

    pixels = _background(np_rng, image_size, texture)
    background = Image.fromarray(pixels.copy(), "RGB") if with_background else None
    pixels[np.asarray(mask) > 0] = COLOURS[colour]
    image = Image.fromarray(pixels, "RGB")

    position = POSITIONS[cell]
    answer = {"colour": colour, "kind": shape, "position": position}[question_type]
    area = _AREA_WORDS[0 if side < 0.65 * max_side else 1 if side < 0.85 * max_side else 2]
    sample = {
        "image": image,
        "question": question,
        "question_type": question_type,
        "answer": answer,
        "answer_text": _answer_text(answer, colour, shape, position, texture, area),
        "colour": colour,
        "shape": shape,
        "position": position,
        "texture": texture,
        "object_box": tuple(int(v) for v in box),
        "image_size": image_size,
    }
    if with_background:
        sample["background_image"] = background
    return sample


def tokenize_words(text: str) -> list[str]:
    """Split on whitespace and make each of `.,?:'` its own token ("user's questions." -> user ' s questions .)."""
    return _TOKEN_RE.findall(text)


def vicuna_prompt(question: str, answer_text: str | None = None, image: str = IMAGE_TOKEN) -> str:
    """The vicuna_v1 prompt for one image turn (as the package's processor renders it), optionally answered;
    `image`: the base's image placeholder."""
    prompt = f"{VICUNA_V1_SYSTEM} USER: {image}\n{question} ASSISTANT:"
    return prompt if answer_text is None else f"{prompt} {answer_text}</s>"


def vocabulary() -> list[str]:
    """Every word token (per `tokenize_words`) that questions, answer texts and the vicuna_v1 template can hold.

    Sorted; special tokens (`<unk>`, `<s>`, `</s>`, `<image>`, `<pad>`) are not included.
    """
    texts = [VICUNA_V1_SYSTEM, *CHAT_WORDS, *SHAPES, *COLOURS, *POSITIONS, *_AREA_WORDS, *_TEXTURE_WORDS.values()]
    texts += [q for qs in QUESTIONS.values() for q in qs]
    texts += list(_DESCRIPTION) + list(_FILLER)
    words = set()
    for text in texts:
        words.update(tokenize_words(re.sub(r"\{\w+\}", " ", text)))
    words.update(_PUNCTUATION)
    return sorted(words)


def build_tokenizer(extra_special_tokens: Sequence[str] = ()) -> PreTrainedTokenizerFast:
    """A word-level `PreTrainedTokenizerFast` over `vocabulary()`, built locally.

    Ids: `<unk>` = 0, `<s>` = 1, `</s>` = 2, the words, then `<image>`, `<pad>` and `extra_special_tokens` (a base's
    own image tokens). Encoding adds `<s>` in front;
    `padding_side` is "left" (for generation); `model_input_names` is ["input_ids", "attention_mask"].
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for word in vocabulary():
        vocab[word] = len(vocab)
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split(Regex(_PUNCTUATION_PATTERN), behavior="isolated")]
    )
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B:1", special_tokens=[("<s>", vocab["<s>"])]
    )
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # joins words with spaces, tidies " ." etc.
    specials = ("<unk>", "<s>", "</s>", IMAGE_TOKEN, PAD_TOKEN, *extra_special_tokens)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token=PAD_TOKEN,
        padding_side="left",
        model_input_names=["input_ids", "attention_mask"],
        clean_up_tokenization_spaces=False,
    )
    return tokenizer


# ------------------------------------------------------------------------------------------- conversations


def sample_rng(seed: int, index: int) -> random.Random:
    """The generator of sample `index` of the stream `seed` (training, evaluation and data sets draw from these)."""
    return random.Random(seed * 1_000_003 + index)


def sample_conversation(sample: dict[str, Any]) -> list[dict[str, str]]:
    """A synthetic sample as LLaVA conversation turns: the image and question, then the long answer."""
    return [
        {"from": "human", "value": IMAGE_TOKEN + "\n" + sample["question"]},
        {"from": "gpt", "value": sample["answer_text"]},
    ]


def prompt_inputs(
    processor: DynamicLlavaProcessor, samples: list[dict[str, Any]], image: str = IMAGE_TOKEN
) -> dict[str, Any]:
    """Left-padded model inputs asking each sample's question about its image (for generate); `image`: the base's
    image placeholder."""
    processor.tokenizer.padding_side = "left"
    return processor(
        images=[s["image"] for s in samples],
        text=[vicuna_prompt(s["question"], image=image) for s in samples],
        return_tensors="pt",
        padding=True,
    )


# ----------------------------------------------------------------------------------------------- scoring

_ALL_ANSWERS = sorted({*SHAPES, *COLOURS, *POSITIONS}, key=lambda a: -len(a.split()))


def _words(text: str) -> list[str]:
    return [w for w in re.split(r"[\s.,?:'!;\"]+", text.lower()) if w]


def first_answer(generated_text: str) -> str | None:
    """The longest known answer (colour, shape or position) that the text starts with, or None."""
    words = _words(generated_text)
    for answer in _ALL_ANSWERS:  # longest first: "top left" wins over "top"
        parts = answer.split()
        if words[: len(parts)] == parts:
            return answer
    return None


def is_correct(generated_text: str, sample: dict) -> bool:
    """Whether the generated text starts with the sample's answer (case-insensitive, punctuation ignored).

    The longest known answer at the start counts, so "top left ..." is wrong for the answer "top".
    """
    return first_answer(generated_text) == sample["answer"].lower()
