"""The synthetic shapes task: one coloured shape on a textured 64 x 64 image, questions about its colour, kind and
position (`task`); training a small Dynamic-LLaVA on it from scratch (`train`), evaluating it (`evaluate`), the
picture of the kept patches (`picture`), and the model trained that way, shipped in `demo_model/`.
"""

from pathlib import Path

IMAGE_SIZE, PATCH = 64, 8
# The model `dynamic-llava train-synthetic` trained, shipped inside the package (weights, config, processor files):
# the default of `dynamic-llava demo`, `generate` and `evaluate`.
DEMO_MODEL = Path(__file__).resolve().parent / "demo_model"
