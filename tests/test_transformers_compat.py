"""`transformers_compat.py` detects features of the installed transformers, not versions: each detected name agrees
with what the installed API does, and each helper gives one answer for both layouts."""

import pytest
import torch
from transformers import LlavaConfig, TrainingArguments
from transformers.models.llava.modeling_llava import LlavaCausalLMOutputWithPast

from dynamic_llava import transformers_compat as compat


def test_the_cache_key_is_the_field_the_installed_outputs_have():
    assert compat.CACHE_KEY in LlavaCausalLMOutputWithPast.__dataclass_fields__


@pytest.mark.parametrize("key", ["cache", "past_key_values"])
def test_the_cache_of_an_output_is_found_under_either_name(key):
    marker = object()
    assert compat.cache_from_output({key: marker}) is marker
    with pytest.raises(ValueError, match="holds no cache"):
        compat.cache_from_output({key: None})


def test_hub_keys_are_the_layout_both_majors_load():
    assert compat.hub_key("model.vision_tower.encoder.layers.0.mlp.fc1.weight") == (
        "model.vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight"
    )
    kept = "model.vision_tower.vision_model.embeddings.patch_embedding.weight"
    assert compat.hub_key(kept) == kept
    assert compat.hub_key("model.language_model.layers.0.mlp.up_proj.weight").startswith("model.language_model.")


def test_the_dtype_field_round_trips_through_the_installed_config(tmp_path):
    config = LlavaConfig()
    setattr(config, compat.config_dtype_field(config), "bfloat16")
    config.save_pretrained(tmp_path)
    loaded = LlavaConfig.from_pretrained(tmp_path)
    stored = getattr(loaded, "dtype", None) or getattr(loaded, "torch_dtype", None)
    assert str(stored).replace("torch.", "") == "bfloat16"


def test_the_warmup_share_goes_in_the_field_training_arguments_have():
    (name, value), *_ = compat.trainer_warmup_kwargs(0.03).items()
    assert name in TrainingArguments.__dataclass_fields__ and value == 0.03


def test_a_layers_output_is_its_hidden_states_tuple_or_not():
    hidden = torch.zeros(1, 2, 3)
    assert compat.layer_output(hidden) is hidden and compat.layer_output((hidden, None)) is hidden


def test_rotary_fields_4_57_reads_are_added_to_a_5x_config_once():
    written_by_5x = {"rope_parameters": {"rope_type": "default", "type": "mrope", "mrope_section": [4, 6, 6],
                                         "rope_theta": 10000.0}}  # fmt: skip
    fields = compat.legacy_rope_fields(written_by_5x)
    assert fields == {"rope_theta": 10000.0, "rope_scaling": {"rope_type": "default", "type": "mrope",
                                                               "mrope_section": [4, 6, 6]}}  # fmt: skip
    assert compat.legacy_rope_fields({**written_by_5x, **fields}) == {}  # already readable: nothing more
    plain = {"rope_parameters": {"rope_type": "default", "rope_theta": 5e5}}
    assert compat.legacy_rope_fields(plain) == {"rope_theta": 5e5}  # the default rope needs no rope_scaling
    assert compat.legacy_rope_fields({"rope_theta": 1e4, "rope_scaling": None}) == {}  # written by 4.57


def test_the_predictors_keys_are_left_where_they_are_by_a_base_key_mapping():
    import re

    stock = {"^visual": "model.visual", r"^model(?!\.(language_model|visual))": "model.language_model"}
    mapping = compat.predictor_keys_kept(stock, ["image_score_predictor", "output_text_score_predictor"])

    def first_match(key):  # as 4.57's from_pretrained applies a key mapping
        for pattern, replacement in mapping.items():
            new, n = re.subn(pattern, replacement, key)
            if n:
                return new
        return key

    def one_after_another(key):  # as 5.0's does
        for pattern, replacement in mapping.items():
            key = re.sub(pattern, replacement, key)
        return key

    for load in (first_match, one_after_another):
        for key in ("model.image_score_predictor.output_mlp.0.weight", "model.output_text_score_predictor.x"):
            assert load(key) == key
        assert load("model.layers.0.mlp.up_proj.weight") == "model.language_model.layers.0.mlp.up_proj.weight"
        assert load("visual.blocks.0.attn.qkv.weight") == "model.visual.blocks.0.attn.qkv.weight"
    # 4.57's save_pretrained reverses a pattern by dropping its groups: the same key prefix as the stock pattern's
    assert [re.sub(r"\(.*\)", "", p.lstrip("^")) for p in mapping] == [
        re.sub(r"\(.*\)", "", p.lstrip("^")) for p in stock
    ]
    assert compat.predictor_keys_kept(None, ["image_score_predictor"]) == {}
