"""The `dynamic-llava` command."""

import subprocess
import sys

import pytest

from dynamic_llava.cli import main


def test_demo_answers_with_the_embedded_model_and_never_overwrites_the_png(tmp_path, capsys, monkeypatch):
    from PIL import Image

    monkeypatch.chdir(tmp_path)
    (tmp_path / "kept_patches.png").write_bytes(b"the user's own file")
    assert main(["demo", "--seed", "3", "--json"]) == 0
    out = capsys.readouterr().out
    assert "(correct)" in out, out
    assert "[sparsity] vision tokens kept 12/64; generated tokens kept " in out
    assert (tmp_path / "kept_patches.png").read_bytes() == b"the user's own file"
    with Image.open(tmp_path / "kept_patches-1.png") as picture:
        assert picture.size == (2 * 256 + 8, 256)
    assert "wrote kept_patches-1.png" in out
    assert main(["demo", "--seed", "3", "--save", "kept_patches.png"]) == 0
    assert (tmp_path / "kept_patches-2.png").exists()


def test_demo_and_generate_take_a_user_image(tmp_path, capsys):
    import random

    from dynamic_llava.synthetic.task import is_correct, make_sample

    sample = make_sample(random.Random(11), 64)
    path = tmp_path / "shape.png"
    sample["image"].resize((200, 200)).save(path)  # any size: the processor resizes it
    question = "What colour is the object?"
    assert main(["demo", "--image", str(path), "--question", question, "--save", str(tmp_path / "k.png")]) == 0
    answer = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("answer: "))
    assert is_correct(answer[len("answer: ") :], dict(sample, answer=sample["colour"])), answer
    assert main(["generate", "--image", str(path), "--prompt", question, "--max-new-tokens", "6"]) == 0
    captured = capsys.readouterr()
    assert captured.out.lower().startswith(sample["colour"]), captured.out
    assert "embedded demo model" in captured.err
    assert main(["demo", "--image", str(tmp_path / "nope.png")]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.slow
def test_console_script_is_installed():
    result = subprocess.run(
        [sys.executable, "-m", "dynamic_llava.cli", "--help"], capture_output=True, text=True, check=True
    )
    assert "demo" in result.stdout


def test_generate_command_prints_answer_and_summary(tmp_path, capsys, monkeypatch, tiny_processor):
    from PIL import Image

    from dynamic_llava.hub.export import export_model

    from fixtures.tiny import tiny_model

    folder = export_model(tiny_model(6), tmp_path / "repo", processor=tiny_processor)
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
