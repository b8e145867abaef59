"""Convert a released Dynamic-LLaVA checkpoint (original LLaVA layout) into a Hub-ready transformers folder.

Source layout (`Osilly/Dynamic-LLaVA-7B/-13B`): `config.json` with `model_type` "llava_llama", `mm_*` fields and a
`sparse_config` dict; keys `model.embed_tokens.*`, `model.layers.{i}.*`, `model.norm.*`, `lm_head.*`,
`model.mm_projector.{0,2}.*`, `model.image_score_predictor.*`, `model.output_text_score_predictor.*`, and usually a
frozen copy of the CLIP tower (`model.vision_tower.vision_tower.*`) that the original loader ignores: it loads the
tower named by `mm_vision_tower`, and so do we. Tensors are streamed shard by shard.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers.utils import logging

from ..configuration_dynamic_llava import DynamicLlavaConfig
from ..files import atomic_output_dir
from .folder import (
    IMAGE_PROCESSOR_AUTO_MAP,
    ShardWriter,
    add_auto_map,
    hub_key,
    parse_dtype,
    set_dtype_field,
    write_code_files,
    write_model_config,
)
from .loading import resolve_model

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.get_logger(__name__)

__all__ = ["convert_original_checkpoint", "ConversionError", "map_original_key"]

SPARSE_CONFIG_FIELDS = {
    # original sparse_config key -> our config field
    "sparse_layer": "sparse_layer",
    "vision_keep_rate": "vision_keep_rate",
    "output_text_keep_rate": "output_text_keep_rate",
    "output_text_len_for_training": "output_text_len_for_training",
    "use_vision_predictor": "use_vision_predictor",
    "d_model": "predictor_d_model",
    "nhead": "predictor_nhead",
    "dim_feedforward": "predictor_dim_feedforward",
    "num_layers": "predictor_num_layers",
    "mask_loss_weight": "mask_loss_weight",
}
# read, but with no field of their own (instruct_* only matter with the instruct predictor, which must be off)
SPARSE_CONFIG_KNOWN = {
    "use_text_predictor",
    "use_output_text_predictor",
    "use_instruct_predictor",
    "instruct_keep_rate",
    "instruct_len_for_training",
}
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
VOCAB_PAD_MULTIPLE = 64  # as llava-hf: <image> and <pad> appended, then the vocabulary padded to a multiple of 64


class ConversionError(ValueError):
    """A source checkpoint that cannot be converted as it is; the message names the problem and the fix."""


# ---- locating files -------------------------------------------------------------------------------------------------


def resolve_source(src: str, allow_patterns: list[str] | None = None) -> Path:
    """A local folder, or a Hub repository id downloaded (`hub.loading.resolve_model`); failures as ConversionError."""
    try:
        return resolve_model(src, allow_patterns=allow_patterns)
    except OSError as error:
        raise ConversionError(str(error)) from error


def weight_files(folder: Path, allow_pickle: bool) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [n for n in names if not (folder / n).exists()]
        if missing:
            raise ConversionError(f"{folder}: shards listed in model.safetensors.index.json are missing: {missing}")
        return [folder / n for n in names]
    singles = sorted(folder.glob("*.safetensors"))
    if singles:
        return singles
    pickles = sorted(folder.glob("*.bin"))
    if pickles:
        if not allow_pickle:
            raise ConversionError(
                f"{folder} holds only pickled weights ({', '.join(p.name for p in pickles)}). Pickles can run code "
                "when loaded; convert a safetensors copy, or pass --allow-pickle if you trust the source (it is then "
                "read with torch.load(weights_only=True))."
            )
        return pickles
    raise ConversionError(f"{folder} has no weights (*.safetensors or model.safetensors.index.json).")


def iter_tensors(files: list[Path]) -> Iterator[tuple[str, Callable[[], torch.Tensor]]]:
    """(key, loader) for every tensor, one file open at a time; a loader reads only its tensor."""
    for file in files:
        if file.suffix == ".bin":
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            for key in list(state):
                yield key, (lambda t=state[key]: t)
            del state
            continue
        yield from _stream_safetensors(file)


_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def _stream_safetensors(file: Path) -> Iterator[tuple[str, Callable[[], torch.Tensor]]]:
    """
    Read a safetensors file tensor by tensor with plain reads (no mmap), so only the tensor being converted is in
    memory: a memory map would keep every page read so far resident until the whole file is closed.
    """
    with open(file, "rb") as handle:
        header_len = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(header_len))
        header.pop("__metadata__", None)
        base = 8 + header_len
        for key, info in sorted(header.items(), key=lambda item: item[1]["data_offsets"][0]):
            if info["dtype"] not in _SAFETENSORS_DTYPES:
                raise ConversionError(f"{file.name}: tensor {key} has dtype {info['dtype']}, not supported here.")

            def load(info=info):
                start, end = info["data_offsets"]
                handle.seek(base + start)
                buffer = bytearray(end - start)
                handle.readinto(buffer)
                tensor = torch.frombuffer(buffer, dtype=_SAFETENSORS_DTYPES[info["dtype"]]) if buffer else None
                shape = info["shape"]
                if tensor is None:
                    return torch.empty(shape, dtype=_SAFETENSORS_DTYPES[info["dtype"]])
                return tensor.reshape(shape)

            yield key, load


# ---- keys ------------------------------------------------------------------------------------------------------------

_DROPPED = (re.compile(r"^model\.vision_tower\.vision_tower\."), re.compile(r"rotary_emb\.inv_freq$"))
_RENAMES = (
    (re.compile(r"^model\.mm_projector\.0\."), "model.multi_modal_projector.linear_1."),
    (re.compile(r"^model\.mm_projector\.2\."), "model.multi_modal_projector.linear_2."),
    (re.compile(r"^model\.(image_score_predictor|output_text_score_predictor)\."), r"model.\1."),
    (re.compile(r"^model\.(embed_tokens|layers|norm)\."), r"model.language_model.\1."),
    (re.compile(r"^lm_head\."), "lm_head."),
)


def map_original_key(key: str) -> str | None:
    """Our (4.57 module layout) key for an original key; None for keys the original loader drops too.
    Raises KeyError for a key with no mapping."""
    if any(p.search(key) for p in _DROPPED):
        return None
    for pattern, replacement in _RENAMES:
        if pattern.search(key):
            return pattern.sub(replacement, key, count=1)
    raise KeyError(key)


# ---- config ---------------------------------------------------------------------------------------------------------


def read_original_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.exists():
        raise ConversionError(f"{folder} has no config.json; pass the folder of an original Dynamic-LLaVA checkpoint.")
    config = json.loads(path.read_text())
    model_type = config.get("model_type")
    if model_type not in ("llava_llama", "llava") or "mm_vision_tower" not in config:
        raise ConversionError(
            f"{path} is not an original LLaVA-layout config (model_type={model_type!r}, "
            f"mm_vision_tower {'present' if 'mm_vision_tower' in config else 'missing'}). The converter reads "
            "Dynamic-LLaVA checkpoints such as Osilly/Dynamic-LLaVA-7B; an already converted folder loads directly."
        )
    checks = {
        "mm_projector_type": ("mlp2x_gelu", "only the mlp2x_gelu projector of LLaVA-1.5 is supported"),
        "mm_use_im_start_end": (False, "image start/end tokens are not supported"),
        "mm_use_im_patch_token": (False, "image patch tokens are not supported"),
        "mm_patch_merge_type": ("flat", "only the flat patch merge of LLaVA-1.5 is supported"),
    }
    for field, (expected, why) in checks.items():
        if field in config and config[field] != expected:
            raise ConversionError(f"{path}: {field}={config[field]!r}; {why} (expected {expected!r}).")
    if config.get("image_aspect_ratio", "pad") not in ("pad", "square"):
        raise ConversionError(
            f"{path}: image_aspect_ratio={config['image_aspect_ratio']!r}; only LLaVA-1.5's 'pad' is supported."
        )
    return config


def sparse_fields(original: dict, path: Path) -> dict:
    sparse = original.get("sparse_config")
    if not isinstance(sparse, dict):
        raise ConversionError(f"{path}/config.json has no sparse_config dict: not a Dynamic-LLaVA checkpoint.")
    unknown = sorted(set(sparse) - set(SPARSE_CONFIG_FIELDS) - SPARSE_CONFIG_KNOWN)
    if unknown:
        logger.warning(f"[convert] sparse_config keys without a meaning here, ignored: {unknown}")
    if sparse.get("use_instruct_predictor"):
        raise ConversionError(
            "sparse_config.use_instruct_predictor is true: instruction-text pruning at prefill is not implemented "
            "(the released checkpoints have it off)."
        )
    fields = {ours: sparse[theirs] for theirs, ours in SPARSE_CONFIG_FIELDS.items() if theirs in sparse}
    fields["use_output_text_predictor"] = bool(
        sparse.get("use_output_text_predictor", True) and sparse.get("use_text_predictor", True)
    )
    if "vision_keep_rate" in fields:
        fields["vision_keep_rate"] = float(fields["vision_keep_rate"])
    return fields


def build_config(
    original: dict, tower_config: dict, vocab_size: int, image_token_id: int, pad_token_id: int, sparse: dict
) -> DynamicLlavaConfig:
    text_keys = (
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "max_position_embeddings",
        "rms_norm_eps",
        "rope_theta",
        "rope_scaling",
        "attention_bias",
        "hidden_act",
        "bos_token_id",
        "eos_token_id",
        "pretraining_tp",
    )
    text_config = {k: original[k] for k in text_keys if original.get(k) is not None}
    text_config.update(model_type="llama", vocab_size=vocab_size, pad_token_id=pad_token_id, tie_word_embeddings=False)
    tower = dict(tower_config)
    tower["model_type"] = "clip_vision_model"
    for junk in ("architectures", "transformers_version", "torch_dtype", "dtype", "_name_or_path"):
        tower.pop(junk, None)
    patches = (tower["image_size"] // tower["patch_size"]) ** 2
    select = original.get("mm_vision_select_feature", "patch")
    if select not in ("patch", "cls_patch"):
        raise ConversionError(f"mm_vision_select_feature={select!r} is not supported (patch or cls_patch).")
    try:
        return DynamicLlavaConfig(
            text_config=text_config,
            vision_config=tower,
            image_token_index=image_token_id,
            image_seq_length=patches + (1 if select == "cls_patch" else 0),
            projector_hidden_act="gelu",
            vision_feature_layer=original.get("mm_vision_select_layer", -2),
            vision_feature_select_strategy="default" if select == "patch" else "full",
            pad_token_id=pad_token_id,
            tie_word_embeddings=False,
            **sparse,
        )
    except ValueError as error:
        raise ConversionError(f"sparse_config is inconsistent with the model: {error}") from error


def load_tower(name: str, src: Path, allow_pickle: bool) -> tuple[Path, dict]:
    """The CLIP tower folder (relative paths resolve against the source folder) and its vision config."""
    candidate = Path(name).expanduser()
    if not candidate.is_absolute():
        relative = src / name
        candidate = relative if relative.exists() else candidate
    folder = (
        candidate
        if candidate.exists()
        else resolve_source(name, allow_patterns=["*.json", "*.safetensors"] + (["*.bin"] if allow_pickle else []))
    )
    path = folder / "config.json"
    if not path.exists():
        raise ConversionError(f"vision tower {name} ({folder}) has no config.json; pass --vision-tower DIR_OR_ID.")
    config = json.loads(path.read_text())
    if "vision_config" in config:  # a full CLIPModel (openai/clip-vit-large-patch14-336)
        config = config["vision_config"]
    if config.get("model_type", "clip_vision_model") not in ("clip_vision_model", "clip"):
        raise ConversionError(
            f"vision tower {name} is not a CLIP vision model (model_type={config.get('model_type')})."
        )
    return folder, config


def prepare_tokenizer(folder: Path | None) -> PreTrainedTokenizerBase | None:
    """The tokenizer with `<image>` (and a pad token) added as llava-hf does, or None when there is none."""
    if folder is None:
        return None
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), use_fast=True)
    except (ImportError, ValueError) as error:
        raise ConversionError(
            f"could not load the tokenizer in {folder}: {error}. A SentencePiece-only tokenizer needs "
            '`pip install sentencepiece protobuf` (or `pip install -e ".[convert]"` in a clone).'
        ) from error
    tokenizer.add_tokens(["<image>"], special_tokens=True)
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": "<pad>"})
    tokenizer.padding_side = "left"
    tokenizer.model_input_names = ["input_ids", "attention_mask"]
    return tokenizer


def has_tokenizer(folder: Path) -> bool:
    return any((folder / f).exists() for f in ("tokenizer.model", "tokenizer.json"))


def mean_rows(weight: torch.Tensor, new_rows: int) -> torch.Tensor:
    """Append `new_rows` copies of the mean row (deterministic; their logits never exceed the maximum)."""
    if new_rows == 0:
        return weight
    mean = weight.float().mean(dim=0, keepdim=True).to(weight.dtype)
    return torch.cat([weight, mean.expand(new_rows, -1)], dim=0)


# ---- conversion -----------------------------------------------------------------------------------------------------


def convert_original_checkpoint(
    src: str,
    out: str | os.PathLike,
    vision_tower: str | None = None,
    tokenizer: str | None = None,
    dtype: str | None = None,
    max_shard_size: int | str = "5GB",
    push_to_hub: str | None = None,
    allow_pickle: bool = False,
    overwrite: bool = False,
    verify: bool = True,
) -> Path:
    """Convert `src` (folder or Hub id) into the Hub-ready folder `out` (written atomically). Returns `out`."""
    source = resolve_source(
        src,
        allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"] + (["*.bin"] if allow_pickle else []),
    )
    original = read_original_config(source)
    sparse = sparse_fields(original, source)
    tower_dir, tower_config = load_tower(vision_tower or original["mm_vision_tower"], source, allow_pickle)
    logger.info(f"[convert] source {source}; vision tower {tower_dir}")

    tok = _source_tokenizer(tokenizer, source)

    old_vocab = int(original["vocab_size"])
    image_token_id = old_vocab if tok is None else tok.convert_tokens_to_ids("<image>")
    pad_token_id = old_vocab + 1 if tok is None else tok.pad_token_id
    needed = max(old_vocab + 2, image_token_id + 1, pad_token_id + 1)
    new_vocab = int(math.ceil(needed / VOCAB_PAD_MULTIPLE) * VOCAB_PAD_MULTIPLE)
    config = build_config(original, tower_config, new_vocab, image_token_id, pad_token_id, sparse)
    target_dtype = _dtype(dtype)

    with torch.device("meta"):
        from ..modeling_dynamic_llava import DynamicLlavaForConditionalGeneration

        skeleton = DynamicLlavaForConditionalGeneration(config)
    expected = {hub_key(k): tuple(v.shape) for k, v in skeleton.state_dict().items()}
    del skeleton

    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        writer = ShardWriter(tmp, max_shard_size)
        written, unmapped, wrong_shape = set(), [], []
        first_dtype = None

        def emit(key, tensor):
            if key not in expected:
                unmapped.append(key)
                return
            if tuple(tensor.shape) != expected[key]:
                wrong_shape.append(f"{key}: {tuple(tensor.shape)} != {expected[key]}")
                return
            writer.add(key, tensor)
            written.add(key)

        for key, load in iter_tensors(weight_files(source, allow_pickle)):
            try:
                new_key = map_original_key(key)
            except KeyError:
                unmapped.append(key)
                continue
            if new_key is None:
                continue
            tensor = load()
            first_dtype = first_dtype or tensor.dtype
            tensor = tensor.to(target_dtype or first_dtype)
            if new_key in ("model.language_model.embed_tokens.weight", "lm_head.weight"):
                tensor = mean_rows(tensor, new_vocab - tensor.shape[0])
            emit(new_key, tensor)
        for key, load in iter_tensors(weight_files(tower_dir, allow_pickle)):
            if not key.startswith("vision_model."):
                continue  # text tower and projections of a full CLIPModel
            emit("model.vision_tower." + key, load().to(target_dtype or first_dtype or torch.float32))
        _check_written(sorted(set(expected) - written), unmapped, wrong_shape)
        writer.finish()

        set_dtype_field(config, target_dtype or first_dtype)
        write_model_config(config, tmp)
        write_code_files(tmp)
        _write_generation_config(config, tmp)
        _write_processor(tok, tower_dir, tower_config, config, tmp)
        from .model_card import write_model_card

        write_model_card(tmp, config, base_model=src if not Path(src).exists() else None, has_tokenizer=tok is not None)
        if verify:
            verify_folder(tmp)
    logger.info(f"[convert] wrote {out}")
    if push_to_hub:
        from huggingface_hub import HfApi

        HfApi().create_repo(push_to_hub, exist_ok=True)
        HfApi().upload_folder(folder_path=str(out), repo_id=push_to_hub)
        logger.info(f"[convert] pushed to https://huggingface.co/{push_to_hub}")
    return Path(out)


def _source_tokenizer(tokenizer: str | None, source: Path) -> Any:
    """The tokenizer to convert: `--tokenizer` (a folder or Hub id), else the source's own files, else None."""
    tok_dir = Path(tokenizer).expanduser() if tokenizer and Path(tokenizer).expanduser().exists() else None
    if tokenizer and tok_dir is None:
        tok_dir = resolve_source(tokenizer, allow_patterns=list(TOKENIZER_FILES) + ["*.txt", "*.json"])
    if tok_dir is None and has_tokenizer(source):
        tok_dir = source
    tok = prepare_tokenizer(tok_dir)
    if tok is None:
        logger.warning(
            "[convert] no tokenizer files in the source (pass --tokenizer to add one): converting the model only"
        )
    return tok


