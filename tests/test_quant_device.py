"""bitsandbytes, device_map / offload and half precision: sparsification keeps working."""

import importlib.util

import pytest
import torch

from dynamic_llava import DynamicLlavaForConditionalGeneration
from dynamic_llava.bench.stock import stock_llava
from dynamic_llava.sparse_cache import cache_from_output as cache_of

from fixtures.tiny import tiny_inputs, tiny_model

GREEDY = dict(do_sample=False, return_dict_in_generate=True)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny model and the stock LLaVA with the same weights, saved; with a calibrated output-text predictor."""
    from dynamic_llava.training.calibration import calibrate_output_text_bias

    folder = tmp_path_factory.mktemp("quant")
    # dimensions that bitsandbytes' 4-bit CPU kernels accept (multiples of 64)
    model = tiny_model(
        3,
        text_config=dict(hidden_size=64, intermediate_size=128, num_key_value_heads=4),
        vision_config=dict(hidden_size=64, intermediate_size=128, projection_dim=64),
    )
    with torch.no_grad():  # a wide image predictor: its scores spread like a trained one's (see large_margin_inputs)
        model.image_score_predictor.output_mlp[-1].weight.mul_(20)
    calibrate_output_text_bias(model, tiny_inputs([(5, 6, 7, 8, 9)]), max_new_tokens=20)
    model.save_pretrained(folder / "ours")
    stock = stock_llava(model)
    stock.save_pretrained(folder / "stock")
    return model, folder


def vision_gap(model, inputs):
    """
    Smallest gap, over rows, between the k-th and (k+1)-th image-predictor margin logit0 - logit1 (the top-k of the
    keep log-probability is the top-k of this margin; the margin does not saturate as the log-probability does).
    """
    gaps = []
    hook = model.image_score_predictor.register_forward_hook(
        lambda m, a, out: gaps.append((out[..., 0] - out[..., 1]).float().sort(-1, descending=True).values)
    )
    with torch.no_grad():
        model(**inputs)
    hook.remove()
    k = int(16 * model.config.vision_keep_rate)
    scores = gaps[0]
    return float((scores[:, k - 1] - scores[:, k]).min())


def agreement(a, b):
    """Share of rows whose kept vision indices agree, and share of equal output-text decisions."""
    pairs = zip(a.kept_vision_indices, b.kept_vision_indices, strict=True)
    vision = sum(torch.equal(x[0], y[0]) for x, y in pairs) / len(a.kept_vision_indices)
    ta, tb = torch.cat(a.output_text_keep), torch.cat(b.output_text_keep)
    n = min(ta.numel(), tb.numel())
    return vision, float((ta[:n] == tb[:n]).float().mean())


def large_margin_inputs(model):
    """
    A case built for a large image-predictor margin: 4 of the 16 patches bright, the rest dark (or the reverse),
    so the patches' hidden states, and so their scores, form two well separated groups; the pattern whose
    top-4 boundary gap is larger in float32 is returned.
    """
    best = None
    for bright_few in (True, False):
        pixels = torch.full((1, 3, 32, 32), -1.5 if bright_few else 1.5)
        for r, c in ((0, 1), (1, 3), (2, 0), (3, 2)):
            pixels[:, :, r * 8 : (r + 1) * 8, c * 8 : (c + 1) * 8] = 1.5 if bright_few else -1.5
        inputs = dict(tiny_inputs([(5, 6, 7, 8, 9)]), pixel_values=pixels)
        gap = vision_gap(model, inputs)
        if best is None or gap > best[0]:
            best = (gap, inputs)
    return best


def compare_decisions(reference, other, label, seeds=range(6)):
    """Agreement of `other` with `reference` over random inputs (printed), and exact on a large-margin case."""

    def run(model, inputs):
        inputs = dict(inputs, pixel_values=inputs["pixel_values"].to(next(model.model.vision_tower.parameters()).dtype))
        return cache_of(model.generate(**inputs, max_new_tokens=8, **GREEDY))

    vision_agree, text_agree = [], []
    for seed in seeds:
        inputs = tiny_inputs([(5, 6, 7, 8, 9)], seed=seed)
        v, t = agreement(run(reference, inputs), run(other, inputs))
        vision_agree.append(v)
        text_agree.append(t)
    gap, inputs = large_margin_inputs(reference)
    assert gap > 0.5, f"the constructed case has a top-k gap of only {gap:.3f}"
    assert torch.equal(run(reference, inputs).kept_vision_indices[0][0], run(other, inputs).kept_vision_indices[0][0])
    print(
        f"\n[{label}] agreement over {len(vision_agree)} random inputs: kept vision indices "
        f"{sum(vision_agree) / len(vision_agree):.2f}, output-text decisions {sum(text_agree) / len(text_agree):.2f}; "
        f"constructed case (top-k gap {gap:.2f}): kept vision indices equal"
    )


bnb = importlib.util.find_spec("bitsandbytes") is not None


@pytest.mark.slow
@pytest.mark.skipif(not bnb, reason='bitsandbytes is not installed (pip install -e ".[quant]")')
@pytest.mark.parametrize("mode", ["8bit", "nf4", "fp4"])
def test_bitsandbytes(saved, mode):
    from transformers import BitsAndBytesConfig, LlavaForConditionalGeneration

    model, folder = saved
    # the usual VLM setting: the vision tower and projector stay unquantized (root paths: both majors match them)
    skip = ["model.vision_tower", "model.multi_modal_projector", "lm_head"]
    quant = (
        BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
        if mode == "8bit"
        else BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=mode,
            bnb_4bit_compute_dtype=torch.float32,
            llm_int8_skip_modules=skip,
        )
    )
    ours = DynamicLlavaForConditionalGeneration.from_pretrained(
        folder / "ours", quantization_config=quant, dtype=torch.float32
    )
    assert ours.image_score_predictor.down_mlp[1].weight.dtype == torch.float32  # kept out of quantization
    assert type(ours.model.language_model.layers[0].mlp.up_proj).__module__.startswith("bitsandbytes")
    assert not type(ours.model.multi_modal_projector.linear_1).__module__.startswith("bitsandbytes")
    stock = LlavaForConditionalGeneration.from_pretrained(
        folder / "stock", quantization_config=quant, dtype=torch.float32
    )
    inputs = tiny_inputs([(5, 6, 7, 8, 9), (10, 11)], seed=2)
    # sparsification off == stock under the same quantization, token for token
    ours.config.use_vision_predictor = ours.config.use_output_text_predictor = False
    a = ours.generate(**inputs, max_new_tokens=10, do_sample=False)
    b = stock.generate(**inputs, max_new_tokens=10, do_sample=False)
    assert torch.equal(a, b)
    ours.config.use_vision_predictor = ours.config.use_output_text_predictor = True
    compare_decisions(model, ours, f"bnb {mode} vs fp32")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_decisions(saved, dtype):
    model, folder = saved
    half = DynamicLlavaForConditionalGeneration.from_pretrained(folder / "ours", dtype=dtype)
    assert half.lm_head.weight.dtype == dtype
    assert half.output_text_score_predictor.output_mlp[1].weight.dtype == torch.float32
    compare_decisions(model, half, f"{dtype} vs fp32")


def offload_maps(sparse_layer):
    names = [
        "model.vision_tower",
        "model.multi_modal_projector",
        "model.language_model.embed_tokens",
        "model.language_model.norm",
        "model.language_model.rotary_emb",
        "lm_head",
        "model.image_score_predictor",
        "model.output_text_score_predictor",
    ]
    split = {name: "cpu" for name in names}
    for i in range(4):
        split[f"model.language_model.layers.{i}"] = "disk" if i in (0, sparse_layer) else "cpu"
    return [split, "auto"]


@pytest.mark.slow
@pytest.mark.parametrize("which", ["manual", "auto"])
def test_device_map_and_disk_offload(saved, tmp_path, which):
    model, folder = saved
    manual, auto = offload_maps(model.config.sparse_layer)
    kwargs = dict(device_map=manual, offload_folder=str(tmp_path / "offload"))
    if which == "auto":
        # about half of the weights fit: the rest is offloaded to disk (all on disk is unsupported by 4.57)
        size = sum(p.numel() * p.element_size() for p in model.parameters())
        kwargs = dict(device_map="auto", max_memory={"cpu": size // 2}, offload_folder=str(tmp_path / "offload"))
    mapped = DynamicLlavaForConditionalGeneration.from_pretrained(folder / "ours", dtype=torch.float32, **kwargs)
    device_map = mapped.hf_device_map
    assert "disk" in set(device_map.values()), device_map
    if which == "manual":  # layers sparse_layer-1 and sparse_layer sit on different entries
        sparse_layer = model.config.sparse_layer
        layers = "model.language_model.layers"
        assert device_map[f"{layers}.{sparse_layer - 1}"] != device_map[f"{layers}.{sparse_layer}"]
    inputs = tiny_inputs([(5, 6, 7, 8, 9), (10, 11)], seed=4)
    a = model.generate(**inputs, max_new_tokens=10, **GREEDY)
    b = mapped.generate(**inputs, max_new_tokens=10, **GREEDY)
    assert torch.equal(a.sequences, b.sequences)
    ca, cb = cache_of(a), cache_of(b)
    assert torch.equal(ca.kept_lengths(), cb.kept_lengths())
    assert all(torch.equal(x, y) for x, y in zip(ca.output_text_keep, cb.output_text_keep, strict=True))
    assert all(torch.equal(x[0], y[0]) for x, y in zip(ca.kept_vision_indices, cb.kept_vision_indices, strict=True))


@pytest.mark.parametrize("impl", ["flash_attention_2", "flex_attention"])
def test_unsupported_attention_is_refused_at_load(saved, impl):
    # the sparse layers need a 4D mask over the kept past plus the chunk; these kernels take none
    _, folder = saved
    with pytest.raises((ValueError, ImportError), match="(?i)flash|flex|support"):
        DynamicLlavaForConditionalGeneration.from_pretrained(folder / "ours", attn_implementation=impl)
