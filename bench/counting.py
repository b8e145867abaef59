"""Counters for the decode path: dispatched aten ops, host syncs, and the bytes written into given storages.

* `AtenOpCounter` (a `TorchDispatchMode`): every aten op that reaches the dispatcher below autograd (views, in-place
  writes and factory calls included), per op name too.
* `HostSyncCounter` (a `TorchFunctionMode`): tensor -> Python conversions (`__bool__`, `item`, `tolist`, `__int__`,
  `__index__`, `__float__`, `nonzero`), each a wait for the device on an accelerator, plus copies from an accelerator
  to the host (`cpu`, `to`, `numpy`). On the CPU nothing waits, but the same places would on a GPU.
* `per_decode_step(model, inputs, steps)`: ops and syncs of `generate(1 + steps)` minus those of `generate(1)`, per
  step (the prefill and the setup of generate cancel out).
* `StorageWriteTracker` (a `TorchDispatchMode`): for named tensors (e.g. each sparse layer's keys and values), the
  bytes that in-place ops write into their storages, and which of them were replaced by a new storage during a call.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = [
    "AtenOpCounter",
    "HostSyncCounter",
    "StorageWriteTracker",
    "count_decode",
    "per_decode_step",
]


class AtenOpCounter(TorchDispatchMode):
    """Counts the aten ops dispatched while active (`count`; `by_op`: per overload name)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self.by_op: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        self.by_op[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


class HostSyncCounter(TorchFunctionMode):
    """
    Counts host syncs while active: tensor -> Python conversions, and copies from an accelerator to the host
    (`count`; `by_name`: per function name).
    """

    CONVERSIONS = frozenset(("__bool__", "item", "tolist", "__int__", "__index__", "__float__", "nonzero", "numpy"))
    TRANSFERS = frozenset(("cpu", "to"))

    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self.by_name: Counter = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        result = func(*args, **kwargs)
        synced = name in self.CONVERSIONS
        if not synced and name in self.TRANSFERS and args and isinstance(args[0], torch.Tensor):
            synced = (
                args[0].device.type != "cpu"
                and isinstance(result, torch.Tensor)
                and result.device.type == "cpu"
                and not kwargs.get("non_blocking", False)
            )
        if synced:
            self.count += 1
            self.by_name[name] += 1
        return result


def count_decode(
    model: torch.nn.Module,
    inputs: dict[str, torch.Tensor],
    new_tokens: int,
    syncs: bool = True,
    **generate_kwargs: Any,
) -> dict[str, Any]:
    """
    Aten ops and (with `syncs`) host syncs of one `generate(**inputs, max_new_tokens=min_new_tokens=new_tokens)`
    (no EOS stop; greedy unless `generate_kwargs` say otherwise; `seed` reseeds torch first). Returns
    {"ops", "syncs", "ops_by_name", "syncs_by_name", "output"} (`output`: generate's, with the cache).
    """
    kwargs = {"do_sample": False, **generate_kwargs, "return_dict_in_generate": True}
    seed = kwargs.pop("seed", 0)
    torch.manual_seed(seed)
    sync_counter = HostSyncCounter() if syncs else None
    with torch.no_grad(), sync_counter if syncs else contextlib.nullcontext(), AtenOpCounter() as ops:
        output = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs)
    return {
        "ops": ops.count,
        "syncs": sync_counter.count if syncs else None,
        "ops_by_name": ops.by_op,
        "syncs_by_name": sync_counter.by_name if syncs else Counter(),
        "output": output,
    }


