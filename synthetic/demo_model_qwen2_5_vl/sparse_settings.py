"""The sparsity contract of one call: which fields a `forward()`/`generate()` call may set, how each is checked, and
the rules every front-end shares (precedence, tokens vs rate, what "off" means).

Everything here is declared once and read by every path: the model's `forward()` and `generate()` (their signatures
are derived from `SparsityKwargs`), the config's checks, a `GenerationConfig` carrying the fields, the command line
(flags and help), lmms-eval's `model_args` and the bench. Pure Python: the command line imports it before torch.

This file is a Hub remote-code module (flat imports only; nothing runs at import).
"""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypedDict

__all__ = [
    "APPLIES_ONLY_WITH",
    "FIELD_GROUPS",
    "FIELD_HELP",
    "PER_CALL_FIELDS",
    "SPARSITY_OFF",
    "SparsityKwargs",
    "SparsitySettings",
    "check_field",
    "check_overrides",
    "normalize_field",
    "per_call_overrides",
    "pop_per_call_fields",
    "resolve_settings",
    "sparsity_enabled",
    "with_per_call_parameters",
]


class SparsityKwargs(TypedDict, total=False):
    """
    The per-call sparsity of one `forward()` / `generate()` call; a field left out (or None) takes the config's value.

    vision_keep_tokens: image tokens kept per image at prefill (wins over the config's `vision_keep_rate`).
    vision_keep_rate: fraction of each image's tokens kept at prefill, `int(tokens * rate)` (wins over the config's
        `vision_keep_tokens`). Giving both in one call is an error.
    use_vision_predictor: prune image tokens at prefill.
    use_output_text_predictor: let the output-text predictor decide which generated tokens enter the sparse cache.
    image_scorer: what ranks the image tokens at prefill: "predictor" (the learned image predictor) or "attention"
        (the training-free rule of FastV: the mean attention each image token receives in the layer before
        `sparse_layer`).
    """

    vision_keep_tokens: int | None
    vision_keep_rate: float | None
    use_vision_predictor: bool | None
    use_output_text_predictor: bool | None
    image_scorer: str | None


PER_CALL_FIELDS: tuple[str, ...] = tuple(SparsityKwargs.__annotations__)

# one line per field, for `--help`, lmms-eval's documentation and error messages
FIELD_HELP: dict[str, str] = {
    "vision_keep_tokens": "image tokens kept per image at prefill",
    "vision_keep_rate": "fraction of each image's tokens kept at prefill",
    "use_vision_predictor": "prune image tokens at prefill",
    "use_output_text_predictor": "let the output-text predictor decide which generated tokens are cached",
    "image_scorer": 'what ranks image tokens: "predictor" (learned) or "attention" (training-free, FastV)',
}

# what "sparsity off" means everywhere: both decisions off, so the model computes exactly what the stock model does
SPARSITY_OFF: dict[str, bool] = {"use_vision_predictor": False, "use_output_text_predictor": False}

IMAGE_SCORERS = ("predictor", "attention")

# a per-call field that means something only while a decision is on: asked for with that decision off, it cannot be
# honoured, so it is refused (on every path: the library, the command line, lmms-eval, the bench)
APPLIES_ONLY_WITH: dict[str, str] = {
    "vision_keep_tokens": "use_vision_predictor",
    "vision_keep_rate": "use_vision_predictor",
    "image_scorer": "use_vision_predictor",
}


def sparsity_enabled(use_vision_predictor: bool, use_output_text_predictor: bool) -> bool:
    """The one rule of "is sparsity on": some decision is on. Off: every layer is dense (stock compute)."""
    return bool(use_vision_predictor or use_output_text_predictor)


# ---- checks of one value -------------------------------------------------------------------------------------------


def _fail(where: str, field: str, problem: str, fix: str) -> None:
    raise ValueError(f"{where}{field} {problem}. {fix}")


