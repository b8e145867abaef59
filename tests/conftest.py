"""Shared fixtures: tiny random models, inputs and processors built locally (no downloads), and the paths of the
files under `tests/fixtures/`. Test modules take these as fixtures or import `fixtures.*`; never each other."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dynamic_llava import DynamicLlavaForConditionalGeneration
from dynamic_llava.processor import DynamicLlavaProcessor
from dynamic_llava.training.calibration import calibrate_output_text_bias

from fixtures import HUB_LOAD_SCRIPT, ORIGINAL_REFERENCE
from fixtures.tiny import tiny_inputs, tiny_model
from fixtures.tiny import tiny_processor as make_tiny_processor

torch.set_num_threads(2)

REPOSITORY = Path(__file__).resolve().parents[1]


class _RepositoryRootIsADirectory:
    """
    The repository root is the package `dynamic_llava` (it has an `__init__.py`), so pytest would collect it as a test
    package and import that `__init__.py` under the name of the clone's folder: in a folder named like `dynamic-llava`
    (not an identifier) that import fails and every test errors; in one named like `main` it loads the model classes a
    second time as `main.*`. Collect the root as a plain folder instead. (Registered as a plugin: a conftest's own
    collection hooks do not apply to its parent folder.)
    """

    @pytest.hookimpl(tryfirst=True)
    def pytest_collect_directory(self, path: Path, parent: pytest.Collector) -> pytest.Collector | None:
        if path == REPOSITORY:
            return pytest.Dir.from_parent(parent, path=path)
        return None


def pytest_configure(config: pytest.Config) -> None:
    config.pluginmanager.register(_RepositoryRootIsADirectory(), "dynamic-llava-repository-root")


@pytest.fixture(scope="session")
def calibrated_model() -> DynamicLlavaForConditionalGeneration:
    """Tiny model whose output-text predictor keeps about half of the generated tokens."""
    model = tiny_model(0)
    calibrate_output_text_bias(model, tiny_inputs([(5, 6, 7, 8, 9)]), max_new_tokens=30)
    return model


@pytest.fixture(scope="session")
def batch_inputs() -> dict[str, torch.Tensor]:
    """3 rows: different prompts, lengths, images (left padded)."""
    return tiny_inputs([(5, 6, 7, 8, 9, 10, 11), (12, 13), (14, 15, 16, 17)], seed=3, image_position=1)


@pytest.fixture
def tiny_processor() -> DynamicLlavaProcessor:
    """A fresh processor of the tiny model (word-level tokenizer `w3`..`w126`, `<image>` = 127, 32 x 32 images)."""
    return make_tiny_processor()


@pytest.fixture(scope="session")
def original_reference() -> Path:
    """The parity fixture: outputs of the original Dynamic-LLaVA code on a tiny checkpoint (see its README.md)."""
    return ORIGINAL_REFERENCE


@pytest.fixture(scope="session")
def hub_load_script() -> Path:
    """The script that loads an exported folder in a fresh process where this project is not importable."""
    return HUB_LOAD_SCRIPT
