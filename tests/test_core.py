"""Core properties of Dynamic-LLaVA on tiny random models (the invariants of docs/design.md)."""

import copy

import pytest
import torch
from transformers import DynamicCache

from dynamic_llava import DynamicLlavaCache, DynamicLlavaConfig
from dynamic_llava.bench.stock import stock_llava
from dynamic_llava.training.calibration import calibrate_output_text_bias
from dynamic_llava.transformers_compat import CACHE_KEY, image_features_list
from dynamic_llava.transformers_compat import cache_from_output as cache_of

from fixtures.tiny import IMAGE_TOKEN_ID, tiny_config, tiny_inputs, tiny_model

GREEDY = dict(do_sample=False, return_dict_in_generate=True, output_logits=True)


def sparsity_off(model):
    model = copy.deepcopy(model)
    model.config.use_vision_predictor = False
    model.config.use_output_text_predictor = False
    return model


# ---- the model variants the invariants run on ------------------------------------------------------------------------

# which predictors run at inference, and where the sparse layers start (1, 2 and L-1 of the 4-layer tiny model)
PREDICTORS = {
    "both": {},
    "vision_only": {"use_output_text_predictor": False},
    "text_only": {"use_vision_predictor": False},
}
SPARSE_LAYERS = [1, 2, 3]
VARIANTS = [(predictors, layer) for predictors in PREDICTORS for layer in SPARSE_LAYERS]
_BUILT: dict = {}


@pytest.fixture(params=VARIANTS, ids=[f"{p}-l{layer}" for p, layer in VARIANTS])
def variant(request):
    """A tiny model per (predictor setting, sparse_layer); an output-text predictor is calibrated to keep ~half."""
    if request.param not in _BUILT:
        predictors, layer = request.param
        model = tiny_model(0, sparse_layer=layer, **PREDICTORS[predictors])
        if model.config.use_output_text_predictor:
            calibrate_output_text_bias(model, tiny_inputs([(5, 6, 7, 8, 9)]), max_new_tokens=30)
        _BUILT[request.param] = model
    return _BUILT[request.param]


def image_keep_count(model):
    return int(16 * model.config.vision_keep_rate) if model.config.use_vision_predictor else 16


# ---- 1. sparsification off == stock LLaVA --------------------------------------------------------------------------


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_sparsity_off_equals_stock_llava(attn, batch_inputs):
    model = sparsity_off(tiny_model(1, attn_implementation=attn))
    stock = stock_llava(model)
    with torch.no_grad():
        ours, ref = model(**batch_inputs), stock(**batch_inputs)
    assert ours.token_indices is None
    assert (ours.logits - ref.logits).abs().max() <= 1e-5

    a = model.generate(**batch_inputs, max_new_tokens=20, **GREEDY)
    b = stock.generate(**batch_inputs, max_new_tokens=20, **GREEDY)
    assert torch.equal(a.sequences, b.sequences)
    step_diff = max((x - y).abs().max().item() for x, y in zip(a.logits, b.logits, strict=True))
    assert step_diff <= 1e-5
    assert isinstance(cache_of(a), DynamicLlavaCache)
    assert cache_of(a).stored_bytes() == cache_of(a).dense_bytes()

    a = model.generate(**batch_inputs, max_new_tokens=8, num_beams=4, do_sample=False)
    b = stock.generate(**batch_inputs, max_new_tokens=8, num_beams=4, do_sample=False)
    assert torch.equal(a, b)


def test_sparsity_off_per_call_equals_stock_on_every_variant(variant, batch_inputs):
    """Both predictors off for one call: stock compute through the sparse machinery's dense cache."""
    off = dict(use_vision_predictor=False, use_output_text_predictor=False)
    a = variant.generate(**batch_inputs, max_new_tokens=10, **GREEDY, **off)
    b = stock_llava(variant).generate(**batch_inputs, max_new_tokens=10, **GREEDY)
    assert torch.equal(a.sequences, b.sequences)
    assert max((x - y).abs().max().item() for x, y in zip(a.logits, b.logits, strict=True)) <= 1e-5


def test_keeping_everything_equals_stock_on_every_variant(variant, batch_inputs):
    """Sparse layers that keep every token (vision rate 1, no output-text predictor) compute what stock does."""
    # (a keep rate applies only with the vision predictor on: a model whose config has it off keeps every image token)
    keep_all = {"vision_keep_rate": 1.0} if variant.config.use_vision_predictor else {}
    a = variant.generate(**batch_inputs, max_new_tokens=10, use_output_text_predictor=False, **keep_all, **GREEDY)
    b = stock_llava(variant).generate(**batch_inputs, max_new_tokens=10, **GREEDY)
    assert torch.equal(a.sequences, b.sequences)
    assert max((x - y).abs().max().item() for x, y in zip(a.logits, b.logits, strict=True)) <= 1e-4


