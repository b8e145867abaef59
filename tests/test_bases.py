"""
Every base of the registry (`hub/bases.py`) keeps the invariants: a folder made by `dynamic-llava init` from a stock
`save_pretrained` folder computes what the stock model does with sparsity off, loads with the stock Auto classes
from its remote code, and with sparsity on keeps exactly K tokens per image (images of different sizes), gives
a row in a batch what the row alone gives, and the same tokens with and without a cache.
"""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from PIL import Image

from dynamic_llava.hub.bases import BASES
from dynamic_llava.hub.init import UNTRAINED_SETTINGS, init_model
from dynamic_llava.hub.loading import load_local
from dynamic_llava.transformers_compat import CACHE_KEY

from fixtures.bases import (
    llava_next_processor_kwargs,
    tiny_llava_next_config,
    tiny_llava_next_processor,
    tiny_qwen2_5_vl_config,
    tiny_qwen2_5_vl_processor,
)

HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None
GREEDY = {"do_sample": False, "return_dict_in_generate": True, "output_logits": True}
FOUR_LAYERS = {"text_config": {"num_hidden_layers": 4}}


def _noise(height: int, width: int, seed: int) -> Image.Image:
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (height, width, 3), generator=generator, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


def _llava_next():
    from transformers import LlavaNextForConditionalGeneration, LlavaNextProcessor

    dynamic = tiny_llava_next_processor()
    stock = LlavaNextProcessor(
        image_processor=dynamic.image_processor, tokenizer=dynamic.tokenizer, **llava_next_processor_kwargs()
    )
    return LlavaNextForConditionalGeneration(tiny_llava_next_config(**FOUR_LAYERS)), stock, "<image>"


def _qwen2_5_vl():
    from transformers import Qwen2_5_VLForConditionalGeneration

    # (the stock processor needs a video processor, hence torchvision: the Dynamic one processes images as stock's
    # does, tests/test_processor_bases.py; the stock folder gets the stock tokenizer and image processor files)
    processor = tiny_qwen2_5_vl_processor()
    image = "<|vision_start|><|image_pad|><|vision_end|>"
    return Qwen2_5_VLForConditionalGeneration(tiny_qwen2_5_vl_config(**FOUR_LAYERS)), processor, image


# the bases with a stock processor here (LLaVA-1.5's own invariants are tests/test_core.py's, on its tiny model)
STOCK_BASES = {"llava_next": _llava_next, "qwen2_5_vl": _qwen2_5_vl}


@pytest.fixture(scope="module", params=sorted(STOCK_BASES))
def base(request, tmp_path_factory):
    """(name, stock model, stock processor, image placeholder, Dynamic folder made by init from the stock folder)."""
    torch.manual_seed(0)
    stock, processor, image = STOCK_BASES[request.param]()
    stock.eval()
    folder = tmp_path_factory.mktemp(request.param)
    stock.save_pretrained(folder / "stock")
    if request.param == "qwen2_5_vl":
        processor.tokenizer.save_pretrained(folder / "stock")
        processor.image_processor.save_pretrained(folder / "stock")
    else:
        processor.save_pretrained(folder / "stock")
    init_model(folder / "stock", folder / "dynamic")
    return request.param, stock, processor, image, folder / "dynamic"


def _rows(processor, image: str, rows: list[tuple[str, list[Image.Image]]]) -> dict:
    texts = [text.replace("<img>", image) for text, _ in rows]
    images = [picture for _, pictures in rows for picture in pictures]
    processor.tokenizer.padding_side = "left"
    return dict(processor(text=texts, images=images or None, return_tensors="pt", padding=True))


def _row_specs() -> list[tuple[str, list[Image.Image]]]:
    """Two rows: one image, and two images of other sizes (the rows' lengths differ: one pads on the left)."""
    return [
        ("<img> what is it?", [_noise(90, 60, 1)]),
        ("<img> and <img> two", [_noise(56, 112, 2), _noise(112, 112, 3)]),
    ]


def _batch(processor, image):
    return _rows(processor, image, _row_specs())


def test_init_writes_a_folder_of_its_base_with_untrained_settings(base):
    name, _, _, _, folder = base
    config = json.loads((folder / "config.json").read_text())
    spec = BASES[name]
    assert config["model_type"] == spec.model_type and config["architectures"] == [spec.model_class]
    assert config["auto_map"] == spec.auto_map
    assert {key: config[key] for key in UNTRAINED_SETTINGS} == UNTRAINED_SETTINGS
    assert (folder / f"modeling_{spec.module}.py").is_file() and (folder / "sparse_flow.py").is_file()
    assert "untrained" in (folder / "README.md").read_text()


