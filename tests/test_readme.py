"""The README quickstart is what this test runs: on a tiny exported model, in a process without the project."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from dynamic_llava.hub.export import export_model

from fixtures.tiny import tiny_model

README = Path(__file__).resolve().parents[1] / "README.md"


def quickstart_code() -> str:
    text = README.read_text()
    block = re.search(r"<!-- quickstart -->\s*```python\n(.*?)```\s*<!-- /quickstart -->", text, re.S)
    assert block, "README.md has no quickstart block"
    return block.group(1)


@pytest.mark.slow
def test_readme_quickstart_runs_as_written(tmp_path, tiny_processor):
    folder = export_model(tiny_model(5), tmp_path / "repo", processor=tiny_processor)
    image = tmp_path / "photo.png"
    Image.effect_noise((48, 30), 50).convert("RGB").save(image)
    code = quickstart_code()
    code, n_repo = re.subn(r'^repo = ".*?"', f"repo = {str(folder)!r}", code, flags=re.M)
    code, n_image = re.subn(r'^image = ".*?"', f"image = {str(image)!r}", code, flags=re.M)
    assert n_repo == n_image == 1
    code = code.replace('"What is shown in this image?"', '"w5 w6 w7"')  # the tiny tokenizer's words
    assert "vision_keep_tokens=128" in code
    code = code.replace("vision_keep_tokens=128", "vision_keep_tokens=8")  # the tiny model's images have 16 tokens
    script = tmp_path / "quickstart.py"
    script.write_text("import sys\nsys.modules['dynamic_llava'] = None\n" + code)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    env.pop("PYTHONPATH", None)
    run = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "'vision_tokens_kept': [[4]]" in run.stdout
    assert "generated_text" in run.stdout
