"""The bench's model presets: random models of given shapes, as plain dicts (no torch: the command line reads the
names for `--preset` before anything loads). `bench.context.preset_model` builds one; `base` names its entry of the
registry (`hub.bases.BASES`) and `bench.bases` turns the rest into that base's Dynamic config. `image` is the
(height, width) of the bench's image where the base takes images of any size (LLaVA-NeXT, Qwen2.5-VL)."""

from __future__ import annotations

__all__ = ["DEFAULT_PRESET", "PRESETS"]

DEFAULT_PRESET = "llava15-cpu"

PRESETS: dict[str, dict] = {
    # LLaVA-1.5 proportions at a size 2 CPU cores run in minutes: 576 image tokens, 32 layers, sparse_layer 2,
    # ~60 prompt text tokens, the predictor narrowed with the model (7B: 4096 / d 512; here 256 / d 32)
    "llava15-cpu": dict(
        base="llava",
        text=dict(
            hidden_size=256,
            intermediate_size=688,
            num_hidden_layers=32,
            num_attention_heads=8,
            num_key_value_heads=8,
            vocab_size=32064,
            max_position_embeddings=4096,
        ),
        vision=dict(
            hidden_size=128,
            intermediate_size=512,
            num_hidden_layers=4,
            num_attention_heads=4,
            image_size=336,
            patch_size=14,
        ),
        predictor=dict(predictor_d_model=32, predictor_nhead=2, predictor_dim_feedforward=128, predictor_num_layers=2),
    ),
    # the real LLaVA-1.5-7B / Dynamic-LLaVA-7B shapes (Vicuna-7B, CLIP ViT-L/14-336): for a GPU
    "llava15-7b": dict(
        base="llava",
        text=dict(
            hidden_size=4096,
            intermediate_size=11008,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=32,
            vocab_size=32064,
            max_position_embeddings=4096,
        ),
        vision=dict(
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=24,
            num_attention_heads=16,
            image_size=336,
            patch_size=14,
        ),
        predictor=dict(
            predictor_d_model=512, predictor_nhead=8, predictor_dim_feedforward=2048, predictor_num_layers=2
        ),
    ),
}
PRESETS["tiny"] = dict(
    # the test fixture's shapes (tests/fixtures/tiny.py) at LLaVA's 576 image tokens' place 16: a run in seconds on
    # one CPU core, for dry runs and the tests of the bench itself (no number of it means anything about speed)
    base="llava",
    text=dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=32064,
        max_position_embeddings=4096,
    ),
    vision=dict(
        hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8
    ),
    predictor=dict(predictor_d_model=16, predictor_nhead=2, predictor_dim_feedforward=32, predictor_num_layers=1),
)

# LLaVA-NeXT (llava-v1.6-vicuna-7b proportions): the text model of llava15-cpu, a 336-px CLIP-like tower with 14-px
# patches (576 tokens per tile, CLS dropped, the second-to-last layer's features) and llava-hf's anyres pinpoints; a
# 480 x 640 image (COCO's usual size) is the base tile + a 2 x 2 grid of tiles: 576 + 36 x 48 unpadded patches + 36
# newlines = 2,340 image tokens, as the real model makes of it
_NEXT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
PRESETS["llava-next-cpu"] = dict(
    base="llava_next",
    text=dict(PRESETS["llava15-cpu"]["text"]),
    vision=dict(PRESETS["llava15-cpu"]["vision"]),
    image_grid_pinpoints=_NEXT_PINPOINTS,
    image=(480, 640),
    predictor=dict(PRESETS["llava15-cpu"]["predictor"]),
)
# the tiny NeXT of tests/fixtures/bases.py (56-px tiles of 16 patches, pinpoints up to 112 px): a 90 x 60 image is
# 5 tiles and 72 image tokens; the text model at qwen2-5-vl-tiny's width (hidden 64: the predictor is then a small
# share of the prefill, as at full size); a run in seconds, for tests (no number of it means anything about speed)
PRESETS["llava-next-tiny"] = dict(
    base="llava_next",
    text=dict(PRESETS["tiny"]["text"], hidden_size=64, intermediate_size=128),
    vision=dict(
        hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=56, patch_size=14
    ),
    image_grid_pinpoints=[[56, 112], [112, 56], [112, 112]],
    image=(90, 60),
    predictor=dict(PRESETS["tiny"]["predictor"]),
)

# Qwen2.5-VL-7B proportions at llava15-cpu's width: Qwen2 text at hidden 256 and 28 layers, grouped-query attention
# 8 query / 2 key-value heads (7B: 28 / 4; head_dim 32 as llava15-cpu's), the MLP at 7B's ratio (18944 / 3584), M-RoPE
# sections at 7B's proportions (16, 24, 24 of 64 -> 4, 6, 6 of 16); the vision tower narrowed (hidden 128, 4 blocks,
# the last with full attention, 7B: 32 blocks, every 8th full) with 7B's patch 14, merge 2, temporal patch 2 and
# 112-px windows. A 644 x 644 image is 46 x 46 patches = 529 image tokens. The vocabulary is LLaVA's 32,064 (7B:
# 152,064), so the LM head weighs on a decode step as in llava15-cpu; the special tokens sit above the text ids.
_QWEN_IDS = dict(eos=32000, vision_start=32001, vision_end=32002, image=32003, video=32004)
PRESETS["qwen2-5-vl-cpu"] = dict(
    base="qwen2_5_vl",
    text=dict(
        hidden_size=256,
        intermediate_size=1352,
        num_hidden_layers=28,
        num_attention_heads=8,
        num_key_value_heads=2,
        vocab_size=32064,
        max_position_embeddings=32768,
        rope_theta=1000000.0,
        tie_word_embeddings=False,
    ),
    mrope_section=(4, 6, 6),
    vision=dict(
        depth=4,
        hidden_size=128,
        intermediate_size=512,
        num_heads=4,
        in_channels=3,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
        window_size=112,
        fullatt_block_indexes=[3],
        out_hidden_size=256,
    ),
    special_ids=_QWEN_IDS,
    image=(644, 644),
    predictor=dict(PRESETS["llava15-cpu"]["predictor"]),
)
# tests/fixtures/bases.py's tiny Qwen2.5-VL shapes (hidden 64, 4 / 2 heads, head_dim 16) at 4 layers; a 224 x 224
# image is 16 x 16 patches = 64 image tokens; a run in seconds, for tests
PRESETS["qwen2-5-vl-tiny"] = dict(
    base="qwen2_5_vl",
    text=dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=32064,
        max_position_embeddings=4096,
        rope_theta=10000.0,
        tie_word_embeddings=False,
    ),
    mrope_section=(2, 3, 3),
    vision=dict(
        depth=2,
        hidden_size=32,
        intermediate_size=64,
        num_heads=2,
        in_channels=3,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
        window_size=112,
        fullatt_block_indexes=[1],
        out_hidden_size=64,
    ),
    special_ids=_QWEN_IDS,
    image=(224, 224),
    predictor=dict(PRESETS["tiny"]["predictor"]),
)
