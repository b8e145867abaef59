"""lmms-eval 0.7.3 runs Dynamic-LLaVA: its real CLI (`python -m lmms_eval`, the code path of the `lmms-eval` command)
in a fresh process, offline, on the local synthetic task written by `write_synthetic_task`, with the embedded demo
model.

- `--model dynamic_llava` (our entry point; float32 as stored; `vision_keep_tokens` per call; batch 4): the accuracy
  and the keep rates equal `evaluate_synthetic` on the same questions, and the sparsity numbers are in the score table
  and in the throughput summary of the results JSON.
- `--model huggingface ... trust_remote_code=True` (lmms-eval's generic model, on an exported copy: it loads with
  `AutoModel`, which the exported `auto_map` names, and calls the processor with `audios=[]`, which the processor
  drops). That path always loads in bfloat16 (hard-coded in lmms-eval), so it is compared with `evaluate_synthetic`
  on the model loaded in bfloat16: both run the same computation (same weights cast to bfloat16, the predictors kept
  in float32; the same prompt, since the chat template renders `vicuna_prompt`; the same batches of 4 in doc order,
  left padded; greedy), and the test checks that, answer by answer, before comparing the accuracy.

Both reference computations run with one intra-op thread, as the lmms-eval processes do (`OMP_NUM_THREADS=1`).
lmms-eval exits 0 even when the evaluation raised, so a run counts only with its results file.
"""

from __future__ import annotations

import contextlib
import glob
import json
import math
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

pytest.importorskip("lmms_eval")

import torch  # noqa: E402

from dynamic_llava.hub.export import export_model  # noqa: E402
from dynamic_llava.hub.loading import load_local  # noqa: E402
from dynamic_llava.integrations.lmms_eval import (  # noqa: E402
    DynamicLlava,
    manifests,
    sparsity_arguments,
    write_synthetic_task,
)
from dynamic_llava.package_data import DEMO_MODEL  # noqa: E402
from dynamic_llava.synthetic import IMAGE_SIZE  # noqa: E402
from dynamic_llava.synthetic.evaluate import evaluate_synthetic  # noqa: E402
from dynamic_llava.synthetic.task import is_correct, make_sample, prompt_inputs, sample_rng  # noqa: E402

pytestmark = pytest.mark.slow

N, SEED, BATCH = 20, 1, 4
KEEP = 8  # vision tokens per image, per call (the demo model's config keeps 12 of 64)


@contextlib.contextmanager
def one_thread():
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("lmms_eval")


@pytest.fixture(scope="module")
def task_dir(work) -> Path:
    return write_synthetic_task(work / "task", n=N, seed=SEED)


def run_lmms_eval(work: Path, name: str, model: str, model_args: str, task_dir: Path) -> dict:
    """`python -m lmms_eval ...` in a fresh process, offline; returns the results JSON and the samples by doc id."""
    out = work / name
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        HF_HOME=str(work / "hf_home"),  # dataset cache and remote-code modules of this test only
        OMP_NUM_THREADS="1",  # two spinning OpenMP threads on a busy 2-core machine make generation 20-50x slower
        TOKENIZERS_PARALLELISM="false",
    )
    command = [
        sys.executable, "-m", "lmms_eval",
        "--model", model, "--model_args", model_args,
        "--tasks", "synthetic_shapes", "--include_path", str(task_dir),
        "--batch_size", str(BATCH), "--device", "cpu",
        "--output_path", str(out), "--log_samples", "--verbosity", "WARNING",
    ]  # fmt: skip
    process = subprocess.run(command, env=env, cwd=work, capture_output=True, text=True, timeout=900)
    log = process.stdout + process.stderr
    (work / f"{name}.log").write_text(log)
    results = sorted(glob.glob(str(out / "*" / "*_results.json")))
    assert process.returncode == 0 and results, f"lmms-eval run {name} failed:\n{log[-6000:]}"
    samples_files = sorted(glob.glob(str(out / "*" / "*_samples_synthetic_shapes.jsonl")))
    samples = {}
    for line in Path(samples_files[-1]).read_text().splitlines():
        sample = json.loads(line)
        samples[sample["doc_id"]] = sample
    return {"results": json.loads(Path(results[-1]).read_text()), "samples": samples, "log": log}


def reference_texts(model, processor, batch_size: int = BATCH) -> list[str]:
    """The greedy answers `evaluate_synthetic` computes for the same questions (its inputs, batches and decoding)."""
    texts = []
    for first in range(0, N, batch_size):
        samples = [make_sample(sample_rng(SEED, i), IMAGE_SIZE) for i in range(first, min(N, first + batch_size))]
        inputs = prompt_inputs(processor, samples)
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=64, do_sample=False)
        texts += processor.tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    return texts


