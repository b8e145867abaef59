"""State-dict layouts: the current one (predictors under `model.`), 0.1 exports (predictors at the top), and
save_pretrained round trips (5.x would save renamed keys back in their old layout if a rename stayed attached)."""

from __future__ import annotations

import torch
from safetensors.torch import load_file, save_file

from dynamic_llava import DynamicLlavaForConditionalGeneration
from dynamic_llava.hub.export import export_model

from fixtures.tiny import tiny_model

PREDICTOR = "model.image_score_predictor.down_mlp.1.weight"


def test_current_exports_load_every_weight(tmp_path):
    model = tiny_model(5)
    export_model(model, tmp_path / "x")
    loaded, info = DynamicLlavaForConditionalGeneration.from_pretrained(tmp_path / "x", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert torch.equal(loaded.state_dict()[PREDICTOR], model.state_dict()[PREDICTOR])


def test_exports_of_version_0_1_load_with_the_predictors_moved(tmp_path):
    model = tiny_model(5)
    export_model(model, tmp_path / "x")
    (weights,) = (tmp_path / "x").glob("*.safetensors")
    legacy = {
        key.removeprefix("model.") if "score_predictor" in key else key: tensor
        for key, tensor in load_file(weights).items()
    }
    assert "image_score_predictor.down_mlp.1.weight" in legacy
    save_file(legacy, weights, metadata={"format": "pt"})
    loaded, info = DynamicLlavaForConditionalGeneration.from_pretrained(tmp_path / "x", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    # saved again, it is in the current layout (no rename is reversed on the way out)
    loaded.save_pretrained(tmp_path / "again")
    (saved,) = (tmp_path / "again").glob("*.safetensors")
    assert any(key.startswith("model.image_score_predictor.") for key in load_file(saved))


def test_save_pretrained_round_trip_keeps_the_predictors(tmp_path):
    model = tiny_model(6)
    model.save_pretrained(tmp_path / "a")
    first = DynamicLlavaForConditionalGeneration.from_pretrained(tmp_path / "a")
    first.save_pretrained(tmp_path / "b")
    second, info = DynamicLlavaForConditionalGeneration.from_pretrained(tmp_path / "b", output_loading_info=True)
    assert not [key for key in info["missing_keys"] if "score_predictor" in key]
    assert torch.equal(second.state_dict()[PREDICTOR], model.state_dict()[PREDICTOR])