def _check_written(missing: list[str], unmapped: list[str], wrong_shape: list[str]) -> None:
    """Every expected key written once with its shape, and no key left without a mapping; else one clear error."""
    problems = []
    if unmapped:
        problems.append(f"unexpected keys (no mapping): {sorted(unmapped)}")
    if missing:
        problems.append(f"missing keys: {missing}")
    if wrong_shape:
        problems.append(f"shape mismatches: {wrong_shape}")
    if problems:
        raise ConversionError("the checkpoint does not match the config; " + "; ".join(problems))


def _dtype(name: str | None) -> torch.dtype | None:
    try:
        return parse_dtype(name)
    except ValueError as error:
        raise ConversionError(f"--{error}") from error


def _write_generation_config(config, folder: Path) -> None:
    from transformers import GenerationConfig

    text = config.text_config
    generation = GenerationConfig(
        bos_token_id=text.bos_token_id, eos_token_id=text.eos_token_id, pad_token_id=config.pad_token_id
    )
    generation.save_pretrained(folder)


def _write_processor(tok, tower_dir: Path, tower_config: dict, config, folder: Path) -> None:
    from ..processor.image_processing_dynamic_llava import DynamicLlavaImageProcessor

    pre = tower_dir / "preprocessor_config.json"
    kwargs = {}
    if pre.exists():
        data = json.loads(pre.read_text())
        kwargs = {k: data[k] for k in ("size", "crop_size", "image_mean", "image_std", "resample") if k in data}
    else:
        side = tower_config["image_size"]
        kwargs = {"size": {"shortest_edge": side}, "crop_size": {"height": side, "width": side}}
    image_processor = DynamicLlavaImageProcessor(**kwargs)
    if tok is None:
        image_processor.save_pretrained(folder)
        add_auto_map(
            folder / "preprocessor_config.json", {"AutoImageProcessor": IMAGE_PROCESSOR_AUTO_MAP["AutoImageProcessor"]}
        )
        return
    from .folder import write_processor_files

    write_processor_files(image_processor, tok, config, folder)


