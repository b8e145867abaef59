"""Where the files shipped inside the package are, for every front-end (below `hub/` and `synthetic/`, which both
use them and do not import each other for it). Pure Python: nothing is loaded or read here.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["DEMO_MODEL"]

# The model `dynamic-llava train-synthetic` trained, shipped inside the package (weights, config, processor files):
# the default of `dynamic-llava demo`, `generate`, `chat` and `evaluate`.
DEMO_MODEL = Path(__file__).resolve().parent / "synthetic" / "demo_model"