def _is_real(value: Any) -> bool:
    """A real number of any numeric type (Python, NumPy, a 0-d tensor), not a bool."""
    if isinstance(value, bool) or type(value).__name__ == "bool_":
        return False
    if isinstance(value, numbers.Real):
        return True
    return hasattr(value, "dim") and hasattr(value, "item") and value.dim() == 0 and not value.dtype.is_complex


def _is_integer(value: Any) -> bool:
    if not _is_real(value):
        return False
    if isinstance(value, numbers.Integral):
        return True
    return hasattr(value, "dtype") and not getattr(value.dtype, "is_floating_point", True)


def _check_int(low: int) -> Callable[[str, str, Any], None]:
    def check(where: str, field: str, value: Any) -> None:
        if not _is_integer(value):
            _fail(where, field, f"must be an integer >= {low}, got {value!r}", f"Set {field} to such an integer.")
        if int(value) < low:
            _fail(where, field, f"is {int(value)}, below {low}", f"Set {field} to an integer >= {low}.")

    return check


def _check_rate(where: str, field: str, value: Any) -> None:
    if not _is_real(value):
        _fail(where, field, f"must be a number, got {value!r}", "Use a fraction such as 0.2.")
    number = float(value)
    if math.isnan(number):
        _fail(where, field, "is NaN", "Use a fraction such as 0.2.")
    if not 0.0 < number <= 1.0:
        _fail(where, field, f"is {number:g}, outside (0, 1]", "Use a fraction such as 0.2.")


def _check_bool(where: str, field: str, value: Any) -> None:
    if not isinstance(value, bool) and type(value).__name__ != "bool_":
        _fail(where, field, f"must be True or False, got {value!r}", "Pass a bool.")


def _check_keep_tokens(where: str, field: str, value: Any) -> None:
    if value is not None:
        _check_int(1)(where, field, value)


def _check_weight(where: str, field: str, value: Any) -> None:
    if not _is_real(value) or math.isnan(float(value)):
        _fail(where, field, f"must be a number, got {value!r}", "Pass a float.")
    if float(value) < 0:
        _fail(where, field, f"is {float(value):g}, negative", "Use a weight >= 0.")


def _check_scorer(where: str, field: str, value: Any) -> None:
    if value not in IMAGE_SCORERS:
        _fail(where, field, f"is {value!r}", f"Use one of {', '.join(repr(s) for s in IMAGE_SCORERS)}.")


# field -> check of the value on its own (cross-field checks are in the config and `resolve_settings`)
FIELD_CHECKS: dict[str, Callable[[str, str, Any], None]] = {
    "sparse_layer": _check_int(1),
    "vision_keep_rate": _check_rate,
    "vision_keep_tokens": _check_keep_tokens,
    "output_text_keep_rate": _check_rate,
    "output_text_len_for_training": _check_int(0),
    "use_vision_predictor": _check_bool,
    "use_output_text_predictor": _check_bool,
    "image_scorer": _check_scorer,
    "predictor_d_model": _check_int(1),
    "predictor_nhead": _check_int(1),
    "predictor_dim_feedforward": _check_int(1),
    "predictor_num_layers": _check_int(1),
    "mask_loss_weight": _check_weight,
}


def check_field(where: str, field: str, value: Any) -> None:
    """Raise a `ValueError` naming `field` and the fix when `value` is not a valid value of it."""
    FIELD_CHECKS[field](where, field, value)


def normalize_field(field: str, value: Any) -> Any:
    """A checked value as the plain Python type the config stores (so it serializes): int, float or bool."""
    if value is None or field not in FIELD_CHECKS:
        return value
    check = FIELD_CHECKS[field]
    if check is _check_bool:
        return bool(value)
    if check in (_check_rate, _check_weight):
        return float(value)
    if check is _check_scorer:
        return value
    return int(value)


