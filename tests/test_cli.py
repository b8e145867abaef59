"""The `dynamic-llava` command: the commands on the embedded demo model and a tiny exported one, one flag set across
demo / generate / evaluate, and every bad input as one line on stderr with exit code 2."""

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from dynamic_llava.cli import main

SUBCOMMANDS = [
    "demo",
    "generate",
    "chat",
    "evaluate",
    "convert",
    "init",
    "bench",
    "train",
    "train-synthetic",
    "synthetic-data",
    "export",
]


def run(argv):
    """main(argv)'s exit code, argparse's usage errors (SystemExit) included."""
    try:
        return main(argv)
    except SystemExit as exit_:
        return exit_.code


def assert_fails(capsys, argv, *fragments):
    """`argv` fails with exit code 2 and one line on stderr that holds every fragment; returns that line."""
    assert run(argv) == 2, argv
    err = capsys.readouterr().err.strip()
    lines = [line for line in err.splitlines() if not line.startswith(("Loading weights", "[model] none given"))]
    assert len(lines) == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Two synthetic sample images (their samples, for the answers) as PNG files."""
    import random

    from dynamic_llava.synthetic.task import make_sample

    folder = tmp_path_factory.mktemp("images")
    samples = [make_sample(random.Random(seed), 64) for seed in (11, 12)]
    paths = []
    for index, sample in enumerate(samples):
        path = folder / f"shape{index}.png"
        sample["image"].resize((200, 200)).save(path)  # any size: the processor resizes it
        paths.append(str(path))
    return paths, samples


@pytest.fixture
def generate_calls(monkeypatch):
    """Every `generate()` call's keyword arguments and the model's config predictor flags at that moment."""
    from dynamic_llava.modeling_dynamic_llava import DynamicLlavaForConditionalGeneration

    calls = []
    original = DynamicLlavaForConditionalGeneration.generate

    def spy(self, *args, **kwargs):
        config = self.config
        calls.append(
            dict(
                kwargs, config=(config.use_vision_predictor, config.use_output_text_predictor, config.vision_keep_rate)
            )
        )
        return original(self, *args, **kwargs)

    monkeypatch.setattr(DynamicLlavaForConditionalGeneration, "generate", spy)
    return calls


# ---- demo, generate, evaluate ---------------------------------------------------------------------------------------


def test_demo_answers_with_the_embedded_model_and_never_overwrites_the_png(tmp_path, capsys, monkeypatch):
    from PIL import Image

    monkeypatch.chdir(tmp_path)
    (tmp_path / "kept_patches.png").write_bytes(b"the user's own file")
    assert main(["demo", "--seed", "3", "--max-new-tokens", "8"]) == 0
    out = capsys.readouterr().out
    assert "(correct)" in out, out
    assert "[sparsity] vision tokens kept 12/64; generated tokens kept " in out
    assert (tmp_path / "kept_patches.png").read_bytes() == b"the user's own file"
    with Image.open(tmp_path / "kept_patches-1.png") as picture:
        assert picture.size == (2 * 256 + 8, 256)
    assert "wrote kept_patches-1.png" in out
    # --json: one JSON object and nothing else
    assert main(["demo", "--seed", "3", "--save", "kept_patches.png", "--json", "--max-new-tokens", "8"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["correct"] is True and result["expected"] == "square" and result["answer"].startswith("square")
    assert [len(kept) for kept in result["kept_vision_patches"]] == [12]
    assert result["picture"] == "kept_patches-2.png" and (tmp_path / "kept_patches-2.png").exists()
    assert result["sparsity"]["vision_tokens_kept"] == [[12]]


def test_demo_and_generate_take_user_images(tmp_path, capsys, images):
    from PIL import Image

    from dynamic_llava.synthetic.task import is_correct

    (first, second), (sample, _) = images
    question = "What colour is the object?"
    for flag in ("--question", "--prompt"):  # --question is demo's alias of --prompt
        argv = ["demo", "--image", first, flag, question, "--save", str(tmp_path / "k.png"), "--max-new-tokens", "4"]
        assert main(argv) == 0
        answer = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("answer: "))
        assert is_correct(answer[len("answer: ") :], dict(sample, answer=sample["colour"])), answer
    assert main(["generate", "--image", first, "--prompt", question, "--max-new-tokens", "6"]) == 0
    captured = capsys.readouterr()
    assert captured.out.lower().startswith(sample["colour"]), captured.out
    assert "embedded demo model" in captured.err
    # two images in one prompt: one <image> each, in order; both pruned; the picture has one row per image
    argv = ["demo", "--image", first, "--image", second, "--prompt", question, "--save", str(tmp_path / "two.png")]
    assert main(argv + ["--max-new-tokens", "2"]) == 0
    out = capsys.readouterr().out
    assert "vision tokens kept 24/128" in out and "kept vision patches of image 2" in out
    with Image.open(tmp_path / "two.png") as picture:
        assert picture.size == (2 * 256 + 8, 2 * 256 + 8)
    assert (
        main(["generate", "--image", first, "--image", second, "--prompt", question, "--json", "--max-new-tokens", "2"])
        == 0
    )
    result = json.loads(capsys.readouterr().out)
    assert result["sparsity"]["vision_tokens_kept"] == [[12, 12]] and result["images"] == [first, second]
    assert main(["demo", "--image", str(tmp_path / "nope.png")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_sparsity_flags_go_to_each_generate_call_not_the_config(capsys, images, generate_calls):
    (first, _), _ = images
    base = ["generate", "--image", first, "--prompt", "What colour is the object?", "--max-new-tokens", "3"]
    for flags, expected, kept in [
        ([], {}, "12/64"),
        (["--vision-keep-tokens", "5"], {"vision_keep_tokens": 5}, "5/64"),
        (["--vision-keep-rate", "0.5"], {"vision_keep_rate": 0.5}, "32/64"),
        (["--no-vision-predictor"], {"use_vision_predictor": False}, "64/64"),
        (["--no-output-text-predictor"], {"use_output_text_predictor": False}, "12/64"),
        (["--no-sparsity"], {"use_vision_predictor": False, "use_output_text_predictor": False}, "64/64"),
    ]:
        assert main(base + flags) == 0
        out = capsys.readouterr().out
        assert f"vision tokens kept {kept}" in out, (flags, out)
        call = generate_calls.pop()
        named = ("vision_keep_tokens", "vision_keep_rate", "use_vision_predictor", "use_output_text_predictor")
        assert {key: call[key] for key in named if key in call} == expected
        assert call["config"] == (True, True, 0.2)  # the config as saved: the call carries the settings
        text_off = "--no-output-text-predictor" in flags or "--no-sparsity" in flags
        assert ("generated tokens kept 0/0" in out) == text_off, out  # off: no generated token is scored
    # sampling and beams reach generate() too
    assert main(base + ["--do-sample", "--temperature", "0.7", "--top-k", "5", "--top-p", "0.9", "--seed", "1"]) == 0
    call = generate_calls.pop()
    assert (call["do_sample"], call["temperature"], call["top_k"], call["top_p"]) == (True, 0.7, 5, 0.9)
    assert main(base + ["--num-beams", "2"]) == 0
    assert generate_calls.pop()["num_beams"] == 2
    capsys.readouterr()


def test_evaluate_takes_the_sparsity_flags_and_shows_progress(capsys, generate_calls):
    from dynamic_llava.synthetic.evaluate import evaluate_synthetic

    assert main(["evaluate", "--n", "2", "--max-new-tokens", "2", "--vision-keep-tokens", "8"]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert result["n"] == 2 and result["vision_keep_rate"] == 8 / 64 and result["sparsity"] is True
    assert result["settings"] == {"vision_keep_tokens": 8}
    assert "evaluate" in captured.err and "question" in captured.err  # the progress bar (tqdm), on stderr
    assert generate_calls[-1]["vision_keep_tokens"] == 8 and generate_calls[-1]["config"] == (True, True, 0.2)
    assert main(["evaluate", "--n", "2", "--max-new-tokens", "2", "--no-sparsity", "--json"]) == 0
    dense = json.loads(capsys.readouterr().out)
    assert dense["sparsity"] is False and dense["vision_keep_rate"] == 1.0 and dense["output_text_keep_rate"] is None
    assert generate_calls[-1]["use_vision_predictor"] is False and generate_calls[-1]["config"] == (True, True, 0.2)
    with pytest.raises(ValueError, match="positive integer"):
        evaluate_synthetic(None, None, n=0)


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
        assert_fails(capsys, argv, message)
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    argv = list(args)
    argv[argv.index("--image") + 1] = str(corrupt)
    assert_fails(capsys, argv, "corrupt.png")


# ---- bad inputs: one line on stderr, exit code 2 ---------------------------------------------------------------------


@pytest.mark.parametrize("n", ["0", "-2", "two"])
def test_evaluate_refuses_a_bad_number_of_questions(capsys, n):
    assert_fails(capsys, ["evaluate", "--n", n], "dynamic-llava evaluate: error: argument --n:")


@pytest.fixture
def cpu_only_torch(monkeypatch):
    """torch as a CPU-only build sees itself (on any machine)."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.setattr(torch.version, "hip", None, raising=False)


