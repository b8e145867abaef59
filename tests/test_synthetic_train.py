"""The synthetic training preset and `dynamic-llava evaluate`, on a few steps (the real run is in the note)."""

import json

import pytest
import torch

from dynamic_llava.cli import main
from dynamic_llava.training.calibration import calibrate_output_text_bias

from fixtures.tiny import tiny_inputs, tiny_model


@pytest.mark.slow
@pytest.mark.parametrize("base", ["llava", "qwen2_5_vl"])
def test_train_synthetic_exports_and_evaluates(tmp_path, capsys, base):
    from safetensors.torch import load_file

    out, again = tmp_path / "model", tmp_path / "again"
    for folder in (out, again):  # seeded: a second run gives the same weights
        assert (
            main(
                [
                    "train-synthetic",
                    "--base",
                    base,
                    "--out",
                    str(folder),
                    "--vision-steps",
                    "2",
                    "--dense-steps",
                    "3",
                    "--sparse-steps",
                    "2",
                    "--batch-size",
                    "4",
                    "--calibration-samples",
                    "4",
                ]
            )
            == 0
        )
    assert (out / "config.json").exists() and (out / "tokenizer_config.json").exists()
    assert json.loads((out / "config.json").read_text())["model_type"] == f"dynamic_{base}"
    log = capsys.readouterr().err  # progress: the library's logger, to stderr under the command
    for phase in ("[vision ", "[dense ", "[sparse ", "[calibrate] output-text keep rate"):
        assert phase in log
    first, second = load_file(str(out / "model.safetensors")), load_file(str(again / "model.safetensors"))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    assert (
        main(
            ["evaluate", "--task", "synthetic", "--n", "6", "--seed", "7", "--model", str(out), "--max-new-tokens", "8"]
        )
        == 0
    )
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["n"] == 6 and 0 <= result["accuracy"] <= 1 and result["correct"] == round(result["accuracy"] * 6)
    assert abs(result["vision_keep_rate"] - int(64 * 0.2) / 64) < 1e-9  # 12 of 64 patches per image
    assert 0 <= result["object_patch_recall"] <= 1 and result["object_patches"] > 0
    assert main(["evaluate", "--n", "3", "--model", str(out), "--no-sparsity", "--max-new-tokens", "4"]) == 0
    dense = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert dense["vision_keep_rate"] == 1.0 and dense["sparsity"] is False
    assert main(["evaluate", "--n", "3", "--model", str(tmp_path / "missing")]) == 2
    assert "config.json" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("base", ["llava", "qwen2_5_vl"])
def test_embedded_model_answers_fresh_questions(capsys, base):
    """Each shipped model (LLaVA-1.5's is the default of evaluate), on 24 questions of a seed it was never evaluated
    on: it answers, keeps 12 of 64 image tokens with the object's among them, and half of what it generates."""
    from dynamic_llava.package_data import DEMO_MODELS

    assert main(["evaluate", "--n", "24", "--seed", "2024", "--model", str(DEMO_MODELS[base])]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["sparsity"] is True and result["n"] == 24
    assert result["accuracy"] >= 0.9, result  # the bars; 500 questions of seed 1 are in the README
    assert abs(result["vision_keep_rate"] - 12 / 64) < 1e-9
    assert abs(result["output_text_keep_rate"] - 0.5) <= 0.1, result
    assert result["object_patch_recall"] >= 0.8, result


@pytest.mark.parametrize("keep_rate", [0.3, 0.5, 0.7])
def test_output_text_calibration_meets_the_rate(keep_rate):
    """Phase 3's threshold shift: greedy answers afterwards keep about `keep_rate` of their generated tokens."""
    model = tiny_model(seed=3)
    inputs = tiny_inputs([(5, 6, 7, 8, 9), (9, 8, 7)], seed=1)
    kept = calibrate_output_text_bias(model, inputs, max_new_tokens=40, keep_rate=keep_rate)
    assert abs(kept - keep_rate) <= 0.1, kept
    with pytest.raises(ValueError, match="keep_rate"):
        calibrate_output_text_bias(model, inputs, keep_rate=1.0)


def test_synthetic_data_writes_llava_conversations_that_train_reads(tmp_path, capsys):
    from PIL import Image

    from dynamic_llava.synthetic.train import synthetic_processor
    from dynamic_llava.training.data import LlavaConversationDataset

    out = tmp_path / "data"
    assert main(["synthetic-data", "--out", str(out), "--n", "3", "--seed", "4"]) == 0
    records = json.loads((out / "data.json").read_text())
    assert [r["image"] for r in records] == ["0.png", "1.png", "2.png"]
    for record in records:
        human, gpt = record["conversations"]
        assert human["from"] == "human" and human["value"].startswith("<image>\n") and gpt["from"] == "gpt"
        assert len(gpt["value"].split()) >= 60
        with Image.open(out / "images" / record["image"]) as image:
            assert image.size == (64, 64)
    dataset = LlavaConversationDataset(records, out / "images", synthetic_processor(), image_seq_length=64)
    assert (dataset[0]["labels"] != -100).sum() > 60
    before = (out / "data.json").read_bytes()
    assert main(["synthetic-data", "--out", str(out), "--n", "2"]) == 2  # never overwrites without --overwrite
    assert "--overwrite" in capsys.readouterr().err and (out / "data.json").read_bytes() == before
