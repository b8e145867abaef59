"""The README quickstart is what this test runs: on the exported demo model, in a process without the project."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from dynamic_llava.hub.export import export_model

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_block(name: str, language: str) -> str:
    """The code of the README's ```language block between `<!-- name -->` and `<!-- /name -->`."""
    pattern = rf"<!-- {name} -->\s*```{language}\n(.*?)```\s*<!-- /{name} -->"
    block = re.search(pattern, README.read_text(), re.S)
    assert block, f"README.md has no {name} block"
    return block.group(1)


def quickstart_code() -> str:
    return readme_block("quickstart", "python")


@pytest.mark.slow
def test_readme_quickstart_runs_as_written(tmp_path):
    """The block verbatim but for the repository (the embedded demo model, exported) and the image (a local file)."""
    from dynamic_llava.package_data import DEMO_MODEL

    folder = export_model(DEMO_MODEL, tmp_path / "repo")
    image = tmp_path / "photo.png"
    Image.effect_noise((64, 64), 50).convert("RGB").save(image)
    code = quickstart_code()
    code, n_repo = re.subn(r'^repo = ".*?"', f"repo = {str(folder)!r}", code, flags=re.M)
    code, n_image = re.subn(r'^image = ".*?"', f"image = {str(image)!r}", code, flags=re.M)
    assert n_repo == n_image == 1
    script = tmp_path / "quickstart.py"
    script.write_text("import sys\nsys.modules['dynamic_llava'] = None\n" + code)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    env.pop("PYTHONPATH", None)
    run = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "'vision_tokens_kept': [[12]]" in run.stdout  # the demo model's config: 12 of 64 per image
    assert "generated_text" in run.stdout


@pytest.mark.slow
def test_readme_recipe_for_a_new_base_runs_as_written(tmp_path):
    """The `init` + `train` recipe verbatim, in an empty folder (the repository's `scripts/` beside it, as in a
    clone): the trained folder answers and reports what it kept."""
    (tmp_path / "scripts").symlink_to(README.parent / "scripts")
    bin_dir = str(Path(sys.executable).parent)  # `python` and `dynamic-llava` of this environment, as once activated
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PATH=bin_dir + os.pathsep + os.environ["PATH"])
    run = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", readme_block("new-base-recipe", "bash")],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=900,
    )
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    assert "[sparsity] vision tokens kept 2 (1 image(s))" in run.stdout
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()
