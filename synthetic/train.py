"""Train a small Dynamic-LLaVA from scratch on the synthetic shapes task (`synthetic/task.py`), on CPU.

Four phases, seeded:
0. vision: the CLIP tower alone learns the image attributes (kind, colour, position) from every patch that covers the
   object, and to keep the other patches blind to the object, the way LLaVA starts from a pretrained CLIP rather
   than learning vision through the language loss;
1. dense: the language model and projector learn the task with sparsification off (the tower frozen from here on);
2. sparse: the predictors learn (Gumbel straight-through masks, budget loss) while the rest adapts at a low rate;
3. calibrate: the output-text predictor's bias is shifted so the inference threshold meets the keep-rate target.

Progress goes to the `dynamic_llava` logger (INFO); `synthetic/evaluate.py` measures the result.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from transformers.utils import logging

from ..configuration_dynamic_llava import DynamicLlavaConfig
from ..files import atomic_output_dir
from ..modeling_dynamic_llava import DynamicLlavaForConditionalGeneration
from ..processor import DynamicLlavaProcessor
from ..sparse_training import predictor_parameter_groups, temperature
from ..training.calibration import calibrate_output_text_bias
from . import IMAGE_SIZE, PATCH
from .bases import SyntheticLlava, synthetic_base
from .task import (
    COLOURS,
    POSITIONS,
    SHAPES,
    make_sample,
    object_patches,
    prompt_inputs,
    sample_conversation,
    sample_rng,
)

logger = logging.get_logger(__name__)


def synthetic_processor() -> DynamicLlavaProcessor:
    """The processor of the synthetic task on LLaVA-1.5: its word-level tokenizer, 64 x 64 images, 8 x 8 patches."""
    return SyntheticLlava().processor()


def synthetic_config(tokenizer: Any, vision_hidden: int = 128, vision_layers: int = 4) -> DynamicLlavaConfig:
    """The LLaVA demo model's config: a 4-layer, hidden-128 Llama and a 4-layer CLIP tower on 64 x 64 images."""
    return SyntheticLlava().config(tokenizer, vision_hidden, vision_layers)


def encode_sample(sample: dict[str, Any], processor: Any, base: Any = None) -> dict[str, torch.Tensor]:
    """A training item of `base` (`synthetic.bases`; default LLaVA-1.5): ids with labels on the answer, pixels."""
    return (base or SyntheticLlava()).encode(sample, processor)


def write_synthetic_dataset(
    out: str | os.PathLike, n: int, seed: int = 0, overwrite: bool = False, progress: bool = False
) -> Path:
    """
    Write `n` synthetic samples as LLaVA conversation data: `out/data.json` (the format `dynamic-llava train` reads)
    and `out/images/{i}.png` (64 x 64). Sample i is the same as sample i of the train-synthetic stream of `seed`.
    Atomic; a non-empty `out` is refused unless `overwrite`. `progress`: a tqdm bar on stderr.
    """
    if n < 1:
        raise ValueError(f"--n must be at least 1, got {n}")
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        (tmp / "images").mkdir()
        records = []
        from tqdm.auto import tqdm

        for index in tqdm(range(n), desc="synthetic samples", disable=not progress):
            sample = make_sample(sample_rng(seed, index), IMAGE_SIZE)
            sample["image"].save(tmp / "images" / f"{index}.png")
            records.append(
                {
                    "id": f"synthetic-{seed}-{index}",
                    "image": f"{index}.png",
                    "conversations": sample_conversation(sample),
                }
            )
        (tmp / "data.json").write_text(json.dumps(records, indent=1))
    return Path(out)


