"""`dynamic-llava train`: train the predictors (and optionally the rest) under the stock transformers Trainer.

Data: LLaVA's conversation JSON (`training/data.py`), the vicuna_v1 template, labels on the answers only. Optimizer:
AdamW without weight decay, predictors at `--predictor-lr` (2e-4), the rest at `--lr` (5e-6), the vision tower
frozen unless `--unfreeze-vision-tower`; cosine schedule with 3% warm-up; Gumbel temperature 0.1^(step/max_steps)
(GumbelTemperatureCallback). Checkpoints go to OUT/checkpoints (resumable with --resume); the trained model is
exported as a Hub-ready folder to OUT/model.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from ..hub.export import export_model
from ..hub.loading import load_local
from ..sparse_training import predictor_parameter_groups, temperature
from ..transformers_compat import trainer_warmup_kwargs
from .data import LlavaConversationDataset, collate


class GumbelTemperatureCallback(TrainerCallback):
    """Sets `model.gumbel_tau = 0.1 ** (step / max_steps)` before every optimizer step (stock Trainer)."""

    def on_step_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: torch.nn.Module | None = None,
        **kwargs: Any,
    ) -> None:
        if model is not None:
            target = model.module if hasattr(model, "module") else model
            target.gumbel_tau = temperature(state.global_step, state.max_steps)


def train(
    data: str,
    images: str,
    model_dir: str,
    out: str,
    epochs: float = 1.0,
    max_steps: int = -1,
    batch_size: int = 4,
    grad_accum: int = 1,
    predictor_lr: float = 2e-4,
    lr: float = 5e-6,
    freeze_vision_tower: bool = True,
    freeze_projector: bool = False,
    freeze_llm: bool = False,
    warmup_ratio: float = 0.03,
    save_steps: int = 500,
    logging_steps: int = 10,
    resume: bool = False,
    seed: int = 0,
    max_length: int = 2048,
    precision: str = "fp32",
    disable_tqdm: bool = False,
) -> Path:
    """
    Train `model_dir` on `data` and export the result to OUT/model. Runs as one process or, under `accelerate
    launch` / `torchrun`, as several (DistributedDataParallel through the stock Trainer; only the main process
    writes the final folder). `precision`: "fp32", or "bf16" / "fp16" autocast (weights stay fp32; the masked
    softmax and the predictors run in fp32 either way).
    """
    from transformers import Trainer, TrainingArguments

    if precision not in ("fp32", "bf16", "fp16"):
        raise ValueError(f"precision must be fp32, bf16 or fp16, got {precision!r}")
    model, processor = load_local(model_dir, dtype=torch.float32)
    if processor is None:
        raise ValueError(f"{model_dir} has no tokenizer/processor files; export it with its processor first")
    dataset = LlavaConversationDataset(data, images, processor, model.config.image_seq_length, max_length)
    out = Path(out)
    checkpoints = out / "checkpoints"
    args = TrainingArguments(
        output_dir=str(checkpoints),
        num_train_epochs=epochs,
        max_steps=max_steps,
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=grad_accum,
        lr_scheduler_type="cosine",
        **trainer_warmup_kwargs(warmup_ratio),
        save_steps=save_steps,
        save_total_limit=2,
        logging_steps=logging_steps,
        seed=seed,
        data_seed=seed,
        report_to=[],
        remove_unused_columns=False,
        use_cpu=not torch.cuda.is_available(),
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        disable_tqdm=disable_tqdm,
    )
    groups = predictor_parameter_groups(model, predictor_lr, lr, freeze_vision_tower, freeze_projector, freeze_llm)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=functools.partial(collate, pad_token_id=processor.tokenizer.pad_token_id or 0),
        optimizers=(torch.optim.AdamW(groups), None),
        callbacks=[GumbelTemperatureCallback()],
    )
    has_checkpoint = checkpoints.exists() and any(checkpoints.glob("checkpoint-*"))
    if resume and not has_checkpoint:
        raise FileNotFoundError(f"--resume: no checkpoint in {checkpoints}; start without --resume")
    trainer.train(resume_from_checkpoint=True if resume else None)
    model.eval()
    model.requires_grad_(True)
    folder = out / "model"
    if trainer.is_world_process_zero():
        export_model(model, folder, processor=processor, overwrite=True)
    trainer.accelerator.wait_for_everyone()  # the other processes return once the folder is written
    return folder
