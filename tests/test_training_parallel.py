"""
Training is one computation however it is split: gradient accumulation and data parallel processes (gloo, CPU) give
the losses and weights of one process with the same global batch, and a tensor-parallel model decodes what one
process does. The runs are `tests/fixtures/parallel_training.py`.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from fixtures import FIXTURES
from fixtures.parallel_training import GLOBAL_BATCH
from fixtures.tiny import tiny_inputs, tiny_model

SCRIPT = FIXTURES / "parallel_training.py"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _run(*args: str, processes: int = 1) -> None:
    """The script in a fresh process (each run starts from the same state: a second Trainer in one process draws
    another data order), or under torchrun on this CPU (gloo); bounded, so a hung collective fails the test."""
    command = [sys.executable, str(SCRIPT), *args]
    if processes > 1:
        command[1:1] = ["-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_port",
                        str(_free_port())]  # fmt: skip
    # (hermetic: an in-process TrainingArguments earlier in the session leaves ACCELERATE_MIXED_PRECISION and the
    # like in os.environ, which a child Trainer would obey)
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_")}
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    done = subprocess.run(command, capture_output=True, text=True, timeout=240, env=env)
    assert done.returncode == 0, done.stderr[-4000:]


def _assert_same_run(a, b) -> None:
    losses_a = json.loads((a / "losses.json").read_text())
    losses_b = json.loads((b / "losses.json").read_text())
    assert len(losses_a) == len(losses_b) == 2
    assert losses_b == pytest.approx(losses_a, rel=1e-5)
    weights_a, weights_b = load_file(a / "weights.safetensors"), load_file(b / "weights.safetensors")
    assert weights_a.keys() == weights_b.keys()
    flat_a = torch.cat([weights_a[k].flatten() for k in sorted(weights_a)])
    flat_b = torch.cat([weights_b[k].flatten() for k in sorted(weights_a)])
    assert ((flat_a - flat_b).norm() / flat_a.norm()).item() <= 1e-5
    moved = load_file(
        a / "weights.safetensors"
    )  # (the weights did move: the comparison is not of two untouched models)
    start = {n: p for n, p in tiny_model(4).named_parameters() if n in moved}
    assert any(not torch.allclose(moved[n], start[n]) for n in moved)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    out = tmp_path_factory.mktemp("one_process")
    _run(str(out), str(GLOBAL_BATCH), "1")
    return out


@pytest.mark.slow
@pytest.mark.parametrize("stock_trainer", [False, True], ids=["DynamicLlavaTrainer", "stock_Trainer"])
def test_gradient_accumulation_equals_one_batch_twice_as_large(tmp_path, one_process, stock_trainer):
    """Batch 2 x accumulation 2 == batch 4: the loss divides by the Trainer's `num_items_in_batch` (the label tokens
    of the whole step) and the budget terms are token-weighted sums, so micro-batches add up to the large batch."""
    _run(str(tmp_path), str(GLOBAL_BATCH // 2), "2", *(["--stock"] if stock_trainer else []))
    _assert_same_run(one_process, tmp_path)


@pytest.mark.slow
def test_two_data_parallel_processes_equal_one_process(tmp_path, one_process):
    """torchrun, 2 processes x batch 2 (DDP, gloo) == 1 process x batch 4: the logged losses and final weights."""
    _run(str(tmp_path), str(GLOBAL_BATCH // 2), "1", processes=2)
    _assert_same_run(one_process, tmp_path)


@pytest.mark.slow
def test_tensor_parallel_model_decodes_what_one_process_does(tmp_path):
    """`from_pretrained(..., tp_plan="auto")` on 2 processes: its weights are sharded, and it gives one process's
    tokens, kept image tokens and cache lengths."""
    model = tiny_model(4)
    model.save_pretrained(tmp_path / "model")
    _run("--tp", str(tmp_path), processes=2)
    parallel = json.loads((tmp_path / "tp.json").read_text())
    inputs = tiny_inputs([(5, 6, 7), (8, 9)])
    result = model.generate(
        **inputs, max_new_tokens=8, do_sample=False, return_dict_in_generate=True, vision_keep_tokens=4
    )
    from dynamic_llava.transformers_compat import CACHE_KEY

    cache = getattr(result, CACHE_KEY)
    assert parallel["q_proj_rows"] == model.config.text_config.hidden_size // 2  # each process holds half the heads
    assert parallel["sequences"] == result.sequences.tolist()
    assert parallel["kept_vision"] == [[image.tolist() for image in row] for row in cache.kept_vision_indices]
    assert parallel["kept"] == cache.kept_lengths().tolist()


def _has_fsdp2_distributed_config() -> bool:
    try:
        from transformers.distributed import DistributedConfig
    except ImportError:
        return False
    import inspect

    return "fsdp_size" in inspect.signature(DistributedConfig).parameters


@pytest.mark.slow
@pytest.mark.skipif(
    not _has_fsdp2_distributed_config(), reason="this transformers has no DistributedConfig(fsdp_size=...) (FSDP2)"
)
def test_fsdp2_sharded_model_saves_and_exports_full_weights_under_our_class_names(tmp_path):
    """A model sharded by FSDP2 (`DistributedConfig`) after a training step: `save_pretrained` and `export_model`
    (with `full_state_dict`) write our class names in `auto_map` / `architectures` and our remote code (not torch's
    wrapper), and the full weights: those of the same step in one process."""
    from dynamic_llava.hub.bases import BASES
    from dynamic_llava.hub.export import export_model
    from dynamic_llava.hub.loading import load_model

    from fixtures.parallel_training import sgd_step

    export_model(tiny_model(4), tmp_path / "model")
    _run("--fsdp", str(tmp_path), processes=2)
    report = json.loads((tmp_path / "fsdp.json").read_text())
    assert report["class"].startswith("FSDP") and report["param"] == "DTensor"  # (it was sharded)
    one = load_model(tmp_path / "model")
    loss = sgd_step(one)
    assert report["loss"] == pytest.approx(loss, rel=1e-5)
    expected = one.state_dict()
    llava = BASES["llava"]
    for name in ("saved", "exported"):
        folder = tmp_path / name
        config = json.loads((folder / "config.json").read_text())
        assert config["architectures"] == [llava.model_class]
        assert set(config["auto_map"].values()) <= set(llava.auto_map.values()), config["auto_map"]
        assert not list(folder.glob("_fsdp*.py")) and (folder / "modeling_dynamic_llava.py").is_file()
        state = load_model(folder).state_dict()
        flat = torch.cat([(state[k] - expected[k]).flatten().float() for k in expected])
        norm = torch.cat([expected[k].flatten().float() for k in expected]).norm()
        assert (flat.norm() / norm).item() <= 1e-5, name
