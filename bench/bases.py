"""The per-base parts of the bench, in one place: how a preset of a base becomes a Dynamic config, what one image of
the bench's prompts is (its inputs and its placeholder tokens), which image inputs belong to the first rows, and the
rotary positions a lone stock decoder layer takes (`accounting.layer_flops`). Everything else in the bench is
base-agnostic. `bench_base(config)` picks the adapter of a config through the registry (`hub.bases.base_of`).

Image inputs per base (B rows, one image each):

* LLaVA-1.5: `pixel_values` `[B, 3, side, side]`; `image_seq_length` placeholder tokens.
* LLaVA-NeXT: `pixel_values` `[B, tiles, 3, side, side]` (the base tile + the anyres tiles of the image's best
  pinpoint), `image_sizes` `[B, 2]` (height, width); the placeholder count is what the model packs for that size
  (`image_token_counts`: base tile, unpadded high-resolution patches, one newline per row).
* Qwen2.5-VL: `pixel_values` `[B * t * h * w, 3 * temporal_patch * patch**2]` flat patches, `image_grid_thw` `[B, 3]`
  = (1, height / patch, width / patch); `t * h * w / merge**2` `<|image_pad|>` tokens between `<|vision_start|>` and
  `<|vision_end|>`.
"""

from __future__ import annotations

from typing import Any

import torch

from ..hub.bases import BASES, base_of
from ..transformers_compat import rope_index_takes_token_types

__all__ = ["BENCH_BASES", "BenchBase", "bench_base"]

PREDICTOR_FIELDS = ("predictor_d_model", "predictor_nhead", "predictor_dim_feedforward", "predictor_num_layers")


def _sparsity(spec: dict) -> dict[str, Any]:
    """The sparsity fields every preset gets: `sparse_layer` 2, `vision_keep_rate` 0.2, the preset's predictor."""
    return dict(sparse_layer=2, vision_keep_rate=0.2, **{k: spec["predictor"][k] for k in PREDICTOR_FIELDS})


