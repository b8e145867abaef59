"""The synthetic training preset and `dynamic-llava evaluate`, on a few steps (the real run is in the note)."""

import json

from dynamic_llava.tools.cli import main


def test_train_synthetic_exports_and_evaluates(tmp_path, capsys):
    out = tmp_path / "model"
    assert main(["train-synthetic", "--out", str(out), "--dense-steps", "3", "--sparse-steps", "2",
                 "--batch-size", "4"]) == 0  # fmt: skip
    assert (out / "config.json").exists() and (out / "tokenizer_config.json").exists()
    capsys.readouterr()
    assert main(["evaluate", "--task", "synthetic", "--n", "6", "--seed", "7", "--model", str(out),
                 "--max-new-tokens", "8"]) == 0  # fmt: skip
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["n"] == 6 and 0 <= result["accuracy"] <= 1 and result["correct"] == round(result["accuracy"] * 6)
    assert abs(result["vision_keep_rate"] - int(64 * 0.2) / 64) < 1e-9  # 12 of 64 patches per image
    assert 0 <= result["object_patch_recall"] <= 1 and result["object_patches"] > 0
    assert main(["evaluate", "--n", "3", "--model", str(out), "--no-sparsity", "--max-new-tokens", "4"]) == 0
    dense = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert dense["vision_keep_rate"] == 1.0 and dense["sparsity"] is False
    assert main(["evaluate", "--n", "3"]) == 2  # no model ships yet: a clear error
    assert "--model" in capsys.readouterr().err
