"""Training-time pieces of Dynamic-LLaVA (docs/design.md, "Training"): no token is removed while training.

* At `sparse_layer`, each predictor's 2-way log-softmax goes through Gumbel-softmax with hard straight-through
  (`gumbel_softmax(log_probs, tau, hard=True)[..., 0]` is the keep mask), so gradients reach the predictors.
* Layers >= `sparse_layer` use a masked softmax in float32: x = scaled scores + causal -inf - row max,
  M = keep mask over key columns with the diagonal forced to 1,
  weights = (exp(x) * M + eps/N) / (sum(exp(x) * M) + eps), eps 1e-6, N = sequence length
  (eps/N also reaches masked and future columns, as in the original).
* Loss = cross-entropy + mask_loss_weight * [sum_b w_b (r_img - mean(M_img_b))^2 + sum_b w_b (t_b - mean(M_out_b))^2]
  / N, w_b the label tokens of row b and N those of the whole optimizer step (`num_items_in_batch`): for one row
  the original's mean; for several, token-weighted like the cross-entropy, so micro-batches add up (`budget_loss`).

The masked softmax is an attention function (`TRAINING_ATTENTION`) that the sparse layers get through their
`**kwargs` (`dynamic_llava_keep`); without that kwarg (the dense layers) it is sdpa. Its causal and padding
structure is the position-tag rule of `sparse_masks.visible_keys` (padding columns are never kept), so a left-padded
row trains as it would alone.

This file is a Hub remote-code module.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

TRAINING_ATTENTION = "dynamic_llava_training"
EPS = 1e-6


def _repeat_kv(states: torch.Tensor, groups: int) -> torch.Tensor:
    """`[B, kv_heads, T, D]` -> `[B, kv_heads * groups, T, D]` (grouped-query attention)."""
    if groups == 1:
        return states
    batch, heads, length, dim = states.shape
    return states[:, :, None].expand(batch, heads, groups, length, dim).reshape(batch, heads * groups, length, dim)


def masked_softmax_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    dynamic_llava_keep: torch.Tensor | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """
    Args:
        query: `[B, H, T, D]`; key, value: `[B, kv_heads, T, D]`.
        attention_mask: for the sparse layers, `[B, 1, T, T]` bool from `sparse_masks.visible_keys` (causal and
            padding; True = visible); for the dense layers whatever their stock mask is.
        dynamic_llava_keep: `[B, T]` float keep mask (straight-through); None -> plain sdpa (dense layers).
    Returns:
        `([B, T, H, D], weights [B, H, T, T])`.
    """
    if dynamic_llava_keep is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    groups = query.shape[1] // key.shape[1]
    key, value = _repeat_kv(key, groups), _repeat_kv(value, groups)
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    scores = torch.matmul(query.float(), key.float().transpose(2, 3)) * scaling
    length = scores.shape[-1]
    x = scores.masked_fill(~attention_mask, float("-inf"))  # causal and padding columns: exp() = 0
    x = x - x.amax(dim=-1, keepdim=True)
    eye = torch.eye(length, dtype=torch.bool, device=scores.device)
    keep = dynamic_llava_keep.float()[:, None, None, :]
    mask = torch.where(eye, torch.ones_like(keep), keep)  # [B, 1, T, T]: the diagonal always 1
    weighted = torch.exp(x) * mask
    weights = (weighted + EPS / length) / (weighted.sum(dim=-1, keepdim=True) + EPS)
    weights = F.dropout(weights, p=dropout, training=module.training)
    out = torch.matmul(weights.to(value.dtype), value)
    return out.transpose(1, 2).contiguous(), weights


def register_training_attention() -> None:
    """Make `TRAINING_ATTENTION` known to transformers (called when a model enters training mode): the attention
    function, and the mask format of its dense layers (sdpa's)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(TRAINING_ATTENTION, masked_softmax_attention)
    AttentionMaskInterface.register(TRAINING_ATTENTION, sdpa_mask)


def straight_through_keep(logits: torch.Tensor, tau: float, noise: bool = True) -> torch.Tensor:
    """
    `[..., 2]` predictor logits -> `[...]` hard keep mask (1 = keep) with straight-through gradients.
    With `noise=False` the mask is the argmax of the log-probabilities (what inference decides for output text).
    """
    log_probs = logits.float().log_softmax(dim=-1)
    if noise:
        return F.gumbel_softmax(log_probs, tau=tau, hard=True)[..., 0]
    soft = (log_probs / tau).softmax(dim=-1)
    hard = F.one_hot(soft.argmax(dim=-1), 2).to(soft.dtype)
    return (hard - soft.detach() + soft)[..., 0]


def answer_span(labels: torch.Tensor, attention_mask: torch.Tensor | None = None):
    """
    `[B, T]` labels -> (`start`, `end`) `[B]`: the final answer span of each row, one past the last -100 among its
    real tokens, up to its last real token (padding is not counted).
    """
    positions = torch.arange(labels.shape[1], device=labels.device).expand_as(labels)
    real = torch.ones_like(labels, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    ignored = (labels == -100) & real
    start = torch.where(ignored, positions, torch.full_like(positions, -1)).amax(-1) + 1
    end = torch.where(real, positions, torch.full_like(positions, -1)).amax(-1) + 1
    return start, end


def budget_loss(terms: torch.Tensor, weights: torch.Tensor, total: torch.Tensor | float) -> torch.Tensor:
    """
    `sum_b weights_b * terms_b / total`: one predictor's keep-budget term, token-weighted like the LM loss.

    terms: `[B]`, each row's `(target - ratio)^2` (0 for a row the predictor does not score). weights: `[B]`, each
    row's label tokens (the tokens its cross-entropy counts). total: the label tokens of the whole optimizer step (the
    Trainer's `num_items_in_batch`: every micro-batch and process), or this batch's own. A sum over rows divided by
    one global count is what makes gradient accumulation and data parallelism equal one large batch; for one row it
    is the original's `(target - ratio)^2`.
    """
    return (terms * weights).sum() / total


def row_weights(labels: torch.Tensor | None, batch: int, num_items_in_batch: Any, device: torch.device):
    """
    (`[B]` float weights, total) of `budget_loss`: each row's label tokens after the causal shift (what
    `ForCausalLMLoss` averages over) and `num_items_in_batch` (or their sum, at least 1). Without labels: 1 per row
    over `batch` (the plain mean over rows).
    """
    if labels is None:
        return torch.ones(batch, device=device), float(batch)
    weights = (labels[:, 1:] != -100).sum(-1).to(device=device, dtype=torch.float32)
    if num_items_in_batch is None:
        return weights, weights.sum().clamp(min=1.0)
    total = num_items_in_batch.to(device) if torch.is_tensor(num_items_in_batch) else float(num_items_in_batch)
    return weights, total


def temperature(step: int, max_steps: int) -> float:
    """tau = 0.1 ** (step / max_steps): 1 at the start, 0.1 at the end."""
    return 0.1 ** (step / max(max_steps, 1))


def freeze_parts(model, freeze_vision_tower: bool = True, freeze_projector: bool = False,
                 freeze_llm: bool = False) -> None:  # fmt: skip
    """`requires_grad_(False)` on the parts that are not trained (the vision tower by default, as the original)."""
    frozen = []
    if freeze_vision_tower:
        frozen.append(model.model.vision_tower if hasattr(model.model, "vision_tower") else model.model.visual)
    if freeze_projector:  # (LLaVA-NeXT's image_newline belongs with its projector)
        frozen.append(getattr(model.model, "multi_modal_projector", None) or model.model.visual.merger)
        if isinstance(getattr(model.model, "image_newline", None), torch.nn.Parameter):
            model.model.image_newline.requires_grad_(False)
    if freeze_llm:
        frozen += [model.model.language_model, model.lm_head]
    for module in frozen:
        module.requires_grad_(False)


def parameter_groups(model, predictor_lr: float = 2e-4, lr: float = 5e-6) -> list[dict]:
    """
    Optimizer groups over the trainable parameters: the predictors (any parameter named `...score_predictor...`,
    whatever wrapper prefixes DDP, FSDP or DeepSpeed add) at `predictor_lr`, the rest at `lr`, no weight decay.
    """
    predictors, rest = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (predictors if "score_predictor" in name else rest).append(param)
    groups = [{"params": predictors, "lr": predictor_lr, "weight_decay": 0.0}]
    if rest:
        groups.append({"params": rest, "lr": lr, "weight_decay": 0.0})
    return groups


def predictor_parameter_groups(model, predictor_lr: float = 2e-4, lr: float = 5e-6, freeze_vision_tower: bool = True,
                               freeze_projector: bool = False, freeze_llm: bool = False) -> list[dict]:  # fmt: skip
    """`freeze_parts` then `parameter_groups` (for a hand-made optimizer; the Trainer path is `DynamicLlavaTrainer`)."""
    freeze_parts(model, freeze_vision_tower, freeze_projector, freeze_llm)
    return parameter_groups(model, predictor_lr, lr)
