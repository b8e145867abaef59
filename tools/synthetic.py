"""Synthetic checkpoints in the ORIGINAL Dynamic-LLaVA layout (tests, converter memory measurement)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import save_file

ORIGINAL_SPARSE_CONFIG = {
    "sparse_layer": 2, "vision_keep_rate": 0.25, "output_text_keep_rate": 0.5, "output_text_len_for_training": 50,
    "use_vision_predictor": True, "use_text_predictor": True, "use_output_text_predictor": True,
    "use_instruct_predictor": False, "instruct_keep_rate": 0.7, "instruct_len_for_training": 25,
    "d_model": 16, "nhead": 2, "dim_feedforward": 32, "num_layers": 1, "mask_loss_weight": 100.0,
    "maskclip": None, "maskclip_distill_loss_weight": 1.0, "maskclip_distill_token_rate": 0.2,
}  # fmt: skip


def _tensors(shapes: dict, dtype, seed: int, random: bool = True):
    generator = torch.Generator().manual_seed(seed)
    for name, shape in shapes.items():
        if not random:
            yield name, torch.zeros(shape, dtype=dtype)
            continue
        if name.endswith(("norm.weight", "layernorm.weight", "norm1.weight", "norm2.weight", "layer_norm1.weight",
                          "layer_norm2.weight", "pre_layrnorm.weight", "post_layernorm.weight", "down_mlp.0.weight",
                          "output_mlp.0.weight")) and len(shape) == 1:  # fmt: skip
            yield name, torch.ones(shape, dtype=dtype)
        else:
            yield name, (torch.randn(shape, generator=generator) * 0.3).to(dtype)


def original_shapes(hidden=32, intermediate=64, layers=4, heads=4, kv_heads=2, vocab=120, tower_hidden=16,
                    d=16, nhead=2, ff=32, predictor_layers=1) -> dict:  # fmt: skip
    head_dim = hidden // heads
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,), "lm_head.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "self_attn.q_proj.weight": (hidden, hidden), p + "self_attn.k_proj.weight": (kv_heads * head_dim, hidden),
            p + "self_attn.v_proj.weight": (kv_heads * head_dim, hidden), p + "self_attn.o_proj.weight": (hidden, hidden),
            p + "mlp.gate_proj.weight": (intermediate, hidden), p + "mlp.up_proj.weight": (intermediate, hidden),
            p + "mlp.down_proj.weight": (hidden, intermediate), p + "input_layernorm.weight": (hidden,),
            p + "post_attention_layernorm.weight": (hidden,),
        })  # fmt: skip
    shapes.update({"model.mm_projector.0.weight": (hidden, tower_hidden), "model.mm_projector.0.bias": (hidden,),
                   "model.mm_projector.2.weight": (hidden, hidden), "model.mm_projector.2.bias": (hidden,)})  # fmt: skip
    ip = "model.image_score_predictor."
    shapes.update({ip + "down_mlp.0.weight": (hidden,), ip + "down_mlp.0.bias": (hidden,),
                   ip + "down_mlp.1.weight": (d, hidden), ip + "down_mlp.1.bias": (d,)})  # fmt: skip
    for i in range(predictor_layers):
        b = f"{ip}transformer.{i}."
        shapes.update({
            b + "norm1.weight": (d,), b + "norm1.bias": (d,), b + "attn.qkv.weight": (3 * d, d),
            b + "attn.proj.weight": (d, d), b + "attn.proj.bias": (d,), b + "norm2.weight": (d,), b + "norm2.bias": (d,),
            b + "mlp.fc1.weight": (ff, d), b + "mlp.fc1.bias": (ff,), b + "mlp.fc2.weight": (d, ff), b + "mlp.fc2.bias": (d,),
        })  # fmt: skip
    for j, (o, i_) in zip((0, 2, 4), ((d // 2, d), (d // 4, d // 2), (2, d // 4))):
        shapes[f"{ip}output_mlp.{j}.weight"], shapes[f"{ip}output_mlp.{j}.bias"] = (o, i_), (o,)
    op = "model.output_text_score_predictor.output_mlp."
    shapes[op + "0.weight"], shapes[op + "0.bias"] = (hidden,), (hidden,)
    for j, (o, i_) in zip((1, 3, 5, 7), ((d, hidden), (d // 2, d), (d // 4, d // 2), (2, d // 4))):
        shapes[f"{op}{j}.weight"], shapes[f"{op}{j}.bias"] = (o, i_), (o,)
    return shapes


def tower_shapes(hidden=16, intermediate=32, layers=2, image_size=32, patch=8, prefix="vision_model.") -> dict:
    n = (image_size // patch) ** 2 + 1
    shapes = {prefix + "embeddings.class_embedding": (hidden,),
              prefix + "embeddings.patch_embedding.weight": (hidden, 3, patch, patch),
              prefix + "embeddings.position_embedding.weight": (n, hidden),
              prefix + "pre_layrnorm.weight": (hidden,), prefix + "pre_layrnorm.bias": (hidden,),
              prefix + "post_layernorm.weight": (hidden,), prefix + "post_layernorm.bias": (hidden,)}  # fmt: skip
    for i in range(layers):
        p = f"{prefix}encoder.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes[f"{p}self_attn.{proj}.weight"], shapes[f"{p}self_attn.{proj}.bias"] = (hidden, hidden), (hidden,)
        for ln in ("layer_norm1", "layer_norm2"):
            shapes[f"{p}{ln}.weight"], shapes[f"{p}{ln}.bias"] = (hidden,), (hidden,)
        shapes[p + "mlp.fc1.weight"], shapes[p + "mlp.fc1.bias"] = (intermediate, hidden), (intermediate,)
        shapes[p + "mlp.fc2.weight"], shapes[p + "mlp.fc2.bias"] = (hidden, intermediate), (hidden,)
    return shapes


def write_tower(folder: Path, hidden=16, intermediate=32, layers=2, heads=2, image_size=32, patch=8, seed=1) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = {"architectures": ["CLIPVisionModel"], "model_type": "clip_vision_model", "hidden_size": hidden,
              "intermediate_size": intermediate, "num_hidden_layers": layers, "num_attention_heads": heads,
              "image_size": image_size, "patch_size": patch, "projection_dim": hidden, "hidden_act": "quick_gelu",
              "layer_norm_eps": 1e-5}  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    pre = {"crop_size": {"height": image_size, "width": image_size}, "do_center_crop": True, "do_convert_rgb": True,
           "do_normalize": True, "do_rescale": True, "do_resize": True,
           "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
           "image_processor_type": "CLIPImageProcessor", "resample": 3, "rescale_factor": 1 / 255,
           "size": {"shortest_edge": image_size}}  # fmt: skip
    (folder / "preprocessor_config.json").write_text(json.dumps(pre, indent=2))
    save_file(dict(_tensors(tower_shapes(hidden, intermediate, layers, image_size, patch), torch.float32, seed)),
              str(folder / "model.safetensors"))  # fmt: skip
    return folder


def write_original_checkpoint(
    folder: Path,
    shards: int = 1,
    with_tower_copy: bool = True,
    extra_sparse: Optional[dict] = None,
    tokenizer: bool = True,
    dtype=torch.float16,
    shapes: Optional[dict] = None,
    config_overrides: Optional[dict] = None,
    heads: int = 4,
    tower: str = "vision_tower",
    seed: int = 0,
    pickle: bool = False,
    random: bool = True,
    tower_kwargs: Optional[dict] = None,
) -> Path:
    """
    Write a tiny (or, with `shapes`/`config_overrides`, any size) checkpoint in the original layout: config.json
    (`llava_llama`, `mm_*`, `sparse_config`), safetensors shards (streamed: one shard in memory at a time), a CLIP
    tower at `folder/<tower>`, optionally the tower copy and a tokenizer.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    shapes = dict(shapes or original_shapes())
    if with_tower_copy:
        shapes.update(tower_shapes(prefix="model.vision_tower.vision_tower.vision_model.", **_tower_shape_args(tower_kwargs)))
    hidden = shapes["model.norm.weight"][0]
    kv_heads = heads * shapes["model.layers.0.self_attn.k_proj.weight"][0] // hidden
    vocab = shapes["model.embed_tokens.weight"][0]
    layers = 1 + max(int(k.split(".")[2]) for k in shapes if k.startswith("model.layers."))
    sparse = dict(ORIGINAL_SPARSE_CONFIG, **(extra_sparse or {}))
    if "model.image_score_predictor.down_mlp.1.weight" in shapes:  # the predictor sizes follow the shapes
        d = shapes["model.image_score_predictor.down_mlp.1.weight"][0]
        blocks = [k for k in shapes if k.startswith("model.image_score_predictor.transformer.") and k.endswith("fc1.weight")]
        sparse.update(d_model=d, num_layers=len(blocks), dim_feedforward=shapes[blocks[0]][0] if blocks else 4 * d)
    config = {
        "architectures": ["DynamicLlavaLlamaForCausalLM"], "model_type": "llava_llama", "hidden_size": hidden,
        "intermediate_size": shapes["model.layers.0.mlp.gate_proj.weight"][0], "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv_heads, "vocab_size": vocab, "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "rope_scaling": None, "attention_bias": False,
        "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "tie_word_embeddings": False,
        "mm_vision_tower": tower, "mm_hidden_size": (tower_kwargs or {}).get("hidden", 16), "mm_projector_type": "mlp2x_gelu",
        "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch", "mm_use_im_patch_token": False,
        "mm_use_im_start_end": False, "mm_patch_merge_type": "flat", "image_aspect_ratio": "pad",
        "tokenizer_padding_side": "right", "tokenizer_model_max_length": 2048, "sparse_config": sparse,
        "torch_dtype": str(dtype).replace("torch.", ""), "use_cache": True,
    }  # fmt: skip
    config.update(config_overrides or {})
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    names = list(shapes)
    per_shard = -(-len(names) // shards)
    weight_map = {}
    generator_seed = seed
    for s in range(shards):
        part = {name: shapes[name] for name in names[s * per_shard : (s + 1) * per_shard]}
        tensors = dict(_tensors(part, dtype, generator_seed + s, random))
        file = "pytorch_model.bin" if pickle else (
            "model.safetensors" if shards == 1 else f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        )  # fmt: skip
        if pickle:
            torch.save(tensors, folder / file)
        else:
            save_file(tensors, str(folder / file), metadata={"format": "pt"})
        weight_map.update({name: file for name in tensors})
        del tensors
    if shards > 1 and not pickle:
        index = {"metadata": {}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    write_tower(folder / tower, **(tower_kwargs or {}))
    if tokenizer:
        from .tiny import tiny_tokenizer

        tiny_tokenizer(vocab).save_pretrained(folder)
    return folder


def _tower_shape_args(tower_kwargs: Optional[dict]) -> dict:
    kwargs = dict(tower_kwargs or {})
    kwargs.pop("heads", None)
    kwargs.pop("seed", None)
    return kwargs


def write_7b_shaped_checkpoint(folder: Path, shards: int = 3) -> Path:
    """The LLaVA-1.5-7B / Dynamic-LLaVA-7B shapes (Vicuna-7B, CLIP ViT-L/14-336, predictors d=512), zeros, fp16."""
    shapes = original_shapes(hidden=4096, intermediate=11008, layers=32, heads=32, kv_heads=32, vocab=32000,
                             tower_hidden=1024, d=512, nhead=8, ff=2048, predictor_layers=2)  # fmt: skip
    tower = dict(hidden=1024, intermediate=4096, layers=24, heads=16, image_size=336, patch=14)
    return write_original_checkpoint(folder, shards=shards, shapes=shapes, heads=32, random=False, tokenizer=False,
                                     tower_kwargs=tower, extra_sparse={"nhead": 8})  # fmt: skip
