"""The example notebook written beside a converted model runs top to bottom and its plot cell makes a PNG."""

import os

import nbformat
import pytest
from nbclient import NotebookClient

from dynamic_llava.hub.convert import convert_original_checkpoint

from fixtures.original_checkpoints import write_original_checkpoint


@pytest.mark.slow
def test_generated_notebook_executes_and_plots(tmp_path, monkeypatch):
    src = write_original_checkpoint(tmp_path / "src")
    out = convert_original_checkpoint(str(src), str(tmp_path / "model"), dtype="float32")
    notebook = nbformat.read(out / "example.ipynb", as_version=4)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    NotebookClient(notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(out)}}).execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    assert "generated_text" in text and "kv_bytes_ratio" in text
    assert any("image/png" in o.get("data", {}) for o in outputs), "the plot cell displayed no PNG"
    png = out / "kept_patches.png"
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert os.path.getsize(png) > 1000
