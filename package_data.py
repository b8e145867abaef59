"""Where the files shipped inside the package are, for every front-end (below `hub/` and `synthetic/`, which both
use them and do not import each other for it). Pure Python: nothing is loaded or read here.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["DEMO_MODEL", "DEMO_MODELS"]

# The model `dynamic-llava train-synthetic` trained, shipped inside the package (weights, config, processor files):
# the default of `dynamic-llava demo`, `generate`, `chat` and `evaluate`.
DEMO_MODEL = Path(__file__).resolve().parent / "synthetic" / "demo_model"

# Every shipped demo model, by the stock `model_type` of its base: LLaVA-1.5 (the default above) and the one trained
# the same way on the Qwen2.5-VL architecture (`dynamic-llava train-synthetic --base qwen2_5_vl`).
DEMO_MODELS = {"llava": DEMO_MODEL, "qwen2_5_vl": DEMO_MODEL.parent / "demo_model_qwen2_5_vl"}