@pytest.mark.parametrize("base", ["llava", "qwen2_5_vl"])
def test_plugin_run_equals_evaluate(work, task_dir, base):
    """`--model dynamic_llava` with `vision_keep_tokens` per call, batch 4, on each shipped demo model (the folder's
    chat template renders the task's messages): accuracy and keep rates = evaluate."""
    from dynamic_llava.package_data import DEMO_MODELS
    from dynamic_llava.synthetic.bases import TOKENS_PER_IMAGE

    folder = DEMO_MODELS[base]
    run = run_lmms_eval(
        work, f"plugin-{base}", "dynamic_llava", f"pretrained={folder},vision_keep_tokens={KEEP}", task_dir
    )
    model, processor = load_local(folder, dtype=torch.float32)
    model.eval()
    saved = model.config.vision_keep_tokens
    model.config.vision_keep_tokens = KEEP  # what the per-call argument sets, for evaluate_synthetic's calls
    try:
        with one_thread():
            expected = evaluate_synthetic(model, processor, n=N, seed=SEED, batch_size=BATCH)
    finally:
        model.config.vision_keep_tokens = saved

    scores = run["results"]["results"]["synthetic_shapes"]
    assert len(run["samples"]) == N
    assert scores["accuracy,none"] == expected["accuracy"]
    # the sparsity actually achieved, next to the score and in the throughput summary
    assert scores["vision_tokens_kept,none"] == KEEP
    assert scores["vision_keep_rate,none"] == expected["vision_keep_rate"] == KEEP / TOKENS_PER_IMAGE
    assert math.isclose(scores["output_text_keep_rate,none"], expected["output_text_keep_rate"], rel_tol=1e-12)
    assert 0 < scores["kv_bytes_ratio,none"] < 1
    throughput = run["results"]["throughput"]
    assert throughput["avg_dl_vision_tokens_kept_per_image"] == KEEP
    assert math.isclose(throughput["avg_dl_output_text_keep_rate"], expected["output_text_keep_rate"], rel_tol=1e-12)
    assert throughput["avg_dl_output_text_scored"] == expected["output_text_scored"]
    assert 0 < throughput["avg_dl_kv_stored_bytes"] < throughput["avg_dl_kv_dense_bytes"]
    assert math.isclose(
        throughput["avg_dl_kv_bytes_ratio"],
        throughput["avg_dl_kv_stored_bytes"] / throughput["avg_dl_kv_dense_bytes"],
        rel_tol=1e-9,
    )
    assert math.isclose(throughput["avg_dl_kv_bytes_ratio"], scores["kv_bytes_ratio,none"], rel_tol=1e-9)
    for doc_id, sample in run["samples"].items():  # per sample, in --log_samples
        assert sample["vision_keep_rate"] == [KEEP, TOKENS_PER_IMAGE], doc_id
    assert "Throughput Summary" in run["log"] and "avg_dl_kv_bytes_ratio" in run["log"]


