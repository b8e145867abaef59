"""`dynamic-llava serve` (run as `python -m dynamic_llava.cli serve`): transformers' OpenAI-compatible server
in a subprocess on 127.0.0.1 (a free port, a bounded wait for /health, always stopped), serving an exported copy of
the demo model; image chat completions (a PNG data URL) non-streaming, streaming (SSE) and 4 at once, each answer
equal to local greedy `generate()` on the same messages; `--continuous-batching` and `--compile` refused in one line.

The reference applies the processor's chat template to the messages the server makes of the OpenAI request (an
`image_url` part becomes `{"type": "image", "url": <the data URL>}`), greedy, the same `max_new_tokens`, decoded with
`skip_special_tokens=True`. transformers 4.57's server answers in SSE even for `"stream": false`; the client reads
both.
"""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

import torch  # noqa: E402

from dynamic_llava.hub.export import export_model  # noqa: E402
from dynamic_llava.hub.loading import load_local  # noqa: E402
from dynamic_llava.package_data import DEMO_MODEL  # noqa: E402
from dynamic_llava.synthetic import IMAGE_SIZE  # noqa: E402
from dynamic_llava.synthetic.task import make_sample, sample_rng  # noqa: E402

pytestmark = pytest.mark.slow

MAX_TOKENS = 24
CONCURRENT = 4
READY_TIMEOUT_S = 300
REQUEST_TIMEOUT_S = 300


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "dynamic_llava.cli", "serve", *args]  # the `dynamic-llava serve` command


def server_env() -> dict[str, str]:
    return dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")


def questions(n: int) -> list[dict]:
    out = []
    for i in range(n):
        sample = make_sample(sample_rng(7, i), IMAGE_SIZE)
        buffer = io.BytesIO()
        sample["image"].save(buffer, format="PNG")
        url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
        out.append({"question": sample["question"], "url": url})
    return out


def openai_messages(item: dict) -> list[dict]:
    content = [{"type": "image_url", "image_url": {"url": item["url"]}}, {"type": "text", "text": item["question"]}]
    return [{"role": "user", "content": content}]


def hf_messages(item: dict) -> list[dict]:
    content = [{"type": "image", "url": item["url"]}, {"type": "text", "text": item["question"]}]
    return [{"role": "user", "content": content}]


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    return export_model(DEMO_MODEL, tmp_path_factory.mktemp("serve") / "model")


@pytest.fixture(scope="module")
def items() -> list[dict]:
    return questions(2 + CONCURRENT)


@pytest.fixture(scope="module")
def references(exported, items) -> list[dict]:
    model, processor = load_local(exported, dtype=torch.float32)
    model.eval()
    saved = torch.get_num_threads()
    torch.set_num_threads(1)  # as the server process (OMP_NUM_THREADS=1)
    try:
        answers = []
        for item in items:
            inputs = processor.apply_chat_template(
                hf_messages(item), add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
            )
            with torch.no_grad():
                out = model.generate(**inputs, max_new_tokens=MAX_TOKENS, do_sample=False)
            generated = out[0, inputs["input_ids"].shape[1] :]
            answers.append(
                {
                    "text": processor.decode(generated, skip_special_tokens=True),
                    "completion_tokens": int(generated.shape[0]),
                    "prompt_tokens": int(inputs["input_ids"].shape[1]),
                }
            )
        return answers
    finally:
        torch.set_num_threads(saved)


@pytest.fixture(scope="module")
def server(exported, tmp_path_factory):
    port = free_port()
    log_path = tmp_path_factory.mktemp("serve_log") / "server.log"
    log = open(log_path, "w")  # noqa: SIM115  (closed below)
    command = serve_command(str(exported), "--host", "127.0.0.1", "--port", str(port), "--device", "cpu")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=server_env())
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            if process.poll() is not None:
                pytest.fail(f"the server exited ({process.returncode}) before it was ready:\n{log_path.read_text()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the server was not ready after {READY_TIMEOUT_S} s:\n{log_path.read_text()}")
            time.sleep(0.25)
        yield {"port": port, "model": str(exported), "log": log_path}
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=30)
        log.close()