@pytest.mark.parametrize("flag", ["--device-map", "--device"])
def test_generate_refuses_cuda_on_a_cpu_only_torch(capsys, cpu_only_torch, flag):
    argv = ["generate", "--prompt", "What colour is the object?", flag, "cuda"]
    assert_fails(capsys, argv, "CUDA is not available in this torch build", "--device cpu")
    assert_fails(capsys, ["generate", "--prompt", "hi", flag, "cuda:banana"], "is not a device")


def test_bench_refuses_cuda_on_a_cpu_only_torch(capsys, cpu_only_torch):
    assert_fails(capsys, ["bench", "--device", "cuda"], "CUDA is not available in this torch build", "--device cpu")


@pytest.mark.parametrize("flag", ["--load-in-4bit", "--load-in-8bit"])
@pytest.mark.parametrize("command", ["generate", "demo", "evaluate"])
def test_quantization_without_bitsandbytes_names_the_extra(capsys, monkeypatch, flag, command):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if it were not installed
    argv = [command, flag] + (["--prompt", "What colour is the object?"] if command == "generate" else [])
    assert_fails(capsys, argv, f"{flag} needs bitsandbytes", 'pip install -e ".[quant]"')


def test_a_prompt_longer_than_the_positions_is_refused_and_unknown_words_warned(tmp_path, capsys):
    question = " ".join(["colour"] * 5000)
    line = assert_fails(
        capsys, ["demo", "--question", question], "the prompt is 5,098 tokens", "512 positions", "shorten"
    )
    assert "max_position_embeddings" in line
    # the prompt fits, but not with --max-new-tokens more
    line = assert_fails(capsys, ["generate", "--prompt", " ".join(["colour"] * 400), "--max-new-tokens", "200"])
    assert "--max-new-tokens 200" in line and "or less" in line
    assert_fails(capsys, ["generate", "--prompt", "<image> What colour is it?"], "contains <image>", "--image")
    # out-of-vocabulary words: one warning naming how many, and the answer still comes
    argv = ["demo", "--question", "What colour is the zebra blorp?", "--max-new-tokens", "2", "--save"]
    assert main(argv + [str(tmp_path / "k.png")]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "not in the model's vocabulary" in line]
    assert len(warnings) == 1 and warnings[0].startswith("warning: 2 word(s)") and "'zebra', 'blorp'" in warnings[0]