def test_generic_huggingface_path_equals_evaluate_in_bfloat16(work, task_dir):
    """`--model huggingface` with trust_remote_code on an exported copy: lmms-eval forces bfloat16, so the reference
    is `evaluate_synthetic` on the model loaded in bfloat16 (answer by answer, then the accuracy)."""
    exported = export_model(DEMO_MODEL, work / "exported")
    auto_map = json.loads((exported / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModel"] == "modeling_dynamic_llava.DynamicLlavaForConditionalGeneration"
    run = run_lmms_eval(
        work, "generic", "huggingface", f"pretrained={exported},trust_remote_code=True,device_map=cpu", task_dir
    )
    model, processor = load_local(DEMO_MODEL, dtype=torch.bfloat16)
    model.eval()
    with one_thread():
        texts = reference_texts(model, processor)
        expected = evaluate_synthetic(model, processor, n=N, seed=SEED, batch_size=BATCH)
    answers = [run["samples"][i]["filtered_resps"] for i in range(N)]
    assert [a.strip() for a in answers] == [t.strip() for t in texts]
    samples = [make_sample(sample_rng(SEED, i), IMAGE_SIZE) for i in range(N)]
    assert sum(is_correct(t, s) for t, s in zip(texts, samples, strict=True)) == expected["correct"]
    assert run["results"]["results"]["synthetic_shapes"]["accuracy,none"] == expected["accuracy"]
    # the generic model reports no sparsity: the task's rows are NaN there
    assert math.isnan(run["results"]["results"]["synthetic_shapes"]["vision_tokens_kept,none"])


def test_entry_point_and_model_args():
    """The entry point resolves to our classes; model_args are checked before any data is loaded."""
    (point,) = [ep for ep in metadata.entry_points(group="lmms_eval.models") if ep.name == "dynamic_llava"]
    assert point.value == "dynamic_llava.integrations.lmms_eval:manifests"
    (manifest,) = point.load()()
    assert manifest == manifests()[0]
    from lmms_eval.models import MODEL_REGISTRY_V2

    resolved = MODEL_REGISTRY_V2.resolve("dynamic_llava")
    assert resolved.class_path == "dynamic_llava.integrations.lmms_eval.DynamicLlava"
    assert MODEL_REGISTRY_V2.resolve("dynamic-llava").class_path == resolved.class_path

    assert sparsity_arguments(vision_keep_tokens="128") == {"vision_keep_tokens": 128}
    assert sparsity_arguments(no_sparsity=True) == {"use_vision_predictor": False, "use_output_text_predictor": False}
    assert sparsity_arguments(use_output_text_predictor="false") == {"use_output_text_predictor": False}
    with pytest.raises(ValueError, match="were both given"):
        sparsity_arguments(vision_keep_tokens=8, vision_keep_rate=0.5)
    with pytest.raises(ValueError, match="no_sparsity"):
        sparsity_arguments(no_sparsity=True, use_vision_predictor=True)
    with pytest.raises(ValueError, match="more than the 64 tokens"):
        DynamicLlava(pretrained=str(DEMO_MODEL), device="cpu", vision_keep_tokens=100)
    with pytest.raises(ValueError, match="unknown model_args"):
        DynamicLlava(pretrained=str(DEMO_MODEL), device="cpu", temperature=0)


def test_eval_extra_is_lmms_eval_requirements_without_torchvision():
    """pyproject's `eval` extra = the installed lmms-eval's requirements minus torch, torchvision and timm, plus
    filelock<4 (docs/integrations.md explains the `--no-deps` install)."""
    assert metadata.version("lmms_eval") == "0.7.3"
    required = {r for r in metadata.requires("lmms_eval") if "extra ==" not in r}
    name = {r: r.replace(">", " ").replace("<", " ").replace("=", " ").split()[0].lower() for r in required}
    expected = {r for r in required if name[r] not in ("torch", "torchvision", "timm")} | {"filelock<4"}
    extra = {
        r.split(";")[0].strip()
        for r in metadata.requires("dynamic-llava") or []
        if r.replace(" ", "").endswith('extra=="eval"')
    }
    assert extra == expected
    assert int(metadata.version("filelock").split(".")[0]) < 4


def test_model_args_are_derived_from_the_declaration(monkeypatch):
    """Every per-call field of `sparse_settings.SparsityKwargs` is a model_arg (a field added there too, without a
    change here), checked by the declaration; `no_sparsity=True` is `SPARSITY_OFF`; the conflicts the command line
    refuses are refused with the same rule, and tokens with rate with the library's own message."""
    from dynamic_llava import sparse_settings
    from dynamic_llava.configuration_dynamic_llava import DynamicLlavaConfig

    assert sparsity_arguments(image_scorer="attention", vision_keep_rate="0.25") == {
        "image_scorer": "attention",
        "vision_keep_rate": 0.25,
    }
    assert sparsity_arguments(no_sparsity="true") == sparse_settings.SPARSITY_OFF
    with pytest.raises(ValueError, match="dynamic_llava: image_scorer is 'fastv'"):
        sparsity_arguments(image_scorer="fastv")
    with pytest.raises(ValueError, match="vision_keep_tokens=4 applies only with use_vision_predictor=True"):
        sparsity_arguments(vision_keep_tokens=4, use_vision_predictor=False)
    with pytest.raises(ValueError) as library:
        DynamicLlavaConfig().sparsity_settings(vision_keep_tokens=8, vision_keep_rate=0.5)
    with pytest.raises(ValueError) as ours:
        sparsity_arguments(vision_keep_tokens=8, vision_keep_rate=0.5)
    assert str(ours.value) == f"dynamic_llava: {library.value}"

    monkeypatch.setitem(sparse_settings.SparsityKwargs.__annotations__, "vision_keep_min", "int | None")
    monkeypatch.setattr(sparse_settings, "PER_CALL_FIELDS", (*sparse_settings.PER_CALL_FIELDS, "vision_keep_min"))
    monkeypatch.setitem(sparse_settings.FIELD_HELP, "vision_keep_min", "the fewest image tokens kept per image")
    monkeypatch.setitem(sparse_settings.FIELD_CHECKS, "vision_keep_min", sparse_settings.FIELD_CHECKS["sparse_layer"])
    assert sparsity_arguments(vision_keep_min="3") == {"vision_keep_min": 3}
    with pytest.raises(ValueError, match="vision_keep_min is 0, below 1"):
        sparsity_arguments(vision_keep_min=0)
    # the constructor takes it as a model_arg (and still names an unknown one, listing the new field as known)
    with pytest.raises(ValueError, match="vision_keep_min is 0, below 1"):
        DynamicLlava(pretrained=str(DEMO_MODEL), device="cpu", vision_keep_min=0)
    with pytest.raises(ValueError, match="known: pretrained, dtype, device, vision_keep_tokens, .*vision_keep_min"):
        DynamicLlava(pretrained=str(DEMO_MODEL), device="cpu", vision_keep_maximum=3)
