"""The bench's model presets: random models of given shapes, as plain dicts (no torch: the command line reads the
names for `--preset` before anything loads). `bench.run.preset_model` builds one."""

from __future__ import annotations

__all__ = ["DEFAULT_PRESET", "PRESETS"]

DEFAULT_PRESET = "llava15-cpu"

PRESETS: dict[str, dict] = {
    # LLaVA-1.5 proportions at a size 2 CPU cores run in minutes: 576 image tokens, 32 layers, sparse_layer 2,
    # ~60 prompt text tokens, the predictor narrowed with the model (7B: 4096 / d 512; here 256 / d 32)
    "llava15-cpu": dict(
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
