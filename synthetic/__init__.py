"""The synthetic shapes task: one coloured shape on a textured 64 x 64 image, questions about its colour, kind and
position (`task`); training a small Dynamic-LLaVA on it from scratch (`train`), evaluating it (`evaluate`), the
picture of the kept patches (`picture`), and the model trained that way, shipped in `demo_model/`
(its location: `dynamic_llava.package_data.DEMO_MODEL`).
"""

IMAGE_SIZE, PATCH = 64, 8
