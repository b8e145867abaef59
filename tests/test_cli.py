"""The `dynamic-llava` command."""

import subprocess
import sys

from dynamic_llava.tools.cli import main


def test_demo_prints_ids_kept_tokens_and_bytes(capsys):
    assert main(["demo", "--max-new-tokens", "12", "--json"]) == 0
    out = capsys.readouterr().out
    assert "generated ids: [" in out
    assert "kept vision tokens: [" in out and "(4 of 16)" in out
    assert "output-text tokens kept:" in out
    assert "bytes stored vs" in out


def test_console_script_is_installed():
    result = subprocess.run(
        [sys.executable, "-m", "dynamic_llava.tools.cli", "--help"], capture_output=True, text=True, check=True
    )
    assert "demo" in result.stdout