# ---- 2. physical dropping == masking ---------------------------------------------------------------------------------


def masked_reference(model, inputs_embeds, positions, keep):
    """
    Every token through every layer (eager attention, float masks built here); in layers >= sparse_layer a key is
    visible iff it is kept (or is the query itself). Returns logits `[batch, q, V]` of all positions.
    """
    lm = model.model.language_model
    sparse_layer = model.config.sparse_layer
    batch, q, _ = inputs_embeds.shape
    causal = torch.ones(q, q, dtype=torch.bool).tril()
    dense = causal.expand(batch, q, q)
    sparse = dense & keep[:, None, :]
    sparse = sparse | torch.eye(q, dtype=torch.bool)
    dtype = inputs_embeds.dtype

    def to_float(visible):
        return torch.zeros(visible.shape, dtype=dtype).masked_fill(~visible, torch.finfo(dtype).min)[:, None]

    hidden = inputs_embeds
    rope = lm.rotary_emb(hidden, positions)
    for i, layer in enumerate(lm.layers):
        mask = to_float(dense if i < sparse_layer else sparse)
        kwargs = {"attention_mask": mask, "position_ids": positions, "position_embeddings": rope}
        if "cache_position" in layer.forward.__code__.co_varnames:
            kwargs["cache_position"] = torch.arange(q)
        hidden = layer(hidden, **kwargs)
    return model.lm_head(lm.norm(hidden))


def embeds_of(model, input_ids, pixel_values):
    embeds = model.get_input_embeddings()(input_ids)
    mask = input_ids == IMAGE_TOKEN_ID
    out = model.model.get_image_features(
        pixel_values=pixel_values,
        vision_feature_layer=model.config.vision_feature_layer,
        vision_feature_select_strategy=model.config.vision_feature_select_strategy,
    )
    features = torch.cat(image_features_list(out), dim=0)
    return embeds.masked_scatter(mask[..., None], features)