def test_sparsity_off_equals_stock_on_each_base(base):
    """The stock weights are kept exactly: with sparsity off the Dynamic model gives stock's tokens and logits
    (each row alone: stock 4.57 Qwen2.5-VL decodes left-padded rows with positions that ignore the padding)."""
    _, stock, processor, image, folder = base
    model, _ = load_local(folder)
    for text, pictures in [("<img> what is it?", [_noise(90, 60, 1)]), ("<img> two", [_noise(56, 112, 2)])]:
        one = _rows(processor, image, [(text, pictures)])
        a = model.generate(**one, max_new_tokens=6, use_vision_predictor=False, **GREEDY)
        b = stock.generate(**one, max_new_tokens=6, **GREEDY)
        assert torch.equal(a.sequences, b.sequences)
        assert max((x - y).abs().max().item() for x, y in zip(a.logits, b.logits, strict=True)) <= 1e-5


@pytest.mark.slow
def test_auto_classes_and_pipeline_load_the_init_folder_in_a_fresh_process(base, tmp_path):
    """The folder alone (its remote code; this package not importable), with `AutoModelForImageTextToText`,
    `AutoProcessor` and `pipeline("image-text-to-text")`, decodes what this package's classes decode."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from fixtures import FIXTURES

    name, _, processor, image, folder = base
    picture = tmp_path / "image.png"
    _noise(90, 60, 1).save(picture)
    text = f"{image} what is it?"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"))
    project = Path(__file__).resolve().parents[1].name
    run = subprocess.run(
        [sys.executable, str(FIXTURES / "base_model_load_script.py"), str(folder), str(picture), text, project],
        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["classes"][:2] == [BASES[name].model_class, BASES[name].processor_class]
    assert not result["classes"][2].startswith("dynamic_llava")  # the folder's own code
    model, _ = load_local(folder)
    inputs = _rows(processor, image, [("<img> what is it?", [_noise(90, 60, 1)])])
    ours = model.generate(**inputs, max_new_tokens=5, do_sample=False, return_dict_in_generate=True)
    assert result["sequences"] == ours.sequences.tolist()
    assert result["kept_vision"] == [
        [len(kept) for kept in row] for row in getattr(ours, CACHE_KEY).kept_vision_indices
    ]
    assert isinstance(result["pipeline"], str) and result["pipeline"]


def test_each_image_keeps_exactly_k_tokens_and_rows_equal_the_row_alone(base):
    _, _, processor, image, folder = base
    model, _ = load_local(folder)
    batch = _batch(processor, image)
    k = 5
    out = model.generate(**batch, max_new_tokens=5, vision_keep_tokens=k, **GREEDY)
    cache = getattr(out, CACHE_KEY)
    assert [[len(kept) for kept in row] for row in cache.kept_vision_indices] == [[k], [k, k]]
    width = batch["input_ids"].shape[1]
    for row, spec in enumerate(_row_specs()):
        alone = model.generate(**_rows(processor, image, [spec]), max_new_tokens=5, vision_keep_tokens=k, **GREEDY)
        assert torch.equal(out.sequences[row, width:], alone.sequences[0, -5:])
        kept_alone = getattr(alone, CACHE_KEY).kept_vision_indices[0]
        assert all(torch.equal(a, b) for a, b in zip(cache.kept_vision_indices[row], kept_alone, strict=True))


def test_cached_decoding_equals_uncached_on_each_base(base):
    _, _, processor, image, folder = base
    model, _ = load_local(folder)
    batch = _batch(processor, image)
    cached = model.generate(**batch, max_new_tokens=5, vision_keep_tokens=5, **GREEDY)
    uncached = model.generate(**batch, max_new_tokens=5, vision_keep_tokens=5, use_cache=False, **GREEDY)
    assert torch.equal(cached.sequences, uncached.sequences)


def test_generate_and_chat_commands_run_on_each_base(base, tmp_path, capsys, monkeypatch):
    """`dynamic-llava generate` and a two-turn `chat` (a new image in the second turn) on an `init` folder: each base's
    processor names its own image inputs, and the summary line counts what each image kept."""
    import io

    from dynamic_llava.cli import main

    _, _, _, _, folder = base
    picture = tmp_path / "image.png"
    _noise(90, 60, 1).save(picture)
    common = ["--model", str(folder), "--max-new-tokens", "3"]
    assert (
        main(["generate", *common, "--image", str(picture), "--prompt", "what is it", "--vision-keep-tokens", "2"]) == 0
    )
    assert "[sparsity] vision tokens kept 2 (1 image(s))" in capsys.readouterr().out
    monkeypatch.setattr("sys.stdin", io.StringIO(f"what is it\n/image {picture}\nand this\n"))
    assert main(["chat", *common, "--image", str(picture), "--vision-keep-tokens", "2"]) == 0
    assert "vision tokens kept 4 (2 image(s))" in capsys.readouterr().out


def test_serve_accepts_each_bases_folder(base):
    """`dynamic-llava serve` takes a folder of every base (and registers its processor); a stock one is refused."""
    from transformers import AutoProcessor

    from dynamic_llava.serving.model import check_served_model, is_dynamic_llava, register_auto_classes

    name, stock, _, _, folder = base
    check_served_model(str(folder))
    register_auto_classes()
    assert type(AutoProcessor.from_pretrained(folder)).__name__ == BASES[name].processor_class
    assert is_dynamic_llava(load_local(folder)[0]) and not is_dynamic_llava(stock)
    with pytest.raises(ValueError, match="serve it with `transformers serve`"):
        check_served_model(str(folder.parent / "stock"))


def test_predictor_only_training_runs_on_each_base(base, tmp_path):
    """`DynamicLlavaTrainer` trains the predictors of any base (LLM and vision tower frozen: `freeze_parts`): the
    budget terms reach both predictors, and only the predictors move."""
    from transformers import TrainingArguments

    from dynamic_llava.sparse_training import freeze_parts
    from dynamic_llava.training.trainer import DynamicLlavaTrainer

    _, _, processor, image, folder = base
    model, _ = load_local(folder)
    model.config.image_scorer = "predictor"  # (the training-free scorer has nothing to train)
    model.config.use_output_text_predictor = True
    model.config.output_text_len_for_training = 4
    rows = []
    for text, pictures in _row_specs():
        one = _rows(processor, image, [(text + " a b c d e f g h", pictures)])
        labels = one["input_ids"].clone()
        labels[:, :-8] = -100
        rows.append({**one, "labels": labels})

    def collate(items):  # batch 1: each row as the processor made it
        (item,) = items
        return item

    freeze_parts(model, freeze_llm=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=1, report_to=[], save_strategy="no",
        remove_unused_columns=False, use_cpu=True, disable_tqdm=True, learning_rate=0.0,
    )  # fmt: skip
    trainer = DynamicLlavaTrainer(model=model, args=args, train_dataset=rows, data_collator=collate, predictor_lr=1e-2)
    trainer.train()
    moved = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert moved and all("score_predictor" in k for k in moved)
    assert any("image_score_predictor" in k for k in moved) and any("output_text_score_predictor" in k for k in moved)


def test_the_train_command_trains_an_init_folder_of_each_base_on_llava_conversation_data(base, tmp_path, capsys):
    """`dynamic-llava init` then `dynamic-llava train --freeze-llm --freeze-projector` on LLaVA-format JSON: the
    base's chat template and processor make the items (labels on the answers), the predictors move and nothing else,
    and the folder it exports uses them (the untrained settings replaced)."""
    from dynamic_llava.cli import main

    _, _, _, _, folder = base
    (tmp_path / "images").mkdir()
    answer = " ".join(["it is a noisy picture with many colours"] * 3)
    records = []
    for i, (height, width) in enumerate([(90, 60), (56, 112), (112, 112)]):
        _noise(height, width, i).save(tmp_path / "images" / f"{i}.png")
        turns = [{"from": "human", "value": "<image>\nwhat is it?"}, {"from": "gpt", "value": answer}]
        if i == 2:  # two rounds
            turns += [{"from": "human", "value": "and then?"}, {"from": "gpt", "value": "nothing more"}]
        records.append({"id": str(i), "image": f"{i}.png", "conversations": turns})
    (tmp_path / "data.json").write_text(json.dumps(records))
    args = ["train", "--data", str(tmp_path / "data.json"), "--images", str(tmp_path / "images"), "--model",
            str(folder), "--out", str(tmp_path / "out"), "--max-steps", "2", "--batch-size", "2", "--freeze-llm",
            "--freeze-projector", "--predictor-lr", "1e-2", "--logging-steps", "1", "--save-steps", "100"]  # fmt: skip
    before, _ = load_local(folder)
    before.config.output_text_len_for_training = 4
    assert main(args) == 0
    trained, _ = load_local(tmp_path / "out" / "model")
    assert trained.config.image_scorer == "predictor" and trained.config.use_output_text_predictor
    old, new = before.state_dict(), trained.state_dict()
    moved = {k for k in old if not torch.equal(old[k], new[k])}
    assert moved and all("score_predictor" in k for k in moved)
    assert any("image_score_predictor" in k for k in moved)


def test_an_exported_folder_loads_every_weight_it_holds_on_each_base(base, tmp_path):
    """Trained weights survive export and loading (4.57's Qwen2.5-VL key mapping would otherwise move the
    predictors' `model.*` keys into the language model and leave fresh predictors), and so do the rotary settings."""
    from dynamic_llava.hub.export import export_model

    _, _, processor, _, folder = base
    model, loaded_processor = load_local(folder)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "score_predictor" in name:
                param.add_(torch.randn_like(param))  # not what a fresh init gives
    export_model(model, tmp_path / "trained", processor=loaded_processor)
    again, _ = load_local(tmp_path / "trained")
    theirs = again.state_dict()
    assert sorted(theirs) == sorted(model.state_dict())
    assert all(torch.equal(value, theirs[key]) for key, value in model.state_dict().items())
    text, text_again = model.config.get_text_config(decoder=True), again.config.get_text_config(decoder=True)
    for field in ("rope_scaling", "rope_parameters", "rope_theta"):
        assert getattr(text_again, field, None) == getattr(text, field, None), field


def test_static_cache_equals_the_dynamic_one_on_each_base(base):
    """`cache_implementation="static"` (preallocated, the one compiled decoding uses) gives the dynamic cache's tokens,
    kept image tokens and stored lengths."""
    from dynamic_llava import DynamicLlavaStaticCache

    _, _, processor, image, folder = base
    model, _ = load_local(folder)
    batch = _batch(processor, image)
    dynamic = model.generate(**batch, max_new_tokens=6, vision_keep_tokens=3, **GREEDY)
    static = model.generate(**batch, max_new_tokens=6, vision_keep_tokens=3, cache_implementation="static", **GREEDY)
    cache = getattr(static, CACHE_KEY)
    assert isinstance(cache, DynamicLlavaStaticCache)
    assert torch.equal(static.sequences, dynamic.sequences)
    kept = getattr(dynamic, CACHE_KEY).kept_vision_indices
    assert [[k.tolist() for k in row] for row in cache.kept_vision_indices] == [[k.tolist() for k in r] for r in kept]
    assert torch.equal(cache.kept_lengths(), getattr(dynamic, CACHE_KEY).kept_lengths())


@pytest.mark.slow
def test_static_cache_decode_compiles_to_one_graph_with_the_eager_results_on_each_base(base):
    """torch.compile(fullgraph=True) of the decode step with the static sparse cache (after an eager prefill with the
    images): one graph, no graph break or recompile over 8 steps, and the eager tokens and kept lengths."""
    from torch._dynamo.utils import counters

    from dynamic_llava import DynamicLlavaStaticCache

    _, _, processor, image, folder = base
    model, _ = load_local(folder)
    batch = _batch(processor, image)
    width = batch["input_ids"].shape[1]

    def decode(forward, steps=8):
        cache = DynamicLlavaStaticCache(model.config, max_cache_len=width + steps + 2)
        positions = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            out = model(**batch, position_ids=positions, output_text_start=width, vision_keep_tokens=3, cache=cache)
            tokens = [out.logits[:, -1].argmax(-1, keepdim=True)]
            position = batch["attention_mask"].sum(-1, keepdim=True)
            for _ in range(steps):
                out = forward(input_ids=tokens[-1], position_ids=position, output_text_start=width, cache=cache)
                tokens.append(out.logits[:, -1].argmax(-1, keepdim=True))
                position = position + 1
        return torch.cat(tokens, dim=1), cache

    eager_tokens, eager_cache = decode(model.forward)
    torch._dynamo.reset()
    counters.clear()
    try:
        tokens, cache = decode(torch.compile(model.forward, fullgraph=True))
        assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
        assert not counters["graph_break"], dict(counters["graph_break"])
        assert not counters["recompiles"], dict(counters["recompiles"])
    finally:
        torch._dynamo.reset()
    assert torch.equal(tokens, eager_tokens)
    assert torch.equal(cache.kept_lengths(), eager_cache.kept_lengths())


# the usual VLM quantization: vision tower and projector unquantized (root paths, which both majors match)
UNQUANTIZED = {
    "llava_next": ["model.vision_tower", "model.multi_modal_projector", "lm_head"],
    "qwen2_5_vl": ["model.visual", "lm_head"],
}


@pytest.mark.slow
@pytest.mark.skipif(not HAS_BNB, reason='bitsandbytes is not installed (pip install -e ".[quant]")')
def test_bitsandbytes_8bit_with_sparsity_off_equals_stock_on_each_base(base):
    """Loaded in 8 bits, the Dynamic folder and the stock one give the same tokens with sparsity off; the predictors
    stay float32 and unquantized, and with sparsity on each image keeps its K tokens."""
    from transformers import BitsAndBytesConfig

    name, stock, processor, image, folder = base
    quant = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=UNQUANTIZED[name])
    ours = BASES[name].load_model_class().from_pretrained(folder, quantization_config=quant, dtype=torch.float32)
    theirs = type(stock).from_pretrained(folder.parent / "stock", quantization_config=quant, dtype=torch.float32)
    layer = ours.model.language_model.layers[0].mlp.up_proj
    assert type(layer).__module__.startswith("bitsandbytes")
    assert ours.model.image_score_predictor.output_mlp[0].weight.dtype == torch.float32
    one = _rows(processor, image, [("<img> what is it?", [_noise(90, 60, 1)])])
    a = ours.generate(**one, max_new_tokens=6, use_vision_predictor=False, do_sample=False)
    b = theirs.generate(**one, max_new_tokens=6, do_sample=False)
    assert torch.equal(a, b)
    out = ours.generate(**_batch(processor, image), max_new_tokens=3, vision_keep_tokens=2, **GREEDY)
    assert [[int(k.numel()) for k in row] for row in getattr(out, CACHE_KEY).kept_vision_indices] == [[2], [2, 2]]


