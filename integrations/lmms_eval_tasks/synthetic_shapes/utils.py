"""Prompting and judging of the local `synthetic_shapes` lmms-eval task (written next to its YAML by
`python -m dynamic_llava.integrations.lmms_eval write-task OUT`).

The model sees what `dynamic-llava evaluate --task synthetic` gives it: the 64 x 64 image and the question in one user
turn. Chat models (lmms-eval 0.7's default) get `doc_to_messages`; the folder's chat template renders it as
`vicuna_prompt(question)` = "<system> USER: <image>\\n<question> ASSISTANT:". Simple models (`--force_simple`) get
`doc_to_visual` and `doc_to_text` (the bare question). Answers are judged by
`dynamic_llava.synthetic.task.is_correct`.
"""

from __future__ import annotations

import math
from pathlib import Path

from PIL import Image

from dynamic_llava.synthetic.task import is_correct

DATA = Path(__file__).resolve().parent / "data"
TASK = "synthetic_shapes"
NAN = float("nan")


def doc_to_visual(doc):
    with Image.open(DATA / doc["image"]) as image:
        return [image.convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]


def doc_to_messages(doc, lmms_eval_specific_kwargs=None):
    image = doc_to_visual(doc)[0]
    return [{"role": "user", "content": [{"type": "image", "url": image}, {"type": "text", "text": doc["question"]}]}]


def _sparsity(doc):
    """What `--model dynamic_llava` measured for this doc (None for any other model or a cached response)."""
    try:
        from dynamic_llava.integrations.lmms_eval import sparsity_for
    except ImportError:
        return None
    return sparsity_for(TASK, doc["index"])


def process_results(doc, results):
    result = {"accuracy": float(is_correct(results[0], doc))}
    measured = _sparsity(doc)
    if measured is None:
        result.update(
            vision_keep_rate=(NAN, NAN),
            vision_tokens_kept=NAN,
            output_text_keep_rate=(NAN, NAN),
            kv_bytes_ratio=(NAN, NAN),
        )
        return result
    kept = sum(measured["vision_tokens_kept"])
    result.update(
        vision_keep_rate=(kept, measured["image_tokens"]),
        vision_tokens_kept=kept / max(1, len(measured["vision_tokens_kept"])),
        output_text_keep_rate=(measured["output_text_kept"], measured["output_text_scored"]),
        kv_bytes_ratio=(measured["kv_stored_bytes_share"], measured["kv_dense_bytes_share"]),
    )
    return result


def pooled_ratio(items):
    """sum(numerators) / sum(denominators) over (num, den) pairs: the pooled rate `dynamic-llava evaluate` prints."""
    pairs = [(float(a), float(b)) for a, b in items if not (math.isnan(float(a)) or math.isnan(float(b)))]
    den = sum(b for _, b in pairs)
    return sum(a for a, _ in pairs) / den if den else NAN
