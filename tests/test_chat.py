"""`dynamic-llava chat`: a multi-turn conversation kept in the model's cache, with the embedded demo model, read from
piped stdin and from a pseudo-terminal.

The references: a second answer through the cache equals the Python API's multi-turn (the first turn's returned cache
passed back with the whole conversation's ids); and, with `--no-output-text-predictor` (every generated token
cached), it equals one fresh `generate()` of the whole conversation. (With the output-text predictor on, the tokens of
the first answer it dropped are absent from the cached conversation but present in a fresh prefill, so a fresh
generate is not the reference then.)
"""

import io
import json
import os
import pty
import re
import select
import subprocess
import sys
import time

import pytest
import torch

from dynamic_llava.cli import main
from dynamic_llava.transformers_compat import CACHE_KEY, cache_from_output

QUESTIONS = ("What colour is the object?", "Where is the shape?")
NEW_TOKENS = 8
CHAT = [sys.executable, "-m", "dynamic_llava.cli", "chat", "--max-new-tokens", str(NEW_TOKENS)]
SUMMARY = re.compile(r"cache ([\d,]+) tokens, this turn fed ([\d,]+)")


@pytest.fixture(scope="module")
def demo():
    from dynamic_llava.hub.loading import load_for_eval

    return load_for_eval(None)


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    import random

    from dynamic_llava.synthetic.task import make_sample

    folder = tmp_path_factory.mktemp("chat-images")
    paths = []
    for seed in (3, 5):
        path = folder / f"sample{seed}.png"
        make_sample(random.Random(seed), 64)["image"].save(path)
        paths.append(str(path))
    return paths


def user(images, text):
    return {"role": "user", "content": [{"type": "image"} for _ in images] + [{"type": "text", "text": text}]}


def assistant(text):
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


def fresh_answer(demo, turns, **sparsity):
    """One generate() of the whole conversation `turns` ([(images, prompt, answer), ...], the last answer None):
    its answer to the last turn."""
    model, processor = demo
    messages, images = [], []
    for turn_images, prompt, answer in turns:
        messages.append(user(turn_images, prompt))
        images += turn_images
        if answer is not None:
            messages.append(assistant(answer))
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=images or None, text=text, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, **sparsity)
    return processor.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def api_two_turns(demo, image):
    """The Python API's multi-turn: turn 1, then turn 2 with the returned cache passed back (default sparsity).
    Returns both answers and the cache length after each turn."""
    model, processor = demo
    first = processor.apply_chat_template([user([image], QUESTIONS[0])], add_generation_prompt=True)
    inputs = processor(images=[image], text=first, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, return_dict_in_generate=True)
    cache = cache_from_output(out)
    length_1 = cache.get_seq_length()
    answer_1 = processor.decode(out.sequences[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()
    conversation = [user([image], QUESTIONS[0]), assistant(answer_1), user([], QUESTIONS[1])]
    whole = processor.apply_chat_template(conversation, add_generation_prompt=True)
    ids = processor(images=[image], text=whole, return_tensors="pt")["input_ids"]
    assert torch.equal(ids[:, : out.sequences.shape[1]], out.sequences)  # the conversation extends what was generated
    with torch.no_grad():
        second = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            return_dict_in_generate=True,
            **{CACHE_KEY: cache},
        )
    answer_2 = processor.decode(second.sequences[0, ids.shape[1] :], skip_special_tokens=True).strip()
    return (answer_1, answer_2), (length_1, cache_from_output(second).get_seq_length())


def json_lines(text):
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def test_chat_keeps_the_conversation_in_the_cache(demo, pictures, capsys, monkeypatch):
    """Piped stdin, in-process, default sparsity: the second turn feeds only its own tokens through the first turn's
    cache and answers what the Python API's multi-turn answers; /reset starts over; /exit ends."""
    lines = [*QUESTIONS, "/reset", QUESTIONS[0], "/exit", "never asked"]
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(lines) + "\n"))
    assert main(["chat", "--image", pictures[0], "--json", "--max-new-tokens", str(NEW_TOKENS)]) == 0
    turns = json_lines(capsys.readouterr().out)
    assert [turn["turn"] for turn in turns] == [1, 2, 1]
    first, second, again = turns
    (answer_1, answer_2), (length_1, length_2) = api_two_turns(demo, pictures[0])
    assert (first["answer"], second["answer"]) == (answer_1, answer_2)
    assert (first["cache_length"], second["cache_length"]) == (length_1, length_2)
    assert first["cache_length_before"] == 0 and first["fed_tokens"] == first["conversation_tokens"] - NEW_TOKENS
    # turn 2 starts from turn 1's cache and feeds only the last answer token and its own few tokens
    assert second["cache_length_before"] == first["cache_length"] < second["cache_length"]
    assert second["fed_tokens"] == second["conversation_tokens"] - NEW_TOKENS - first["cache_length"]
    assert 0 < second["fed_tokens"] < 20 < first["fed_tokens"]
    assert second["sparsity"]["output_text_scored"][0] > first["sparsity"]["output_text_scored"][0]
    assert second["sparsity"]["vision_tokens_kept"] == [[12]] and second["images"] == []
    # /reset: the same first turn again, from an empty cache, with the --image image again
    assert again["answer"] == first["answer"] and again["cache_length_before"] == 0 and again["images"] == pictures[:1]


