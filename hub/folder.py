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

from ..transformers_compat import TOKENIZER_CLASS_REWRITES, config_dtype_field, hub_key

if TYPE_CHECKING:
    from ..configuration_dynamic_llava import DynamicLlavaConfig

# the package root (the parent of hub/): where the flat remote-code files are
PACKAGE_ROOT = Path(__file__).resolve().parent.parent
# remote-code files of a Hub folder (processor/ is flattened: remote code resolves only flat `from .x import`)
CODE_FILES = {
    "configuration_dynamic_llava.py": PACKAGE_ROOT / "configuration_dynamic_llava.py",
    "modeling_dynamic_llava.py": PACKAGE_ROOT / "modeling_dynamic_llava.py",
    "configuration_dynamic_llava_next.py": PACKAGE_ROOT / "configuration_dynamic_llava_next.py",
    "modeling_dynamic_llava_next.py": PACKAGE_ROOT / "modeling_dynamic_llava_next.py",
    "configuration_dynamic_qwen2_5_vl.py": PACKAGE_ROOT / "configuration_dynamic_qwen2_5_vl.py",
    "modeling_dynamic_qwen2_5_vl.py": PACKAGE_ROOT / "modeling_dynamic_qwen2_5_vl.py",
    "sparse_cache.py": PACKAGE_ROOT / "sparse_cache.py",
    "sparse_flow.py": PACKAGE_ROOT / "sparse_flow.py",
    "sparse_model.py": PACKAGE_ROOT / "sparse_model.py",
    "sparse_scorers.py": PACKAGE_ROOT / "sparse_scorers.py",
    "sparse_training.py": PACKAGE_ROOT / "sparse_training.py",
    "sparse_masks.py": PACKAGE_ROOT / "sparse_masks.py",
    "sparse_predictors.py": PACKAGE_ROOT / "sparse_predictors.py",
    "sparse_settings.py": PACKAGE_ROOT / "sparse_settings.py",
    "transformers_compat.py": PACKAGE_ROOT / "transformers_compat.py",
    "processing_dynamic_llava.py": PACKAGE_ROOT / "processor" / "processing_dynamic_llava.py",
    "image_processing_dynamic_llava.py": PACKAGE_ROOT / "processor" / "image_processing_dynamic_llava.py",
}
MODEL_AUTO_MAP = {
    "AutoConfig": "configuration_dynamic_llava.DynamicLlavaConfig",
    # generic harnesses load with AutoModel (lmms-eval's `--model huggingface` always does): the generation class
    "AutoModel": "modeling_dynamic_llava.DynamicLlavaForConditionalGeneration",
    "AutoModelForImageTextToText": "modeling_dynamic_llava.DynamicLlavaForConditionalGeneration",
    "AutoModelForVision2Seq": "modeling_dynamic_llava.DynamicLlavaForConditionalGeneration",
}
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


def write_code_files(folder: Path) -> None:
    for name, source in CODE_FILES.items():
        if not source.exists():
            raise FileNotFoundError(f"{source} is missing from the package; reinstall dynamic-llava.")
        shutil.copyfile(source, Path(folder) / name)


def write_model_config(config: DynamicLlavaConfig, folder: str | os.PathLike) -> None:
    """config.json with `auto_map` and `architectures`, as transformers 4.57 writes it (5.x reads it)."""
    config.auto_map = dict(MODEL_AUTO_MAP)
    config.architectures = ["DynamicLlavaForConditionalGeneration"]
    config.save_pretrained(folder)


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
    transformers majors read (TRANSFORMERS_NOTES section 7)."""
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
