"""Model card (README.md with Hub metadata) and an example notebook for an exported Dynamic-LLaVA folder."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..configuration_dynamic_llava import DynamicLlavaConfig

PUBLISHED = """| | LLaVA-1.5-7B | Dynamic-LLaVA-7B (I\\|T) |
|---|---|---|
| Prefill image-token TFLOPs | 10.1 | 2.5 |
| VQAv2 | 78.5 | 77.9 |
| GQA | 62.0 | 61.3 |
| POPE | 85.9 | 85.9 |
| MME | 1510.7 | 1501.0 |
| LVIS-VQA KV cache (MB) | 103 | 63 |

Figures published by the authors (Huang et al., *Dynamic-LLaVA: Efficient Multimodal Large Language Models via
Dynamic Vision-language Context Sparsification*, ICLR 2025, arXiv:2412.00876), not measured by this package."""


NO_TOKENIZER = (
    "\n**This folder has no tokenizer** (the source had none): pass token ids yourself or add one with "
    "`dynamic-llava convert --tokenizer`.\n"
)

# released original checkpoints whose cards may carry the authors' figures (a converted copy of one of them)
RELEASED_CHECKPOINTS = ("Osilly/Dynamic-LLaVA-7B", "Osilly/Dynamic-LLaVA-13B")

NOT_MEASURED = """No evaluation results were recorded for this model. The figures the Dynamic-LLaVA paper reports are
for the authors' released 7B/13B checkpoints and do not describe it. Measure it with `dynamic-llava evaluate`, or
with lmms-eval (`lmms-eval --model dynamic_llava --model_args pretrained=<this folder>`)."""


def _kept_per_image(config: Any) -> str:
    """How many image tokens the config keeps, in words (a fixed count per image, or a share of each image's)."""
    tokens = getattr(config, "tokens_per_image", None) or getattr(config, "image_seq_length", None)
    if tokens:
        return f"{config.vision_keep_tokens or int(tokens * config.vision_keep_rate)} of {tokens} kept per image"
    return f"{config.vision_keep_tokens or config.vision_keep_rate} of each image's tokens kept"


def _front_matter(base_model: str | None) -> list[str]:
    """The card's Hub metadata lines (YAML between `---`)."""
    front = ["---", "library_name: transformers", "pipeline_tag: image-text-to-text", "license: apache-2.0"]
    if base_model:
        front.append(f"base_model: {base_model}")
    tags = ["dynamic-llava", "llava", "token-pruning", "kv-cache-compression", "custom_code"]
    return front + ["tags:"] + [f"  - {tag}" for tag in tags] + ["---", ""]


def write_model_card(
    folder: str | os.PathLike,
    config: DynamicLlavaConfig,
    base_model: str | None = None,
    has_tokenizer: bool = True,
    repo_id: str = "REPO_ID",
    about: str | None = None,
    results: str | None = None,
) -> None:
    """
    The model card (README.md with Hub metadata) and `example.ipynb` of a Hub folder.

    Args:
        base_model: the Hub id the folder was converted from. The authors' published figures appear, attributed,
            only on cards of converted released checkpoints (`RELEASED_CHECKPOINTS`).
        about: what this model is (markdown), e.g. how it was trained and what it knows.
        results: its own measured results (markdown, with the command that measured them). Without them the card
            says that none were recorded.
    """
    folder = Path(folder)
    front = _front_matter(base_model)
    kept = _kept_per_image(config)
    converted = base_model in RELEASED_CHECKPOINTS
    if about is None:
        about = (
            f"Converted from the original checkpoint `{base_model}` by `dynamic-llava convert`."
            if base_model
            else "Exported by `dynamic-llava export`."
        )
    if results is None:
        results = (
            f"Not measured by this package. The authors' published figures for this checkpoint:\n\n{PUBLISHED}"
            if converted
            else NOT_MEASURED
        )
    body = f"""# Dynamic-LLaVA ({config.text_config.num_hidden_layers} layers, hidden {config.text_config.hidden_size})

Dynamic-LLaVA prunes vision tokens at prefill with a learned image predictor and, while decoding, lets a learned
output-text predictor decide which generated tokens' keys/values enter the KV cache. This folder is a
`trust_remote_code` transformers model made by the `dynamic-llava` package; it runs in the stock `generate()`
and `pipeline()` on transformers 4.57.x and 5.x.

{about}
{"" if has_tokenizer else NO_TOKENIZER}
## Usage

```python
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor, pipeline

repo = "{repo_id}"
model = AutoModelForImageTextToText.from_pretrained(repo, trust_remote_code=True, dtype="auto")
processor = AutoProcessor.from_pretrained(repo, trust_remote_code=True)
messages = [{{"role": "user", "content": [{{"type": "image", "url": "image.png"}},
                                        {{"type": "text", "text": "What is in this picture?"}}]}}]
inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                       return_dict=True, return_tensors="pt")
out = model.generate(**inputs, max_new_tokens=64, return_dict_in_generate=True)
print(processor.decode(out.sequences[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
cache = out.cache if hasattr(out, "cache") else out.past_key_values
print(cache.sparsity_report())

# one loaded model, several budgets: per-call sparsity
out = model.generate(**inputs, max_new_tokens=64, vision_keep_tokens=64)

pipe = pipeline("image-text-to-text", model=repo, trust_remote_code=True)
print(pipe(text=messages, max_new_tokens=64))
```

Serve it behind an OpenAI-compatible endpoint (transformers' own server, with this model registered; in a clone
of the dynamic-llava repository, `pip install -e ".[serve]"`): `dynamic-llava serve {repo_id}`. Evaluate it with
lmms-eval (`pip install -e ".[eval]"` there, then `pip install --no-deps lmms-eval==0.7.3`; with a CUDA torch, a
plain `pip install lmms-eval==0.7.3` beside the matching torchvision): `lmms-eval --model dynamic_llava --model_args
pretrained={repo_id},vision_keep_rate=0.25 --tasks ...`.

## Sparsity settings

| field | value |
|---|---|
| `sparse_layer` | {config.sparse_layer} |
| `vision_keep_rate` | {config.vision_keep_rate} |
| `vision_keep_tokens` | {config.vision_keep_tokens} (wins over the rate when set; {kept}) |
| `use_vision_predictor` | {config.use_vision_predictor} |
| `use_output_text_predictor` | {config.use_output_text_predictor} (keep a generated token iff logit0 > logit1) |
| `output_text_keep_rate` | {config.output_text_keep_rate} (training target) |

Any of `vision_keep_tokens`, `vision_keep_rate`, `use_vision_predictor`, `use_output_text_predictor` can be given
to `generate()` per call. With both predictors off the model computes exactly what the stock LLaVA computes on the
same weights.

## Results

{results}

See `example.ipynb` beside this card for a walk-through that plots which image patches were kept.
"""
    (folder / "README.md").write_text("\n".join(front) + body)
    write_notebook(folder / "example.ipynb", repo_id)


def _cell(kind: str, source: str) -> dict:
    cell = {"cell_type": kind, "metadata": {}, "source": source.strip("\n").splitlines(keepends=True)}
    if kind == "code":
        cell.update(execution_count=None, outputs=[])
    return cell


def write_notebook(path: Path, repo_id: str = "REPO_ID") -> None:
    """A notebook that loads the model, runs the pipeline on an image, prints the sparsity summary and plots the
    kept patches. `MODEL` defaults to the folder the notebook sits in."""
    cells = [
        _cell(
            "markdown",
            "# Dynamic-LLaVA: what the model keeps\nLoads the model, answers a question about an "
            "image with the pipeline, prints the sparsity summary and plots the kept patches.",
        ),
        _cell(
            "code",
            f"""
import os
import numpy as np
import torch
from PIL import Image, ImageDraw
from transformers import AutoModelForImageTextToText, AutoProcessor, pipeline

MODEL = os.environ.get("DYNAMIC_LLAVA_MODEL", ".")  # this folder, or the Hub id {repo_id!r}
model = AutoModelForImageTextToText.from_pretrained(MODEL, trust_remote_code=True)
processor = AutoProcessor.from_pretrained(MODEL, trust_remote_code=True)
""",
        ),
        _cell(
            "code",
            """
# a synthetic picture: a red square and a blue disc on grey
image = Image.new("RGB", (320, 240), (128, 128, 128))
draw = ImageDraw.Draw(image)
draw.rectangle([30, 40, 130, 140], fill=(220, 30, 30))
draw.ellipse([180, 80, 280, 180], fill=(30, 60, 220))
messages = [{"role": "user", "content": [{"type": "image", "image": image},
                                        {"type": "text", "text": "What shapes are in the picture?"}]}]
pipe = pipeline("image-text-to-text", model=model, processor=processor)
print(pipe(text=messages, max_new_tokens=16, return_full_text=False))
""",
        ),
        _cell(
            "code",
            """
inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                       return_dict=True, return_tensors="pt")
out = model.generate(**inputs, max_new_tokens=16, return_dict_in_generate=True)
cache = out["cache"] if "cache" in out else out["past_key_values"]
report = cache.sparsity_report()
print({k: report[k] for k in ("vision_tokens_kept", "output_text_kept", "output_text_scored",
                              "stored_bytes", "dense_bytes", "kv_bytes_ratio")})
""",
        ),
        _cell(
            "code",
            """
import matplotlib.pyplot as plt

kept = cache.kept_vision_indices[0][0]  # row 0, its first image
side = int(model.config.image_seq_length ** 0.5)
grid = np.zeros(side * side)
grid[kept.numpy()] = 1.0
pixels = inputs["pixel_values"][0].permute(1, 2, 0).numpy()
pixels = (pixels - pixels.min()) / (pixels.max() - pixels.min())
fig, ax = plt.subplots(figsize=(4, 4))
ax.imshow(pixels)
ax.imshow(grid.reshape(side, side), cmap="Greens", alpha=0.45,
          extent=(0, pixels.shape[1], pixels.shape[0], 0), interpolation="nearest")
ax.set_title(f"kept {len(kept)} of {side * side} patches")
ax.axis("off")
fig.savefig("kept_patches.png", dpi=80)
plt.show()
""",
        ),
    ]
    for i, cell in enumerate(cells):
        cell["id"] = f"cell-{i}"
    notebook = {
        "cells": cells,
        "metadata": {
            "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
            "language_info": {"name": "python"},
        },
        "nbformat": 4,
        "nbformat_minor": 5,
    }
    Path(path).write_text(json.dumps(notebook, indent=1) + "\n")
