"""Training mode: straight-through masks, masked softmax, budget loss, stock Trainer."""

import functools

import pytest
import torch
from PIL import Image
from transformers import TrainingArguments

from dynamic_llava.sparse_training import (
    TRAINING_ATTENTION,
    predictor_parameter_groups,
    straight_through_keep,
    temperature,
)
from dynamic_llava.training.data import LlavaConversationDataset, collate
from dynamic_llava.training.trainer import GumbelTemperatureCallback

from fixtures.tiny import tiny_inputs, tiny_model, tiny_processor


def training_batch(answer_words=40):
    """Two rows: an image prompt then a long answer (labels on the answer only)."""
    inputs = tiny_inputs(
        [(5, 6, 7) + tuple(range(20, 20 + answer_words)), (8, 9) + tuple(range(30, 30 + answer_words))]
    )
    labels = inputs["input_ids"].clone()
    labels[:, : inputs["input_ids"].shape[1] - answer_words] = -100
    labels[inputs["attention_mask"] == 0] = -100
    return inputs, labels


def test_training_mode_switches_attention_and_back():
    model = tiny_model(0)
    model.train()
    assert model.config.text_config._attn_implementation == TRAINING_ATTENTION
    model.eval()
    assert model.config.text_config._attn_implementation == "sdpa"


def test_gradients_reach_both_predictors_through_the_masks():
    model = tiny_model(0, output_text_len_for_training=20).train()
    inputs, labels = training_batch()
    out = model(**inputs, labels=labels)
    assert out.loss is not None and out.ce_loss is not None
    assert torch.allclose(out.loss, out.ce_loss + 100 * (out.vision_budget_loss + out.output_text_budget_loss))
    out.loss.backward()
    for predictor in (model.image_score_predictor, model.output_text_score_predictor):
        grads = [p.grad for p in predictor.parameters()]
        assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0
    # no token is removed while training: logits for every position
    assert out.logits.shape[1] == inputs["input_ids"].shape[1]


def test_masked_softmax_with_all_kept_equals_plain_attention():
    """With every keep 1 the masked softmax is the causal softmax (up to eps): the model matches eval mode."""
    model = tiny_model(1, use_vision_predictor=False, output_text_len_for_training=10_000)
    inputs, labels = training_batch()
    inputs = {"input_ids": inputs["input_ids"][:1], "pixel_values": inputs["pixel_values"][:1]}  # the unpadded row
    with torch.no_grad():
        reference = model.eval()(**inputs).logits
        trained = model.train()(**inputs, labels=None).logits
    assert (trained - reference).abs().max() < 1e-3


def test_at_tau_to_zero_training_masks_equal_inference_decisions():
    model = tiny_model(2, output_text_len_for_training=10).eval()
    inputs, labels = training_batch(answer_words=24)
    row = {k: v[:1] for k, v in inputs.items()}
    start = int((labels[0] == -100).nonzero().max()) + 1
    with torch.no_grad():
        inference = model(
            input_ids=row["input_ids"], pixel_values=row["pixel_values"], use_cache=False, output_text_start=start
        )
    captured = {}

    def grab(module, args, kwargs):
        captured.setdefault("keep", kwargs["dynamic_llava_keep"])

    hook = model.model.language_model.layers[model.config.sparse_layer].register_forward_pre_hook(
        grab, with_kwargs=True
    )
    model.train()
    model.gumbel_tau, model.gumbel_noise = 1e-4, False
    with torch.no_grad():
        model(**row, labels=labels[:1])
    hook.remove()
    keep = captured["keep"][0]
    assert torch.equal(keep[start:].bool(), inference.output_text_keep[0])
    # images: each token kept iff logit0 > logit1 (inference keeps the top-k of the same scores instead)
    assert set(inference.kept_vision_indices[0][0].tolist()) <= set(range(16))
    assert torch.equal(
        straight_through_keep(torch.tensor([[2.0, 1.0], [0.0, 3.0]]), 1e-4, noise=False), torch.tensor([1.0, 0.0])
    )


def test_a_few_steps_move_keep_ratios_toward_targets_and_loss_down():
    torch.manual_seed(0)
    model = tiny_model(3, output_text_len_for_training=20).train()
    inputs, labels = training_batch()
    optimizer = torch.optim.AdamW(predictor_parameter_groups(model, predictor_lr=5e-3, lr=1e-4))

    def ratios():  # what training targets: the expected keep ratios, over 16 draws of the Gumbel noise
        draws = []
        with torch.no_grad(), torch.random.fork_rng():
            for seed in range(16):
                torch.manual_seed(seed)
                out = model(**inputs, labels=labels)
                draws.append((float(out.vision_keep_ratio), float(out.output_text_keep_ratio), float(out.loss)))
        return tuple(sum(values) / len(values) for values in zip(*draws, strict=True))

    vision0, text0, loss0 = ratios()
    for step in range(40):
        model.gumbel_tau = temperature(step, 40)
        out = model(**inputs, labels=labels)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    vision1, text1, loss1 = ratios()
    target_v, target_t = model.config.vision_keep_rate, model.config.output_text_keep_rate
    assert abs(vision1 - target_v) < abs(vision0 - target_v) or abs(vision1 - target_v) <= 0.07
    assert abs(text1 - target_t) < abs(text0 - target_t) or abs(text1 - target_t) <= 0.07
    assert loss1 < loss0


