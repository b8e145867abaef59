"""A seeded, bounded randomized hunt for wrong answers: random batches through generate(), each checked
against the properties that must hold whatever the input.

Each draw picks 1-6 rows with 0-2 images at random places and random prompt lengths (left padded), a decoding mode
(greedy, sampling, beams, num_return_sequences), sometimes an end token that stops a row in mid-batch, sometimes
prompt chunking (text-only prompts) or a second turn through the returned cache, and per-call sparsity settings. The
checks: cached == uncached; each row == that row alone (tokens, kept vision indices, output-text decisions,
`kept_lengths()`); sparsity off == stock LLaVA; `stored_bytes()` == the formula of the kept counts.

`python -m pytest -q` runs all 120 draws (about 15 s); the quick loop `-m "not slow"` runs the first 30.
"""

from __future__ import annotations

import random

import pytest
import torch

from dynamic_llava.bench.stock import stock_llava
from dynamic_llava.transformers_compat import CACHE_KEY, cache_from_output

from fixtures.tiny import IMAGE_TOKEN_ID

SEED = 20261201
DRAWS = 120
QUICK_DRAWS = 30  # the first 30 run in the quick loop (`-m "not slow"`); all 120 in the full suite
TOKENS = 16  # image tokens of the tiny model


def build_rows(rng: random.Random, batch: int) -> tuple[dict, list[list[int]], list[int]]:
    """Left-padded inputs; returns (inputs, each row's token list, each row's image count)."""
    rows, images = [], []
    for _ in range(batch):
        words = [rng.randrange(3, 100) for _ in range(rng.randint(1, 6))]
        n_images = rng.choice([0, 1, 1, 2])
        for _ in range(n_images):
            at = rng.randint(0, len(words))
            words[at:at] = [IMAGE_TOKEN_ID] * TOKENS
        rows.append([1, *words])
        images.append(n_images)
    width = max(map(len, rows))
    ids = torch.zeros(batch, width, dtype=torch.long)
    mask = torch.zeros(batch, width, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(row)
        mask[i, width - len(row) :] = 1
    inputs = {"input_ids": ids, "attention_mask": mask}
    if sum(images):
        g = torch.Generator().manual_seed(rng.randrange(2**31))
        inputs["pixel_values"] = torch.randn(sum(images), 3, 32, 32, generator=g)
    return inputs, rows, images


def row_alone(inputs: dict, rows: list[list[int]], images: list[int], row: int) -> dict:
    first = sum(images[:row])
    alone = {"input_ids": torch.tensor([rows[row]]), "attention_mask": torch.ones(1, len(rows[row]), dtype=torch.long)}
    if images[row]:
        alone["pixel_values"] = inputs["pixel_values"][first : first + images[row]]
    return alone


def stored_bytes_formula(cache, model) -> int:
    text = model.config.text_config
    per_token = 2 * text.num_key_value_heads * (text.hidden_size // text.num_attention_heads) * 4
    batch = cache.kept_lengths().shape[1]
    dense = cache.sparse_layer * batch * cache.get_seq_length() * per_token
    longest = int(cache.kept_lengths()[-1].max()) if cache.is_sparse else 0
    return dense + (len(cache.layers) - cache.sparse_layer) * batch * longest * per_token


def draws():
    rng = random.Random(SEED)
    for index in range(DRAWS):
        case = {
            "index": index,
            "seed": rng.randrange(2**31),
            "batch": rng.randint(1, 6),
            "mode": rng.choice(["greedy", "greedy", "sampling", "beams", "return_sequences"]),
            "eos": rng.random() < 0.4,
            "second_turn": rng.random() < 0.3,
            "chunk": rng.choice([None, 2, 3]),
            "per_call": rng.choice(
                [
                    {},
                    {},
                    {"use_vision_predictor": False},
                    {"use_output_text_predictor": False},
                    {"vision_keep_tokens": 6},
                ]
            ),
        }
        marks = () if index < QUICK_DRAWS else (pytest.mark.slow,)
        yield pytest.param(case, id=f"draw{index}-{case['mode']}-b{case['batch']}", marks=marks)


@pytest.mark.parametrize("case", list(draws()))
def test_random_batches_keep_every_property(calibrated_model, case):
    model = calibrated_model
    rng = random.Random(case["seed"])
    inputs, rows, images = build_rows(rng, case["batch"])
    new = 7
    mode = case["mode"]
    kwargs = dict(max_new_tokens=new, return_dict_in_generate=True, pad_token_id=0, **case["per_call"])
    if mode == "beams":
        kwargs.update(num_beams=2, num_return_sequences=2, do_sample=False)
    elif mode == "return_sequences":  # (copies of the greedy answer: sampling among the top 1)
        kwargs.update(num_return_sequences=2, do_sample=True, top_k=1)
    elif mode == "sampling":
        kwargs.update(do_sample=True, top_k=8)
    else:
        kwargs.update(do_sample=False)
    if case["chunk"] and "pixel_values" not in inputs:
        kwargs["prefill_chunk_size"] = case["chunk"]
    if case["eos"] and mode != "sampling":  # an end token the first row produces at its third step
        probe = model.generate(**inputs, **kwargs)
        kwargs["eos_token_id"] = int(probe.sequences[0, inputs["input_ids"].shape[1] + 2])

    torch.manual_seed(case["seed"])
    out = model.generate(**inputs, **kwargs)
    cache = cache_from_output(out)
    width = inputs["input_ids"].shape[1]
    expand = kwargs.get("num_return_sequences", 1)

    # the cache holds what the kept counts say, and each row's decisions are its own
    assert cache.stored_bytes() == stored_bytes_formula(cache, model)
    assert len(cache.kept_vision_indices) == case["batch"] * expand
    for row in range(case["batch"] * expand):
        assert len(cache.kept_vision_indices[row]) == images[row // expand]

    if mode == "sampling":  # the uncached forward over the sampled sequence re-derives every decision
        start = {"output_text_start": width}
        with torch.no_grad():
            again = model(
                **{k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")},
                input_ids=out.sequences[:, :-1],
                attention_mask=torch.cat([inputs["attention_mask"], torch.ones(case["batch"], new - 1)], 1).long(),
                use_cache=False,
                **start,
                **case["per_call"],
            )
        if again.output_text_keep is not None:
            for row in range(case["batch"]):
                assert torch.equal(again.output_text_keep[row], cache.output_text_keep[row])
        return

    # cached == uncached (prefill chunking needs a cache)
    no_cache = {k: v for k, v in kwargs.items() if k != "prefill_chunk_size"}
    uncached = model.generate(**inputs, **no_cache, use_cache=False)
    assert torch.equal(out.sequences, uncached.sequences)

    # sparsity off == stock LLaVA on the same weights. Rows with several images under expansion: stock 4.57
    # repeats pixel_values image by image (a row [a, b] gets [a, a]), so it is given rows expanded by hand
    off = dict(kwargs, use_vision_predictor=False, use_output_text_predictor=False)
    off.pop("vision_keep_tokens", None)
    # (stock without prefill chunking: transformers 5.0's generate() cannot chunk a stock prefill)
    per_call = ("use_vision_predictor", "use_output_text_predictor", "prefill_chunk_size")
    stock_kwargs = {k: v for k, v in off.items() if k not in per_call}
    stock_inputs = inputs
    if expand > 1 and max(images) > 1:
        if mode == "beams":
            stock_kwargs = None  # (beam search expands inside generate(): no hand-expanded stock reference)
        else:
            order = [
                i
                for row, n in enumerate(images)
                for _ in range(expand)
                for i in range(sum(images[:row]), sum(images[:row]) + n)
            ]
            stock_inputs = {k: v.repeat_interleave(expand, dim=0) for k, v in inputs.items() if k != "pixel_values"}
            stock_inputs["pixel_values"] = inputs["pixel_values"][order]
            stock_kwargs = dict(stock_kwargs, num_return_sequences=1)
    if stock_kwargs is not None:
        ours_off = model.generate(**inputs, **off).sequences
        assert torch.equal(ours_off, stock_llava(model).generate(**stock_inputs, **stock_kwargs).sequences)

    # each row == that row alone
    lengths = cache.kept_lengths()
    for row in range(case["batch"]):
        alone = model.generate(**row_alone(inputs, rows, images, row), **kwargs)
        alone_cache = cache_from_output(alone)
        for copy in range(expand):
            got = out.sequences[row * expand + copy, width:]
            want = alone.sequences[copy, len(rows[row]) :]
            assert torch.equal(got[: want.numel()], want)
            tail = got[want.numel() :]  # after the row ended: padding (beam search repeats the end token)
            assert ((tail == 0) | (tail == kwargs.get("eos_token_id", 0))).all()
            if mode == "beams":
                continue  # beams reorder rows; their caches hold the surviving beams' histories
            batch_row = row * expand + copy
            assert torch.equal(cache.output_text_keep[batch_row], alone_cache.output_text_keep[copy])
            assert torch.equal(lengths[:, batch_row], alone_cache.kept_lengths()[:, copy])
            assert all(
                torch.equal(a, b)
                for a, b in zip(
                    cache.kept_vision_indices[batch_row], alone_cache.kept_vision_indices[copy], strict=True
                )
            )

    # a second turn through the returned cache == the same conversation generated fresh
    if case["second_turn"] and mode == "greedy":
        turn = torch.randint(3, 100, (case["batch"], 3), generator=torch.Generator().manual_seed(case["seed"]))
        ids = torch.cat([out.sequences, turn], 1)
        mask = torch.cat([inputs["attention_mask"], (out.sequences[:, width:] != -1).long(), torch.ones_like(turn)], 1)
        second = model.generate(input_ids=ids, attention_mask=mask, **kwargs, **{CACHE_KEY: cache})
        fresh = model.generate(**inputs, **kwargs)
        again = model.generate(input_ids=ids, attention_mask=mask, **kwargs, **{CACHE_KEY: cache_from_output(fresh)})
        assert torch.equal(second.sequences, again.sequences)
