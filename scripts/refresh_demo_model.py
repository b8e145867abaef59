"""Re-export the embedded demo model after a change to a remote-code file (tests/test_hub.py fails until then).

The weights are not touched: the folder is exported again (with transformers 4.57, whose processor and tokenizer
files both majors read) so that its copies of the remote-code files, its auto_maps and its card are current.

    python scripts/refresh_demo_model.py      # with transformers 4.57.x installed, from the repository root
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import transformers

from dynamic_llava.hub.export import export_model
from dynamic_llava.package_data import DEMO_MODEL
from dynamic_llava.synthetic.train import SYNTHETIC_ABOUT

RESULTS = """Measured on 500 held-out questions (seed 1; the training stream never contains them) with
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


def main() -> None:
    if not transformers.__version__.startswith("4.57"):
        raise SystemExit(f"run this with transformers 4.57.x (installed: {transformers.__version__})")
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp) / "demo_model"
        export_model(
            str(DEMO_MODEL), fresh, about=SYNTHETIC_ABOUT, results=RESULTS, repo_id="dynamic-llava/synthetic-demo"
        )
        for path in fresh.iterdir():
            shutil.copyfile(path, DEMO_MODEL / path.name)
    print(f"refreshed {DEMO_MODEL}")


if __name__ == "__main__":
    main()