def per_decode_step(
    model: torch.nn.Module,
    inputs: dict[str, torch.Tensor],
    steps: int = 64,
    syncs: bool = True,
    **generate_kwargs: Any,
) -> dict[str, Any]:
    """
    Aten ops and host syncs per decode step: (`generate(1 + steps)` - `generate(1)`) / `steps`, greedy by default
    (`generate_kwargs` go to both calls; `seed` reseeds torch before each). The model must not stop early (no EOS:
    set `eos_token_id=None` or suppress it). `syncs=False` counts ops only (the sync counter, a TorchFunctionMode,
    costs more Python time than the op counter).

    Returns:
        {"ops", "syncs"}: per step (floats; syncs None without `syncs`); {"ops_total", "syncs_total"}: over the
        `steps` steps; "ops_by_name" and "syncs_by_name": Counters of the difference (what the decode steps
        dispatch, all steps together); "output": the output of `generate(1 + steps)` (its cache included).
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    one = count_decode(model, inputs, 1, syncs=syncs, **generate_kwargs)
    many = count_decode(model, inputs, 1 + steps, syncs=syncs, **generate_kwargs)
    ops_by_name = Counter(many["ops_by_name"])
    ops_by_name.subtract(one["ops_by_name"])
    syncs_by_name = Counter(many["syncs_by_name"])
    syncs_by_name.subtract(one["syncs_by_name"])
    ops = many["ops"] - one["ops"]
    sync_total = many["syncs"] - one["syncs"] if syncs else None
    return {
        "ops": ops / steps,
        "syncs": sync_total / steps if syncs else None,
        "ops_total": ops,
        "syncs_total": sync_total,
        "steps": steps,
        "ops_by_name": +ops_by_name,
        "syncs_by_name": +syncs_by_name,
        "output": many["output"],
    }


def _storage_key(tensor: torch.Tensor) -> tuple[str, int] | None:
    try:
        storage = tensor.untyped_storage()
    except (RuntimeError, NotImplementedError):  # tensors without storage (meta, functional wrappers)
        return None
    return (str(tensor.device), storage.data_ptr())


# ops whose written region is given by an index tensor, or by a source tensor (not by the whole destination view)
_INDEX_WRITES = frozenset(("scatter_", "scatter_add_", "scatter_reduce_", "scatter"))
_SOURCE_ARGUMENTS = ("source", "values", "src")


class StorageWriteTracker(TorchDispatchMode):
    """
    Bytes written into the storages of named tensors during a call, and the tensors that got a new storage.

    `watched` returns the tensors to watch by name (e.g. `{"layer 2 keys": layer.keys, ...}`); it is read on entry
    (the storages watched) and on exit (`replaced`: the names whose tensor then lives in another storage).
    Every dispatched op with a written (mutable) tensor argument aliasing a watched storage adds the elements it
    writes there: `index.numel()` for scatter ops, the source's numel for `index_copy_` / `index_put_` / ops with a
    `src`, otherwise the numel of the written view; times the element size.

    written: {name: bytes}; writes: {name: [(op name, bytes), ...]}; replaced: set of names.
    """

    def __init__(self, watched: Callable[[], dict[str, torch.Tensor]]) -> None:
        super().__init__()
        self._watched = watched
        self._storages: dict[tuple[str, int], list[str]] = {}
        self._before: dict[str, tuple[str, int] | None] = {}
        self.written: Counter = Counter()
        self.writes: dict[str, list[tuple[str, int]]] = {}
        self.replaced: set[str] = set()

    def __enter__(self):
        self._before = {name: _storage_key(t) for name, t in self._watched().items() if t is not None}
        self._storages = {}
        for name, key in self._before.items():
            if key is not None:
                self._storages.setdefault(key, []).append(name)
        return super().__enter__()

    def __exit__(self, *exc):
        result = super().__exit__(*exc)
        after = {name: _storage_key(t) for name, t in self._watched().items() if t is not None}
        self.replaced = {name for name, key in self._before.items() if after.get(name) != key}
        return result

    def _written_elements(self, func, arguments: dict[str, Any], target: torch.Tensor) -> int:
        name = func.__name__.split(".")[0]
        if name in _INDEX_WRITES and isinstance(arguments.get("index"), torch.Tensor):
            return arguments["index"].numel()
        for source in _SOURCE_ARGUMENTS:
            value = arguments.get(source)
            if isinstance(value, torch.Tensor):
                return value.numel()
        return target.numel()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self._storages and func._schema.is_mutable:
            schema_args = func._schema.arguments
            arguments = {a.name: v for a, v in zip(schema_args, args, strict=False)}
            arguments.update(kwargs)
            for argument in schema_args:
                info = argument.alias_info
                if info is None or not info.is_write:
                    continue
                value = arguments.get(argument.name)
                targets, _ = tree_flatten(value)
                for target in targets:
                    if not isinstance(target, torch.Tensor):
                        continue
                    names = self._storages.get(_storage_key(target))
                    if not names:
                        continue
                    nbytes = self._written_elements(func, arguments, target) * target.element_size()
                    for watched in names:
                        self.written[watched] += nbytes
                        self.writes.setdefault(watched, []).append((func.__name__, nbytes))
        return func(*args, **kwargs)
