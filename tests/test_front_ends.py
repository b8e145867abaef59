"""
One sparsity contract (`sparse_settings.py`), every front-end: the same per-call settings, good and bad, get the same
accept / refuse answer from `generate()`, the command line, lmms-eval's model and the bench, and the good ones the
same kept image tokens from `generate()` and the command line.
"""

from __future__ import annotations

import pytest
import torch

from dynamic_llava.cli import main
from dynamic_llava.hub.loading import load_for_eval
from dynamic_llava.package_data import DEMO_MODEL
from dynamic_llava.transformers_compat import CACHE_KEY

# (name, per-call settings, refused?): the demo model has 64 tokens per image
CASES = [
    ("tokens", {"vision_keep_tokens": 5}, False),
    ("rate", {"vision_keep_rate": 0.25}, False),
    ("scorer", {"image_scorer": "attention", "vision_keep_tokens": 7}, False),
    ("tokens_and_rate", {"vision_keep_tokens": 5, "vision_keep_rate": 0.25}, True),
    ("rate_above_one", {"vision_keep_rate": 1.5}, True),
    ("more_tokens_than_an_image", {"vision_keep_tokens": 65}, True),
    ("keep_with_the_predictor_off", {"vision_keep_tokens": 5, "use_vision_predictor": False}, True),
    ("unknown_scorer", {"image_scorer": "fastv"}, True),
]


def _flags(settings: dict) -> list[str]:
    flags = []
    for field, value in settings.items():
        if field == "use_vision_predictor":
            flags.append("--vision-predictor" if value else "--no-vision-predictor")
        else:
            flags += [f"--{field.replace('_', '-')}", str(value)]
    return flags


@pytest.fixture(scope="module")
def demo():
    model, processor = load_for_eval(None)
    from PIL import Image

    image = Image.new("RGB", (64, 64), (200, 30, 30))
    inputs = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what colour is the shape"}]}],
        add_generation_prompt=True,
    )
    return model, dict(processor(images=image, text=inputs, return_tensors="pt")), image


def _command(argv: list[str]) -> int:
    """The command's exit code (argparse's usage errors are SystemExit(2))."""
    try:
        return main(argv)
    except SystemExit as exit_:
        return exit_.code


def _library(model, inputs, settings):
    out = model.generate(**inputs, max_new_tokens=2, do_sample=False, return_dict_in_generate=True, **settings)
    return [int(k.numel()) for k in getattr(out, CACHE_KEY).kept_vision_indices[0]]


@pytest.mark.parametrize(("name", "settings", "refused"), CASES, ids=[c[0] for c in CASES])
def test_generate_and_the_command_line_answer_alike(demo, tmp_path, capsys, name, settings, refused):
    model, inputs, image = demo
    picture = tmp_path / "shape.png"
    image.save(picture)
    argv = ["generate", "--image", str(picture), "--prompt", "what colour is the shape", "--max-new-tokens", "2"]
    if refused:
        with pytest.raises((ValueError, TypeError)):
            _library(model, inputs, settings)
        assert _command(argv + _flags(settings)) == 2
        assert "error:" in capsys.readouterr().err
        return
    kept = _library(model, inputs, settings)
    assert _command(argv + _flags(settings)) == 0
    assert f"vision tokens kept {sum(kept)}/64" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.parametrize(("name", "settings", "refused"), CASES, ids=[c[0] for c in CASES])
def test_lmms_eval_and_the_bench_answer_alike(name, settings, refused):
    pytest.importorskip("lmms_eval", reason="lmms-eval is not installed (the `eval` extra, docs/integrations.md)")
    from dynamic_llava.bench.run import run_bench
    from dynamic_llava.integrations.lmms_eval import DynamicLlava

    if refused:
        with pytest.raises((ValueError, TypeError)):
            DynamicLlava(pretrained=str(DEMO_MODEL), device="cpu", **settings)
        with pytest.raises((ValueError, TypeError)):
            run_bench(model=str(DEMO_MODEL), new_tokens=1, repeats=1, progress=False, **settings)
        return
    DynamicLlava(pretrained=str(DEMO_MODEL), device="cpu", **settings)  # accepted (checked against the model)
    torch.manual_seed(0)
    results = run_bench(
        model=str(DEMO_MODEL), new_tokens=2, repeats=1, throughput_batches=[1], throughput_tokens=1,
        decode_batch=None, count_steps=1, long_tokens=[], nocache_tokens=0, progress=False, **settings,
    )  # fmt: skip
    assert results["sparsity"] == settings