def test_sparse_prefill_equals_masking_reference(variant):
    model = copy.deepcopy(variant)
    model.config._attn_implementation = model.config.text_config._attn_implementation = "eager"
    inputs = tiny_inputs([(5, 6, 7, 8, 9, 10)], seed=1)
    with torch.no_grad():
        out = model(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"])
        embeds = embeds_of(model, inputs["input_ids"], inputs["pixel_values"])
        q = embeds.shape[1]
        image_start = 2
        keep = torch.ones(1, q, dtype=torch.bool)
        keep[0, image_start : image_start + 16] = False
        kept = out.kept_vision_indices[0][0]
        assert len(kept) == image_keep_count(model)
        keep[0, image_start + kept] = True
        ref = masked_reference(model, embeds, torch.arange(q)[None], keep)
    computed = out.token_indices[0] if out.token_indices is not None else torch.arange(q)
    assert torch.equal(computed, keep[0].nonzero().flatten())
    assert (out.logits[0] - ref[0, keep[0]]).abs().max() <= 1e-5


def test_nocache_step_equals_masking_reference(variant):
    model = variant
    inputs = tiny_inputs([(5, 6, 7, 8, 9)])
    gen = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    prompt_len = inputs["input_ids"].shape[1]
    with torch.no_grad():
        out = model(input_ids=gen, pixel_values=inputs["pixel_values"], use_cache=False, output_text_start=prompt_len)
        embeds = embeds_of(model, gen, inputs["pixel_values"])
        q = gen.shape[1]
        keep = torch.ones(1, q, dtype=torch.bool)
        keep[0, 2:18] = False
        keep[0, 2 + out.kept_vision_indices[0][0]] = True
        if model.config.use_output_text_predictor:
            keep[0, prompt_len:] = out.output_text_keep[0]
            assert 0 < int(out.output_text_keep.sum()) < out.output_text_keep.numel()
        else:
            assert out.output_text_keep is None
        ref = masked_reference(model, embeds, torch.arange(q)[None], keep)
    # the last (current) token always computes; dropped generated tokens are gone from layers >= l
    assert (out.logits[0, -1] - ref[0, -1]).abs().max() <= 1e-5


# ---- 3. cached == uncached ----------------------------------------------------------------------------------------


def test_cached_and_uncached_generate_agree(variant):
    model = variant
    inputs = tiny_inputs([(5, 6, 7, 8, 9)])
    cached = model.generate(**inputs, max_new_tokens=30, **GREEDY)
    uncached = model.generate(**inputs, max_new_tokens=30, use_cache=False, do_sample=False)
    assert torch.equal(cached.sequences, uncached)
    decisions = cache_of(cached).output_text_keep[0]
    prompt_len = inputs["input_ids"].shape[1]
    with torch.no_grad():  # the no-cache forward over the final input re-scores every generated token
        last = model(
            input_ids=uncached[:, :-1],
            pixel_values=inputs["pixel_values"],
            use_cache=False,
            output_text_start=prompt_len,
        )
    if model.config.use_output_text_predictor:
        assert decisions.numel() == 29
        assert 0.2 <= decisions.float().mean() <= 0.8
        assert torch.equal(last.output_text_keep[0], decisions)
    else:
        assert decisions.numel() == 0 and last.output_text_keep is None
    assert torch.equal(last.kept_vision_indices[0][0], cache_of(cached).kept_vision_indices[0][0])


# ---- 4. batch row == row alone ---------------------------------------------------------------------------------------


def assert_rows_equal_rows_alone(model, batch_inputs, n=16):
    batch = model.generate(**batch_inputs, max_new_tokens=n, **GREEDY)
    batch_cache = cache_of(batch)
    width = batch_inputs["input_ids"].shape[1]
    lengths = batch_cache.kept_lengths()
    kept_total = []
    for row in range(3):
        real = batch_inputs["attention_mask"][row].bool()
        alone_inputs = {
            "input_ids": batch_inputs["input_ids"][row : row + 1, real],
            "attention_mask": batch_inputs["attention_mask"][row : row + 1, real],
            "pixel_values": batch_inputs["pixel_values"][row : row + 1],
        }
        alone = model.generate(**alone_inputs, max_new_tokens=n, **GREEDY)
        alone_cache = cache_of(alone)
        assert torch.equal(batch.sequences[row, width:], alone.sequences[0, real.sum() :])
        assert torch.equal(batch_cache.kept_vision_indices[row][0], alone_cache.kept_vision_indices[0][0])
        assert torch.equal(batch_cache.output_text_keep[row], alone_cache.output_text_keep[0])
        assert torch.equal(lengths[:, row], alone_cache.kept_lengths()[:, 0])
        kept_total.append(int(lengths[-1, row]))
    assert len(set(kept_total)) > 1, "rows should keep different counts"

    # storage: dense layers batch x padded length, sparse layers batch x max kept (plus at most one spare block)
    text = model.config.text_config
    per_entry = 2 * text.num_key_value_heads * (text.hidden_size // text.num_attention_heads) * 4
    sparse_layer, num_layers = model.config.sparse_layer, text.num_hidden_layers
    dense_len = width + n - 1
    expected = sparse_layer * 3 * dense_len * per_entry + (num_layers - sparse_layer) * 3 * max(kept_total) * per_entry
    assert batch_cache.stored_bytes() == expected
    assert batch_cache.dense_bytes() == num_layers * 3 * dense_len * per_entry
    for layer in batch_cache.sparse_layers:
        assert max(kept_total) <= layer.keys.shape[-2] <= max(kept_total) + batch_cache.table.block_size + 1


def test_batch_rows_equal_rows_alone(variant, batch_inputs):
    assert_rows_equal_rows_alone(variant, batch_inputs)


def test_batch_rows_equal_rows_alone_with_eager_attention(calibrated_model, batch_inputs):
    model = copy.deepcopy(calibrated_model)
    model.config._attn_implementation = model.config.text_config._attn_implementation = "eager"
    assert_rows_equal_rows_alone(model, batch_inputs)


# ---- 5. cache contents after N tokens, and a second user turn -----------------------------------------------------


def test_sparse_layers_hold_prompt_kept_plus_kept_generated_and_second_turn(variant):
    model = variant
    inputs = tiny_inputs([(5, 6, 7, 8, 9)])
    prompt_len = inputs["input_ids"].shape[1]
    n = 20
    first = model.generate(**inputs, max_new_tokens=n, do_sample=False, return_dict_in_generate=True)
    cache = cache_of(first)
    prompt_kept = prompt_len - 16 + image_keep_count(model)
    decisions_first = cache.output_text_keep[0]
    kept_generated = int(decisions_first.sum()) if model.config.use_output_text_predictor else n - 1
    lengths = cache.kept_lengths()[:, 0]
    sparse_layer = model.config.sparse_layer
    assert lengths[:sparse_layer].tolist() == [prompt_len + n - 1] * sparse_layer
    assert lengths[sparse_layer:].tolist() == [prompt_kept + kept_generated] * (len(lengths) - sparse_layer)
    assert cache.get_seq_length() == prompt_len + n - 1
    positions = cache.stored_positions()[0]
    assert positions.tolist() == sorted(positions.tolist()) and min(positions.tolist()) >= 0

    # second user turn through the returned cache: the chunk (last answer token + new turn) is cached fully
    turn = torch.tensor([[20, 21, 22, 23]])
    ids = torch.cat([first.sequences, turn], dim=-1)
    chunk = ids.shape[1] - cache.get_seq_length()
    decisions_before = decisions_first.clone()
    second = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=6,
        do_sample=False,
        return_dict_in_generate=True,
        **{CACHE_KEY: cache},
    )
    cache2 = cache_of(second)
    decisions = cache2.output_text_keep[0]
    assert torch.equal(decisions[: decisions_before.numel()], decisions_before)
    new_kept = int(decisions[decisions_before.numel() :].sum()) if model.config.use_output_text_predictor else 5
    expected = [prompt_kept + kept_generated + chunk + new_kept] * (len(lengths) - sparse_layer)
    assert cache2.kept_lengths()[sparse_layer:, 0].tolist() == expected
    # the continuation equals an uncached run of the same conversation under the same rule
    with torch.no_grad():
        fresh = model.generate(**inputs, max_new_tokens=n, do_sample=False, return_dict_in_generate=True)
        again = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=6,
            do_sample=False,
            **{CACHE_KEY: cache_of(fresh)},
        )
    assert torch.equal(again, second.sequences)