@pytest.mark.parametrize("question", ["", "   "])
def test_demo_refuses_an_empty_question(capsys, question):
    assert_fails(capsys, ["demo", "--question", question], "--prompt/--question is empty")


def test_bad_model_folders_and_paths_say_what_they_are(tmp_path, capsys, images):
    (image, _), _ = images
    ask = ["generate", "--prompt", "What colour is the object?", "--image", image]
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("not a model")
    line = assert_fails(capsys, ask + ["--model", str(tmp_path / "notes")], "is not a model folder", "no config.json")
    assert "Expected a Dynamic-LLaVA folder" in line
    (tmp_path / "llava").mkdir()
    (tmp_path / "llava" / "config.json").write_text('{"model_type": "llava"}')
    assert_fails(capsys, ask + ["--model", str(tmp_path / "llava")], "holds a 'llava' model", "dynamic-llava convert")
    assert_fails(capsys, ask + ["--model", str(tmp_path / "nowhere")], "does not exist", "config.json")
    assert_fails(capsys, ask + ["--model", image], "is a file, not a model folder")
    assert_fails(capsys, ask + ["--image", str(tmp_path)], "is a directory")
    assert_fails(capsys, ["chat", "--image", str(tmp_path)], "is a directory")
    assert_fails(capsys, ["demo", "--save", str(tmp_path)], "--save", "is a directory")
    a_file = tmp_path / "data.txt"
    a_file.write_text("mine")
    assert_fails(capsys, ["synthetic-data", "--out", str(a_file)], "--out", "is a file")
    assert_fails(capsys, ["train-synthetic", "--out", str(a_file)], "--out", "is a file")
    assert_fails(capsys, ["export", str(tmp_path / "notes"), str(tmp_path / "x")], "is not a model folder")
    assert_fails(capsys, ["bench", "--out", str(a_file)], "--out", "is a file")
    assert_fails(capsys, ["convert", str(tmp_path / "src"), str(a_file)], "OUT", "is a file")
    assert_fails(capsys, ["export", str(tmp_path / "notes"), str(a_file)], "OUT_DIR", "is a file")
    train = ["train", "--data", "d.json", "--images", "imgs", "--model", str(tmp_path / "notes"), "--out", str(a_file)]
    assert_fails(capsys, train, "--out", "is a file")
    assert a_file.read_text() == "mine"