def _offload_map(model) -> dict[str, str]:
    """A device map of every top-level part on the CPU but decoder layers 0 and `sparse_layer` on disk."""
    sparse = model.config.sparse_layer
    split = {f"model.{name}": "cpu" for name, _ in model.model.named_parameters(recurse=False)}  # (image_newline)
    for name, child in model.model.named_children():
        if name != "language_model":
            split[f"model.{name}"] = "cpu"
            continue
        for sub, part in child.named_children():
            if sub == "layers":
                split.update(
                    {
                        f"model.language_model.layers.{i}": "disk" if i in (0, sparse) else "cpu"
                        for i in range(len(part))
                    }
                )
            else:
                split[f"model.language_model.{sub}"] = "cpu"
    return {**split, "lm_head": "cpu"}


@pytest.mark.slow
def test_a_device_map_with_disk_offload_decodes_as_one_device_on_each_base(base, tmp_path):
    """A `device_map` with decoder layers 0 and `sparse_layer` offloaded to disk: the same tokens, kept image tokens
    and cache lengths as the model loaded whole."""
    _, _, processor, image, folder = base
    model, _ = load_local(folder)
    mapped = type(model).from_pretrained(
        folder, dtype=torch.float32, device_map=_offload_map(model), offload_folder=str(tmp_path)
    )
    assert "disk" in set(mapped.hf_device_map.values()), mapped.hf_device_map
    batch = _batch(processor, image)
    a = model.generate(**batch, max_new_tokens=5, vision_keep_tokens=3, **GREEDY)
    b = mapped.generate(**batch, max_new_tokens=5, vision_keep_tokens=3, **GREEDY)
    assert torch.equal(a.sequences, b.sequences)
    ca, cb = getattr(a, CACHE_KEY), getattr(b, CACHE_KEY)
    assert torch.equal(ca.kept_lengths(), cb.kept_lengths())
    kept = [[[k.tolist() for k in row] for row in c.kept_vision_indices] for c in (ca, cb)]
    assert kept[0] == kept[1]


