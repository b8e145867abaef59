"""The two learned predictors of Dynamic-LLaVA (module and parameter names as in the original checkpoints, so
converted weights load by name; docs/design.md).

* `ImageScorePredictor` scores each image token entering layer `sparse_layer`.
* `OutputTextScorePredictor` scores each generated token fed back.

Both return two logits per token; index 0 means keep. They stay in float32 whatever the model's dtype: their top-k
and threshold decisions are cut at margins half precision can flip (the original ran them in fp16). `from_pretrained`
keeps them fp32 through `_keep_in_fp32_modules(_strict)`; `Float32Module` does the same for `.to(dtype)`, `.half()`
and `.bfloat16()` on a built model. Their inputs are cast to float32 by `run_predictor`.

This file is a Hub remote-code module.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

__all__ = ["Float32Module", "ImageScorePredictor", "OutputTextScorePredictor", "run_predictor"]


class Float32Module(nn.Module):
    """A module whose floating-point parameters and buffers stay float32 under dtype casts (device moves apply)."""

    def _apply(self, fn: Callable, recurse: bool = True):
        def keep_float32(tensor: torch.Tensor) -> torch.Tensor:
            moved = fn(tensor)
            if tensor.dtype == torch.float32 and moved.dtype != torch.float32 and moved.is_floating_point():
                return tensor.to(device=moved.device)  # the cast is dropped, the move kept
            return moved

        return super()._apply(keep_float32, recurse)


def run_predictor(predictor: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """`predictor(hidden_states)` with the input cast to the predictor's dtype (float32)."""
    dtype = next(predictor.parameters()).dtype
    return predictor(hidden_states.to(dtype))


class PredictorAttention(nn.Module):
    """Full multi-head self-attention over one image's tokens: no mask, no positions, scale 1/sqrt(d/nhead)."""

    def __init__(self, d_model: int, nhead: int):
        super().__init__()
        self.nhead = nhead
        self.scale = (d_model // nhead) ** -0.5
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: `[images, tokens, d]` -> `[images, tokens, d]`."""
        n, t, d = x.shape
        q, k, v = self.qkv(x).reshape(n, t, 3, self.nhead, d // self.nhead).permute(2, 0, 3, 1, 4).unbind(0)
        # softmax(q k^T * scale) v, the original's eager product, in SDPA's fused kernel (no tokens x tokens
        # matrix kept; the same values to float32 rounding)
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=self.scale)
        return self.proj(out.transpose(1, 2).reshape(n, t, d))


class PredictorMlp(nn.Module):
    """fc1 -> exact GELU -> fc2."""

    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(d_model, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`[..., d]` -> `[..., d]`."""
        return self.fc2(self.act(self.fc1(x)))


class PredictorBlock(nn.Module):
    """Pre-norm ViT block of width d (no layer scale)."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model, eps=1e-5)
        self.attn = PredictorAttention(d_model, nhead)
        self.norm2 = nn.LayerNorm(d_model, eps=1e-5)
        self.mlp = PredictorMlp(d_model, int(d_model * (dim_feedforward / d_model)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`[images, tokens, d]` -> `[images, tokens, d]`."""
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ImageScorePredictor(Float32Module):
    """
    Scores the tokens of one image from the hidden states entering layer `sparse_layer`.

    down_mlp (LayerNorm -> Linear(H, d) -> GELU) -> `num_layers` ViT blocks -> local/global mix (first d/2 channels
    per token, mask-weighted mean of the last d/2 over the image) -> output_mlp (d -> d/2 -> d/4 -> 2).
    """

    def __init__(self, hidden_size: int, d_model: int, nhead: int, dim_feedforward: int, num_layers: int):
        super().__init__()
        self.down_mlp = nn.Sequential(nn.LayerNorm(hidden_size, eps=1e-5), nn.Linear(hidden_size, d_model), nn.GELU())
        self.transformer = nn.ModuleList([PredictorBlock(d_model, nhead, dim_feedforward) for _ in range(num_layers)])
        self.output_mlp = nn.Sequential(
            nn.Linear(d_model, d_model // 2),
            nn.GELU(),
            nn.Linear(d_model // 2, d_model // 4),
            nn.GELU(),
            nn.Linear(d_model // 4, 2),
        )

    def forward(self, hidden_states: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """
        Args:
            hidden_states: `[images, tokens, H]`, each image's tokens as they enter layer `sparse_layer`.
            mask: `[images, tokens]` keep mask (training); None means all ones (inference).
        Returns:
            `[images, tokens, 2]` logits, index 0 = keep.
        """
        x = self.down_mlp(hidden_states)
        if mask is None:
            mask = x.new_ones(x.shape[:-1])
        mask = mask.to(x.dtype)[..., None]
        x = x * mask
        for block in self.transformer:
            x = block(x)
        local_x, global_x = x.chunk(2, dim=-1)
        global_x = (global_x * mask).sum(dim=1, keepdim=True) / mask.sum(dim=1, keepdim=True)
        x = torch.cat([local_x, global_x.expand_as(local_x)], dim=-1)
        return self.output_mlp(x)


class OutputTextScorePredictor(Float32Module):
    """Per-token MLP: LayerNorm(H) -> Linear(H, d) -> GELU -> d/2 -> GELU -> d/4 -> GELU -> 2 (index 0 = keep)."""

    def __init__(self, hidden_size: int, d_model: int):
        super().__init__()
        self.output_mlp = nn.Sequential(
            nn.LayerNorm(hidden_size, eps=1e-5),
            nn.Linear(hidden_size, d_model),
            nn.GELU(),
            nn.Linear(d_model, d_model // 2),
            nn.GELU(),
            nn.Linear(d_model // 2, d_model // 4),
            nn.GELU(),
            nn.Linear(d_model // 4, 2),
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """`[..., H]` -> `[..., 2]` logits."""
        return self.output_mlp(hidden_states)