def test_chat_adds_an_image_mid_conversation_and_streams(demo, pictures, tmp_path, capsys, monkeypatch):
    """Text output (streamed), a second image added with /image for the second turn: the answer equals a fresh
    generate of the whole conversation (every generated token cached). Bad lines are one error each; the chat goes
    on, and exits 2 at the end of piped input."""
    from transformers import TextStreamer

    from dynamic_llava.modeling_dynamic_llava import DynamicLlavaForConditionalGeneration

    streamers = []
    original = DynamicLlavaForConditionalGeneration.generate

    def spy(self, *args, **kwargs):
        streamers.append(kwargs.get("streamer"))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(DynamicLlavaForConditionalGeneration, "generate", spy)
    lines = [QUESTIONS[0], f"/image {tmp_path}", "/nonsense", f"/image {pictures[1]}", QUESTIONS[1]]
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(lines) + "\n"))
    argv = ["chat", "--image", pictures[0], "--max-new-tokens", str(NEW_TOKENS), "--no-output-text-predictor"]
    assert main(argv) == 2  # two bad lines in piped input
    captured = capsys.readouterr()
    answers = [
        line[len("ASSISTANT: ") :].strip() for line in captured.out.splitlines() if line.startswith("ASSISTANT:")
    ]
    summaries = [line for line in captured.out.splitlines() if line.startswith("[sparsity]")]
    assert len(answers) == 2 and len(summaries) == 2
    assert "vision tokens kept 12/64" in summaries[0] and "vision tokens kept 24/128" in summaries[1]
    (length_1, _), (length_2, fed_2) = [
        tuple(int(n.replace(",", "")) for n in SUMMARY.search(s).groups()) for s in summaries
    ]
    assert length_2 > length_1 and fed_2 < length_2 - length_1 + 1
    assert all(isinstance(streamer, TextStreamer) for streamer in streamers) and len(streamers) == 2
    turns = [([pictures[0]], QUESTIONS[0], answers[0]), ([pictures[1]], QUESTIONS[1], None)]
    assert answers[1] == fresh_answer(demo, turns, use_output_text_predictor=False)
    errors = [line for line in captured.err.splitlines() if line.startswith("dynamic-llava chat: error:")]
    assert len(errors) == 2 and "is a directory" in errors[0] and "unknown command /nonsense" in errors[1]