def test_other_usage_errors_are_one_line(capsys):
    assert_fails(capsys, ["evaluate", "--task", "vqa"], "unknown task 'vqa'")
    assert_fails(capsys, ["demo", "--bogus"], "unrecognized arguments: --bogus")
    assert_fails(capsys, ["generate"], "--prompt")  # required
    assert_fails(capsys, ["demo", "--temperature", "0.5"], "--temperature", "--do-sample")
    assert_fails(capsys, ["demo", "--vision-keep-tokens", "4", "--vision-keep-rate", "0.5"], "were both given")
    assert_fails(capsys, ["demo", "--vision-keep-rate", "0.5", "--no-sparsity"], "--no-sparsity")
    assert_fails(capsys, ["demo", "--vision-keep-rate", "1.5"], "(0, 1]")
    assert_fails(capsys, ["demo", "--max-new-tokens", "0"], "at least 1")
    assert_fails(capsys, ["demo", "--dtype", "float8"], "--dtype", "float8")
    assert_fails(capsys, ["demo", "--vision-keep-tokens", "65", "--max-new-tokens", "1"], "65", "at most 64")
    assert_fails(capsys, ["chat", "--num-beams", "2"], "--num-beams")
    assert_fails(capsys, ["bench", "--batch-sizes", "1,,8"], "comma-separated")