class BenchBase:
    """LLaVA-1.5 (`llava`): one fixed-size image of `image_seq_length` tokens. The other bases override."""

    name = "llava"

    def build_config(self, spec: dict, **fields: Any) -> Any:
        """The Dynamic config of a preset spec (`bench.presets.PRESETS[name]`): a Llama LM and a CLIP tower, plus the
        base's own config `fields`."""
        vision = spec["vision"]
        return BASES[self.name].load_config_class()(
            text_config=dict(model_type="llama", pad_token_id=0, bos_token_id=1, eos_token_id=2, **spec["text"]),
            vision_config=dict(model_type="clip_vision_model", projection_dim=vision["hidden_size"], **vision),
            image_token_index=spec.get("image_token_id", 32000),
            image_seq_length=(vision["image_size"] // vision["patch_size"]) ** 2,
            pad_token_id=0,
            **_sparsity(spec),
            **fields,
        )

    def image_size(self, config: Any, requested: tuple[int, int] | None) -> tuple[int, int] | None:
        """The (height, width) of the bench's image; None where the tower fixes it (LLaVA-1.5: `image_size`)."""
        side = config.vision_config.image_size
        if requested is not None and tuple(requested) != (side, side):
            raise ValueError(
                f"image_size {tuple(requested)}: a LLaVA-1.5 image is always {side} x {side} pixels (the tower's "
                "image_size); pass image_size=None."
            )
        return None

    def special_ids(self, config: Any) -> list[int]:
        """Token ids a random text token must not take (the image placeholder and its markers)."""
        return [config.image_token_id]

    def image_placeholder(self, config: Any, tokens: int) -> torch.Tensor:
        """`[n]` the ids that stand for one image of `tokens` image tokens in a prompt."""
        return torch.full((tokens,), config.image_token_id)

    def image_tokens(self, model: Any, image_size: tuple[int, int] | None) -> int:
        """The image tokens the model makes of one image of `image_size` (height, width)."""
        return model.config.image_seq_length

    def image_inputs(
        self, model: Any, batch: int, image_size: tuple[int, int] | None, generator: torch.Generator
    ) -> dict[str, torch.Tensor]:
        """Random image inputs of `batch` rows, one image of `image_size` each (shapes: the module docstring)."""
        side = model.config.vision_config.image_size
        pixels = torch.randn(batch, 3, side, side, generator=generator)
        return {"pixel_values": pixels.to(model.device, model.dtype)}

    def first_rows(self, inputs: dict[str, torch.Tensor], rows: int) -> dict[str, torch.Tensor]:
        """The image inputs of the first `rows` rows of `inputs` (one image per row)."""
        return {"pixel_values": inputs["pixel_values"][:rows]}

    def token_inputs(self, config: Any, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-token inputs the base's processor returns beside `input_ids` `[batch, seq]` (none here)."""
        return {}

    def rope_positions(self, positions: torch.Tensor) -> torch.Tensor:
        """What the text model's `rotary_emb` takes for `[1, T]` text positions (1-D RoPE: themselves)."""
        return positions


class LlavaNextBench(BenchBase):
    """LLaVA-NeXT (`llava_next`): anyres tiles; an image's token count depends on its size."""

    name = "llava_next"

    def build_config(self, spec: dict, **fields: Any) -> Any:
        return super().build_config(
            spec,
            image_grid_pinpoints=[list(p) for p in spec["image_grid_pinpoints"]],
            vision_feature_select_strategy="default",
            vision_feature_layer=-2,
            **fields,
        )

    def image_size(self, config: Any, requested: tuple[int, int] | None) -> tuple[int, int]:
        """The requested (height, width), else a 480 x 640 photo (COCO's usual size) scaled to the tower's tile."""
        if requested is not None:
            height, width = (int(x) for x in requested)
            if height < 1 or width < 1:
                raise ValueError(f"image_size {tuple(requested)}: pass a positive (height, width) in pixels.")
            return height, width
        scale = config.vision_config.image_size / 336
        return max(1, round(480 * scale)), max(1, round(640 * scale))

    def image_tokens(self, model: Any, image_size: tuple[int, int] | None) -> int:
        """What the model packs for one image of that size (its own `image_token_counts`, no vision tower)."""
        from ..sparse_model import select_strategy

        (tokens,) = model.model.image_token_counts(
            torch.tensor([list(image_size)]), select_strategy(model.config, None)
        )
        return tokens

    def image_inputs(
        self, model: Any, batch: int, image_size: tuple[int, int] | None, generator: torch.Generator
    ) -> dict[str, torch.Tensor]:
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        config = model.config
        side = config.vision_config.image_size
        sizes = torch.tensor([list(image_size)] * batch)
        tiles = image_size_to_num_patches(list(image_size), config.image_grid_pinpoints, side)
        pixels = torch.randn(batch, tiles, 3, side, side, generator=generator)
        return {"pixel_values": pixels.to(model.device, model.dtype), "image_sizes": sizes.to(model.device)}

    def first_rows(self, inputs: dict[str, torch.Tensor], rows: int) -> dict[str, torch.Tensor]:
        return {"pixel_values": inputs["pixel_values"][:rows], "image_sizes": inputs["image_sizes"][:rows]}


class Qwen2_5_VLBench(BenchBase):
    """Qwen2.5-VL (`qwen2_5_vl`): dynamic resolution, flat patches, M-RoPE (3 rotary positions per token)."""

    name = "qwen2_5_vl"

    def build_config(self, spec: dict) -> Any:
        ids = spec["special_ids"]
        text = dict(spec["text"], pad_token_id=0, bos_token_id=None, eos_token_id=ids["eos"])
        text["rope_scaling"] = {"type": "mrope", "mrope_section": list(spec["mrope_section"])}
        return BASES[self.name].load_config_class()(
            text_config=text,
            vision_config=dict(spec["vision"]),
            image_token_id=ids["image"],
            video_token_id=ids["video"],
            vision_start_token_id=ids["vision_start"],
            vision_end_token_id=ids["vision_end"],
            tie_word_embeddings=False,
            pad_token_id=0,
            **_sparsity(spec),
        )

    def image_size(self, config: Any, requested: tuple[int, int] | None) -> tuple[int, int]:
        """The requested (height, width), else 46 x 46 patches (644 x 644 px at patch 14: 529 tokens); each side
        must be a multiple of patch * merge (what the stock image processor resizes to)."""
        vision = config.vision_config
        unit = vision.patch_size * vision.spatial_merge_size
        if requested is None:
            return 46 * vision.patch_size, 46 * vision.patch_size
        height, width = (int(x) for x in requested)
        if height < unit or width < unit or height % unit or width % unit:
            raise ValueError(
                f"image_size {tuple(requested)}: a Qwen2.5-VL image's sides must be positive multiples of patch_size * "
                f"spatial_merge_size = {unit} px (as the image processor resizes them); e.g. "
                f"({max(1, round(height / unit)) * unit}, {max(1, round(width / unit)) * unit})."
            )
        return height, width

    def special_ids(self, config: Any) -> list[int]:
        return [config.image_token_id, config.video_token_id, config.vision_start_token_id, config.vision_end_token_id]

    def image_placeholder(self, config: Any, tokens: int) -> torch.Tensor:
        pads = torch.full((tokens,), config.image_token_id)
        return torch.cat(
            [torch.tensor([config.vision_start_token_id]), pads, torch.tensor([config.vision_end_token_id])]
        )

    def image_tokens(self, model: Any, image_size: tuple[int, int] | None) -> int:
        """`t * h * w / merge**2` of the image's grid (the model's own `image_token_counts`)."""
        (tokens,) = model.model.image_token_counts(self._grid(model, image_size, 1))
        return tokens

    def _grid(self, model: Any, image_size: tuple[int, int], batch: int) -> torch.Tensor:
        """`[batch, 3]` image_grid_thw rows (1, height / patch, width / patch)."""
        patch = model.config.vision_config.patch_size
        return torch.tensor([[1, image_size[0] // patch, image_size[1] // patch]] * batch)

    def image_inputs(
        self, model: Any, batch: int, image_size: tuple[int, int] | None, generator: torch.Generator
    ) -> dict[str, torch.Tensor]:
        vision = model.config.vision_config
        grid = self._grid(model, image_size, batch)
        width = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
        pixels = torch.randn(int(grid.prod(-1).sum()), width, generator=generator)
        return {"pixel_values": pixels.to(model.device, model.dtype), "image_grid_thw": grid.to(model.device)}

    def first_rows(self, inputs: dict[str, torch.Tensor], rows: int) -> dict[str, torch.Tensor]:
        grid = inputs["image_grid_thw"][:rows]
        return {"pixel_values": inputs["pixel_values"][: int(grid.prod(-1).sum())], "image_grid_thw": grid}

    def token_inputs(self, config: Any, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """`mm_token_type_ids` `[batch, seq]` (1 at image tokens) where the stock model finds images by it (5.25's
        `get_rope_index`, whose processor returns it by default; 4.57 and 5.0 find them by `<|vision_start|>`, and
        their processors return it only on request). Ours reads the image tokens from `input_ids` either way."""
        if not rope_index_takes_token_types():
            return {}
        return {"mm_token_type_ids": (input_ids == config.image_token_id).long()}

    def rope_positions(self, positions: torch.Tensor) -> torch.Tensor:
        """`[3, 1, T]`: text tokens have the same time, height and width positions."""
        return positions[None].expand(3, -1, -1)


BENCH_BASES: dict[str, BenchBase] = {
    adapter.name: adapter for adapter in (BenchBase(), LlavaNextBench(), Qwen2_5_VLBench())
}


def bench_base(config: Any) -> BenchBase:
    """The bench adapter of a config's base (stock or Dynamic `model_type`, through `hub.bases.base_of`)."""
    return BENCH_BASES[base_of(config).stock_model_type]