def test_beam_search_with_sparsity_off_equals_stock_on_each_base(base):
    _, stock, processor, image, folder = base
    model, _ = load_local(folder)
    one = _rows(processor, image, [("<img> what is it?", [_noise(90, 60, 1)])])
    beams = {"num_beams": 2, "do_sample": False, "max_new_tokens": 5}
    ours = model.generate(**one, use_vision_predictor=False, **beams)
    assert torch.equal(ours, stock.generate(**one, **beams))


def test_a_row_without_image_beside_rows_with_images_equals_itself_alone(base):
    """0, 1 and 2 images per row in one left-padded batch: each row gives what it gives alone, and keeps K per image."""
    _, _, processor, image, folder = base
    model, _ = load_local(folder)
    specs = [("just words here", []), *_row_specs()]
    out = model.generate(**_rows(processor, image, specs), max_new_tokens=4, vision_keep_tokens=3, **GREEDY)
    cache = getattr(out, CACHE_KEY)
    assert [[len(kept) for kept in row] for row in cache.kept_vision_indices] == [[], [3], [3, 3]]
    for row, spec in enumerate(specs):
        alone = model.generate(**_rows(processor, image, [spec]), max_new_tokens=4, vision_keep_tokens=3, **GREEDY)
        assert torch.equal(out.sequences[row, -4:], alone.sequences[0, -4:])