def test_bench_flags_reach_the_real_run_bench_signature(capsys, monkeypatch):
    import functools
    import inspect

    import dynamic_llava.bench.run as bench_run

    signature = inspect.signature(bench_run.run_bench)
    seen = {}

    @functools.wraps(bench_run.run_bench)  # the command reads run_bench's parameters: the real ones
    def fake_run_bench(*args, **kwargs):
        signature.bind(*args, **kwargs)  # the arguments the command passes fit the real run_bench
        seen.clear()
        seen.update(kwargs)
        return {}

    monkeypatch.setattr(bench_run, "run_bench", fake_run_bench)
    monkeypatch.setattr(bench_run, "format_table", lambda results: "the table")
    flags = ["--compile", "--memory-budget", "2", "--batch-sizes", "1,4", "--no-output-text-predictor"]
    flags += ["--decode-batch", "0", "--no-ragged", "--compile-batches", "1,2", "--compile-mode", "default"]
    flags += ["--count-steps", "16", "--seed", "3", "--no-progress", "--repeats", "2"]
    assert main(["bench", *flags, "--vision-keep-tokens", "8"]) == 0
    assert capsys.readouterr().out.strip() == "the table"
    assert seen == dict(
        seen,
        compiled=True,
        memory_budget_gb=2.0,
        throughput_batches=[1, 4],
        use_output_text_predictor=False,
        decode_batch=None,
        ragged=False,
        compile_batches=[1, 2],
        compile_mode="default",
        count_steps=16,
        seed=3,
        progress=False,
        repeats=2,
        vision_keep_tokens=8,
    )
    assert main(["bench"]) == 0  # the defaults: run_bench's own
    assert seen["compiled"] is None and seen["vision_keep_tokens"] is None and seen["decode_batch"] == 8
    assert main(["bench", "--vision-keep-rate", "0.25"]) == 0 and seen["vision_keep_rate"] == 0.25
    assert main(["bench", "--no-vision-predictor"]) == 0 and seen["use_vision_predictor"] is False
    assert main(["bench", "--no-sparsity"]) == 0
    assert (seen["use_vision_predictor"], seen["use_output_text_predictor"]) == (False, False)
    assert_fails(capsys, ["bench", "--vision-keep-rate", "0.25", "--vision-keep-tokens", "4"], "were both given")
    # a keep count with the vision predictor off cannot be honoured: refused, as in every other command
    line = assert_fails(capsys, ["bench", "--no-vision-predictor", "--vision-keep-tokens", "8"])
    assert "--vision-keep-tokens 8 applies only with use_vision_predictor=True, and --no-vision-predictor" in line
    # a per-call field that run_bench does not take cannot be measured: refused, not ignored; one it takes goes
    from dynamic_llava.cli import build_parser
    from dynamic_llava.cli.bench import run_bench_kwargs
    from dynamic_llava.cli.common import UsageError

    args = build_parser().parse_args(["bench", "--image-scorer", "attention"])
    accepted = set(signature.parameters) - {"image_scorer"}
    with pytest.raises(UsageError, match="--image-scorer attention: the bench cannot run it"):
        run_bench_kwargs(args, accepted)
    assert run_bench_kwargs(args, accepted | {"image_scorer"})["image_scorer"] == "attention"


# ---- flags: the sparsity flags are derived from the declaration (sparse_settings) -------------------------------


@pytest.fixture
def declared_extra_fields(monkeypatch):
    """Two per-call fields added to the declaration only (an int and a bool), as a new field would be."""
    from dynamic_llava import sparse_settings

    fields = {"vision_keep_min": "int | None", "use_extra_predictor": "bool | None"}
    for field, hint in fields.items():
        monkeypatch.setitem(sparse_settings.SparsityKwargs.__annotations__, field, hint)
    monkeypatch.setattr(sparse_settings, "PER_CALL_FIELDS", (*sparse_settings.PER_CALL_FIELDS, *fields))
    monkeypatch.setitem(sparse_settings.FIELD_HELP, "vision_keep_min", "the fewest image tokens kept per image")
    monkeypatch.setitem(sparse_settings.FIELD_HELP, "use_extra_predictor", "run the extra predictor")
    monkeypatch.setitem(sparse_settings.FIELD_CHECKS, "vision_keep_min", sparse_settings.FIELD_CHECKS["sparse_layer"])
    monkeypatch.setitem(
        sparse_settings.FIELD_CHECKS, "use_extra_predictor", sparse_settings.FIELD_CHECKS["use_vision_predictor"]
    )
    return fields


