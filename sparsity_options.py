"""The per-call sparsity as the front-ends take it: the flags of `dynamic-llava demo / generate / chat / evaluate /
bench`, lmms-eval's `model_args` and `evaluate_synthetic`'s keywords.

Nothing about a field is written here: each option is derived, when it is asked for, from the declaration in
`sparse_settings` (the fields of `SparsityKwargs` and their types, `FIELD_HELP`, `check_field`, `check_overrides`,
`SPARSITY_OFF`). A field added there is a flag and a model_arg, with its help and its check, without a change here or
in a front-end. The rules of what a user asked for are one function, `sparsity_request`, which every front-end calls.
Pure Python: the command line imports it before torch.
"""

from __future__ import annotations

import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from . import sparse_settings

__all__ = [
    "APPLIES_ONLY_WITH",
    "NO_SPARSITY",
    "SparsityOption",
    "keyword_spelling",
    "no_sparsity_help",
    "sparsity_options",
    "sparsity_request",
]

# the front-ends' switch for "sparsity off" (`--no-sparsity`, lmms-eval `no_sparsity=True`): `SPARSITY_OFF`
NO_SPARSITY = "no_sparsity"

# (the rule of `sparse_settings.APPLIES_ONLY_WITH`, named by the front-ends' own spelling)
APPLIES_ONLY_WITH = sparse_settings.APPLIES_ONLY_WITH

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")
_KINDS = (bool, int, float, str)  # bool first: it is an int too


@dataclass(frozen=True)
class SparsityOption:
    """One per-call field as a front-end option: its kind (bool, int, float or str), flag, metavar and help."""

    field: str
    kind: type
    help: str

    @property
    def flag(self) -> str:
        """`--vision-keep-tokens`; a bool `use_x` is `--x` (and `--no-x`)."""
        name = self.field.removeprefix("use_") if self.kind is bool else self.field
        return "--" + name.replace("_", "-")

    @property
    def negative_flag(self) -> str | None:
        """`--no-x` of a bool option (None for the others)."""
        return "--no-" + self.flag[2:] if self.kind is bool else None

    @property
    def metavar(self) -> str:
        """The last word of the field: `vision_keep_tokens` -> TOKENS."""
        return self.field.rsplit("_", 1)[-1].upper()

    def parse(self, value: Any, where: str = "") -> Any:
        """
        The checked value (`check_field`, normalized) of `value`: a value of the field's type, or text as a command
        line or lmms-eval's `model_args` gives it ("128", "0.25", "false", "attention"). A bad value raises the
        declaration's `ValueError` (naming the field and the fix).
        """
        if isinstance(value, str):
            value = _from_text(self.kind, value)
        sparse_settings.check_field(where, self.field, value)
        return sparse_settings.normalize_field(self.field, value)


def _from_text(kind: type, text: str) -> Any:
    """`text` as a value of `kind`; text that is not one is returned as given (its check then names the problem)."""
    stripped = text.strip()
    if kind is bool:
        lowered = stripped.lower()
        return True if lowered in _TRUE else False if lowered in _FALSE else text
    if kind in (int, float):
        try:
            return kind(stripped)
        except ValueError:
            return text
    return text


def _kind(field: str, hint: Any) -> type:
    kinds = [arg for arg in typing.get_args(hint) or (hint,) if arg is not type(None)]
    if len(kinds) != 1 or kinds[0] not in _KINDS:
        raise TypeError(
            f"SparsityKwargs.{field} is {hint!r}: a front-end option is derived only for a field of one of "
            f"{', '.join(kind.__name__ for kind in _KINDS)} (or None)"
        )
    return kinds[0]


def sparsity_options() -> list[SparsityOption]:
    """One option per field of `SparsityKwargs`, in its order (read from the declaration now)."""
    hints = typing.get_type_hints(sparse_settings.SparsityKwargs)
    missing = [field for field in sparse_settings.PER_CALL_FIELDS if field not in sparse_settings.FIELD_HELP]
    if missing:
        raise TypeError(f"sparse_settings.FIELD_HELP has no help for {', '.join(missing)}")
    return [
        SparsityOption(field, _kind(field, hints[field]), sparse_settings.FIELD_HELP[field])
        for field in sparse_settings.PER_CALL_FIELDS
    ]


def no_sparsity_help() -> str:
    """What "sparsity off" sets, from `SPARSITY_OFF`."""
    sets = ", ".join(f"{field}={value}" for field, value in sparse_settings.SPARSITY_OFF.items())
    return f"sparsity off: {sets} (the stock model's computation on the same weights)"


Spelling = Callable[[str, Any], str]


def keyword_spelling(field: str, value: Any) -> str:
    """A request's field as a Python keyword or lmms-eval model_arg spells it: `vision_keep_rate=0.5`."""
    return f"{field}={value!r}" if isinstance(value, str) else f"{field}={value}"


def sparsity_request(
    values: Mapping[str, Any], no_sparsity: Any = False, spell: Spelling = keyword_spelling, where: str = ""
) -> dict[str, Any]:
    """
    What a front-end asked for -> the per-call sparsity keywords of `generate()` (only those set; None = not set),
    by the same rules on every path:

    1. each value is parsed and checked (`SparsityOption.parse`; text is read as the field's type);
    2. `sparse_settings.check_overrides`: `vision_keep_tokens` and `vision_keep_rate` both given is refused with the
       library's own message;
    3. `no_sparsity` true means `SPARSITY_OFF`; a field of it asked for with another value is refused;
    4. a field of `APPLIES_ONLY_WITH` asked for with its decision off in the same request is refused.

    Args:
        values: field -> value (text or typed); a name that is not a per-call field raises `TypeError`.
        no_sparsity: True, False, or text ("true", "false", ...).
        spell: how the messages name what the user wrote (`keyword_spelling`; the command line names its flags).
        where: prefix of the per-value messages.
    """
    options = {option.field: option for option in sparsity_options()}
    unknown = [field for field in values if field not in options]
    if unknown:
        sparse_settings.check_overrides(dict.fromkeys(unknown))  # the library's TypeError, listing the fields
    given = {field: options[field].parse(value, where) for field, value in values.items() if value is not None}
    off = _as_switch(no_sparsity, where)
    request = dict(given)
    if off:
        for field, value in sparse_settings.SPARSITY_OFF.items():
            if field in given and given[field] != value:
                raise ValueError(
                    f"{spell(NO_SPARSITY, True)} sets {_listed(sparse_settings.SPARSITY_OFF)} and "
                    f"{spell(field, given[field])} asks for {field}={given[field]}: pass one"
                )
        request.update(sparse_settings.SPARSITY_OFF)
    for field, decision in APPLIES_ONLY_WITH.items():
        if field in given and request.get(decision) is False:
            turned_off = spell(NO_SPARSITY, True) if off and decision not in given else spell(decision, False)
            raise ValueError(
                f"{spell(field, given[field])} applies only with {decision}=True, and {turned_off} turns it off: "
                "pass one"
            )
    given = sparse_settings.check_overrides(given)  # (the library's checks, its messages)
    return {**request, **given}


def _as_switch(value: Any, where: str) -> bool:
    if isinstance(value, str):
        value = _from_text(bool, value)
    if not isinstance(value, bool) and type(value).__name__ != "bool_":
        raise ValueError(f"{where}{NO_SPARSITY} must be True or False, got {value!r}. Pass a bool.")
    return bool(value)


def _listed(fields: Mapping[str, Any]) -> str:
    return " and ".join(f"{field}={value}" for field, value in fields.items())
