"""Writing a Hub-ready model folder: sharded safetensors in the layout both transformers majors load, the remote-code
files, `auto_map`, the processor files and the dtype fields. The folder itself is written atomically by
`dynamic_llava.files.atomic_output_dir`."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import save_file

from ..transformers_compat import TOKENIZER_CLASS_REWRITES, config_dtype_field, hub_key, legacy_rope_fields
from .bases import BASES, PACKAGE_ROOT, Base, base_of

if TYPE_CHECKING:
    from ..configuration_dynamic_llava import DynamicLlavaConfig

# remote-code files of a LLaVA-1.5 Hub folder (processor/ flattened: remote code resolves only flat `from .x import`);
# each base's own set is `folder_code_files(base)`
CODE_FILES = {
    **BASES["llava"].code_files,
    "processing_dynamic_llava.py": PACKAGE_ROOT / "processor" / "processing_dynamic_llava.py",
    "image_processing_dynamic_llava.py": PACKAGE_ROOT / "processor" / "image_processing_dynamic_llava.py",
}
MODEL_AUTO_MAP = BASES["llava"].auto_map
PROCESSOR_AUTO_MAP = {"AutoProcessor": "processing_dynamic_llava.DynamicLlavaProcessor"}
IMAGE_PROCESSOR_AUTO_MAP = {
    "AutoImageProcessor": "image_processing_dynamic_llava.DynamicLlavaImageProcessor",
    "AutoProcessor": "processing_dynamic_llava.DynamicLlavaProcessor",
}

# The processor side of each base's folder, by the stock `model_type` of the base: its remote-code files (flat, all
# copied next to each other), the `auto_map` of processor_config.json / tokenizer_config.json, and that of
# preprocessor_config.json. LLaVA-NeXT and Qwen2.5-VL keep the stock image processor (`image_processor_type` as the
# stock processor writes it), so `AutoImageProcessor` resolves it exactly as for the stock model: the torchvision
# backend where torchvision is installed and transformers defaults to it, the PIL one where it is not; only
# `AutoProcessor` is remote.
PROCESSOR_CODE_FILES = {
    "llava": {
        "processing_dynamic_llava.py": CODE_FILES["processing_dynamic_llava.py"],
        "image_processing_dynamic_llava.py": CODE_FILES["image_processing_dynamic_llava.py"],
    },
    "llava_next": {
        "processing_dynamic_llava_next.py": PACKAGE_ROOT / "processor" / "processing_dynamic_llava_next.py",
        "processing_dynamic_common.py": PACKAGE_ROOT / "processor" / "processing_dynamic_common.py",
        "image_processing_dynamic_llava.py": CODE_FILES["image_processing_dynamic_llava.py"],
    },
    "qwen2_5_vl": {
        "processing_dynamic_qwen2_5_vl.py": PACKAGE_ROOT / "processor" / "processing_dynamic_qwen2_5_vl.py",
        "processing_dynamic_common.py": PACKAGE_ROOT / "processor" / "processing_dynamic_common.py",
        "image_processing_dynamic_llava.py": CODE_FILES["image_processing_dynamic_llava.py"],
    },
}
BASE_PROCESSOR_AUTO_MAPS = {
    "llava": PROCESSOR_AUTO_MAP,
    "llava_next": {"AutoProcessor": "processing_dynamic_llava_next.DynamicLlavaNextProcessor"},
    "qwen2_5_vl": {"AutoProcessor": "processing_dynamic_qwen2_5_vl.DynamicQwen2_5_VLProcessor"},
}
BASE_IMAGE_PROCESSOR_AUTO_MAPS = {
    "llava": IMAGE_PROCESSOR_AUTO_MAP,
    "llava_next": BASE_PROCESSOR_AUTO_MAPS["llava_next"],
    "qwen2_5_vl": BASE_PROCESSOR_AUTO_MAPS["qwen2_5_vl"],
}


def parse_size(size: int | str) -> int:
    """'5GB', '500MB', '10KB' or an int -> bytes."""
    if isinstance(size, int):
        return size
    text = str(size).strip().upper()
    for unit, factor in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3), ("B", 1)):
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(text)


class ShardWriter:
    """Stream tensors into safetensors shards of at most `max_shard_size` bytes (one tensor may exceed it alone)."""

    def __init__(self, folder: Path, max_shard_size="5GB"):
        self.folder = Path(folder)
        self.limit = parse_size(max_shard_size)
        self.current: dict[str, torch.Tensor] = {}
        self.current_bytes = 0
        self.shards: list[tuple[str, list[str]]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.current and self.current_bytes + size > self.limit:
            self._flush()
        self.current[name] = tensor.contiguous()
        self.current_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        name = f"part-{len(self.shards):05d}.safetensors"
        save_file(self.current, str(self.folder / name), metadata={"format": "pt"})
        self.shards.append((name, list(self.current)))
        self.current, self.current_bytes = {}, 0

    def finish(self) -> list[str]:
        if self.current or not self.shards:
            self._flush()
        n = len(self.shards)
        if n == 1:
            (self.folder / self.shards[0][0]).rename(self.folder / "model.safetensors")
            return ["model.safetensors"]
        weight_map, names = {}, []
        for i, (tmp_name, keys) in enumerate(self.shards):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            (self.folder / tmp_name).rename(self.folder / final)
            names.append(final)
            weight_map.update({key: final for key in keys})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return names


def folder_code_files(base: Base) -> dict[str, Path]:
    """Every remote-code file of a folder of `base`: the model side and the processor side, flat."""
    return {**base.code_files, **PROCESSOR_CODE_FILES[base.stock_model_type]}


def write_code_files(folder: Path, base: Base | None = None) -> None:
    """Copy the remote-code files of `base` (default LLaVA-1.5) into `folder`."""
    for name, source in folder_code_files(base or BASES["llava"]).items():
        if not source.exists():
            raise FileNotFoundError(f"{source} is missing from the package; reinstall dynamic-llava.")
        shutil.copyfile(source, Path(folder) / name)


def write_model_config(config: Any, folder: str | os.PathLike) -> None:
    """config.json with its base's `auto_map` and `architectures` (our class names, whatever wrapper the model is in),
    readable by transformers 4.57 and 5.x whichever wrote it (the rotary fields of both, `legacy_rope_fields`)."""
    base = base_of(config)
    config.auto_map = dict(base.auto_map)
    config.architectures = [base.model_class]
    config.save_pretrained(folder)
    # (4.57's Qwen2.5-VL config leaves `architectures` out of the file it writes: write both entries as given)
    path = Path(folder) / "config.json"
    data = json.loads(path.read_text())
    rope = {key: legacy_rope_fields(data[key]) for key in ("text_config",) if isinstance(data.get(key), dict)}
    rope = {key: fields for key, fields in rope.items() if fields}
    if data.get("architectures") != config.architectures or data.get("auto_map") != config.auto_map or rope:
        data.update(architectures=config.architectures, auto_map=config.auto_map)
        for key, fields in rope.items():
            data[key].update(fields)
        path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def add_auto_map(path: str | os.PathLike, auto_map: dict[str, str]) -> None:
    """Set the `auto_map` entry of a JSON file (sorted keys, as transformers writes them)."""
    data = json.loads(Path(path).read_text())
    data["auto_map"] = dict(auto_map)
    Path(path).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_state_dict(
    state_dict: dict[str, torch.Tensor],
    folder: str | os.PathLike,
    max_shard_size: int | str = "5GB",
    dtype: torch.dtype | None = None,
) -> list[str]:
    """Write `state_dict` as safetensors shards under its 4.57-layout keys (`hub_key`); returns the file names."""
    writer = ShardWriter(folder, max_shard_size)
    for key, tensor in state_dict.items():
        tensor = tensor.detach().cpu()
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        writer.add(hub_key(key), tensor)
    return writer.finish()


def write_processor_files(
    image_processor: Any, tokenizer: Any, config: DynamicLlavaConfig, folder: str | os.PathLike
) -> None:
    """Processor, image processor and tokenizer files with the chat template and `auto_map`, in the format both
    transformers majors read (4.57 reads the image processor from preprocessor_config.json only)."""
    from ..processor.processing_dynamic_llava import DynamicLlavaProcessor

    processor = DynamicLlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=config.vision_config.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        num_additional_image_tokens=1,
    )
    processor.save_pretrained(folder)
    folder = Path(folder)
    _normalize_processor_files(folder)
    preprocessor = folder / "preprocessor_config.json"
    if preprocessor.exists():
        add_auto_map(preprocessor, IMAGE_PROCESSOR_AUTO_MAP)
    for name in ("processor_config.json", "tokenizer_config.json"):
        if (folder / name).exists():
            add_auto_map(folder / name, PROCESSOR_AUTO_MAP)


def write_base_processor_files(processor: Any, config: Any, folder: str | os.PathLike) -> None:
    """
    The processor side of a folder of any base: LLaVA-1.5 as `write_processor_files`; another base's processor
    (stock or Dynamic) saved as its Dynamic processor class, in the layout both majors read, with its `auto_map`s.
    """
    base = base_of(config)
    if base.stock_model_type == "llava":
        write_processor_files(processor.image_processor, processor.tokenizer, config, folder)
        return
    cls = base.load_processor_class()
    if not isinstance(processor, cls):
        raise TypeError(f"a {base.stock_name} folder takes a {cls.__name__}, got {type(processor).__name__}")
    processor.save_pretrained(str(folder))
    folder = Path(folder)
    _normalize_processor_files(folder)
    for name in ("processor_config.json", "tokenizer_config.json"):
        if (folder / name).exists():
            add_auto_map(folder / name, BASE_PROCESSOR_AUTO_MAPS[base.stock_model_type])
    if (folder / "preprocessor_config.json").exists():
        add_auto_map(folder / "preprocessor_config.json", BASE_IMAGE_PROCESSOR_AUTO_MAPS[base.stock_model_type])


def _normalize_processor_files(folder: Path) -> None:
    """Make files written by transformers 5.x readable by 4.57 too: the image processor in its own
    preprocessor_config.json, and a tokenizer class 4.57 knows."""
    processor_config = folder / "processor_config.json"
    if processor_config.exists():
        data = json.loads(processor_config.read_text())
        nested = data.pop("image_processor", None)
        if isinstance(nested, dict):
            nested.setdefault("processor_class", data.get("processor_class", "DynamicLlavaProcessor"))
            (folder / "preprocessor_config.json").write_text(json.dumps(nested, indent=2, sort_keys=True) + "\n")
            processor_config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    tokenizer_config = folder / "tokenizer_config.json"
    if tokenizer_config.exists():
        data = json.loads(tokenizer_config.read_text())
        rewrite = TOKENIZER_CLASS_REWRITES.get(data.get("tokenizer_class"))
        if rewrite is not None:
            data["tokenizer_class"] = rewrite
            tokenizer_config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def set_dtype_field(config: DynamicLlavaConfig, dtype: torch.dtype | str) -> None:
    """config.json's dtype entry (its name depends on the transformers version: `config_dtype_field`)."""
    setattr(config, config_dtype_field(config), str(dtype).replace("torch.", ""))


DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def parse_dtype(name: str | None) -> torch.dtype | None:
    """'float16', 'bf16', ... -> torch dtype; None or 'auto' -> None (keep the stored dtype)."""
    if name in (None, "auto"):
        return None
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r} is not one of {sorted(DTYPES)} or auto")
    return DTYPES[name]