@pytest.mark.slow
def test_stock_trainer_runs_one_epoch(tmp_path):
    from transformers import Trainer, TrainingArguments

    for i in range(4):
        Image.effect_noise((36, 28), 30 + 10 * i).convert("RGB").save(tmp_path / f"{i}.png")
    samples = [
        {
            "id": i,
            "image": f"{i}.png",
            "conversations": [
                {"from": "human", "value": "<image>\nw5 w6"},
                {"from": "gpt", "value": " ".join(f"w{10 + (i + j) % 90}" for j in range(30))},
            ],
        }
        for i in range(4)
    ]
    processor = tiny_processor()
    dataset = LlavaConversationDataset(samples, tmp_path, processor, image_seq_length=16)
    model = tiny_model(4, output_text_len_for_training=20)
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        num_train_epochs=1,
        per_device_train_batch_size=2,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        remove_unused_columns=False,
        use_cpu=True,
        disable_tqdm=True,
    )
    optimizer = torch.optim.AdamW(predictor_parameter_groups(model))
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=dataset,
        optimizers=(optimizer, None),
        data_collator=functools.partial(collate, pad_token_id=0),
        callbacks=[GumbelTemperatureCallback()],
    )
    result = trainer.train()
    assert trainer.state.global_step == 2 and result.training_loss > 0
    assert model.gumbel_tau == pytest.approx(temperature(1, 2))
    assert not any(p.requires_grad for p in model.model.vision_tower.parameters())  # frozen by default


