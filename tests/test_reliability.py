"""No silent wrong answers: one regression test per case found by review, each named by the behaviour
it checks. The CLI's bad inputs are in test_cli.py; the randomized hunt is test_randomized.py.
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from transformers import AutoConfig, DynamicCache

from dynamic_llava import DynamicLlavaCache, DynamicLlavaForConditionalGeneration, DynamicLlavaStaticCache
from dynamic_llava.bench.stock import stock_llava
from dynamic_llava.transformers_compat import (
    CACHE_KEY,
    GENERATE_CONTINUES_A_CACHE_WITHOUT_USE_CACHE,
    cache_from_output,
)

from fixtures.tiny import IMAGE_TOKEN_ID, tiny_config, tiny_inputs, tiny_model

GREEDY = dict(do_sample=False, return_dict_in_generate=True)


def sparsity_off(model: DynamicLlavaForConditionalGeneration) -> DynamicLlavaForConditionalGeneration:
    model = copy.deepcopy(model)
    model.config.use_vision_predictor = model.config.use_output_text_predictor = False
    return model


def two_image_rows(seed: int = 4) -> dict:
    """Row 0: BOS, image a, words, image b, words. Row 1 (left padded): BOS, words, image c, words."""
    g = torch.Generator().manual_seed(seed)
    rows = [
        [1, 5] + [IMAGE_TOKEN_ID] * 16 + [6, 7] + [IMAGE_TOKEN_ID] * 16 + [8],
        [1, 9, 10] + [IMAGE_TOKEN_ID] * 16 + [11],
    ]
    width = max(map(len, rows))
    ids = torch.zeros(2, width, dtype=torch.long)
    mask = torch.zeros(2, width, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(row)
        mask[i, width - len(row) :] = 1
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": torch.randn(3, 3, 32, 32, generator=g)}


# ---- 1. several images in one row under num_return_sequences / num_beams -----------------------------------------


def test_a_rows_images_are_expanded_as_a_group(calibrated_model):
    inputs = two_image_rows()
    off = sparsity_off(calibrated_model)
    # greedy copies (sampling among the top 1): the same as stock on inputs expanded by hand (rows repeated, each
    # row's images with it)
    expanded = {
        "input_ids": inputs["input_ids"].repeat_interleave(2, dim=0),
        "attention_mask": inputs["attention_mask"].repeat_interleave(2, dim=0),
        "pixel_values": inputs["pixel_values"][[0, 1, 0, 1, 2, 2]],
    }
    ours = off.generate(**inputs, max_new_tokens=6, do_sample=True, top_k=1, num_return_sequences=2)
    stock = stock_llava(off).generate(**expanded, max_new_tokens=6, do_sample=False)
    assert torch.equal(ours, stock)
    # beams, sparsity on: the first step of every beam row sees its own row's images (its logits are the row's)
    out = calibrated_model.generate(**inputs, max_new_tokens=3, num_beams=2, output_logits=True, **GREEDY)
    with torch.no_grad():
        alone = calibrated_model(**inputs)
    first = out.logits[0]
    for beam_row, row in ((0, 0), (1, 0), (2, 1), (3, 1)):
        assert (first[beam_row] - alone.logits[row, -1]).abs().max() <= 1e-4


# ---- 2. training with left padding --------------------------------------------------------------------------------


def test_training_left_padded_row_equals_the_row_alone():
    model = tiny_model(1)
    model.train()
    model.model.gumbel_noise = False  # deterministic masks (the straight-through argmax)
    inputs = tiny_inputs([(5, 6, 7, 8, 9, 10), (12, 13)], seed=2)
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    batch = model(**inputs, labels=labels)
    real = inputs["attention_mask"][1].bool()
    alone = model(
        input_ids=inputs["input_ids"][1:, real],
        attention_mask=inputs["attention_mask"][1:, real],
        pixel_values=inputs["pixel_values"][1:],
        labels=labels[1:, real],
    )
    assert (batch.logits[1, real] - alone.logits[0]).abs().max() <= 1e-4


# ---- 3. every way of setting a field is validated ------------------------------------------------------------------

BAD_FIELDS = [
    ("vision_keep_rate", 0.0, r"outside \(0, 1\]"),
    ("vision_keep_rate", 1.5, r"outside \(0, 1\]"),
    ("vision_keep_rate", -1, r"outside \(0, 1\]"),
    ("use_vision_predictor", "no", "True or False"),
    ("sparse_layer", 4, r"outside 1\.\.3"),
    ("sparse_layer", 0, "integer >= 1"),
    ("vision_keep_tokens", 17, "more than the 16 tokens"),
    ("vision_keep_tokens", 0, "integer >= 1"),
]


@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    tiny_model(0).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("field, value, message", BAD_FIELDS)
def test_fields_are_checked_by_constructor_from_pretrained_and_assignment(saved_tiny, field, value, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**{field: value})
    with pytest.raises(ValueError, match=message):
        DynamicLlavaForConditionalGeneration.from_pretrained(saved_tiny, **{field: value})
    with pytest.raises(ValueError, match=message):
        AutoConfig.from_pretrained(saved_tiny, **{field: value})
    config = tiny_config()
    with pytest.raises(ValueError, match=message):
        setattr(config, field, value)


# ---- 4. a prompt chunk of one token is prompt text -----------------------------------------------------------------


@pytest.mark.parametrize("chunk", [4, 5])  # prompts of 9 tokens: the last chunk is 1 token with 4 (4 + 4 + 1)
def test_prefill_chunks_are_prompt_whatever_their_size(calibrated_model, chunk):
    ids = torch.tensor([[1, 5, 6, 7, 8, 9, 10, 11, 12]])
    whole = calibrated_model.generate(input_ids=ids, max_new_tokens=8, **GREEDY)
    chunked = calibrated_model.generate(input_ids=ids, max_new_tokens=8, prefill_chunk_size=chunk, **GREEDY)
    a, b = cache_from_output(whole), cache_from_output(chunked)
    assert torch.equal(whole.sequences, chunked.sequences)
    assert torch.equal(a.output_text_keep[0], b.output_text_keep[0])
    assert torch.equal(a.kept_lengths(), b.kept_lengths())
    assert a.output_text_keep[0].numel() == 7  # only the generated tokens fed back were scored


# ---- 5. a caller's own cache object ---------------------------------------------------------------------------------


def test_callers_cache_is_filled_in_place_or_refused_clearly(calibrated_model):
    inputs = tiny_inputs([(5, 6, 7, 8)])
    with pytest.raises(TypeError, match=r"needs its own cache.*DynamicLlavaCache\(model\.config\)"):
        calibrated_model.generate(**inputs, max_new_tokens=4, **{CACHE_KEY: DynamicCache()})
    own = DynamicLlavaCache(calibrated_model.config)
    first = calibrated_model.generate(**inputs, max_new_tokens=5, **GREEDY, **{CACHE_KEY: own})
    assert cache_from_output(first) is own and own.get_seq_length() == inputs["input_ids"].shape[1] + 4
    turn = torch.cat([first.sequences, torch.tensor([[20, 21, 22]])], dim=-1)
    second = calibrated_model.generate(input_ids=turn, max_new_tokens=5, **GREEDY, **{CACHE_KEY: own})
    # the same conversation through the cache generate() returned
    fresh = calibrated_model.generate(**inputs, max_new_tokens=5, **GREEDY)
    again = calibrated_model.generate(
        input_ids=turn, max_new_tokens=5, **GREEDY, **{CACHE_KEY: cache_from_output(fresh)}
    )
    assert torch.equal(second.sequences, again.sequences)
    assert torch.equal(own.output_text_keep[0], cache_from_output(again).output_text_keep[0])


# ---- 6. a cache built for another sparse layer ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda config: DynamicLlavaCache(config, sparse_layer=1), "built for sparse_layer=1"),
        (lambda config: DynamicLlavaCache(config, sparse_layer=4), "sparsification off"),
        (lambda config: DynamicLlavaCache(num_hidden_layers=6, sparse_layer=2), "has 6 layers"),
    ],
)
def test_a_mismatched_cache_is_refused(calibrated_model, make, message):
    inputs = tiny_inputs([(5, 6, 7)])
    with pytest.raises(ValueError, match=message):
        calibrated_model.generate(**inputs, max_new_tokens=3, **{CACHE_KEY: make(calibrated_model.config)})
    with pytest.raises(ValueError, match=message):
        calibrated_model(**inputs, **{CACHE_KEY: make(calibrated_model.config)})


# ---- 7. a filled cache with use_cache=False ------------------------------------------------------------------------


def test_filled_cache_with_use_cache_false_does_what_stock_does(calibrated_model):
    inputs = tiny_inputs([(5, 6, 7, 8)])
    off = sparsity_off(calibrated_model)
    stock = stock_llava(off)
    with torch.no_grad():
        ours_cache = off(**inputs)[CACHE_KEY]
        stock_cache = stock(**inputs, use_cache=True)[CACHE_KEY]
        step = torch.tensor([[9]])
        ours = off(input_ids=step, use_cache=False, **{CACHE_KEY: ours_cache})
        ref = stock(input_ids=step, use_cache=False, **{CACHE_KEY: stock_cache})
    assert (ours.logits - ref.logits).abs().max() <= 1e-5
    assert ours_cache.get_seq_length() == stock_cache.get_seq_length() == inputs["input_ids"].shape[1] + 1
    ours_cache = off(**inputs)[CACHE_KEY]
    if not GENERATE_CONTINUES_A_CACHE_WITHOUT_USE_CACHE:  # 4.57's and 5.0's generate() cannot (stock: IndexError)
        with pytest.raises(ValueError, match="use_cache=False.*cache"):
            off.generate(**inputs, max_new_tokens=4, use_cache=False, **{CACHE_KEY: ours_cache})
        return
    stock_cache = stock(**inputs, use_cache=True)[CACHE_KEY]
    a = off.generate(**inputs, max_new_tokens=4, do_sample=False, use_cache=False, **{CACHE_KEY: ours_cache})
    b = stock.generate(**inputs, max_new_tokens=4, do_sample=False, use_cache=False, **{CACHE_KEY: stock_cache})
    assert torch.equal(a, b)


# ---- 8. cache_implementation ---------------------------------------------------------------------------------------


def test_static_cache_implementation_gives_the_static_sparse_cache(calibrated_model, batch_inputs):
    dynamic = calibrated_model.generate(**batch_inputs, max_new_tokens=8, **GREEDY)
    static = calibrated_model.generate(**batch_inputs, max_new_tokens=8, cache_implementation="static", **GREEDY)
    assert isinstance(cache_from_output(static), DynamicLlavaStaticCache)
    assert torch.equal(dynamic.sequences, static.sequences)
    a, b = cache_from_output(dynamic), cache_from_output(static)
    assert all(torch.equal(x, y) for x, y in zip(a.output_text_keep, b.output_text_keep, strict=True))
    assert torch.equal(a.kept_lengths(), b.kept_lengths())


@pytest.mark.parametrize("implementation", ["offloaded", "quantized", "offloaded_static", "paged", "sliding_window"])
def test_other_cache_implementations_are_refused_naming_the_supported_ones(calibrated_model, implementation):
    inputs = tiny_inputs([(5, 6, 7)])
    with pytest.raises(ValueError, match=f"cache_implementation='{implementation}'.*'dynamic'.*'static'"):
        calibrated_model.generate(**inputs, max_new_tokens=3, cache_implementation=implementation)


# ---- 9. rows that reached EOS ---------------------------------------------------------------------------------------


def test_finished_rows_keep_their_bookkeeping(calibrated_model, batch_inputs):
    probe = calibrated_model.generate(**batch_inputs, max_new_tokens=12, do_sample=False)
    width = batch_inputs["input_ids"].shape[1]
    generated = probe[:, width:]
    # an end token that row 0 produces at its 3rd step and that no row produced before it
    eos = int(generated[0, 2])
    if eos in generated[:, :2].flatten().tolist():
        pytest.fail("pick another step: the probe's token occurs earlier")  # (deterministic weights: never)
    batch = calibrated_model.generate(**batch_inputs, max_new_tokens=12, eos_token_id=eos, pad_token_id=0, **GREEDY)
    cache = cache_from_output(batch)
    report = cache.sparsity_report()
    for row in range(3):
        real = batch_inputs["attention_mask"][row].bool()
        alone = calibrated_model.generate(
            input_ids=batch_inputs["input_ids"][row : row + 1, real],
            attention_mask=batch_inputs["attention_mask"][row : row + 1, real],
            pixel_values=batch_inputs["pixel_values"][row : row + 1],
            max_new_tokens=12,
            eos_token_id=eos,
            pad_token_id=0,
            **GREEDY,
        )
        alone_cache = cache_from_output(alone)
        n = alone.sequences.shape[1] - int(real.sum())
        assert torch.equal(batch.sequences[row, width : width + n], alone.sequences[0, -n:])
        assert torch.equal(cache.output_text_keep[row], alone_cache.output_text_keep[0])
        assert torch.equal(cache.kept_lengths()[:, row], alone_cache.kept_lengths()[:, 0])
        assert report["output_text_scored"][row] == alone_cache.sparsity_report()["output_text_scored"][0]
    assert report["output_text_scored"][0] == 2  # fed its first two tokens; the EOS it was fed ended the row


# ---- 10. dtype casts keep the predictors in float32 ----------------------------------------------------------------


@pytest.mark.parametrize("cast", ["to", "half", "bfloat16"])
def test_dtype_casts_keep_the_predictors_float32(saved_tiny, cast):
    model = tiny_model(0)
    dtype = torch.float16 if cast == "half" else torch.bfloat16
    cast_model = model.to(dtype) if cast == "to" else getattr(model, cast)()
    predictors = [cast_model.model.image_score_predictor, cast_model.model.output_text_score_predictor]
    assert all(p.dtype == torch.float32 for module in predictors for p in module.parameters())
    assert cast_model.lm_head.weight.dtype == dtype
    loaded = DynamicLlavaForConditionalGeneration.from_pretrained(saved_tiny, dtype=dtype).eval()
    inputs = tiny_inputs([(5, 6, 7), (8, 9)], seed=5)
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    with torch.no_grad():
        a, b = cast_model(**inputs), loaded(**inputs)
    assert all(torch.equal(x[0], y[0]) for x, y in zip(a.kept_vision_indices, b.kept_vision_indices, strict=True)), (
        "a cast model decides as a model loaded in that dtype"
    )


# ---- 11. text-only calls report one entry per row -----------------------------------------------------------------


def test_text_only_calls_report_an_empty_list_per_row(calibrated_model):
    ids = torch.tensor([[1, 5, 6, 7], [0, 1, 8, 9]])
    mask = (ids != 0).long()
    out = calibrated_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, **GREEDY)
    assert cache_from_output(out).kept_vision_indices == [[], []]
    with torch.no_grad():
        assert calibrated_model(input_ids=ids, attention_mask=mask).kept_vision_indices == [[], []]


# ---- 12. generate() in training mode -------------------------------------------------------------------------------


def test_generate_in_train_mode_runs_in_eval_and_restores_training(calibrated_model, caplog):
    model = copy.deepcopy(calibrated_model)
    inputs = tiny_inputs([(5, 6, 7, 8)])
    expected = model.generate(**inputs, max_new_tokens=6, **GREEDY)
    model.train()
    with caplog.at_level(logging.WARNING):
        got = model.generate(**inputs, max_new_tokens=6, **GREEDY)
    assert model.training and model.model.language_model.training
    assert torch.equal(expected.sequences, got.sequences)
    assert cache_from_output(got).get_seq_length() > 0
    assert torch.equal(cache_from_output(got).output_text_keep[0], cache_from_output(expected).output_text_keep[0])


# ---- 14. the crop refusal tells the truth --------------------------------------------------------------------------


@pytest.mark.parametrize("sparsity", [True, False])
def test_crop_is_refused_with_a_true_message(calibrated_model, sparsity):
    model = calibrated_model if sparsity else sparsity_off(calibrated_model)
    cache = model(**tiny_inputs([(5, 6, 7)]))[CACHE_KEY]
    with pytest.raises(ValueError, match="cannot be cropped.*not supported") as error:
        cache.crop(3)
    assert "use_vision_predictor" not in str(error.value) and "sparsity off" not in str(error.value)
    with pytest.raises(ValueError, match="(?i)assist"):  # refused by generate() itself, on every version
        model.generate(**tiny_inputs([(5, 6, 7)]), max_new_tokens=3, assistant_model=copy.deepcopy(model))


# ---- 15. return_dict=False, and an attention mask of the wrong shape -----------------------------------------------


def test_return_dict_false_gives_a_tuple(calibrated_model):
    inputs = tiny_inputs([(5, 6, 7)])
    with torch.no_grad():
        as_tuple = calibrated_model(**inputs, return_dict=False)
        as_dict = calibrated_model(**inputs)
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], as_dict.logits)


@pytest.mark.parametrize("shape", [(1, 5), (2, 24), (1, 24, 1)])
def test_attention_mask_of_the_wrong_shape_is_a_clear_error(calibrated_model, shape):
    inputs = tiny_inputs([(5, 6, 7, 8, 9)])
    with pytest.raises(ValueError, match="attention_mask has shape"):
        calibrated_model(**dict(inputs, attention_mask=torch.ones(shape, dtype=torch.long)))


# ---- 16. an image in a later turn, through the returned cache ------------------------------------------------------


def test_a_later_turns_image_reaches_the_model_through_generate(calibrated_model):
    """transformers 4.57's generate() forwards pixel_values only while the cache is empty: a second turn's image was
    silently embedded as plain <image> tokens. Now it is encoded (and pruned) like the first turn's."""
    inputs = tiny_inputs([(5, 6, 7)], seed=8)
    g = torch.Generator().manual_seed(9)
    second_image = torch.randn(1, 3, 32, 32, generator=g)
    kwargs = dict(max_new_tokens=5, do_sample=False, return_dict_in_generate=True, use_output_text_predictor=False)
    first = calibrated_model.generate(**inputs, **kwargs)
    turn = torch.tensor([[1, 9] + [IMAGE_TOKEN_ID] * 16 + [10]])
    ids = torch.cat([first.sequences, turn], dim=-1)
    cache = cache_from_output(first)
    second = calibrated_model.generate(input_ids=ids, pixel_values=second_image, **kwargs, **{CACHE_KEY: cache})
    assert [len(images) for images in cache_from_output(second).kept_vision_indices] == [2]
    # the same conversation in one go (no output-text pruning: the answers are all in both caches)
    both = torch.cat([inputs["pixel_values"], second_image])
    fresh = calibrated_model.generate(input_ids=ids, pixel_values=both, **kwargs)
    assert torch.equal(second.sequences, fresh.sequences)
    kept_fresh = cache_from_output(fresh).kept_vision_indices[0]
    assert all(
        torch.equal(a, b) for a, b in zip(cache_from_output(second).kept_vision_indices[0], kept_fresh, strict=True)
    )


