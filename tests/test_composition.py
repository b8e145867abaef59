"""Features that are right alone stay right together: later turns after early stops, masks over past columns, the
static cache, per-call settings on a `GenerationConfig`, beams, chunking, and the clear refusals where a combination
cannot be honoured."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from transformers import GenerationConfig, StaticCache

from dynamic_llava import DynamicLlavaCache, DynamicLlavaStaticCache
from dynamic_llava.bench.stock import stock_llava
from dynamic_llava.transformers_compat import CACHE_KEY, cache_from_output

from fixtures.conversation import Conversation
from fixtures.tiny import IMAGE_TOKEN_ID

GREEDY = dict(do_sample=False, return_dict_in_generate=True, pad_token_id=0)


def sparsity_off(model):
    model = copy.deepcopy(model)
    model.config.use_vision_predictor = model.config.use_output_text_predictor = False
    return model


def two_rows(seed: int = 3):
    """Row 0: a long prompt with an image; row 1: a short one with an image (left padded in the batch)."""
    g = torch.Generator().manual_seed(seed)
    rows = [[1, 5, *[IMAGE_TOKEN_ID] * 16, 6, 7, 8, 9, 10, 11], [1, 12, *[IMAGE_TOKEN_ID] * 16, 13]]
    return rows, [torch.randn(1, 3, 32, 32, generator=g), torch.randn(1, 3, 32, 32, generator=g)]


def first_token_of(model, rows, images, row: int, step: int) -> int:
    """The token `row` says at `step` of a 12-token greedy answer alone (an end token that stops it early)."""
    probe = Conversation(model, [rows[row]], [images[row]])
    said = probe.turn(None, 12, **GREEDY, check=False)["said"][0]
    return int(said[step])


CACHES = [("returned", False), ("returned", True), ("held", False), ("held", True)]
CACHE_IDS = ["returned-dynamic", "returned-static", "held-dynamic", "held-static"]


@pytest.mark.parametrize(("cache", "static"), CACHES, ids=CACHE_IDS)
def test_a_later_turn_after_a_row_stopped_early_equals_that_row_alone(calibrated_model, cache, static):
    rows, images = two_rows()
    eos = first_token_of(calibrated_model, rows, images, row=1, step=2)
    chat = Conversation(calibrated_model, rows, images, cache=cache, static=static, max_cache_len=96)
    first = chat.turn(None, 8, eos_token_id=eos, **GREEDY)
    assert first["said"][1].numel() == 3 and int(first["said"][1][-1]) == eos  # row 1 ended early (EOS included)
    # the EOS fed to the stopped row is held back: not counted until the next turn shows it
    chat.turn([[20, 21, 22], [23, 24]], 6, eos_token_id=eos, **GREEDY)
    chat.turn([[25], [26, 27, 28]], 5, eos_token_id=eos, **GREEDY)


@pytest.mark.parametrize(("cache", "static"), CACHES, ids=CACHE_IDS)
def test_a_row_stopped_by_a_stopping_criterion_is_not_scored_after_it_stopped(calibrated_model, cache, static):
    rows, images = two_rows(5)
    chat = Conversation(calibrated_model, rows, images, cache=cache, static=static, max_cache_len=96)
    chat.turn(None, 12, stop_after=[None, 3], **GREEDY)
    report = chat.batch.cache.sparsity_report()
    # row 1 said 3 tokens and was fed 2 of them while live: 2 decisions, not one per later padding step
    assert report["output_text_scored"] == [11, 2]
    chat.turn([[30, 31], [32]], 6, stop_after=[2, None], **GREEDY)


@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
def test_a_mask_over_past_columns_is_honoured_by_every_cache(calibrated_model, static):
    rows, images = two_rows(7)
    # sparsity off: ours (dynamic and static) == stock (DynamicCache and StaticCache)
    off = sparsity_off(calibrated_model)
    stock = stock_llava(off)
    said = {}
    for name, model, factory in [
        ("ours", off, None),
        ("stock", stock, (lambda: StaticCache(config=stock.config, max_cache_len=96)) if static else None),
    ]:
        chat = Conversation(
            model,
            rows,
            images,
            cache="held" if static else "returned",
            static=static,
            max_cache_len=96,
            cache_factory=factory,
            ours=name == "ours",
        )
        chat.turn(None, 5, **GREEDY)
        chat.hide(0, 3)  # a text token of row 0's prompt
        chat.hide(1, 1)
        said[name] = chat.turn([[40, 41], [42, 43, 44]], 6, **GREEDY)["batch"].sequences
    assert torch.equal(said["ours"], said["stock"])
    # sparsity on: the batch equals each row alone with the same columns hidden, for both caches
    chat = Conversation(calibrated_model, rows, images, cache="returned", static=static, max_cache_len=96)
    chat.turn(None, 5, **GREEDY)
    chat.hide(0, 3)
    chat.hide(1, 20)  # a generated token of row 1
    chat.turn([[40, 41], [42, 43, 44]], 6, **GREEDY)
    # and the sparse layers hide them too: keeping every token (vision_keep_rate 1, output-text predictor off), the
    # sparse path computes what stock computes under the same mask
    keep_all = dict(GREEDY, use_output_text_predictor=False, vision_keep_rate=1.0)
    said = {}
    for name, model, factory in [
        ("ours", calibrated_model, None),
        ("stock", stock, (lambda: StaticCache(config=stock.config, max_cache_len=96)) if static else None),
    ]:
        chat = Conversation(
            model,
            rows,
            images,
            cache="held" if static else "returned",
            static=static,
            max_cache_len=96,
            cache_factory=factory,
            ours=name == "ours",
        )
        chat.turn(None, 5, **(keep_all if name == "ours" else GREEDY))
        chat.hide(0, 3)
        chat.hide(0, 24)
        chat.hide(1, 20)
        said[name] = chat.turn([[40, 41], [42, 43, 44]], 6, **(keep_all if name == "ours" else GREEDY))
    assert torch.equal(said["ours"]["batch"].sequences, said["stock"]["batch"].sequences)
    assert chat.turns == 2 and said["ours"]["said"][0].numel() == 6


def test_the_static_cache_answers_like_the_dynamic_one_over_masked_turns(calibrated_model):
    rows, images = two_rows(9)
    eos = first_token_of(calibrated_model, rows, images, row=0, step=3)
    said = []
    for static in (False, True):
        chat = Conversation(calibrated_model, rows, images, cache="returned", static=static, max_cache_len=96)
        chat.turn(None, 8, eos_token_id=eos, **GREEDY)
        chat.hide(1, 2)
        chat.turn([[50, 51], [52]], 6, eos_token_id=eos, vision_keep_tokens=3, **GREEDY)
        said.append((chat.batch.ids, chat.batch.cache.kept_lengths(), chat.batch.cache.output_text_keep))
    assert torch.equal(said[0][0], said[1][0])
    assert torch.equal(said[0][1], said[1][1])
    assert all(torch.equal(a, b) for a, b in zip(said[0][2], said[1][2], strict=True))


def test_per_call_fields_on_a_generation_config_are_honoured_with_keyword_precedence(calibrated_model):
    rows, images = two_rows(11)
    inputs = {
        "input_ids": torch.tensor([rows[0]]),
        "attention_mask": torch.ones(1, len(rows[0]), dtype=torch.long),
        "pixel_values": images[0],
    }
    model = copy.deepcopy(calibrated_model)

    def kept(out):
        return [int(i.numel()) for i in cache_from_output(out).kept_vision_indices[0]]

    config = GenerationConfig(max_new_tokens=3, do_sample=False, pad_token_id=0, vision_keep_tokens=3)
    assert kept(model.generate(**inputs, generation_config=config, return_dict_in_generate=True)) == [3]
    # a keyword argument wins over the passed config
    out = model.generate(**inputs, generation_config=config, vision_keep_tokens=5, return_dict_in_generate=True)
    assert kept(out) == [5]
    # the model's own generation config, then the passed one over it
    model.generation_config.vision_keep_tokens = 7
    assert kept(model.generate(**inputs, max_new_tokens=3, return_dict_in_generate=True)) == [7]
    assert kept(model.generate(**inputs, generation_config=config, return_dict_in_generate=True)) == [3]
    # checked like keyword arguments
    model.generation_config.vision_keep_tokens = None
    bad = GenerationConfig(max_new_tokens=3, vision_keep_rate=1.5)
    with pytest.raises(ValueError, match="vision_keep_rate is 1.5, outside"):
        model.generate(**inputs, generation_config=bad)
    both = GenerationConfig(max_new_tokens=3, vision_keep_rate=0.5)
    with pytest.raises(ValueError, match="were both given"):
        model.generate(**inputs, generation_config=both, vision_keep_tokens=4, vision_keep_rate=0.5)
    # the keep budget is one setting: a keyword count replaces a config's rate (and a keyword rate a config's
    # count); a keyword that turns the vision predictor off drops a config's budget
    assert kept(
        model.generate(**inputs, generation_config=both, vision_keep_tokens=4, return_dict_in_generate=True)
    ) == [4]
    model.generation_config.vision_keep_tokens = 6
    assert kept(model.generate(**inputs, max_new_tokens=3, vision_keep_rate=0.5, return_dict_in_generate=True)) == [8]
    model.generation_config.vision_keep_tokens = None
    off = model.generate(**inputs, generation_config=both, use_vision_predictor=False, return_dict_in_generate=True)
    assert kept(off) == [16]
    # a turn's budget from its config, another turn's from a keyword (through the same cache)
    chat = Conversation(calibrated_model, rows, images)
    chat.turn(None, 4, generation_config=GenerationConfig(vision_keep_tokens=2), **GREEDY)
    assert [int(i.numel()) for i in chat.batch.cache.kept_vision_indices[0]] == [2]


@pytest.mark.parametrize("rate", [np.float32(0.5), np.float64(0.25), torch.tensor(0.5), 1, np.int64(1)], ids=repr)
def test_keep_rates_of_any_real_numeric_type_are_accepted(calibrated_model, rate):
    rows, images = two_rows()
    inputs = {"input_ids": torch.tensor([rows[0]]), "pixel_values": images[0]}
    out = calibrated_model.generate(**inputs, max_new_tokens=2, vision_keep_rate=rate, **GREEDY)
    assert [int(i.numel()) for i in cache_from_output(out).kept_vision_indices[0]] == [int(16 * float(rate))]
    config = copy.deepcopy(calibrated_model.config)
    config.vision_keep_rate = rate
    assert type(config.vision_keep_rate) is float and config.to_dict()["vision_keep_rate"] == float(rate)


@pytest.mark.parametrize(
    ("rate", "message"),
    [
        (float("nan"), "is NaN"),
        (np.float32(1.5), "is 1.5, outside"),
        ("0.5", "must be a number, got '0.5'"),
        (True, "must be a number, got True"),
        (0, "is 0, outside"),
    ],
    ids=["nan", "too-large", "str", "bool", "zero"],
)
def test_a_keep_rate_that_is_not_a_fraction_is_refused_with_its_true_reason(calibrated_model, rate, message):
    inputs = {"input_ids": torch.tensor([[1, 5, 6]])}
    with pytest.raises(ValueError, match=message):
        calibrated_model.generate(**inputs, max_new_tokens=2, vision_keep_rate=rate)


def test_a_static_cache_too_small_for_the_answer_is_refused_before_decoding(calibrated_model):
    rows, images = two_rows()
    inputs = {"input_ids": torch.tensor([rows[0]]), "pixel_values": images[0]}
    cache = DynamicLlavaStaticCache(calibrated_model.config, max_cache_len=30)
    with pytest.raises(ValueError, match=r"max_cache_len=30 tokens per row, but this call needs 33.*max_cache_len=33"):
        calibrated_model.generate(**inputs, max_new_tokens=10, **{CACHE_KEY: cache}, **GREEDY)
    assert cache.get_seq_length() == 0  # nothing ran


def test_max_cache_len_sizes_the_static_cache_for_later_turns(calibrated_model):
    rows, images = two_rows()
    chat = Conversation(calibrated_model, rows, images, cache="returned", static=True, max_cache_len=120)
    chat.turn(None, 6, **GREEDY)
    assert chat.batch.cache.max_cache_len == 120
    chat.turn([[60, 61, 62, 63], [64]], 8, **GREEDY)  # (the call-sized cache would be full here)


def test_cache_implementation_with_a_passed_cache_is_refused(calibrated_model):
    inputs = {"input_ids": torch.tensor([[1, 5, 6]])}
    for implementation, cache in [
        ("static", DynamicLlavaCache(calibrated_model.config)),
        ("dynamic", DynamicLlavaStaticCache(calibrated_model.config, max_cache_len=40)),
    ]:
        with pytest.raises(ValueError, match="Passing both cache_implementation"):
            calibrated_model.generate(
                **inputs, max_new_tokens=2, cache_implementation=implementation, **{CACHE_KEY: cache}
            )


def test_a_cache_filled_by_beam_search_cannot_continue_the_conversation(calibrated_model):
    rows, images = two_rows()
    inputs = {"input_ids": torch.tensor([rows[0]]), "pixel_values": images[0]}
    out = calibrated_model.generate(**inputs, max_new_tokens=4, num_beams=2, **GREEDY)
    cache = cache_from_output(out)
    following = torch.cat([out.sequences, torch.tensor([[70, 71]])], 1)
    with pytest.raises(ValueError, match="filled by beam search"):
        calibrated_model.generate(input_ids=following, max_new_tokens=2, **{CACHE_KEY: cache}, **GREEDY)
    with pytest.raises(ValueError, match="filled by beam search"):
        calibrated_model(input_ids=following[:, -2:], **{CACHE_KEY: cache})
    # without the cache the conversation goes on (the history is computed again), like the row alone
    chat = Conversation(calibrated_model, rows, images, cache="none")
    chat.turn(None, 4, num_beams=2, **GREEDY)
    chat.turn([[72], [73, 74]], 4, **GREEDY)


def test_a_per_call_select_strategy_is_honoured_or_refused_clearly(calibrated_model):
    rows, images = two_rows()
    inputs = {"input_ids": torch.tensor([rows[0]]), "pixel_values": images[0]}
    with pytest.raises(ValueError, match=r"vision_feature_select_strategy='full' makes each image 17 tokens"):
        calibrated_model.generate(**inputs, max_new_tokens=2, vision_feature_select_strategy="full")
    # a prompt expanded for "full" (17 tokens per image) runs, and each row equals the row alone
    full_rows = [[t for t in row] for row in rows]
    for row in full_rows:
        at = row.index(IMAGE_TOKEN_ID)
        row.insert(at, IMAGE_TOKEN_ID)
    chat = Conversation(calibrated_model, full_rows, images)
    chat.turn(None, 4, vision_feature_select_strategy="full", vision_keep_tokens=5, **GREEDY)
    assert [len(i) for i in chat.batch.cache.kept_vision_indices[0]] == [5]
    with pytest.raises(ValueError, match="is not one of 'default'"):
        calibrated_model.generate(**inputs, max_new_tokens=2, vision_feature_select_strategy="cls")


def test_chunked_prefill_of_left_padded_rows_equals_unchunked_uncached_and_alone(calibrated_model):
    rows = [[1, 5, 6, 7, 8, 9, 10, 11], [1, 12, 13], [1, 14, 15, 16, 17]]
    chat = Conversation(calibrated_model, rows, [torch.zeros(0, 3, 32, 32)] * 3)
    chunked = chat.turn(None, 6, prefill_chunk_size=2, **GREEDY)["batch"].sequences
    inputs = {"input_ids": chat.batch.ids[:, : chunked.shape[1] - 6], "attention_mask": chat.batch.mask[:, :-6]}
    plain = calibrated_model.generate(**inputs, max_new_tokens=6, **GREEDY).sequences
    uncached = calibrated_model.generate(**inputs, max_new_tokens=6, use_cache=False, **GREEDY).sequences
    assert torch.equal(chunked, plain) and torch.equal(chunked, uncached)


@pytest.mark.parametrize("expand", [{"num_beams": 2}, {"num_return_sequences": 2, "do_sample": True, "top_k": 1}])
def test_inputs_embeds_with_images_expand_like_input_ids(calibrated_model, expand):
    rows, images = two_rows()
    ids = torch.tensor([rows[0]])
    embeds = calibrated_model.get_input_embeddings()(ids)
    kwargs = dict(GREEDY, max_new_tokens=4, **expand)
    from_embeds = calibrated_model.generate(inputs_embeds=embeds, pixel_values=images[0], **kwargs).sequences
    from_ids = calibrated_model.generate(input_ids=ids, pixel_values=images[0], **kwargs).sequences
    assert torch.equal(from_embeds, from_ids[:, ids.shape[1] :])
    off = sparsity_off(calibrated_model)
    stock = stock_llava(off).generate(inputs_embeds=embeds, pixel_values=images[0], **kwargs).sequences
    assert torch.equal(off.generate(inputs_embeds=embeds, pixel_values=images[0], **kwargs).sequences, stock)