# ---- 6. sampling, beams, num_return_sequences ----------------------------------------------------------------------


def test_sampling_is_reproducible(calibrated_model, batch_inputs):
    runs = []
    for _ in range(2):
        torch.manual_seed(123)
        runs.append(calibrated_model.generate(**batch_inputs, max_new_tokens=10, do_sample=True, top_k=20))
    assert torch.equal(runs[0], runs[1])


def test_num_return_sequences_rows_keep_their_own_decisions(calibrated_model):
    model = calibrated_model
    inputs = tiny_inputs([(5, 6, 7, 8, 9)])
    torch.manual_seed(7)
    out = model.generate(
        **inputs, max_new_tokens=12, do_sample=True, num_return_sequences=3, return_dict_in_generate=True
    )
    cache = cache_of(out)
    prompt_len = inputs["input_ids"].shape[1]
    assert len(cache.output_text_keep) == 3
    for row in range(3):
        with torch.no_grad():
            rerun = model(
                input_ids=out.sequences[row : row + 1, :-1], pixel_values=inputs["pixel_values"], use_cache=False,
                output_text_start=prompt_len,
            )  # fmt: skip
        assert torch.equal(rerun.output_text_keep[0], cache.output_text_keep[row])
        assert int(cache.kept_lengths()[-1, row]) == prompt_len - 12 + int(cache.output_text_keep[row].sum())


@pytest.mark.parametrize("num_beams", [2, 4])
def test_beam_search_cached_equals_uncached(calibrated_model, batch_inputs, num_beams):
    model = calibrated_model
    kwargs = dict(max_new_tokens=10, num_beams=num_beams, num_return_sequences=2, do_sample=False)
    cached = model.generate(**batch_inputs, **kwargs)
    uncached = model.generate(**batch_inputs, use_cache=False, **kwargs)
    assert torch.equal(cached, uncached)


