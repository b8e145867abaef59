"""Shared fixtures: tiny random models built locally (no downloads)."""

import pytest
import torch

from dynamic_llava.tools.tiny import calibrate_output_text_bias, tiny_inputs, tiny_model

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def calibrated_model():
    """Tiny model whose output-text predictor keeps about half of the generated tokens."""
    model = tiny_model(0)
    calibrate_output_text_bias(model, tiny_inputs([(5, 6, 7, 8, 9)]), max_new_tokens=30)
    return model


@pytest.fixture(scope="session")
def batch_inputs():
    """3 rows: different prompts, lengths, images (left padded)."""
    return tiny_inputs([(5, 6, 7, 8, 9, 10, 11), (12, 13), (14, 15, 16, 17)], seed=3, image_position=1)
