"""Configuration of Dynamic-LLaVA (ICLR 2025): a LLaVA config plus the sparsification fields.

Every field of the stock `LlavaConfig` keeps its meaning. The sparsification fields are flat attributes, so they show
up in `config.json` and can be set from `from_pretrained(..., vision_keep_rate=0.3)`. Every way of setting one (the
constructor, `from_pretrained` keyword arguments, attribute assignment, a per-call `generate(...)` override) goes
through the same checks and fails with the same clear errors.

This file is a Hub remote-code module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from transformers import LlavaConfig

__all__ = ["PER_CALL_FIELDS", "DynamicLlavaConfig", "SparsitySettings"]


def _fail(where: str, field: str, problem: str, fix: str) -> None:
    raise ValueError(f"{where}{field} {problem}. {fix}")


def _check_int(where: str, field: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        _fail(where, field, f"must be an integer >= {low}, got {value!r}", f"Set {field} to such an integer.")


def _check_rate(where: str, field: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0.0 < value <= 1.0):
        _fail(where, field, f"is {value!r}, outside (0, 1]", "Use a fraction such as 0.2.")


def _check_bool(where: str, field: str, value: Any) -> None:
    if not isinstance(value, bool):
        _fail(where, field, f"must be True or False, got {value!r}", "Pass a bool.")


def _check_keep_tokens(where: str, field: str, value: Any) -> None:
    if value is not None:
        _check_int(where, field, value, 1)


def _check_weight(where: str, field: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        _fail(where, field, f"must be a number, got {value!r}", "Pass a float.")
    if value < 0:
        _fail(where, field, f"is {value}, negative", "Use a weight >= 0.")


# field -> check of the value on its own (cross-field checks are in `validate_sparsity`)
_FIELD_CHECKS = {
    "sparse_layer": lambda w, f, v: _check_int(w, f, v, 1),
    "vision_keep_rate": _check_rate,
    "vision_keep_tokens": _check_keep_tokens,
    "output_text_keep_rate": _check_rate,
    "output_text_len_for_training": lambda w, f, v: _check_int(w, f, v, 0),
    "use_vision_predictor": _check_bool,
    "use_output_text_predictor": _check_bool,
    "predictor_d_model": lambda w, f, v: _check_int(w, f, v, 1),
    "predictor_nhead": lambda w, f, v: _check_int(w, f, v, 1),
    "predictor_dim_feedforward": lambda w, f, v: _check_int(w, f, v, 1),
    "predictor_num_layers": lambda w, f, v: _check_int(w, f, v, 1),
    "mask_loss_weight": _check_weight,
}
# the fields one `generate()`/`forward()` call may override (the cache layout does not depend on them)
PER_CALL_FIELDS = ("vision_keep_tokens", "vision_keep_rate", "use_vision_predictor", "use_output_text_predictor")


@dataclass(frozen=True)
class SparsitySettings:
    """The sparsification of one call: the config's fields with that call's overrides applied (all validated)."""

    sparse_layer: int
    use_vision_predictor: bool
    use_output_text_predictor: bool
    vision_keep_rate: float
    vision_keep_tokens: int | None

    @property
    def enabled(self) -> bool:
        """False when both predictors are off: the model then computes exactly what stock LLaVA does."""
        return self.use_vision_predictor or self.use_output_text_predictor

    def image_keep_count(self, tokens_per_image: int) -> int:
        """Image tokens kept per image: `vision_keep_tokens` if set, else `int(tokens_per_image * rate)`."""
        if self.vision_keep_tokens is not None:
            if self.vision_keep_tokens > tokens_per_image:
                raise ValueError(
                    f"vision_keep_tokens={self.vision_keep_tokens} is more than the {tokens_per_image} tokens of an "
                    f"image. Use at most {tokens_per_image} (or vision_keep_rate=1.0 to keep every token)."
                )
            return self.vision_keep_tokens
        count = int(tokens_per_image * self.vision_keep_rate)
        if count < 1:
            raise ValueError(
                f"vision_keep_rate={self.vision_keep_rate} keeps int({tokens_per_image} x {self.vision_keep_rate}) = 0 "
                f"of an image's {tokens_per_image} tokens. Use a rate >= {1 / tokens_per_image:.4g} or set "
                "vision_keep_tokens."
            )
        return count


class DynamicLlavaConfig(LlavaConfig):
    r"""
    Configuration of [`DynamicLlavaForConditionalGeneration`].

    Args (besides those of `LlavaConfig`):
        sparse_layer (`int`, defaults to 2):
            Index `l` of the first sparse decoder layer. Layers `0..l-1` see every token; the predictors score the
            hidden states entering layer `l`; layers `l..L-1` see, and cache, only the kept tokens.
            Must lie in `1..num_hidden_layers-1`.
        vision_keep_rate (`float`, defaults to 0.2):
            Fraction of each image's tokens kept at prefill: `k = int(num_image_tokens * vision_keep_rate)`
            (576 tokens x 0.2 -> 115).
        vision_keep_tokens (`int`, *optional*):
            Image tokens kept per image; wins over `vision_keep_rate` when set (the literature's 64 / 128 / 192).
        output_text_keep_rate (`float`, defaults to 0.5):
            Training target of the output-text predictor's keep ratio. At inference the predictor's own threshold
            decides (keep iff `logit[0] > logit[1]`); there is no budget.
        output_text_len_for_training (`int`, defaults to 50):
            Answers shorter than this are not sparsified during training.
        use_vision_predictor (`bool`, defaults to True):
            Prune image tokens at prefill with the image predictor.
        use_output_text_predictor (`bool`, defaults to True):
            Decide, per generated token, whether its keys/values enter the sparse layers' cache.
            With both `use_*` False, sparsification is off and the model computes exactly what stock LLaVA does.
        predictor_d_model (`int`, defaults to 512): width of both predictors.
        predictor_nhead (`int`, defaults to 8): attention heads of the image predictor's transformer blocks.
        predictor_dim_feedforward (`int`, defaults to 2048): MLP width of those blocks.
        predictor_num_layers (`int`, defaults to 2): number of those blocks.
        mask_loss_weight (`float`, defaults to 100): weight of the keep-budget loss during training.
    """

    model_type = "dynamic_llava"

    def __init__(
        self,
        sparse_layer: int = 2,
        vision_keep_rate: float = 0.2,
        vision_keep_tokens: int | None = None,
        output_text_keep_rate: float = 0.5,
        output_text_len_for_training: int = 50,
        use_vision_predictor: bool = True,
        use_output_text_predictor: bool = True,
        predictor_d_model: int = 512,
        predictor_nhead: int = 8,
        predictor_dim_feedforward: int = 2048,
        predictor_num_layers: int = 2,
        mask_loss_weight: float = 100.0,
        **kwargs: Any,
    ):
        self.sparse_layer = sparse_layer
        self.vision_keep_rate = vision_keep_rate
        self.vision_keep_tokens = vision_keep_tokens
        self.output_text_keep_rate = output_text_keep_rate
        self.output_text_len_for_training = output_text_len_for_training
        self.use_vision_predictor = use_vision_predictor
        self.use_output_text_predictor = use_output_text_predictor
        self.predictor_d_model = predictor_d_model
        self.predictor_nhead = predictor_nhead
        self.predictor_dim_feedforward = predictor_dim_feedforward
        self.predictor_num_layers = predictor_num_layers
        self.mask_loss_weight = mask_loss_weight
        super().__init__(**kwargs)
        self.validate_sparsity()

    def __setattr__(self, key: str, value: Any) -> None:
        check = _FIELD_CHECKS.get(key)
        if check is not None:
            check("DynamicLlavaConfig.", key, value)
            if key == "sparse_layer":
                self._check_sparse_layer(value)
            elif key == "vision_keep_tokens":
                self._check_keep_tokens_fit(value, "DynamicLlavaConfig.")
        super().__setattr__(key, value)

    @property
    def sparsification_enabled(self) -> bool:
        """False when both predictors are off: the model then computes exactly what stock LLaVA does."""
        return bool(self.use_vision_predictor or self.use_output_text_predictor)

    @property
    def tokens_per_image(self) -> int | None:
        """Tokens one image becomes (`(image_size / patch_size)^2`, plus the class token for strategy "full")."""
        vision = getattr(self, "vision_config", None)
        if vision is None or not hasattr(vision, "image_size"):
            return None
        full = getattr(self, "vision_feature_select_strategy", "default") == "full"
        return (vision.image_size // vision.patch_size) ** 2 + (1 if full else 0)

    def _check_sparse_layer(self, value: int) -> None:
        text = self.__dict__.get("text_config")
        num_layers = getattr(text, "num_hidden_layers", None)
        if num_layers is not None and not (1 <= value <= num_layers - 1):
            _fail(
                "DynamicLlavaConfig.",
                "sparse_layer",
                f"is {value}, outside 1..{num_layers - 1} (the text model has {num_layers} layers)",
                "At least one dense layer must come before it and one sparse layer from it on.",
            )

    def _check_keep_tokens_fit(self, value: int | None, where: str) -> None:
        tokens = self.tokens_per_image if "vision_config" in self.__dict__ else None
        if value is not None and tokens is not None and value > tokens:
            _fail(
                where,
                "vision_keep_tokens",
                f"is {value}, more than the {tokens} tokens of an image",
                f"Use at most {tokens} (or vision_keep_rate=1.0 to keep every token).",
            )

    def validate_sparsity(self) -> None:
        """Raise a `ValueError` naming the field and the fix when a sparsification field is out of range."""
        for field, check in _FIELD_CHECKS.items():
            check("DynamicLlavaConfig.", field, getattr(self, field))
        self._check_sparse_layer(self.sparse_layer)
        self._check_keep_tokens_fit(self.vision_keep_tokens, "DynamicLlavaConfig.")
        for divisor, why in ((self.predictor_nhead, "predictor_nhead"), (4, "4")):
            if self.predictor_d_model % divisor != 0:
                _fail(
                    "DynamicLlavaConfig.",
                    "predictor_d_model",
                    f"({self.predictor_d_model}) is not divisible by {why} ({divisor})",
                    "The image predictor splits it across heads and its output MLP narrows to d/2 and d/4; use a "
                    "multiple of both.",
                )

    def sparsity_settings(self, **overrides: Any) -> SparsitySettings:
        """
        The settings of one call: these fields with `overrides` (`PER_CALL_FIELDS`, None = the config's value)
        applied, each checked as the constructor checks it.
        """
        values = {field: getattr(self, field) for field in PER_CALL_FIELDS}
        for field, value in overrides.items():
            if field not in PER_CALL_FIELDS:
                raise TypeError(
                    f"{field} cannot be set per call; per-call sparsity fields: {', '.join(PER_CALL_FIELDS)}"
                )
            if value is None:
                continue
            _FIELD_CHECKS[field]("per-call ", field, value)
            self._check_keep_tokens_fit(value if field == "vision_keep_tokens" else None, "per-call ")
            values[field] = value
            if field == "vision_keep_rate" and overrides.get("vision_keep_tokens") is None:
                values["vision_keep_tokens"] = None  # an explicit per-call rate wins over the config's token count
        return SparsitySettings(sparse_layer=self.sparse_layer, **values)