def test_reorder_and_batch_ops_move_bookkeeping_with_rows(calibrated_model, batch_inputs):
    model = calibrated_model
    out = model.generate(**batch_inputs, max_new_tokens=8, do_sample=False, return_dict_in_generate=True)
    cache = cache_of(out)
    lengths, decisions = cache.kept_lengths(), cache.output_text_keep
    vision = cache.kept_vision_indices
    perm = torch.tensor([2, 0, 0])
    moved = copy.deepcopy(cache)
    moved.reorder_cache(perm)
    assert torch.equal(moved.kept_lengths(), lengths[:, perm])
    for i, j in enumerate(perm.tolist()):
        assert torch.equal(moved.output_text_keep[i], decisions[j])
        assert torch.equal(moved.kept_vision_indices[i][0], vision[j][0])
    # one more decode step on the reordered cache == the same step on the original rows
    next_ids = out.sequences[:, -1:]
    mask = torch.cat([batch_inputs["attention_mask"], torch.ones(3, 8, dtype=torch.long)], dim=-1)
    with torch.no_grad():
        a = model(input_ids=next_ids[perm], attention_mask=mask[perm], **{CACHE_KEY: moved})
        b = model(input_ids=next_ids, attention_mask=mask, **{CACHE_KEY: copy.deepcopy(cache)})
    assert (a.logits - b.logits[perm]).abs().max() <= 1e-5

    rep = copy.deepcopy(cache)
    rep.batch_repeat_interleave(2)
    assert torch.equal(rep.kept_lengths(), lengths.repeat_interleave(2, dim=1))
    sel = copy.deepcopy(cache)
    sel.batch_select_indices(torch.tensor([1]))
    assert torch.equal(sel.kept_lengths(), lengths[:, [1]])
    assert torch.equal(sel.output_text_keep[0], decisions[1])
    sel.reset()
    assert sel.get_seq_length() == 0 and sel.stored_bytes() == 0


def test_streamer_and_stopping_criteria(calibrated_model):
    from transformers import StoppingCriteria, StoppingCriteriaList, TextStreamer

    class Collect(TextStreamer):
        def __init__(self):
            self.tokens = []

        def put(self, value):
            self.tokens.extend(value.flatten().tolist())

        def end(self):
            pass

    class StopAfter(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), input_ids.shape[1] >= self.limit, dtype=torch.bool)

    inputs = tiny_inputs([(5, 6, 7)])
    stop = StopAfter()
    stop.limit = inputs["input_ids"].shape[1] + 5
    streamer = Collect()
    out = calibrated_model.generate(
        **inputs, max_new_tokens=20, do_sample=False, streamer=streamer, stopping_criteria=StoppingCriteriaList([stop])
    )
    assert out.shape[1] == stop.limit
    assert streamer.tokens == out[0].tolist()


# ---- dtypes and attention implementations ------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_dtypes_and_attention_run(calibrated_model, batch_inputs, dtype, attn):
    model = copy.deepcopy(calibrated_model).to(dtype)
    model.config._attn_implementation = attn
    model.config.text_config._attn_implementation = attn
    inputs = dict(batch_inputs, pixel_values=batch_inputs["pixel_values"].to(dtype))
    out = model.generate(**inputs, max_new_tokens=6, **GREEDY)
    cache = cache_of(out)
    assert cache.layers[-1].keys.dtype == dtype
    assert all(torch.isfinite(step).all() for step in out.logits)
    assert cache.stored_bytes() < cache.dense_bytes()
    assert all(len(v[0]) == int(16 * model.config.vision_keep_rate) for v in cache.kept_vision_indices)


# ---- 8. bad input -------------------------------------------------------------------------------------------------


def test_wrong_number_of_images_is_a_clear_error(calibrated_model):
    inputs = tiny_inputs([(5, 6, 7)])
    two = torch.cat([inputs["pixel_values"]] * 2)
    with pytest.raises(ValueError, match="image tokens .* but 2 image"):
        calibrated_model(input_ids=inputs["input_ids"], pixel_values=two)


def test_wrong_pixel_shape_is_a_clear_error(calibrated_model):
    inputs = tiny_inputs([(5, 6, 7)])
    with pytest.raises(ValueError, match="pixel_values has shape .* processor"):
        calibrated_model(input_ids=inputs["input_ids"], pixel_values=torch.randn(1, 3, 64, 64))