def test_image_tokens_without_pixel_values_are_a_clear_error(calibrated_model):
    inputs = tiny_inputs([(5, 6, 7)])
    with pytest.raises(ValueError, match="image tokens but no pixel_values"):
        calibrated_model(input_ids=inputs["input_ids"])
    with pytest.raises(ValueError, match="image tokens but no pixel_values"):
        calibrated_model.generate(input_ids=inputs["input_ids"], max_new_tokens=2)


# ---- found after the review (this package's own hunt) --------------------------------------------------------------


def test_generate_from_inputs_embeds_equals_generate_from_input_ids(calibrated_model):
    """generate(inputs_embeds=...) was refused with transformers' generic "not implemented" message, although stock
    LLaVA runs it: now the same tokens and the same sparsity decisions as from input_ids, and off == stock."""
    inputs = tiny_inputs([(5, 6, 7), (8, 9)])
    embeds = calibrated_model.get_input_embeddings()(inputs["input_ids"])
    kwargs = dict(max_new_tokens=6, **GREEDY)
    from_ids = calibrated_model.generate(**inputs, **kwargs)
    from_embeds = calibrated_model.generate(
        inputs_embeds=embeds, attention_mask=inputs["attention_mask"], pixel_values=inputs["pixel_values"], **kwargs
    )
    assert torch.equal(from_embeds.sequences, from_ids.sequences[:, -6:])  # generate returns only the new tokens
    ids_cache, embeds_cache = cache_from_output(from_ids), cache_from_output(from_embeds)
    for a, b in zip(ids_cache.kept_vision_indices, embeds_cache.kept_vision_indices, strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    for a, b in zip(ids_cache.output_text_keep, embeds_cache.output_text_keep, strict=True):
        assert torch.equal(a, b)
    assert torch.equal(ids_cache.kept_lengths(), embeds_cache.kept_lengths())
    off = sparsity_off(calibrated_model)
    stock = stock_llava(off)
    same = dict(inputs_embeds=embeds, attention_mask=inputs["attention_mask"], pixel_values=inputs["pixel_values"])
    assert torch.equal(off.generate(**same, **kwargs).sequences, stock.generate(**same, **kwargs).sequences)


def test_a_cache_of_other_rows_is_a_clear_error(calibrated_model):
    """A filled cache continued with a different number of rows crashed inside torch.cat (5.x) or generate()'s input
    slicing (4.57)."""
    cache = DynamicLlavaCache(calibrated_model.config)
    calibrated_model.generate(**tiny_inputs([(5, 6, 7), (8, 9)]), max_new_tokens=3, **{CACHE_KEY: cache})
    with pytest.raises(ValueError, match="The cache holds 2 rows but this call has 1"):
        calibrated_model.generate(**tiny_inputs([(5, 6, 7)]), max_new_tokens=3, **{CACHE_KEY: cache})
    with pytest.raises(ValueError, match="The cache holds 2 rows but this call has 1"):
        calibrated_model(**tiny_inputs([(5, 6, 7)]), **{CACHE_KEY: cache})


def test_image_sizes_are_honoured_or_refused(calibrated_model):
    """`image_sizes` crashed inside the CLIP tower (as in stock LLaVA): sizes equal to the model's one image size
    change nothing; other sizes are refused, not ignored."""
    inputs = tiny_inputs([(5, 6, 7), (8, 9)])
    plain = calibrated_model.generate(**inputs, max_new_tokens=4, **GREEDY)
    stated = calibrated_model.generate(
        **inputs, image_sizes=torch.tensor([[32, 32], [32, 32]]), max_new_tokens=4, num_beams=1, **GREEDY
    )
    assert torch.equal(plain.sequences, stated.sequences)
    with pytest.raises(ValueError, match=r"image_sizes \[\[300, 500\], \[32, 32\]\] cannot be honoured"):
        calibrated_model.generate(**inputs, image_sizes=torch.tensor([[300, 500], [32, 32]]), max_new_tokens=2)


@pytest.mark.parametrize("cut", [0, 4])
def test_a_filled_cache_with_no_new_input_is_a_clear_error(calibrated_model, cut):
    """An input no longer than what the cache holds: 4.57 failed with an IndexError, 5.x fed the last cached token
    a second time (an answer unlike a fresh run's, silently; stock does the same). Refused, naming the fix."""
    inputs = tiny_inputs([(5, 6, 7, 8)])
    cache = calibrated_model(**inputs)[CACHE_KEY]
    ids = inputs["input_ids"][:, : inputs["input_ids"].shape[1] - cut]
    with pytest.raises(ValueError, match=r"already holds 21 tokens per row but the input has \d+.*followed by the new"):
        calibrated_model.generate(
            input_ids=ids, pixel_values=inputs["pixel_values"], max_new_tokens=3, **{CACHE_KEY: cache}
        )
    # the fix: the conversation so far plus new tokens
    more = torch.cat([inputs["input_ids"], torch.tensor([[9, 10]])], dim=-1)
    out = calibrated_model.generate(input_ids=more, max_new_tokens=3, **GREEDY, **{CACHE_KEY: cache})
    assert out.sequences.shape[1] == more.shape[1] + 3


def test_prefill_chunks_with_images_are_refused_on_every_version(calibrated_model):
    """5.x's generate() refuses chunked prefill with pixel_values; 4.57's cut the image tokens across chunks and
    failed with a misleading image-count error. Now one clear message on both (text-only chunking works)."""
    with pytest.raises(ValueError, match="prefill_chunk_size=5 with images.*prefill_chunk_size=None"):
        calibrated_model.generate(**tiny_inputs([(5, 6, 7), (8, 9)]), max_new_tokens=3, prefill_chunk_size=5)
