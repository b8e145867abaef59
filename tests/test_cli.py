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


def test_generate_command_prints_answer_and_summary(tmp_path, capsys, monkeypatch):
    from PIL import Image
    from test_hub import tiny_processor

    from dynamic_llava.tools.export import export_model
    from dynamic_llava.tools.tiny import tiny_model

    folder = export_model(tiny_model(6), tmp_path / "repo", processor=tiny_processor())
    image = tmp_path / "in.png"
    Image.effect_noise((30, 50), 40).convert("RGB").save(image)
    args = ["generate", "--model", str(folder), "--image", str(image), "--prompt", "w5 w6", "--max-new-tokens", "5"]
    assert main(args) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out[0].split()) == 5  # the answer: five words of the tiny vocabulary
    assert out[1].startswith("[sparsity] vision tokens kept 4/16; generated tokens kept ")
    assert "bytes vs dense" in out[1]
    assert main(args + ["--no-sparsity"]) == 0
    assert "vision tokens kept 16/16" in capsys.readouterr().out

    # errors: one line each, exit code 2, no traceback
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for bad, message in [
        (["--image", str(tmp_path / "missing.png")], "does not exist"),
        (["--prompt", "  "], "--prompt is empty"),
        (["--model", "nobody/no-such-repo"], "offline and not in the local cache"),
    ]:
        argv = list(args)
        flag = bad[0]
        argv[argv.index(flag) + 1] = bad[1]
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and "Traceback" not in err and len(err.splitlines()) == 1
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    argv = list(args)
    argv[argv.index("--image") + 1] = str(corrupt)
    assert main(argv) == 2
    assert "corrupt.png" in capsys.readouterr().err
