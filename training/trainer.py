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
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.utils import logging

from ..hub.export import export_model, full_state_dict
from ..hub.loading import load_local
from ..sparse_training import freeze_parts, parameter_groups, temperature
from ..transformers_compat import trainer_warmup_kwargs
from .data import LlavaConversationDataset, collate, collate_chat

logger = logging.get_logger(__name__)

# what a folder must use to train the learned method (an `init` folder starts with the training-free scorer)
LEARNED_SETTINGS = {"image_scorer": "predictor", "use_vision_predictor": True, "use_output_text_predictor": True}


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


class DynamicLlavaTrainer(Trainer):
    """
    The stock `Trainer` with the predictors at their own learning rate: `create_optimizer` builds the two groups
    (`sparse_training.parameter_groups`: predictors at `predictor_lr`, the rest at `args.learning_rate`, no weight
    decay) with the optimizer `args.optim` names. Every backend calls `create_optimizer` (DDP, DeepSpeed without
    an optimizer in its config, FSDP after wrapping), so the groups hold under each; an `optimizers=` pair is used
    as given.
    """

    def __init__(self, *args: Any, predictor_lr: float = 2e-4, **kwargs: Any) -> None:
        self.predictor_lr = predictor_lr
        super().__init__(*args, **kwargs)

    def create_optimizer(self, *args: Any, **kwargs: Any) -> torch.optim.Optimizer:
        if self.optimizer is None:
            model = self.model
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, model)
            if "params" in optimizer_kwargs or "model" in optimizer_kwargs or "optimizer_dict" in optimizer_kwargs:
                raise ValueError(
                    f"optim={self.args.optim!r} builds its own parameter groups, which would drop the predictors' "
                    "learning rate: use an optimizer that takes parameter groups (adamw_torch, sgd, adafactor, ...)."
                )
            groups = parameter_groups(model, self.predictor_lr, self.args.learning_rate)
            self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer


def pad_token_id(processor: Any) -> int:
    """The tokenizer's pad id (Qwen's `<|endoftext|>`, LLaVA's `<pad>`), else 0 (padding is masked either way)."""
    pad = processor.tokenizer.pad_token_id
    return 0 if pad is None else pad


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
    if precision not in ("fp32", "bf16", "fp16"):
        raise ValueError(f"precision must be fp32, bf16 or fp16, got {precision!r}")
    model, processor = load_local(model_dir, dtype=torch.float32)
    if processor is None:
        raise ValueError(f"{model_dir} has no tokenizer/processor files; export it with its processor first")
    changed = {k: v for k, v in LEARNED_SETTINGS.items() if getattr(model.config, k) != v}
    if changed:
        logger.warning(
            f"{model_dir} does not use the learned predictors ({ {k: getattr(model.config, k) for k in changed} }, "
            f"as `dynamic-llava init` writes): training and the exported folder use {changed}"
        )
        for key, value in changed.items():
            setattr(model.config, key, value)
    llava = model.config.model_type == "dynamic_llava"  # the original's vicuna_v1 data path; others: chat template
    image_seq_length = model.config.image_seq_length if llava else None
    dataset = LlavaConversationDataset(data, images, processor, image_seq_length, max_length)
    out = Path(out)
    checkpoints = out / "checkpoints"
    import transformers  # (looked up at call time: a caller may subclass or wrap TrainingArguments)

    args = transformers.TrainingArguments(
        output_dir=str(checkpoints),
        num_train_epochs=epochs,
        max_steps=max_steps,
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=grad_accum,
        learning_rate=lr,
        optim="adamw_torch",
        weight_decay=0.0,
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
    freeze_parts(model, freeze_vision_tower, freeze_projector, freeze_llm)
    trainer = DynamicLlavaTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=functools.partial(collate if llava else collate_chat, pad_token_id=pad_token_id(processor)),
        callbacks=[GumbelTemperatureCallback()],
        predictor_lr=predictor_lr,
    )
    has_checkpoint = checkpoints.exists() and any(checkpoints.glob("checkpoint-*"))
    if resume and not has_checkpoint:
        raise FileNotFoundError(f"--resume: no checkpoint in {checkpoints}; start without --resume")
    trainer.train(resume_from_checkpoint=True if resume else None)
    model.eval()
    model.requires_grad_(True)
    folder = out / "model"
    # the full state dict, gathered from every process under the Trainer's FSDP or a sharded (DTensor) model: a
    # collective, every process takes part
    if trainer.is_fsdp_enabled:
        state_dict = trainer.accelerator.get_state_dict(trainer.model_wrapped)
    else:
        state_dict = full_state_dict(model)
    if trainer.is_world_process_zero():
        export_model(model, folder, processor=processor, overwrite=True, state_dict=state_dict)
    trainer.accelerator.wait_for_everyone()  # the other processes return once the folder is written
    return folder
