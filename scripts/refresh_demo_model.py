"""Re-export the embedded demo models after a change to a remote-code file (tests/test_hub.py fails until then).

The weights are not touched: each folder (LLaVA-1.5's `synthetic/demo_model`, Qwen2.5-VL's
`synthetic/demo_model_qwen2_5_vl`) is exported again (with transformers 4.57, whose processor and tokenizer files
both majors read) so that its copies of the remote-code files, its auto_maps and its card are current.

    python scripts/refresh_demo_model.py      # with transformers 4.57.x installed, from the repository root
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import transformers

from dynamic_llava.hub.export import export_model
from dynamic_llava.package_data import DEMO_MODELS
from dynamic_llava.synthetic.bases import synthetic_base

LLAVA_RESULTS = """Measured on 500 held-out questions (seed 1; the training stream never contains them) with
`dynamic-llava evaluate --task synthetic --n 500 --seed 1` plus the options in the first column (transformers
5.24.0 and 4.57.6 give the same numbers; answers are 60 words, judged on their first words). Object-patch recall
is the share of the image patches covering the object that the image predictor kept.

| options | accuracy | vision tokens kept | output-text keep | object-patch recall |
|---|---|---|---|---|
| `--no-sparsity` (stock compute) | 0.990 | 64 of 64 | - | 1.000 |
| (defaults: `vision_keep_rate` 0.2, output-text predictor on) | 0.998 | 12 of 64 | 0.501 | 0.888 |
| `--vision-keep-tokens 7` (the share of 64 of LLaVA's 576) | 0.978 | 7 of 64 | 0.500 | 0.744 |
| `--vision-keep-tokens 14` (128 of 576) | 0.998 | 14 of 64 | 0.501 | 0.900 |
| `--vision-keep-tokens 21` (192 of 576) | 0.998 | 21 of 64 | 0.501 | 0.916 |
| `--no-output-text-predictor` | 0.998 | 12 of 64 | - | 0.888 |

Trained with `dynamic-llava train-synthetic --out DIR` (seed 0, defaults: vision 4000, dense 3000, sparse 2000
steps, batch 16): 27 min 49 s on a 2-core CPU, transformers 5.24, torch 2.13."""


QWEN_RESULTS = """Measured on 500 held-out questions (seed 1; the training stream never contains them) with
`dynamic-llava evaluate --model DIR --task synthetic --n 500 --seed 1` plus the options in the first column
(transformers 5.25.0). Each 64 x 64 image is 64 image tokens (16 x 16 patches of 4 pixels, merged 2 x 2). The
attention scorer row is the training-free FastV-style rule (`image_scorer="attention"`) at the same budget on the
same weights, the learned output-text predictor still on.

| options | accuracy | vision tokens kept | output-text keep | object-patch recall |
|---|---|---|---|---|
| `--no-sparsity` (stock compute) | 0.992 | 64 of 64 | - | 1.000 |
| (defaults: `vision_keep_rate` 0.2, output-text predictor on) | 0.992 | 12 of 64 | 0.493 | 0.966 |
| `--image-scorer attention` (training-free, same budget) | 0.662 | 12 of 64 | 0.489 | 0.131 |
| `--vision-keep-tokens 7` | 0.988 | 7 of 64 | 0.494 | 0.761 |
| `--vision-keep-tokens 21` | 0.992 | 21 of 64 | 0.493 | 0.980 |
| `--no-output-text-predictor` | 0.992 | 12 of 64 | - | 0.966 |

Trained with `dynamic-llava train-synthetic --base qwen2_5_vl --out DIR --vision-steps 1500 --dense-steps 2500
--sparse-steps 1500` (seed 0, batch 16): 35 min 11 s on a 2-core CPU (shared with other work), transformers 5.25,
torch 2.13."""

# base -> (its card's measured results, the Hub repo id the card names)
CARDS = {
    "llava": (LLAVA_RESULTS, "dynamic-llava/synthetic-demo"),
    "qwen2_5_vl": (QWEN_RESULTS, "dynamic-llava/synthetic-demo-qwen2_5_vl"),
}


def main() -> None:
    if not transformers.__version__.startswith("4.57"):
        raise SystemExit(f"run this with transformers 4.57.x (installed: {transformers.__version__})")
    for base, folder in DEMO_MODELS.items():
        results, repo_id = CARDS[base]
        with tempfile.TemporaryDirectory() as tmp:
            fresh = Path(tmp) / folder.name
            export_model(str(folder), fresh, about=synthetic_base(base).about, results=results, repo_id=repo_id)
            for path in fresh.iterdir():
                shutil.copyfile(path, folder / path.name)
        print(f"refreshed {folder}")


if __name__ == "__main__":
    main()