# ---- the rules of one call -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SparsitySettings:
    """The sparsification of one call: the config's fields with that call's overrides applied (all validated)."""

    sparse_layer: int
    num_hidden_layers: int
    use_vision_predictor: bool
    use_output_text_predictor: bool
    vision_keep_rate: float
    vision_keep_tokens: int | None
    image_scorer: str = "predictor"

    @property
    def enabled(self) -> bool:
        """False when both decisions are off: the model then computes exactly what the stock model does."""
        return sparsity_enabled(self.use_vision_predictor, self.use_output_text_predictor)

    @property
    def cache_sparse_layer(self) -> int:
        """The first sparse layer of a cache for this call: `sparse_layer`, or every layer dense when off."""
        return self.sparse_layer if self.enabled else self.num_hidden_layers

    def image_keep_count(self, tokens_per_image: int) -> int:
        """Image tokens kept of an image of `tokens_per_image`: `vision_keep_tokens`, else `int(tokens * rate)`."""
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


# fields that answer one question together: the first source that sets any of them sets the group (a per-call
# `vision_keep_tokens` replaces a `GenerationConfig`'s `vision_keep_rate`; both in one source are refused)
FIELD_GROUPS: tuple[tuple[str, ...], ...] = (("vision_keep_tokens", "vision_keep_rate"),)


def per_call_overrides(*sources: Mapping[str, Any] | Any | None) -> dict[str, Any]:
    """
    The per-call fields of the first source that sets each (None = not set), in precedence order: e.g.
    `per_call_overrides(kwargs, generation_config, model.generation_config)`. A source is a mapping or an object
    whose attributes are read (a `GenerationConfig`). A group of `FIELD_GROUPS` comes whole from the first source
    that sets any of its fields; a field of `APPLIES_ONLY_WITH` from a later source than its decision turned off is
    dropped (a per-call `use_vision_predictor=False` turns off a generation config's keep rate).
    """

    def read(source: Any, field: str) -> Any:
        if source is None:
            return None
        return source.get(field) if isinstance(source, Mapping) else getattr(source, field, None)

    found: dict[str, Any] = {}
    origin: dict[str, int] = {}
    grouped = {field: group for group in FIELD_GROUPS for field in group}
    for field in PER_CALL_FIELDS:
        if field in origin:
            continue
        members = grouped.get(field, (field,))
        for index, source in enumerate(sources):
            values = {member: read(source, member) for member in members}
            if any(value is not None for value in values.values()):
                for member, value in values.items():
                    origin[member] = index
                    if value is not None:
                        found[member] = value
                break
    for field, decision in APPLIES_ONLY_WITH.items():
        if field in found and found.get(decision) is False and origin[field] > origin[decision]:
            del found[field]
    return found


def check_overrides(overrides: Mapping[str, Any], where: str = "per-call ") -> dict[str, Any]:
    """
    The checks of one call's overrides that need no config (every front-end calls it before loading a model, and
    `resolve_settings` calls it): only `PER_CALL_FIELDS`; not both `vision_keep_tokens` and `vision_keep_rate`; each
    value valid (`check_field`). Returns the given fields (None = not given, left out), normalized.
    """
    unknown = [field for field in overrides if field not in PER_CALL_FIELDS]
    if unknown:
        raise TypeError(
            f"{', '.join(unknown)} cannot be set per call; per-call sparsity fields: {', '.join(PER_CALL_FIELDS)}"
        )
    given = {field: value for field, value in overrides.items() if value is not None}
    if "vision_keep_tokens" in given and "vision_keep_rate" in given:
        raise ValueError(
            f"{where}vision_keep_tokens={given['vision_keep_tokens']!r} and vision_keep_rate="
            f"{given['vision_keep_rate']!r} were both given: pass one (tokens kept per image, or a fraction of them)."
        )
    for field, value in given.items():
        check_field(where, field, value)
    for field, decision in APPLIES_ONLY_WITH.items():
        if field in given and given.get(decision) is False:
            raise ValueError(
                f"{where}{field}={given[field]!r} applies only with {decision}=True, and {decision}=False was given "
                "too: pass one."
            )
    return {field: normalize_field(field, value) for field, value in given.items()}