@pytest.mark.slow
def test_train_command_checkpoints_resumes_and_exports(tmp_path, capsys):
    import json

    from dynamic_llava.cli import main
    from dynamic_llava.hub.export import export_model

    images = tmp_path / "images"
    images.mkdir()
    samples = []
    for i in range(6):
        Image.effect_noise((30, 40), 20 + 9 * i).convert("RGB").save(images / f"{i}.png")
        samples.append(
            {
                "id": i,
                "image": f"{i}.png",
                "conversations": [
                    {"from": "human", "value": "<image>\nw5 w6"},
                    {"from": "gpt", "value": " ".join(f"w{10 + (i * 7 + j) % 90}" for j in range(25))},
                ],
            }
        )
    (tmp_path / "data.json").write_text(json.dumps(samples))
    base = export_model(tiny_model(5, output_text_len_for_training=20), tmp_path / "base", processor=tiny_processor())
    out = tmp_path / "run"
    argv = [
        "train",
        "--data",
        str(tmp_path / "data.json"),
        "--images",
        str(images),
        "--model",
        str(base),
        "--out",
        str(out),
        "--batch-size",
        "2",
        "--save-steps",
        "1",
        "--logging-steps",
        "1",
    ]
    assert main(argv + ["--max-steps", "2"]) == 0
    assert (out / "checkpoints" / "checkpoint-2").exists()
    assert main(argv + ["--max-steps", "3", "--resume"]) == 0  # continues from checkpoint-2
    state = json.loads((out / "checkpoints" / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["global_step"] == 3
    assert (out / "model" / "config.json").exists() and (out / "model" / "modeling_dynamic_llava.py").exists()
    from dynamic_llava import DynamicLlavaForConditionalGeneration

    trained = DynamicLlavaForConditionalGeneration.from_pretrained(out / "model")
    before = DynamicLlavaForConditionalGeneration.from_pretrained(base)
    delta = (trained.image_score_predictor.down_mlp[1].weight - before.image_score_predictor.down_mlp[1].weight).abs()
    assert delta.max() > 0  # the predictors moved
    for a, b in zip(trained.model.vision_tower.parameters(), before.model.vision_tower.parameters(), strict=True):
        assert torch.equal(a, b)  # the vision tower is frozen by default
    bad = argv[:-6] + ["--out", str(tmp_path / "fresh"), "--resume"]
    assert main(bad) == 2
    assert "no checkpoint" in capsys.readouterr().err


@pytest.mark.slow
def test_accelerate_launch_trains_on_two_processes(tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2 ... train` runs unchanged (DDP; gloo on this CPU machine)."""
    import json
    import os
    import socket
    import subprocess
    import sys

    from dynamic_llava.cli import main
    from dynamic_llava.package_data import DEMO_MODEL

    assert main(["synthetic-data", "--out", str(tmp_path / "data"), "--n", "16", "--seed", "5"]) == 0
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(port),
        "-m",
        "dynamic_llava.cli",
        "train",
        "--data",
        str(tmp_path / "data" / "data.json"),
        "--images",
        str(tmp_path / "data" / "images"),
        "--model",
        str(DEMO_MODEL),
        "--out",
        str(tmp_path / "run"),
        "--batch-size",
        "2",
        "--max-steps",
        "4",
        "--save-steps",
        "4",
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_")}  # (hermetic: see parallel tests)
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("trained model written to") == 1, done.stdout  # only the main process reports
    state = json.loads((tmp_path / "run" / "checkpoints" / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4 and state["epoch"] == pytest.approx(1.0)  # 2 processes x 2 rows x 4 steps = 16
    from dynamic_llava import DynamicLlavaForConditionalGeneration

    trained = DynamicLlavaForConditionalGeneration.from_pretrained(tmp_path / "run" / "model")
    before = DynamicLlavaForConditionalGeneration.from_pretrained(DEMO_MODEL)
    moved = trained.output_text_score_predictor.state_dict()
    assert any(not torch.equal(v, before.output_text_score_predictor.state_dict()[k]) for k, v in moved.items())


class _SpyTrainingArguments(TrainingArguments):
    """TrainingArguments that record their mixed-precision flags (module level: checkpoints pickle them)."""

    seen: list = []

    def __post_init__(self):
        super().__post_init__()
        _SpyTrainingArguments.seen.append((self.bf16, self.fp16))


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_train_precision_option(tmp_path, monkeypatch, precision):
    """`--precision` reaches the Trainer (bf16 autocast runs on CPU too); an unknown value is refused up front."""
    import transformers

    from dynamic_llava.cli import main
    from dynamic_llava.package_data import DEMO_MODEL
    from dynamic_llava.training.trainer import train

    monkeypatch.setattr(transformers, "TrainingArguments", _SpyTrainingArguments)
    monkeypatch.setattr(_SpyTrainingArguments, "seen", [])

    assert main(["synthetic-data", "--out", str(tmp_path / "data"), "--n", "4"]) == 0
    data, images = str(tmp_path / "data" / "data.json"), str(tmp_path / "data" / "images")
    folder = train(
        data,
        images,
        str(DEMO_MODEL),
        str(tmp_path / "run"),
        max_steps=1,
        batch_size=2,
        save_steps=1,
        precision=precision,
        disable_tqdm=True,
    )
    state = (tmp_path / "run" / "checkpoints" / "checkpoint-1" / "trainer_state.json").read_text()
    assert (folder / "model.safetensors").exists() and '"global_step": 1' in state
    assert _SpyTrainingArguments.seen == [(precision == "bf16", False)]
    with pytest.raises(ValueError, match="precision must be fp32, bf16 or fp16"):
        train(data, images, str(DEMO_MODEL), str(tmp_path / "other"), precision="fp8")
    assert not (tmp_path / "other").exists()


@pytest.mark.parametrize(("optim", "cls"), [("adamw_torch", torch.optim.AdamW), ("sgd", torch.optim.SGD)])
def test_trainer_builds_the_predictor_groups_in_create_optimizer(tmp_path, optim, cls):
    """Every backend calls `create_optimizer` (DeepSpeed without an optimizer in its config, FSDP after wrapping):
    the groups are built there, with the optimizer `args.optim` names, the predictors at their own rate."""
    from dynamic_llava.sparse_training import freeze_parts
    from dynamic_llava.training.trainer import DynamicLlavaTrainer

    model = tiny_model(4)
    freeze_parts(model)
    args = TrainingArguments(
        output_dir=str(tmp_path), optim=optim, learning_rate=5e-6, report_to=[], use_cpu=True, weight_decay=0.1
    )
    trainer = DynamicLlavaTrainer(model=model, args=args, predictor_lr=2e-4)
    optimizer = trainer.create_optimizer()
    assert isinstance(optimizer, cls)
    predictors, rest = optimizer.param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    assert all("score_predictor" in names[id(p)] for p in predictors["params"])
    assert not any("score_predictor" in names[id(p)] for p in rest["params"])
    assert (predictors["lr"], rest["lr"]) == (2e-4, 5e-6)
    assert predictors["weight_decay"] == rest["weight_decay"] == 0.0  # (no weight decay, as the original)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert {id(p) for group in optimizer.param_groups for p in group["params"]} == trainable
