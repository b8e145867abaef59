"""LLaVA conversation data: vicuna_v1 prompts, labels on the answers only, clear errors that name the sample."""

import json

import pytest
from PIL import Image

from dynamic_llava.processor import VICUNA_V1_SYSTEM
from dynamic_llava.sparse_training import answer_span
from dynamic_llava.training.data import IGNORE_INDEX, DataError, LlavaConversationDataset, collate


@pytest.fixture
def folder(tmp_path):
    Image.new("RGB", (40, 30), (200, 10, 10)).save(tmp_path / "a.png")
    return tmp_path


def sample(**changes):
    base = {
        "id": "s1",
        "image": "a.png",
        "conversations": [
            {"from": "human", "value": "<image>\nw5 w6"},
            {"from": "gpt", "value": "w7 w8 w9"},
            {"from": "human", "value": "w10"},
            {"from": "gpt", "value": "w11"},
        ],
    }
    base.update(changes)
    return base


def test_prompt_and_labels(folder, tiny_processor):
    processor = tiny_processor
    data = LlavaConversationDataset([sample()], folder, processor, image_seq_length=16)
    item = data[0]
    tok = processor.tokenizer
    # the same tokens as the processor's vicuna_v1 chat template for this conversation, the image expanded to 16
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "w5 w6"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "w7 w8 w9"}]},
        {"role": "user", "content": [{"type": "text", "text": "w10"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "w11"}]},
    ]
    text = processor.apply_chat_template(messages)
    assert text == f"{VICUNA_V1_SYSTEM} USER: <image>\nw5 w6 ASSISTANT: w7 w8 w9</s>USER: w10 ASSISTANT: w11</s>"
    expected = []
    for t in tok(text)["input_ids"]:
        expected.extend([t] * 16 if t == tok.convert_tokens_to_ids("<image>") else [t])
    assert item["input_ids"].tolist() == expected
    answers = [tok.decode([t]) for t in item["labels"].tolist() if t != IGNORE_INDEX]
    assert answers == ["w7", "w8", "w9", "</s>", "w11", "</s>"]
    assert item["pixel_values"].shape == (3, 32, 32)

    batch = collate([item, data[0]], pad_token_id=tok.pad_token_id)
    assert batch["pixel_values"].shape == (2, 3, 32, 32)
    start, end = answer_span(batch["labels"], batch["attention_mask"])
    n = item["input_ids"].numel()
    assert start.tolist() == [n - 2, n - 2] and end.tolist() == [n, n]  # the final answer: "w11 </s>"


def test_collate_pads_right_and_masks_labels(folder, tiny_processor):
    processor = tiny_processor
    short = sample(conversations=sample()["conversations"][:2])
    data = LlavaConversationDataset([sample(), short], folder, processor, image_seq_length=16)
    batch = collate([data[0], data[1]], pad_token_id=0)
    n1 = data[1]["input_ids"].numel()
    assert batch["attention_mask"][1].tolist() == [1] * n1 + [0] * (batch["input_ids"].shape[1] - n1)
    assert (batch["labels"][1, n1:] == IGNORE_INDEX).all()
    start, end = answer_span(batch["labels"], batch["attention_mask"])
    assert end[1] == n1 and start[1] == n1 - 4  # "w7 w8 w9 </s>"


@pytest.mark.parametrize(
    "bad, message",
    [
        (sample(image="missing.png"), "sample 0 \\(id 's1'\\): image file 'missing.png' not found"),
        (
            sample(conversations=[{"from": "human", "value": "w5"}, {"from": "gpt", "value": "w6"}]),
            "sample 0 \\(id 's1'\\) has an image but 0 '<image>'",
        ),
        (sample(conversations=[]), "sample 0 \\(id 's1'\\) has no conversations"),
        (
            {"id": 7, "conversations": [{"from": "human", "value": "<image>\nw5"}, {"from": "gpt", "value": "w6"}]},
            "sample 0 \\(id 7\\) has '<image>' in its text but no 'image' file",
        ),
        (sample(conversations=[{"from": "gpt", "value": "w5"}]), "turn 0 must be"),
    ],
)
def test_bad_samples_name_the_sample(folder, bad, message, tiny_processor):
    with pytest.raises(DataError, match=message):
        LlavaConversationDataset([bad], folder, tiny_processor, image_seq_length=16)


def test_bad_files(folder, tiny_processor):
    with pytest.raises(DataError, match="does not exist"):
        LlavaConversationDataset(folder / "nope.json", folder, tiny_processor, image_seq_length=16)
    (folder / "broken.json").write_text("[{")
    with pytest.raises(DataError, match="not valid JSON"):
        LlavaConversationDataset(folder / "broken.json", folder, tiny_processor, image_seq_length=16)
    (folder / "ok.json").write_text(json.dumps([sample()]))
    assert len(LlavaConversationDataset(folder / "ok.json", folder, tiny_processor, image_seq_length=16)) == 1


def test_another_base_trains_on_its_own_chat_template_with_labels_on_each_answer_and_end_of_turn(folder):
    """Qwen2.5-VL's items: the stock chat template (default system turn, `<|im_start|>` turns), the image expanded by
    the processor, labels on exactly what each assistant turn adds (its answer, `<|im_end|>` and the newline)."""
    from dynamic_llava.training.data import collate_chat

    from fixtures.bases import QWEN_IMAGE_TOKEN_ID, tiny_qwen2_5_vl_processor

    processor = tiny_qwen2_5_vl_processor()
    data = LlavaConversationDataset([sample(), sample(id="s2")], folder, processor, image_seq_length=None)
    item = data[0]
    tokenizer = processor.tokenizer
    text = tokenizer.decode(item["input_ids"])
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n")
    answers, run = [], []
    for token, label in zip(item["input_ids"].tolist(), item["labels"].tolist(), strict=True):
        if label != IGNORE_INDEX:
            assert label == token
            run.append(token)
        elif run:
            answers.append(tokenizer.decode(run))
            run = []
    if run:
        answers.append(tokenizer.decode(run))
    assert answers == ["w7 w8 w9<|im_end|>\n", "w11<|im_end|>\n"]
    grid = item["image_grid_thw"]
    assert int((item["input_ids"] == QWEN_IMAGE_TOKEN_ID).sum()) == int(grid.prod()) // 4
    batch = collate_chat([data[0], data[1]], pad_token_id=0)
    assert batch["pixel_values"].shape[0] == 2 * int(grid.prod()) and batch["image_grid_thw"].shape == (2, 3)


def test_a_chat_template_item_cut_inside_its_image_is_refused(folder):
    from fixtures.bases import tiny_qwen2_5_vl_processor

    data = LlavaConversationDataset([sample()], folder, tiny_qwen2_5_vl_processor(), None, max_length=22)
    with pytest.raises(DataError, match="cuts into the image"):
        data[0]