def _batches(base: Any, processor: Any, seed: int, batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
    index = 0
    while True:
        items = [
            base.encode(make_sample(sample_rng(seed, index + i), IMAGE_SIZE), processor) for i in range(batch_size)
        ]
        index += batch_size
        yield base.collate(items, pad_token_id=processor.tokenizer.pad_token_id)


def _cosine(optimizer: torch.optim.Optimizer, steps: int, warmup: float) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over `warmup` of the steps, then cosine to 0."""
    warm = max(1, int(steps * warmup))

    def factor(step):
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def pretrain_vision_tower(
    model: DynamicLlavaForConditionalGeneration,
    processor: DynamicLlavaProcessor,
    steps: int,
    batch_size: int = 32,
    seed: int = 0,
    lr: float = 2e-3,
    base: Any = None,
) -> None:
    """Phase 0: train `model`'s vision tower to tell kind, colour and position from each patch covering the object,
    and to keep every other patch blind to the object.

    Three linear heads (discarded afterwards) read the image features of `base` (`synthetic.bases`, default
    LLaVA-1.5: the features the projector will see, `vision_feature_layer` without the class token; Qwen2.5-VL: the
    merged tokens) at the object's patches only: (sum of object patches over the batch, hidden) -> logits.
    A locality term pulls the features of the patches outside the object's box towards the features of the same
    image without the object (relative squared error, the object-free side detached): without it the tower's global
    attention copies the object into the background patches, the language model reads it there, and the image
    predictor has no reason to keep the object. Samples come from their own stream (seed + 99991).
    """
    base = base or SyntheticLlava()
    tower = base.vision_tower(model)
    hidden = base.feature_size(model)
    heads = torch.nn.ModuleList(torch.nn.Linear(hidden, n) for n in (len(SHAPES), len(COLOURS), len(POSITIONS)))
    colours = sorted(COLOURS)
    optimizer = torch.optim.AdamW([*tower.parameters(), *heads.parameters()], lr=lr, weight_decay=0.0)
    schedule = _cosine(optimizer, steps, warmup=0.05)
    tower.train()
    start = time.time()
    for step in range(steps):
        samples = [
            make_sample(sample_rng(seed + 99991, step * batch_size + i), IMAGE_SIZE, with_background=True)
            for i in range(batch_size)
        ]
        features = base.image_features(model, processor, [s["image"] for s in samples])
        with torch.no_grad():
            empty = base.image_features(model, processor, [s["background_image"] for s in samples])
        rows, patches = [], []
        outside = torch.ones(features.shape[:2], dtype=torch.bool)
        for row, sample in enumerate(samples):
            covered = object_patches(sample["object_box"], IMAGE_SIZE, PATCH)
            rows += [row] * len(covered)
            patches += covered
            outside[row, covered] = False
        rows = torch.tensor(rows)
        picked = features[rows, torch.tensor(patches)]
        targets = [
            [SHAPES.index(s["shape"]) for s in samples],
            [colours.index(s["colour"]) for s in samples],
            [POSITIONS.index(s["position"]) for s in samples],
        ]
        losses = [
            torch.nn.functional.cross_entropy(head(picked), torch.tensor(t)[rows])
            for head, t in zip(heads, targets, strict=True)
        ]
        locality = (features[outside] - empty[outside]).pow(2).mean() / empty[outside].pow(2).mean().clamp(min=1e-6)
        optimizer.zero_grad()
        (sum(losses) + locality).backward()
        optimizer.step()
        schedule.step()
        if step % 250 == 0 or step == steps - 1:
            logger.info(
                f"[vision {step}/{steps}] loss kind {losses[0].item():.3f} colour {losses[1].item():.3f} position "
                f"{losses[2].item():.3f} locality {locality.item():.4f} ({time.time() - start:.0f}s)"
            )


SYNTHETIC_ABOUT = SyntheticLlava.about


def train_synthetic(
    vision_steps: int = 4000,
    dense_steps: int = 3000,
    sparse_steps: int = 2000,
    batch_size: int = 16,
    seed: int = 0,
    calibration_samples: int = 100,
    base: str = "llava",
) -> tuple[Any, Any]:
    """
    Train from scratch (seeded, reproducible on one machine) on `base` (`llava` or `qwen2_5_vl`, see
    `synthetic.bases`). Returns `(model, processor)` in eval mode; `dynamic-llava train-synthetic` exports them
    (`hub.export.export_model`, with the base's `about` text on the card).
    """
    entry = synthetic_base(base)
    torch.manual_seed(seed)
    processor = entry.processor()
    config = entry.config(processor.tokenizer)
    model = entry.model_class()(config)
    model.generation_config.pad_token_id = config.pad_token_id
    model.generation_config.eos_token_id = 2
    batches = _batches(entry, processor, seed, batch_size)
    start = time.time()

    # phase 0: the vision tower alone
    pretrain_vision_tower(model, processor, vision_steps, batch_size=entry.vision_batch_size, seed=seed, base=entry)

    # phase 1: dense, the language model and projector learn the task; the pretrained tower stays frozen from here on
    config.use_vision_predictor = config.use_output_text_predictor = False
    model.train()
    entry.vision_tower(model).requires_grad_(False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3, weight_decay=0.0)
    schedule = _cosine(optimizer, dense_steps, warmup=0.05)
    for step in range(dense_steps):
        loss = model(**next(batches)).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == dense_steps - 1:
            logger.info(f"[dense {step}/{dense_steps}] loss {loss.item():.3f} ({time.time() - start:.0f}s)")

    # phase 2: sparse, predictors at a high rate, the rest slowly (vision tower frozen as in the paper)
    config.use_vision_predictor = config.use_output_text_predictor = True
    model.train()
    groups = predictor_parameter_groups(model, predictor_lr=2e-3, lr=5e-5, freeze_vision_tower=True)
    optimizer = torch.optim.AdamW(groups)
    schedule = _cosine(optimizer, sparse_steps, warmup=0.03)
    for step in range(sparse_steps):
        model.gumbel_tau = temperature(step, sparse_steps)
        out_ = model(**next(batches))
        optimizer.zero_grad()
        out_.loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], 1.0)
        optimizer.step()
        schedule.step()
        if step % 50 == 0 or step == sparse_steps - 1:
            text_keep = out_.output_text_keep_ratio  # None when no row had a long enough answer
            text_keep = float(text_keep.detach()) if text_keep is not None else float("nan")
            logger.info(
                f"[sparse {step}/{sparse_steps}] loss {out_.loss.item():.3f} ce {out_.ce_loss.item():.3f} vision "
                f"keep {float(out_.vision_keep_ratio.detach()):.2f} text keep {text_keep:.2f} "
                f"({time.time() - start:.0f}s)"
            )
    model.eval()
    model.requires_grad_(True)

    # phase 3: calibrate the output-text threshold on fresh prompts of the training stream
    first = (dense_steps + sparse_steps) * batch_size
    keep = calibrate_output_text_threshold(
        model,
        processor,
        [make_sample(sample_rng(seed, first + i), IMAGE_SIZE) for i in range(calibration_samples)],
        image=entry.image_placeholder,
    )
    logger.info(
        f"[calibrate] output-text keep rate {keep:.3f} on {calibration_samples} training-stream prompts "
        f"(target {config.output_text_keep_rate}) ({time.time() - start:.0f}s)"
    )
    return model, processor


def calibrate_output_text_threshold(
    model: DynamicLlavaForConditionalGeneration,
    processor: DynamicLlavaProcessor,
    samples: list[dict[str, Any]],
    max_new_tokens: int = 64,
    image: str = "<image>",
) -> float:
    """
    Shift the output-text predictor's keep/drop bias so that greedy answers to `samples` keep
    `config.output_text_keep_rate` of their generated tokens. Training meets the rate in expectation over Gumbel
    noise; a trained predictor is undecided about part of the filler (keep probability ~0.6-0.8), and the fixed
    inference threshold keeps all of those. Returns the keep rate after the shift.
    """
    with torch.no_grad():
        return calibrate_output_text_bias(
            model,
            prompt_inputs(processor, samples, image=image),
            max_new_tokens=max_new_tokens,
            keep_rate=model.config.output_text_keep_rate,
        )