@pytest.mark.parametrize("command", ["demo", "generate", "chat", "evaluate", "bench"])
def test_a_field_added_to_the_declaration_is_a_flag_with_its_help_and_check(capsys, declared_extra_fields, command):
    from dynamic_llava.cli import build_parser
    from dynamic_llava.cli.common import sparsity_kwargs

    parser = build_parser()
    prompt = ["--prompt", "What colour is the object?"] if command == "generate" else []
    with pytest.raises(SystemExit):
        parser.parse_args([command, "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--vision-keep-min MIN the fewest image tokens kept per image" in help_text
    assert "--extra-predictor, --no-extra-predictor run the extra predictor: on / off" in help_text
    args = parser.parse_args([command, *prompt, "--vision-keep-min", "3", "--no-extra-predictor"])
    assert sparsity_kwargs(args) == {"vision_keep_min": 3, "use_extra_predictor": False}
    # its check is the declaration's: one line, exit code 2
    assert_fails(capsys, [command, *prompt, "--vision-keep-min", "0"], "vision_keep_min is 0, below 1")
    assert_fails(capsys, [command, *prompt, "--vision-keep-min", "many"], "vision_keep_min must be an integer")


def test_a_field_added_to_the_declaration_reaches_generate_and_run_bench(declared_extra_fields):
    import inspect

    from dynamic_llava.bench.run import run_bench
    from dynamic_llava.cli import build_parser
    from dynamic_llava.cli.bench import run_bench_kwargs
    from dynamic_llava.cli.common import UsageError, generation_kwargs

    args = build_parser().parse_args(["generate", "--prompt", "hi", "--vision-keep-min", "5", "--extra-predictor"])
    assert generation_kwargs(args) == dict(
        max_new_tokens=64, do_sample=False, num_beams=1, vision_keep_min=5, use_extra_predictor=True
    )
    args = build_parser().parse_args(["bench", "--vision-keep-min", "5"])
    accepted = set(inspect.signature(run_bench).parameters)
    with pytest.raises(UsageError, match="--vision-keep-min 5: the bench cannot run it"):
        run_bench_kwargs(args, accepted)  # this run_bench has no such parameter: refused, not ignored
    kwargs = run_bench_kwargs(args, accepted | set(declared_extra_fields))
    assert kwargs["vision_keep_min"] == 5 and kwargs["use_extra_predictor"] is None


def test_no_sparsity_is_the_declared_off(capsys, monkeypatch):
    from dynamic_llava import sparse_settings
    from dynamic_llava.cli import build_parser
    from dynamic_llava.cli.common import sparsity_kwargs

    parser = build_parser()
    for command in ("demo", "evaluate", "bench"):
        assert sparsity_kwargs(parser.parse_args([command, "--no-sparsity"])) == sparse_settings.SPARSITY_OFF
    monkeypatch.setattr(sparse_settings, "SPARSITY_OFF", {"use_vision_predictor": False})  # another "off"
    parser = build_parser()
    assert sparsity_kwargs(parser.parse_args(["demo", "--no-sparsity"])) == {"use_vision_predictor": False}
    with pytest.raises(SystemExit):
        parser.parse_args(["demo", "--help"])
    assert "--no-sparsity sparsity off: use_vision_predictor=False (" in " ".join(capsys.readouterr().out.split())
    args = parser.parse_args(["demo", "--no-sparsity", "--output-text-predictor"])
    assert sparsity_kwargs(args) == {"use_vision_predictor": False, "use_output_text_predictor": True}


@pytest.mark.parametrize(
    "flags, fragments",
    [
        (["--no-sparsity", "--vision-predictor"], ["--no-sparsity sets use_vision_predictor=False", "asks for"]),
        (["--no-sparsity", "--vision-keep-rate", "0.5"], ["--vision-keep-rate 0.5 applies only with", "--no-sparsity"]),
        (["--no-vision-predictor", "--vision-keep-tokens", "4"], ["--vision-keep-tokens 4", "--no-vision-predictor"]),
        (["--no-vision-predictor", "--image-scorer", "attention"], ["--image-scorer attention", "turns it off"]),
        (["--image-scorer", "fastv"], ["argument --image-scorer: image_scorer is 'fastv'", "'attention'"]),
    ],
)
def test_sparsity_conflicts_are_refused_alike_by_the_cli_and_the_shared_rule(capsys, flags, fragments):
    """The command line and `sparsity_request` (what lmms-eval and evaluate_synthetic call) refuse the same input."""
    from dynamic_llava.cli import build_parser
    from dynamic_llava.sparsity_options import sparsity_options, sparsity_request

    for command in ("demo", "evaluate"):
        assert_fails(capsys, [command, *flags], *fragments)
    try:  # the same request as keywords, as lmms-eval's model_args give it
        args = build_parser().parse_args(["demo", *flags])
    except SystemExit:  # a bad value: argparse refused it with the declaration's check, which the rule runs too
        capsys.readouterr()
        field, value = flags[0].lstrip("-").replace("-", "_"), flags[1]
        with pytest.raises(ValueError, match=f"{field} is {value!r}"):
            sparsity_request({field: value})
        return
    values = {option.field: getattr(args, option.field) for option in sparsity_options()}
    with pytest.raises(ValueError, match="pass one"):
        sparsity_request(values, args.no_sparsity)


def test_keep_tokens_and_rate_together_is_the_librarys_own_error_on_every_path(capsys, monkeypatch):
    from dynamic_llava.configuration_dynamic_llava import DynamicLlavaConfig
    from dynamic_llava.synthetic.evaluate import evaluate_synthetic

    from fixtures.tiny import tiny_inputs, tiny_model

    with pytest.raises(ValueError) as library:
        DynamicLlavaConfig().sparsity_settings(vision_keep_tokens=4, vision_keep_rate=0.5)
    message = str(library.value)
    assert "were both given" in message
    with pytest.raises(ValueError) as generate:
        tiny_model(0).generate(**tiny_inputs([(5, 6)]), max_new_tokens=2, vision_keep_tokens=4, vision_keep_rate=0.5)
    assert str(generate.value) == message
    with pytest.raises(ValueError) as evaluate:
        evaluate_synthetic(None, None, n=1, vision_keep_tokens=4, vision_keep_rate=0.5)
    assert str(evaluate.value) == message
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    both = ["--vision-keep-tokens", "4", "--vision-keep-rate", "0.5"]
    for argv in (["demo"], ["generate", "--prompt", "hi"], ["chat"], ["evaluate"], ["bench"]):
        line = assert_fails(capsys, argv + both)
        assert line == f"dynamic-llava {argv[0]}: error: {message}", line


# ---- package layout ------------------------------------------------------------------------------------------------


def test_hub_does_not_import_synthetic():
    """The demo model's location is below both (`package_data`): hub/ never imports synthetic/, so no cycle."""
    import ast

    root = Path(__file__).resolve().parents[1]
    for path in sorted((root / "hub").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                names = [(node.module or "").split(".")[0]] + [alias.name for alias in node.names]
                assert "synthetic" not in names, f"{path.name}:{node.lineno} imports synthetic"
            elif isinstance(node, ast.Import):
                assert not any(".synthetic" in alias.name for alias in node.names), f"{path.name}:{node.lineno}"


# ---- files: the umask's permissions --------------------------------------------------------------------------------


@pytest.fixture(params=[0o022, 0o027], ids=["umask-022", "umask-027"])
def umask(request):
    before = os.umask(request.param)
    yield request.param
    os.umask(before)


def modes(folder: Path) -> set[tuple[str, int]]:
    """(kind, permission bits) of a folder and everything in it."""
    found = {("dir", stat.S_IMODE(folder.stat().st_mode))}
    for path in folder.rglob("*"):
        found.add(("dir" if path.is_dir() else "file", stat.S_IMODE(path.stat().st_mode)))
    return found


def test_written_files_get_the_umask_permissions(tmp_path, capsys, umask):
    expected = {("dir", 0o777 & ~umask), ("file", 0o666 & ~umask)}
    assert main(["synthetic-data", "--out", str(tmp_path / "data"), "--n", "2"]) == 0
    assert modes(tmp_path / "data") == expected
    from dynamic_llava.package_data import DEMO_MODEL

    assert main(["export", str(DEMO_MODEL), str(tmp_path / "exported")]) == 0
    assert modes(tmp_path / "exported") == expected
    assert main(["demo", "--max-new-tokens", "1", "--save", str(tmp_path / "pictures" / "kept.png")]) == 0
    assert stat.S_IMODE((tmp_path / "pictures" / "kept.png").stat().st_mode) == 0o666 & ~umask
    capsys.readouterr()


# ---- --help, --version, serve ---------------------------------------------------------------------------------------

HELP_PROBE = r"""
import importlib, json, pkgutil, sys
heavy = lambda: sorted(m for m in ("torch", "transformers") if m in sys.modules)
report = {}
# the package: what `import dynamic_llava` loads
import dynamic_llava
report["package_heavy"] = heavy()
before = set(sys.modules)
# every module of the cli package, each command's own parser and its --help load neither
import dynamic_llava.cli as cli
report["modules"] = sorted(info.name for info in pkgutil.iter_modules(cli.__path__))
for name in report["modules"]:
    importlib.import_module(f"dynamic_llava.cli.{name}")
for command in sys.argv[1:]:
    try:
        cli.build_parser().parse_args([command, "--help"])
    except SystemExit as exit_:
        report.setdefault("isolated_exit", {})[command] = exit_.code
report["isolated_heavy"] = heavy()
for command in [None, *sys.argv[1:], "serve"]:
    try:
        code = cli.main(([command] if command else []) + ["--help"])  # serve returns its server's code
    except SystemExit as exit_:
        code = exit_.code
    report.setdefault("exit", {})[command or ""] = code
try:
    cli.main(["--version"])
except SystemExit as exit_:
    report["version_exit"] = exit_.code
report["cli_added_heavy"] = sorted(
    m for m in set(sys.modules) - before if m.split(".")[0] in ("torch", "transformers")
)
print("REPORT" + json.dumps(report))
"""


@pytest.fixture(scope="module")
def help_report():
    result = subprocess.run(
        [sys.executable, "-c", HELP_PROBE, *SUBCOMMANDS], capture_output=True, text=True, timeout=300, check=True
    )
    report = json.loads(result.stdout.split("REPORT", 1)[1])
    return report, result.stdout


@pytest.mark.slow
def test_every_help_answers_without_loading_torch_or_transformers(help_report):
    report, out = help_report
    # one module per command, the shared flags and what the commands share when they run
    commands = {command.replace("-", "_") for command in [*SUBCOMMANDS, "serve"]}
    assert set(report["modules"]) == commands | {"__main__", "common", "flags"}
    assert report["isolated_exit"] == {command: 0 for command in SUBCOMMANDS}
    assert report["exit"] == {command: 0 for command in ["", *SUBCOMMANDS, "serve"]}
    from importlib.metadata import version

    assert report["version_exit"] == 0 and f"dynamic-llava {version('dynamic-llava')}\n" in out
    for command in [*SUBCOMMANDS, "serve"]:
        assert f"usage: dynamic-llava {command}" in out
    assert report["isolated_heavy"] == []  # every cli module imports them inside the commands only
    assert report["cli_added_heavy"] == []
    if report["package_heavy"]:
        pytest.xfail(
            f"dynamic_llava/__init__.py imports {report['package_heavy']} at import time (to register the Auto "
            "classes), so `dynamic-llava --help` loads them before the cli runs"
        )


@pytest.mark.slow
def test_console_script_is_installed():
    result = subprocess.run(
        [sys.executable, "-m", "dynamic_llava.cli", "--help"], capture_output=True, text=True, check=True
    )
    assert "demo" in result.stdout and "chat" in result.stdout and "serve" in result.stdout


def test_version_is_the_installed_package_version(capsys):
    from importlib.metadata import version

    assert run(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"dynamic-llava {version('dynamic-llava')}"


def test_serve_passes_every_argument_to_the_server(capsys, monkeypatch):
    import types

    seen = []
    fake = types.ModuleType("dynamic_llava.serving")
    fake.main = lambda argv: seen.append(argv) or 7
    monkeypatch.setitem(sys.modules, "dynamic_llava.serving", fake)
    assert main(["serve", "--port", "8000", "--model", "x", "--help"]) == 7
    assert seen == [["--port", "8000", "--model", "x", "--help"]]


def test_serve_help_exits_0(capsys):
    assert run(["serve", "--help"]) == 0
    assert "usage" in capsys.readouterr().out.lower()


# ---- export ---------------------------------------------------------------------------------------------------------


def test_export_names_the_demo_model_by_default_and_keeps_its_card(tmp_path, capsys):
    from dynamic_llava.package_data import DEMO_MODEL

    assert main(["export", str(tmp_path / "exported")]) == 0
    assert (tmp_path / "exported" / "README.md").read_text() == (DEMO_MODEL / "README.md").read_text()
    assert (tmp_path / "exported" / "model.safetensors").is_file()
    capsys.readouterr()


def test_export_refuses_a_non_empty_output_folder_before_loading(tmp_path, capsys, monkeypatch):
    import dynamic_llava.hub.loading as loading

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded before the output folder was checked")

    monkeypatch.setattr(loading, "model_folder", never)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    assert_fails(capsys, ["export", str(tmp_path / "out")], "exists and is not empty", "--overwrite")
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"