def resolve_settings(
    config: Any, overrides: Mapping[str, Any], num_hidden_layers: int, where: str = "per-call "
) -> SparsitySettings:
    """
    The one precedence rule: a per-call field wins over the config's; a per-call `vision_keep_rate` also wins over
    the config's `vision_keep_tokens` (and a per-call `vision_keep_tokens` over its rate); both in one call is an
    error. Each override is checked as the config checks it.

    Args:
        config: the model config (its sparsity fields are the defaults).
        overrides: field -> value (None = the config's); only `PER_CALL_FIELDS`.
        num_hidden_layers: layers of the language model (all dense when sparsity is off).
    """
    given = check_overrides(overrides, where)
    values = {field: getattr(config, field, None) for field in PER_CALL_FIELDS}
    if values["image_scorer"] is None:
        values["image_scorer"] = "predictor"
    values.update(given)
    for field, decision in APPLIES_ONLY_WITH.items():
        if field in given and not values[decision]:
            raise ValueError(
                f"{where}{field}={given[field]!r} applies only with {decision}=True, and the model's config has "
                f"{decision}=False: pass {decision}=True with it, or drop {field}."
            )
    if "vision_keep_rate" in given:
        values["vision_keep_tokens"] = None  # an explicit per-call rate wins over the config's token count
    return SparsitySettings(sparse_layer=config.sparse_layer, num_hidden_layers=num_hidden_layers, **values)


# ---- the config fields -----------------------------------------------------------------------------------------------

# every sparsity field of a Dynamic config and its default (the original's released configuration)
SPARSITY_DEFAULTS: dict[str, Any] = {
    "sparse_layer": 2,
    "vision_keep_rate": 0.2,
    "vision_keep_tokens": None,
    "output_text_keep_rate": 0.5,
    "output_text_len_for_training": 50,
    "use_vision_predictor": True,
    "use_output_text_predictor": True,
    "image_scorer": "predictor",
    "predictor_d_model": 512,
    "predictor_nhead": 8,
    "predictor_dim_feedforward": 2048,
    "predictor_num_layers": 2,
    "mask_loss_weight": 100.0,
}

SPARSITY_CONFIG_DOC = r"""
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
            Prune image tokens at prefill (ranked by `image_scorer`).
        use_output_text_predictor (`bool`, defaults to True):
            Decide, per generated token, whether its keys/values enter the sparse layers' cache.
            With both `use_*` False, sparsification is off and the model computes exactly what the stock model does.
        image_scorer (`str`, defaults to "predictor"):
            What ranks image tokens at prefill: "predictor" (the learned image predictor) or "attention" (FastV's
            training-free rule: the mean attention each image token receives in layer `sparse_layer - 1`).
        predictor_d_model (`int`, defaults to 512): width of both predictors.
        predictor_nhead (`int`, defaults to 8): attention heads of the image predictor's transformer blocks.
        predictor_dim_feedforward (`int`, defaults to 2048): MLP width of those blocks.
        predictor_num_layers (`int`, defaults to 2): number of those blocks.
        mask_loss_weight (`float`, defaults to 100): weight of the keep-budget loss during training.
"""