def verify_folder(folder: Path) -> None:
    """Load the written folder and run one forward with an image; raise if anything is off."""
    from ..modeling_dynamic_llava import DynamicLlavaForConditionalGeneration

    size = sum(p.stat().st_size for p in Path(folder).glob("*.safetensors"))
    available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    kwargs = {}
    offload = None
    if size > 0.5 * available:  # too big to hold twice: let accelerate offload to disk
        offload = tempfile.TemporaryDirectory(prefix="dynamic-llava-verify-")
        kwargs = dict(device_map="auto", offload_folder=offload.name, max_memory={"cpu": int(0.4 * available)})
    try:
        model = DynamicLlavaForConditionalGeneration.from_pretrained(str(folder), dtype="auto", **kwargs)
        config = model.config
        tokens = config.image_seq_length
        bos = config.text_config.bos_token_id or 1
        ids = torch.tensor([[bos] + [config.image_token_id] * tokens + [bos]])
        side = config.vision_config.image_size
        with torch.no_grad():
            out = model(input_ids=ids, pixel_values=torch.zeros(1, 3, side, side, dtype=model.dtype))
        if not torch.isfinite(out.logits).all():
            raise ConversionError("verification forward produced non-finite logits")
        computed = f"{out.logits.shape[1]} of {ids.shape[1]} positions computed"
        logger.info(f"[convert] verified: loaded and ran one forward ({computed})")
    finally:
        if offload is not None:
            offload.cleanup()
