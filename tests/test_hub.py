"""Export a tiny model and load it like a Hub user: a fresh process where this project is not importable."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import pipeline

from dynamic_llava.files import OutputExistsError
from dynamic_llava.hub.export import export_model

from fixtures.tiny import tiny_model


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from fixtures.tiny import tiny_processor

    work = tmp_path_factory.mktemp("hub")
    model, processor = tiny_model(4), tiny_processor()
    folder = export_model(model, work / "repo", processor=processor)
    images = []
    for i, size in enumerate([(40, 24), (20, 36)]):
        path = work / f"image{i}.png"
        Image.effect_noise(size, 60 + 30 * i).convert("RGB").save(path)
        images.append(str(path))
    return model, processor, folder, images


def test_exported_folder_is_what_a_hub_repo_holds(exported):
    _, _, folder, _ = exported
    names = {p.name for p in folder.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "modeling_dynamic_llava.py",
        "configuration_dynamic_llava.py",
        "sparse_cache.py",
        "processing_dynamic_llava.py",
        "image_processing_dynamic_llava.py",
        "preprocessor_config.json",
        "tokenizer_config.json",
        "generation_config.json",
        "README.md",
        "example.ipynb",
    } <= names
    assert not any(name.endswith((".bin", ".pt", ".pkl")) for name in names)
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"]["AutoModelForImageTextToText"].startswith("modeling_dynamic_llava.")
    assert "AutoModelForVision2Seq" in config["auto_map"] and "AutoConfig" in config["auto_map"]
    card = (folder / "README.md").read_text()
    assert "library_name: transformers" in card and "pipeline_tag: image-text-to-text" in card


@pytest.mark.slow
def test_fresh_process_without_the_project_matches_in_process(exported, hub_load_script):
    model, processor, folder, images = exported
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_MODULES_CACHE=str(folder.parent / "modules"))
    repo_root = Path(__file__).resolve().parents[1]
    run = subprocess.run(
        [sys.executable, str(hub_load_script), str(folder), ",".join(images), repo_root.name],
        capture_output=True,
        text=True,
        env=env,
        cwd=str(folder.parent),
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.split("RESULT ", 1)[1])
    assert all(module.startswith("transformers_modules") for module in result["classes"]), result["classes"]
    assert result["cache_class"] == "DynamicLlavaCache"
    if "vision2seq_class" in result:
        assert result["vision2seq_class"] == "DynamicLlavaForConditionalGeneration"

    # the same in this process, with the package's own classes
    pil = [Image.open(p) for p in images]
    inputs = processor(images=pil[0], text="<image>\nw5 w6 w7", return_tensors="pt")
    ours = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert result["generate_ids"] == ours[0, inputs["input_ids"].shape[1] :].tolist()
    assert len(result["kept_vision"]) == 4

    pipe = pipeline("image-text-to-text", model=model, processor=processor)
    messages = [
        [{"role": "user", "content": [{"type": "image", "image": im}, {"type": "text", "text": "w5 w6 w7"}]}]
        for im in pil
    ]
    one = pipe(text=messages[0], max_new_tokens=8, return_full_text=False)[0]["generated_text"]
    assert result["pipeline_one"] == one and one.strip()
    both = [pipe(text=m, max_new_tokens=8, return_full_text=False)[0]["generated_text"] for m in messages]
    assert result["pipeline_batch"] == both
    assert result["streamed"].strip() == one.strip()


def test_export_refuses_a_non_empty_folder_and_leaves_nothing_behind(exported, tmp_path):
    model, processor, _, _ = exported
    target = tmp_path / "taken"
    target.mkdir()
    (target / "mine.txt").write_text("user data")
    with pytest.raises(OutputExistsError, match="--overwrite"):
        export_model(model, target, processor=processor)
    assert [p.name for p in target.iterdir()] == ["mine.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["taken"]
    export_model(model, target, processor=processor, overwrite=True)
    assert (target / "config.json").exists() and not (target / "mine.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["taken"]


def test_export_failure_leaves_no_partial_folder(exported, tmp_path, monkeypatch):
    model, processor, _, _ = exported
    import dynamic_llava.hub.export as export_module

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(export_module, "write_model_card", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        export_model(model, tmp_path / "out", processor=processor)
    assert list(tmp_path.iterdir()) == []


def test_sharded_export_loads_back(exported, tmp_path):
    model, processor, _, _ = exported
    folder = export_model(model, tmp_path / "sharded", processor=processor, max_shard_size="20KB")
    assert (folder / "model.safetensors.index.json").exists()
    assert len(list(folder.glob("model-*.safetensors"))) > 1
    from dynamic_llava import DynamicLlavaForConditionalGeneration

    loaded, info = DynamicLlavaForConditionalGeneration.from_pretrained(folder, output_loading_info=True)
    assert not any(info.values()), info
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


# ---- the folder the package ships: the embedded demo model -----------------------------------------------------------


@pytest.mark.parametrize("base", ["llava", "qwen2_5_vl"])
def test_shipped_demo_folder_is_a_complete_current_hub_folder(base):
    """Every folder the package ships loads with the stock Auto classes: each demo folder holds its base's remote
    code, and that code is today's (after changing a remote-code file: `python scripts/refresh_demo_model.py` under
    4.57)."""
    from dynamic_llava.hub.bases import BASES
    from dynamic_llava.hub.folder import folder_code_files
    from dynamic_llava.package_data import DEMO_MODELS

    folder = DEMO_MODELS[base]
    for name, source in folder_code_files(BASES[base]).items():
        shipped = folder / name
        assert shipped.is_file(), f"{name} is missing from {folder}"
        assert shipped.read_bytes() == source.read_bytes(), (
            f"{name} in {folder} is stale: run scripts/refresh_demo_model.py"
        )
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"] == BASES[base].auto_map
    for name in ("processor_config.json", "tokenizer_config.json"):
        assert "AutoProcessor" in json.loads((folder / name).read_text()).get("auto_map", {}), name


@pytest.mark.slow
@pytest.mark.parametrize("base", ["llava", "qwen2_5_vl"])
def test_shipped_demo_folder_loads_with_the_stock_auto_classes_in_a_fresh_process(tmp_path, base):
    """Each demo folder alone (this package not importable): the stock Auto classes load it from its remote code and
    answer as the package's own loader does, token for token."""
    import random

    from dynamic_llava.hub.bases import BASES
    from dynamic_llava.hub.loading import load_local
    from dynamic_llava.package_data import DEMO_MODELS
    from dynamic_llava.synthetic import IMAGE_SIZE
    from dynamic_llava.synthetic.bases import synthetic_base
    from dynamic_llava.synthetic.task import make_sample, vicuna_prompt

    folder = DEMO_MODELS[base]
    sample = make_sample(random.Random(3), IMAGE_SIZE)
    sample["image"].save(tmp_path / "shape.png")
    prompt = vicuna_prompt(sample["question"], image=synthetic_base(base).image_placeholder)
    script = tmp_path / "load.py"
    script.write_text(
        "import json, sys\n"
        "sys.modules['dynamic_llava'] = None\n"
        "from PIL import Image\n"
        "from transformers import AutoModelForImageTextToText, AutoProcessor\n"
        f"folder, image = {str(folder)!r}, {str(tmp_path / 'shape.png')!r}\n"
        f"prompt = {prompt!r}\n"
        "processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)\n"
        "model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True)\n"
        "inputs = processor(images=[Image.open(image)], text=[prompt], return_tensors='pt')\n"
        "out = model.generate(**inputs, max_new_tokens=12, do_sample=False)\n"
        "print('RESULT ' + json.dumps([type(processor).__name__, out[0, inputs['input_ids'].shape[1]:].tolist()]))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    run = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=600
    )
    assert run.returncode == 0, run.stderr[-3000:]
    processor_class, tokens = json.loads(run.stdout.split("RESULT ", 1)[1])
    assert processor_class == BASES[base].processor_class
    model, processor = load_local(folder)
    inputs = processor(images=[sample["image"]], text=[prompt], return_tensors="pt")
    with torch.no_grad():
        expected = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    assert tokens == expected[0, inputs["input_ids"].shape[1] :].tolist()