def chat(server: dict, item: dict, stream: bool) -> dict:
    """POST /v1/chat/completions; the answer text, finish reason, usage, and how it came (SSE or JSON)."""
    body = {"model": server["model"], "messages": openai_messages(item), "max_tokens": MAX_TOKENS, "stream": stream}
    request = urllib.request.Request(
        f"http://127.0.0.1:{server['port']}/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_S) as response:
        content_type = response.headers.get("content-type", "")
        raw = response.read().decode()
    if content_type.startswith("text/event-stream"):
        return parse_sse(raw)
    data = json.loads(raw)
    usage = data.get("usage") or {}
    return {
        "text": data["choices"][0]["message"]["content"],
        "completion_tokens": usage.get("completion_tokens"),
        "prompt_tokens": usage.get("prompt_tokens"),
        "chunks": None,
        "errors": [],
    }


def parse_sse(raw: str) -> dict:
    text, usage, chunks, errors = [], {}, 0, []
    for line in raw.splitlines():
        if not line.startswith("data:"):
            continue
        payload = line[len("data:") :].strip()
        if payload == "[DONE]":
            continue
        event = json.loads(payload)
        if "error" in event:
            errors.append(event["error"])
            continue
        chunks += 1
        for choice in event.get("choices", []):
            content = (choice.get("delta") or {}).get("content")
            if content:
                text.append(content)
        usage = event.get("usage") or usage
    return {
        "text": "".join(text),
        "completion_tokens": usage.get("completion_tokens"),
        "prompt_tokens": usage.get("prompt_tokens"),
        "chunks": chunks,
        "errors": errors,
    }


def assert_equal(got: dict, expected: dict, what: str) -> None:
    assert not got["errors"], f"{what}: {got['errors']}"
    assert got["text"] == expected["text"], what
    for key in ("completion_tokens", "prompt_tokens"):  # where the server reports usage (5.5+)
        if got[key] is not None:
            assert got[key] == expected[key], f"{what}: {key}"


def test_chat_completions_equal_local_generate(server, items, references):
    got = chat(server, items[0], stream=False)
    assert_equal(got, references[0], "non-streaming")
    got = chat(server, items[1], stream=True)
    assert_equal(got, references[1], "streaming")
    assert got["chunks"] > 1  # streamed in pieces
    assert_equal(chat(server, items[0], stream=True), references[0], "streaming, the non-streaming prompt")

    barrier = threading.Barrier(CONCURRENT)
    results: list = [None] * CONCURRENT

    def ask(i: int) -> None:
        barrier.wait()
        try:
            results[i] = chat(server, items[2 + i], stream=i % 2 == 1)
        except Exception as error:  # reported below
            results[i] = error

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(CONCURRENT)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=REQUEST_TIMEOUT_S + 60)
    for i, result in enumerate(results):
        assert isinstance(result, dict), f"concurrent request {i}: {result!r}\n{server['log'].read_text()[-3000:]}"
        assert_equal(result, references[2 + i], f"concurrent request {i}")


def test_continuous_batching_refused():
    """In a real process: exit status 2 and one line on stderr, before anything is loaded."""
    process = subprocess.run(
        serve_command(str(DEMO_MODEL), "--port", str(free_port()), "--continuous-batching"),
        capture_output=True,
        text=True,
        timeout=300,
        env=server_env(),
    )
    lines = [line for line in process.stderr.splitlines() if line.strip()]
    assert process.returncode == 2, process.stderr
    assert len(lines) == 1, lines
    assert lines[0].startswith("dynamic-llava serve: error: --continuous-batching is not supported: "), lines


def test_compile_refused_help_and_not_a_model(tmp_path, capsys):
    from dynamic_llava.serving import main

    assert main([str(DEMO_MODEL), "--compile"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dynamic-llava serve: error: --compile is not supported: ")
    assert main(["--help"]) == 0
    assert capsys.readouterr().out.startswith("usage: dynamic-llava serve ")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava"}))
    assert main([str(tmp_path), "--port", str(free_port())]) == 2
    assert "holds a 'llava' model, not one of" in capsys.readouterr().err
    assert main([str(tmp_path / "missing"), "--port", str(free_port())]) == 2
    assert "cannot read the config" in capsys.readouterr().err


def test_flags_are_parsed_before_torch_and_transformers_load():
    code = (
        "import sys\n"
        "from dynamic_llava.serving import main\n"
        "codes = [main(['--help']), main(['x', '--continuous-batching']), main(['x', '--compile'])]\n"
        "assert codes == [0, 2, 2], codes\n"
        "heavy = [name for name in ('torch', 'transformers') if name in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    process = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert process.returncode == 0, process.stderr


def test_the_installed_transformers_server_generation_has_an_adapter():
    """Feature detection finds the installed server's generation, and its adapter imports (the adapters import
    transformers' serving classes at module level: only the installed generation's can)."""
    import importlib

    from dynamic_llava.serving.server import GENERATIONS, server_generation

    adapter = server_generation()
    assert adapter in [name for name, _, _ in GENERATIONS]
    assert callable(importlib.import_module(f"dynamic_llava.serving.{adapter}").run)


def test_a_server_generation_no_adapter_knows_is_refused_with_the_version_and_the_alternative(capsys, monkeypatch):
    import transformers

    from dynamic_llava.serving import main, server

    monkeypatch.setattr(server, "GENERATIONS", (("future", "transformers.cli.serving.engine", "EngineV2"),))
    assert main([str(DEMO_MODEL), "--port", str(free_port())]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"dynamic-llava serve: error: transformers {transformers.__version__}'s server is none")
    assert "transformers.cli.serving.engine.EngineV2" in lines[0]
    assert "docs/integrations.md" in lines[0] and "dynamic-llava chat" in lines[0]