@pytest.mark.slow
def test_chat_through_piped_stdin(demo, pictures):
    """A fresh process, stdin a pipe: one line per turn, end of input ends; one JSON line per turn."""
    command = CHAT + ["--image", pictures[0], "--json", "--no-output-text-predictor"]
    result = subprocess.run(command, input="\n".join(QUESTIONS) + "\n", capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    first, second = json_lines(result.stdout)
    assert second["cache_length_before"] == first["cache_length"] < second["cache_length"]
    assert second["fed_tokens"] < 20 < first["fed_tokens"]
    turns = [([pictures[0]], QUESTIONS[0], first["answer"]), ([], QUESTIONS[1], None)]
    assert second["answer"] == fresh_answer(demo, turns, use_output_text_predictor=False)
    assert first["answer"] == fresh_answer(demo, [([pictures[0]], QUESTIONS[0], None)], use_output_text_predictor=False)


class Terminal:
    """A process on a pseudo-terminal (stdin, stdout and stderr), read as it writes."""

    def __init__(self, command):
        self.master, slave = pty.openpty()
        self.process = subprocess.Popen(command, stdin=slave, stdout=slave, stderr=slave, close_fds=True)
        os.close(slave)
        self.transcript = b""

    def wait_for(self, pattern: bytes, count: int, timeout: float = 180) -> None:
        """Read until `pattern` has appeared `count` times."""
        deadline = time.monotonic() + timeout
        while self.transcript.count(pattern) < count:
            left = deadline - time.monotonic()
            assert left > 0, f"timed out waiting for {pattern!r} x{count}: {self.transcript.decode(errors='replace')}"
            if select.select([self.master], [], [], left)[0]:
                try:
                    chunk = os.read(self.master, 4096)
                except OSError:  # EIO: the process closed the terminal
                    chunk = b""
                assert chunk, f"the process ended: {self.transcript.decode(errors='replace')}"
                self.transcript += chunk

    def type(self, text: bytes) -> None:
        os.write(self.master, text)

    def finish(self, timeout: float = 60) -> int:
        code = self.process.wait(timeout=timeout)
        while select.select([self.master], [], [], 0.1)[0]:
            try:
                chunk = os.read(self.master, 4096)
            except OSError:
                break
            if not chunk:
                break
            self.transcript += chunk
        os.close(self.master)
        return code


@pytest.mark.slow
def test_chat_through_a_pseudo_terminal(demo, pictures):
    """A fresh process on a terminal: a prompt per turn, the answer streamed, the sparsity line; Ctrl-D ends."""
    terminal = Terminal(CHAT + ["--image", pictures[0], "--no-output-text-predictor"])
    try:
        for turn, question in enumerate(QUESTIONS, start=1):
            terminal.wait_for(b"USER: ", turn)
            terminal.type(question.encode() + b"\n")
            terminal.wait_for(b"this turn fed", turn)
        terminal.wait_for(b"USER: ", 3)
        terminal.type(b"\x04")  # Ctrl-D: end of input
        assert terminal.finish() == 0
    finally:
        if terminal.process.poll() is None:
            terminal.process.kill()
    text = terminal.transcript.decode().replace("\r\n", "\n")
    answers = [line.split("ASSISTANT: ", 1)[1].strip() for line in text.splitlines() if "ASSISTANT: " in line]
    summaries = [SUMMARY.search(line) for line in text.splitlines() if SUMMARY.search(line)]
    assert len(answers) == 2 and len(summaries) == 2, text
    (length_1, fed_1), (length_2, fed_2) = [tuple(int(n.replace(",", "")) for n in m.groups()) for m in summaries]
    assert length_2 > length_1 and fed_2 < 20 < fed_1
    turns = [([pictures[0]], QUESTIONS[0], answers[0]), ([], QUESTIONS[1], None)]
    assert answers[0] == fresh_answer(demo, [([pictures[0]], QUESTIONS[0], None)], use_output_text_predictor=False)
    assert answers[1] == fresh_answer(demo, turns, use_output_text_predictor=False)


def test_chat_refuses_a_turn_longer_than_the_positions_and_goes_on(pictures, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{QUESTIONS[0]}\n"))
    assert main(["chat", "--image", pictures[0], "--max-new-tokens", "500"]) == 2  # a refused turn in piped input
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if line.startswith("dynamic-llava chat: error:")]
    assert len(errors) == 1 and "--max-new-tokens 500" in errors[0] and "/reset starts over" in errors[0]
    assert "ASSISTANT:" not in captured.out


def test_chat_reports_an_unreadable_image_at_once_and_does_not_keep_it(tmp_path, capsys, monkeypatch):
    """`/image` of a file that is not an image: the error comes at that line (not at the next message), and the next
    message goes without it; `--image` of such a file is refused before the model loads."""
    corrupt = tmp_path / "notes.png"
    corrupt.write_text("not an image")
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"/image {corrupt}\n{QUESTIONS[0]}\n"))
    assert main(["chat", "--max-new-tokens", "4"]) == 2
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if line.startswith("dynamic-llava chat: error:")]
    assert len(errors) == 1 and "Could not read the image file" in errors[0] and "notes.png" in errors[0]
    summaries = [line for line in captured.out.splitlines() if line.startswith("[sparsity]")]
    assert len(summaries) == 1 and "vision tokens kept no image" in summaries[0]
    assert main(["chat", "--image", str(corrupt)]) == 2
    assert "Could not read the image file" in capsys.readouterr().err