class SparsityConfigMixin:
    """
    The sparsity fields of a Dynamic config, as flat attributes checked however they are set (constructor,
    `from_pretrained(..., field=value)`, assignment). Put it before the base config class:
    `class DynamicXConfig(SparsityConfigMixin, XConfig)`, and call `self._set_sparsity_fields(kwargs)` before the
    base `__init__` and `self.validate_sparsity()` after it.
    """

    def _set_sparsity_fields(self, kwargs: dict[str, Any]) -> None:
        """Pop every sparsity field from `kwargs` (defaults for the missing ones) and set it."""
        for field, default in SPARSITY_DEFAULTS.items():
            setattr(self, field, kwargs.pop(field, default))

    def __setattr__(self, key: str, value: Any) -> None:
        if key in FIELD_CHECKS:
            where = f"{type(self).__name__}."
            check_field(where, key, value)
            value = normalize_field(key, value)
            if key == "sparse_layer":
                self._check_sparse_layer(value)
            elif key == "vision_keep_tokens":
                self._check_keep_tokens_fit(value, where)
        super().__setattr__(key, value)

    @property
    def sparsification_enabled(self) -> bool:
        """False when both predictors are off: the model then computes exactly what the stock model does."""
        return sparsity_enabled(self.use_vision_predictor, self.use_output_text_predictor)

    @property
    def fixed_tokens_per_image(self) -> int | None:
        """Tokens every image becomes, when that is fixed by the config (None: it depends on each image)."""
        return None

    def _num_text_layers(self) -> int | None:
        text = self.__dict__.get("text_config")
        return getattr(text, "num_hidden_layers", None)

    def _check_sparse_layer(self, value: int) -> None:
        num_layers = self._num_text_layers()
        if num_layers is not None and not (1 <= value <= num_layers - 1):
            _fail(
                f"{type(self).__name__}.",
                "sparse_layer",
                f"is {value}, outside 1..{num_layers - 1} (the text model has {num_layers} layers)",
                "At least one dense layer must come before it and one sparse layer from it on.",
            )

    def _check_keep_tokens_fit(self, value: int | None, where: str) -> None:
        tokens = self.fixed_tokens_per_image if "vision_config" in self.__dict__ else None
        if value is not None and tokens is not None and value > tokens:
            _fail(
                where,
                "vision_keep_tokens",
                f"is {value}, more than the {tokens} tokens of an image",
                f"Use at most {tokens} (or vision_keep_rate=1.0 to keep every token).",
            )

    def validate_sparsity(self) -> None:
        """Raise a `ValueError` naming the field and the fix when a sparsification field is out of range."""
        where = f"{type(self).__name__}."
        for field in SPARSITY_DEFAULTS:
            check_field(where, field, getattr(self, field))
        self._check_sparse_layer(self.sparse_layer)
        self._check_keep_tokens_fit(self.vision_keep_tokens, where)
        for divisor, why in ((self.predictor_nhead, "predictor_nhead"), (4, "4")):
            if self.predictor_d_model % divisor != 0:
                _fail(
                    where,
                    "predictor_d_model",
                    f"({self.predictor_d_model}) is not divisible by {why} ({divisor})",
                    "The image predictor splits it across heads and its output MLP narrows to d/2 and d/4; use a "
                    "multiple of both.",
                )

    def sparsity_settings(self, **overrides: Any) -> SparsitySettings:
        """The settings of one call (`resolve_settings`: `overrides` are `PER_CALL_FIELDS`, None = the config's)."""
        settings = resolve_settings(self, overrides, self._num_text_layers())
        if "vision_keep_tokens" in overrides and overrides["vision_keep_tokens"] is not None:
            self._check_keep_tokens_fit(settings.vision_keep_tokens, "per-call ")
        return settings


# ---- signatures ------------------------------------------------------------------------------------------------------


def with_per_call_parameters(function: Callable) -> Callable:
    """
    Give `function` (a `forward(..., **kwargs: Unpack[SparsityKwargs])`) a signature that names every per-call field
    and `sparsity` as keyword-only parameters: `generate()` reads `forward`'s signature to know which of its keyword
    arguments the model takes, so the fields reach every call of `forward` without being spelled out again.
    """
    signature = inspect.signature(function)
    parameters = list(signature.parameters.values())
    variadic = [p for p in parameters if p.kind is inspect.Parameter.VAR_KEYWORD]
    named = [p for p in parameters if p.kind is not inspect.Parameter.VAR_KEYWORD]
    added = [
        inspect.Parameter(field, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=annotation)
        for field, annotation in {**SparsityKwargs.__annotations__, "sparsity": "SparsitySettings | None"}.items()
        if field not in signature.parameters
    ]
    function.__signature__ = signature.replace(parameters=named + added + variadic)
    return function


def pop_per_call_fields(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Remove the per-call fields from `kwargs` and return them (those left None included)."""
    return {field: kwargs.pop(field) for field in PER_CALL_FIELDS if field in kwargs}