def test_plain_dynamic_cache_is_refused_or_converted(calibrated_model):
    inputs = tiny_inputs([(5, 6, 7)])
    # an empty plain cache is refused with the fix (a silent swap would leave the caller's object empty)
    with pytest.raises(TypeError, match="needs its own cache.*DynamicLlavaCache\\(model.config\\)"):
        calibrated_model.generate(**inputs, max_new_tokens=3, **{CACHE_KEY: DynamicCache()})
    # the caller's own DynamicLlavaCache is filled in place
    own = DynamicLlavaCache(calibrated_model.config)
    out = calibrated_model.generate(**inputs, max_new_tokens=3, return_dict_in_generate=True, **{CACHE_KEY: own})
    assert cache_of(out) is own and own.get_seq_length() == inputs["input_ids"].shape[1] + 2
    # a filled one cannot be: it holds entries the sparse layers would have dropped
    stock = stock_llava(calibrated_model)
    filled = stock(**inputs, use_cache=True)
    filled_cache = filled[CACHE_KEY]
    with pytest.raises(TypeError, match="needs its own cache.*Pass no cache"):
        calibrated_model(input_ids=inputs["input_ids"][:, -1:], **{CACHE_KEY: filled_cache})


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"sparse_layer": 0}, "sparse_layer"),
        ({"sparse_layer": 4}, "outside 1..3"),
        ({"vision_keep_rate": 0.0}, "vision_keep_rate"),
        ({"vision_keep_rate": 1.5}, "outside \\(0, 1\\]"),
        ({"output_text_keep_rate": -0.1}, "output_text_keep_rate"),
        ({"predictor_d_model": 18, "predictor_nhead": 4}, "not divisible by predictor_nhead"),
        ({"predictor_d_model": 18, "predictor_nhead": 2}, "not divisible by 4"),
        ({"use_vision_predictor": "yes"}, "True or False"),
    ],
)
def test_invalid_config_is_a_clear_error(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**overrides)


def test_config_round_trip(tmp_path):
    config = tiny_config(vision_keep_rate=0.3, use_output_text_predictor=False, sparse_layer=1)
    config.save_pretrained(tmp_path)
    loaded = DynamicLlavaConfig.from_pretrained(tmp_path)
    for field in ("sparse_layer", "vision_keep_rate", "use_output_text_predictor", "predictor_d_model"):
        assert getattr(loaded, field) == getattr(config, field)
    assert loaded.text_config.num_hidden_layers == 4
    assert loaded.model_type == "dynamic_llava"


def test_model_state_dict_matches_stock_plus_predictors(calibrated_model):
    stock = stock_llava(calibrated_model)
    ours = set(calibrated_model.state_dict())
    extra = ours - set(stock.state_dict())
    assert ours >= set(stock.state_dict())
    assert extra and all(
        k.split(".")[:2] in (["model", "image_score_predictor"], ["model", "output_text_score_predictor"])
        for k in extra
    )


def test_labels_loss_follows_the_computed_positions(calibrated_model):
    inputs = tiny_inputs([(5, 6, 7, 8, 9)])
    labels = inputs["input_ids"].masked_fill(inputs["input_ids"] == IMAGE_TOKEN_ID, -100)
    off = sparsity_off(calibrated_model)
    with torch.no_grad():
        ours = off(**inputs, labels=labels)
        stock = stock_llava(off)(**inputs, labels=labels)
        sparse = calibrated_model(**inputs, labels=labels)
    assert abs(ours.loss.item() - stock.loss.item()) <= 1e-5
    # with pruning, the logits cover the computed positions; labels are gathered to them (dropped image tokens
    # carry -100 anyway), so the loss is the mean over the same text targets
    kept = sparse.token_indices[0]
    gathered = labels[0, kept]
    shift_logits, shift_labels = sparse.logits[0, :-1], gathered[1:]
    expected = torch.nn.functional.cross_entropy(shift_logits, shift_labels, ignore_index=-100)
    assert torch.allclose(sparse.loss, expected, atol=1e-6)


class _HostSyncCounter(torch.overrides.TorchFunctionMode):
    """Counts tensor -> Python conversions (each waits for the device on a GPU)."""

    SYNCS = ("__bool__", "item", "tolist", "__int__", "__index__", "__float__", "nonzero")

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.count += getattr(func, "__name__", "") in self.SYNCS
        return func(*args, **(kwargs or {}))


def test_host_syncs_per_step_do_not_grow_with_depth():
    """The sparse layers share one storage plan per call: a few host syncs per forward, whatever the layer count."""
    counts = {}
    for layers in (4, 12):
        model = tiny_model(3, text_config={"num_hidden_layers": layers})
        inputs = tiny_inputs([(5, 6, 7, 8), (9, 8)], seed=1)
        calibrate_output_text_bias(model, inputs, max_new_tokens=10)
        per_call = []
        with torch.no_grad():
            with _HostSyncCounter() as counter:
                out = model(**inputs, use_cache=True)
            per_call.append(counter.count)
            for _ in range(4):
                step = out.logits[:, -1:].argmax(-1)
                with _HostSyncCounter() as counter:
                    out = model(input_ids=step, **{CACHE_KEY: out[CACHE_KEY]})
                per_call.append(counter.count)
        counts[layers] = per_call
    assert counts[4] == counts[12], counts
    assert max(counts[4][1:]) <= 3, counts  # per decode step
