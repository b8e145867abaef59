"""A seeded, bounded randomized hunt over multi-turn conversations: features combined the way users combine them.

Each draw is a sentence of a small grammar:

    conversation := cache first-turn later-turn{1,2}
    cache        := returned | held   x   dynamic | static          (or none: every turn recomputes the history)
    turn         := new user tokens per row, a budget (keyword or GenerationConfig), early stops (EOS or a stopping
                    criterion on some rows), past columns masked before it, beams (last turn, or with no cache)

and every turn is checked against the same conversation run row by row alone (the tokens each row says, its
`kept_lengths()`, output-text decisions and kept vision indices), and the conversation with sparsity off against
stock LLaVA on the same weights. The quick loop (`-m "not slow"`) runs the first draws, the full suite all of them.
"""

from __future__ import annotations

import copy
import random

import pytest
import torch
from transformers import GenerationConfig, StaticCache

from dynamic_llava.bench.stock import stock_llava

from fixtures.conversation import Conversation
from fixtures.tiny import IMAGE_TOKEN_ID

SEED = 20261204
DRAWS = 48
QUICK_DRAWS = 10
TOKENS = 16  # image tokens of the tiny model
GREEDY = dict(do_sample=False, return_dict_in_generate=True, pad_token_id=0)
BUDGETS = [
    {},
    {"vision_keep_tokens": 3},
    {"vision_keep_tokens": 6},
    {"vision_keep_rate": 0.5},
    {"use_output_text_predictor": False},
    {"use_vision_predictor": False},
]


def draw(index: int, rng: random.Random) -> dict:
    cache = rng.choice(["returned", "returned", "held", "none"])
    static = cache != "none" and rng.random() < 0.5
    rows, images = [], []
    for _ in range(rng.randint(1, 4)):
        words = [rng.randrange(3, 100) for _ in range(rng.randint(1, 5))]
        n = rng.choice([0, 1, 1, 2])
        for _ in range(n):
            at = rng.randint(0, len(words))
            words[at:at] = [IMAGE_TOKEN_ID] * TOKENS
        rows.append([1, *words])
        images.append(n)
    turns = []
    for t in range(rng.randint(2, 3)):
        turns.append(
            {
                "new": None if t == 0 else [[rng.randrange(3, 100) for _ in range(rng.randint(1, 3))] for _ in rows],
                "max_new_tokens": rng.randint(3, 6),
                "budget": rng.choice(BUDGETS),
                "via_config": rng.random() < 0.4,
                "stop": rng.choice([None, None, "eos", "criterion"]),
                "hide": t > 0 and rng.random() < 0.5,
                "beams": False,
            }
        )
    last = turns[-1] if cache != "none" else rng.choice(turns)
    last["beams"] = rng.random() < 0.3
    return {
        "index": index,
        "seed": rng.randrange(2**31),
        "cache": cache,
        "static": static,
        "rows": rows,
        "images": images,
        "turns": turns,
    }


def draws():
    rng = random.Random(SEED)
    for index in range(DRAWS):
        case = draw(index, rng)
        marks = () if index < QUICK_DRAWS else (pytest.mark.slow,)
        name = f"draw{index}-{case['cache']}{'-static' if case['static'] else ''}-b{len(case['rows'])}"
        yield pytest.param(case, id=name, marks=marks)


def turn_kwargs(turn: dict, rng: random.Random, rows: int, eos: int | None) -> tuple[dict, list | None]:
    kwargs = dict(GREEDY)
    if turn["beams"]:
        kwargs["num_beams"] = 2
    stop_after = None
    if turn["stop"] == "eos" and eos is not None:
        kwargs["eos_token_id"] = eos
    elif turn["stop"] == "criterion":
        stop_after = [rng.choice([None, 1, 2, 3]) for _ in range(rows)]
    return kwargs, stop_after


def sparsity_off(model):
    model = copy.deepcopy(model)
    model.config.use_vision_predictor = model.config.use_output_text_predictor = False
    return model


@pytest.mark.parametrize("case", list(draws()))
def test_random_conversations_keep_every_property(calibrated_model, case):
    rng = random.Random(case["seed"])
    g = torch.Generator().manual_seed(case["seed"])
    images = [torch.randn(n, 3, 32, 32, generator=g) for n in case["images"]]
    kinds = dict(cache=case["cache"], static=case["static"], max_cache_len=160)
    ours = Conversation(calibrated_model, case["rows"], images, **kinds)
    off = sparsity_off(calibrated_model)
    stock = stock_llava(off)
    off_chat = Conversation(off, case["rows"], images, **kinds)
    stock_factory = (lambda: StaticCache(config=stock.config, max_cache_len=160)) if case["static"] else None
    stock_kinds = dict(kinds, cache="held" if case["static"] else case["cache"], cache_factory=stock_factory)
    stock_chat = Conversation(stock, case["rows"], images, ours=False, **stock_kinds)
    # stock 4.57 repeats pixel_values image by image when it expands a row of several images for beams, and no
    # stock cache continues under beam search (ours repeats its rows): stock is compared where it can run
    compare_stock = not any(t["beams"] for t in case["turns"]) or max(case["images"]) < 2
    eos = None
    for turn in case["turns"]:
        if turn["stop"] == "eos" and eos is None:  # a token the first row says early in this turn alone
            new = turn["new"][0] if turn["new"] else None
            said = ours.peek(0, new, turn["max_new_tokens"], **GREEDY, **turn["budget"])
            eos = int(said[min(1, said.numel() - 1)])
        kwargs, stop_after = turn_kwargs(turn, rng, len(case["rows"]), eos)
        if turn["hide"]:  # a past column of each row that did not stop early: one of its own tokens so far
            # (their histories may differ in length: each says EOS on its own; stock runs only where it can)
            chats = (ours, off_chat, stock_chat) if compare_stock else (ours, off_chat)
            for row in range(len(case["rows"])):
                index = rng.randrange(1, min(chat.alone[row].ids.shape[1] for chat in chats))
                if any(chat.stopped_early[row] for chat in chats):
                    continue
                for chat in chats:
                    chat.hide(row, index)
        budget = turn["budget"]
        if turn["via_config"] and budget:
            ours_kwargs = dict(kwargs, generation_config=GenerationConfig(**budget))
        else:
            ours_kwargs = dict(kwargs, **budget)
        ours.turn(turn["new"], turn["max_new_tokens"], stop_after=stop_after, **ours_kwargs)
        off_out = off_chat.turn(turn["new"], turn["max_new_tokens"], stop_after=stop_after, **kwargs)
        if turn["beams"] and case["cache"] != "none" and ours.turns > 1:
            compare_stock = False
        if compare_stock:
            stock_out = stock_chat.turn(
                turn["new"], turn["max_new_tokens"], stop_after=stop_after, check=False, **kwargs
            )
            assert torch.equal(off_out["batch"].sequences, stock_out["batch"].sequences)
