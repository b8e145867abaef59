"""Dynamic-LLaVA as an lmms-eval (0.7.x) model: `lmms-eval --model dynamic_llava`.

lmms-eval finds it through the `lmms_eval.models` entry-point group (pyproject.toml), whose value is `manifests`:
lmms-eval's registry calls it and gets the `ModelManifest` naming the two classes below by dotted path (they are
imported only when `--model dynamic_llava` is asked for)::

    lmms-eval --model dynamic_llava --model_args pretrained=DIR,vision_keep_tokens=128 \\
        --tasks TASKS --batch_size 8 --device cuda --output_path out --log_samples

`model_args` (comma separated; only `pretrained` is required):

- `pretrained`: a Dynamic-LLaVA folder of any supported base (`save_pretrained`, `dynamic-llava export` / `convert`
  / `init` / `train` output) or a Hub id; its chat template renders the requests' messages. It is loaded with this
  package's classes (`dynamic_llava.hub.loading.load_local`: no remote code runs, and a folder without code files
  loads too).
- `dtype`: `auto` (default: the stored dtype), `float32`, `bfloat16`, `float16`.
- `device`: `cpu`, `cuda`, `cuda:N` (also `--device`; default cuda when available, else cpu).
- every per-call sparsity field of `generate()` (`sparse_settings.SparsityKwargs`: `vision_keep_tokens=K` or
  `vision_keep_rate=R`, `use_vision_predictor`, `use_output_text_predictor` (True/False), `image_scorer=predictor` or
  `attention`, ...), and `no_sparsity=True` (`SPARSITY_OFF`: both predictors off, the stock LLaVA computation on the
  same weights). Each is passed to every `generate()` call; the config is not changed. Unset: the folder's config
  decides. They are read, checked and combined by `sparsity_options.sparsity_request`, the rules of the command line
  too (both `vision_keep_tokens` and `vision_keep_rate` is the library's own error).

The batch size is `--batch_size N` (lmms-eval passes it to the constructor itself; `batch_size=` inside `--model_args`
too is refused by Python as a duplicate keyword).

What the model kept reaches the results in two ways:

1. for any task: `log_metrics(..., additional_metrics=...)`, which lmms-eval prints in its "Throughput Summary" after
   the score table and writes as `results["throughput"]` in the results JSON (`avg_dl_vision_keep_rate`,
   `avg_dl_output_text_keep_rate`, `avg_dl_kv_bytes_ratio`, ...; one value per run: lmms-eval makes one
   `generate_until` call per run);
2. per doc, next to the score: `sparsity_for(task, doc_id)` returns what was measured for that doc, and a task's
   `process_results` can return it as metrics (the shipped `synthetic_shapes` task does: rows of the score table,
   `results[task]`, and each sample of `--log_samples`).

`python -m dynamic_llava.integrations.lmms_eval write-task OUT --n 200 --seed 1` writes the local `synthetic_shapes`
task (images, questions, YAML, utils) for `--include_path OUT`; sample i is exactly the one `dynamic-llava evaluate
--task synthetic --seed S` asks.

Only `generate_until` tasks are supported (`loglikelihood` / multiple-choice and multi-round requests raise).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from lmms_eval.api.instance import GenerationResult, Instance, TokenCounts
from lmms_eval.api.model import lmms

from ..sparsity_options import NO_SPARSITY, sparsity_options, sparsity_request

MODEL_ID = "dynamic_llava"
TASK_FILES = Path(__file__).resolve().parent / "lmms_eval_tasks"

__all__ = [
    "MODEL_ID",
    "DynamicLlava",
    "DynamicLlavaSimple",
    "manifests",
    "sparsity_arguments",
    "sparsity_for",
    "write_synthetic_task",
]


def manifests() -> list:
    """Entry-point payload (`lmms_eval.models` group): the manifest of this model's two classes."""
    from lmms_eval.models.registry_v2 import ModelManifest  # lmms_eval.models is mid-import when this runs

    return [
        ModelManifest(
            model_id=MODEL_ID,
            chat_class_path=f"{__name__}.DynamicLlava",
            simple_class_path=f"{__name__}.DynamicLlavaSimple",
            aliases=("dynamic-llava",),
        )
    ]


# ---- per-doc sparsity, for tasks that report it next to their score ---------------------------------------------

_SPARSITY: dict[tuple[str, int], dict[str, Any]] = {}


def sparsity_for(task: str, doc_id: int) -> dict[str, Any] | None:
    """
    What the last `dynamic_llava` generation measured for `doc_id` of `task` (None if this process did not generate
    it: another model, or a cached response). Keys:

    - `vision_tokens_kept`: one count per image of the doc; `image_tokens`: tokens per image x images;
    - `output_text_kept` / `output_text_scored`: generated tokens whose keys/values entered the cache / generated
      tokens the output-text predictor decided on (0 / 0 with that predictor off: then every token is cached);
    - `kv_stored_bytes_share` / `kv_dense_bytes_share`: the doc's batch's KV-cache bytes (stored, and what a dense
      cache would hold) divided by the batch's rows, so that summing over docs gives the run's bytes;
      `batch_kv_bytes_ratio`: the batch's stored / dense.
    """
    return _SPARSITY.get((task, int(doc_id)))


# ---- model_args --------------------------------------------------------------------------------------------------

_DTYPES = {
    "auto": "auto",
    "float32": "float32",
    "fp32": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
}


def _as_bool(name: str, value: Any) -> bool | None:
    if value is None or isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"dynamic_llava: {name} must be True or False, got {value!r}")


def sparsity_arguments(no_sparsity: Any = False, **fields: Any) -> dict[str, Any]:
    """model_args -> the per-call sparsity keywords of `generate()` (only those that are set; text or typed values)."""
    try:
        return sparsity_request(fields, no_sparsity)
    except (TypeError, ValueError) as error:
        raise ValueError(f"dynamic_llava: {error}") from None


# ---- the model ---------------------------------------------------------------------------------------------------


class DynamicLlava(lmms):
    """Chat requests (`doc_to_messages`): the folder's chat template, batched `generate()`, and the sparsity kept."""

    is_simple = False

    def __init__(
        self,
        pretrained: str,
        device: str | None = None,
        dtype: str = "auto",
        batch_size: int | str = 1,
        max_batch_size: int | None = None,
        no_sparsity: bool = False,
        **model_args: Any,
    ) -> None:
        super().__init__()
        import torch

        from ..hub.loading import load_local, resolve_model

        fields = [option.field for option in sparsity_options()]
        sparsity = {field: model_args.pop(field) for field in fields if field in model_args}
        if model_args:
            known = ", ".join(("pretrained", "dtype", "device", *fields, NO_SPARSITY))
            raise ValueError(
                f"dynamic_llava: unknown model_args {sorted(model_args)}; known: {known} (the batch size is "
                "--batch_size)"
            )
        if str(batch_size).startswith("auto"):
            raise ValueError("dynamic_llava: --batch_size auto is not supported; give a number")
        self.batch_size_per_gpu = int(batch_size)
        if str(dtype) not in _DTYPES:
            raise ValueError(f"dynamic_llava: dtype {dtype!r} is not one of {sorted(_DTYPES)}")
        torch_dtype = _DTYPES[str(dtype)]
        torch_dtype = None if torch_dtype == "auto" else getattr(torch, torch_dtype)
        self.generate_sparsity = sparsity_arguments(no_sparsity, **sparsity)

        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if str(device).startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"dynamic_llava: device {device!r} asked for, but torch has no CUDA here; --device cpu")
        self._device = torch.device(device)
        # data parallel under `accelerate launch --num_processes N`, as lmms-eval's own HF models do: each process
        # takes its device and lmms-eval gives it its share of the requests
        from accelerate import Accelerator

        accelerator = Accelerator()
        if accelerator.num_processes > 1:
            self.accelerator = accelerator
            self._device = accelerator.device
            self._rank, self._world_size = accelerator.process_index, accelerator.num_processes

        model, processor = load_local(resolve_model(str(pretrained)), dtype=torch_dtype)
        if processor is None:
            raise ValueError(f"dynamic_llava: {pretrained} has no tokenizer/processor files")
        self._model = model.to(self._device).eval()
        self._config = self._model.config
        self.processor = processor
        self.processor.tokenizer.padding_side = "left"  # batched generation
        # fail here, not after the data is loaded: the settings are checked as generate() checks them (a count
        # against LLaVA-1.5's fixed tokens per image; other bases check it per image, in generate())
        settings = self._config.sparsity_settings(**self.generate_sparsity)
        if self._config.model_type == "dynamic_llava":
            settings.image_keep_count(int(self._config.image_seq_length))
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(self.processor.image_token)

    # ---- lmms properties ---------------------------------------------------------------------------------------

    @property
    def model(self):
        return self._model

    @property
    def config(self):
        return self._config

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def device(self):
        return self._device

    @property
    def eot_token_id(self):
        return self.tokenizer.eos_token_id

    # ---- unsupported request types -----------------------------------------------------------------------------

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        raise NotImplementedError(
            "dynamic_llava: loglikelihood requests (output_type loglikelihood / multiple_choice) are not supported: "
            "the sparsification happens in generate() (prefill pruning, decode-time KV admission); evaluate a "
            "generate_until variant of the task"
        )

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError(
            "dynamic_llava: multi-round generation requests are not supported; use single-turn generate_until tasks"
        )

    # ---- requests ----------------------------------------------------------------------------------------------

    def _prompt(self, request: Instance) -> tuple[str, list]:
        """(prompt text, images) of one chat request: the folder's chat template over doc_to_messages(doc)."""
        from lmms_eval.protocol import ChatMessages

        _ctx, doc_to_messages, _gen_kwargs, doc_id, task, split = request.args
        messages = ChatMessages(messages=doc_to_messages(self.task_dict[task][split][doc_id]))
        images, videos, audios = messages.extract_media()
        if videos or audios:
            raise NotImplementedError("dynamic_llava: video and audio inputs are not supported (images only)")
        text = self.processor.apply_chat_template(messages.to_hf_messages(), tokenize=False, add_generation_prompt=True)
        return text, images

    def _gen_kwargs(self, request: Instance) -> dict:
        return request.args[2]

    @staticmethod
    def _doc_key(request: Instance) -> tuple[str, int]:
        args = request.args  # both request layouts end with (doc_id, task, split)
        return args[-2], int(args[-3])

    def _generate_args(self, gen_kwargs: dict) -> dict:
        """lmms-eval generation_kwargs -> generate() keywords: greedy unless temperature > 0 or do_sample."""
        args: dict[str, Any] = {"max_new_tokens": int(gen_kwargs.get("max_new_tokens") or 128)}
        temperature = float(gen_kwargs.get("temperature") or 0)
        if temperature > 0 or _as_bool("do_sample", gen_kwargs.get("do_sample", False)):
            args.update(do_sample=True, temperature=temperature or 1.0)
            if gen_kwargs.get("top_p") is not None:
                args["top_p"] = float(gen_kwargs["top_p"])
        else:
            args["do_sample"] = False
        num_beams = int(gen_kwargs.get("num_beams") or 1)
        if num_beams != 1:
            args["num_beams"] = num_beams
        return args

    def generate_until(self, requests: list[Instance]) -> list[GenerationResult]:
        import torch
        from tqdm import tqdm

        from ..transformers_compat import cache_from_output

        results: list[GenerationResult | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}  # one batch never mixes generation settings; request order inside
        for i, request in enumerate(requests):
            groups.setdefault(json.dumps(self._gen_kwargs(request), sort_keys=True, default=str), []).append(i)
        totals = dict.fromkeys(
            ("images", "vision_kept", "vision_tokens", "text_kept", "text_scored", "stored", "dense", "gen_tokens"), 0
        )
        seconds = 0.0
        eos, pad = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        progress = tqdm(total=len(requests), disable=(self.rank != 0), desc="dynamic_llava responding")
        for indices in groups.values():
            gen_kwargs = dict(self._gen_kwargs(requests[indices[0]]))
            until = gen_kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            generate_args = {**self._generate_args(gen_kwargs), **self.generate_sparsity}
            for start in range(0, len(indices), self.batch_size):
                batch = indices[start : start + self.batch_size]
                prompts = [self._prompt(requests[i]) for i in batch]
                texts = [text for text, _ in prompts]
                images = [image for _, row_images in prompts for image in row_images]
                self.processor.tokenizer.padding_side = "left"
                inputs = self.processor(images=images or None, text=texts, return_tensors="pt", padding=True)
                inputs = inputs.to(self._device)
                pixel_values = inputs.get("pixel_values")
                if pixel_values is not None and pixel_values.is_floating_point():
                    inputs["pixel_values"] = pixel_values.to(self._model.dtype)  # as `dynamic-llava evaluate` does
                began = time.perf_counter()
                with torch.no_grad():
                    out = self._model.generate(**inputs, **generate_args, return_dict_in_generate=True)
                seconds += time.perf_counter() - began
                new_tokens = out.sequences[:, inputs["input_ids"].shape[1] :]
                decoded = self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
                report = cache_from_output(out).sparsity_report()
                rows = len(batch)
                totals["stored"] += report["stored_bytes"]
                totals["dense"] += report["dense_bytes"]
                for row, i in enumerate(batch):
                    text = decoded[row]
                    for stop in until:
                        if stop and stop in text:
                            text = text.split(stop)[0]
                    ids = new_tokens[row].tolist()
                    end = next((j + 1 for j, token in enumerate(ids) if token == eos), len(ids))  # through EOS
                    n_out = sum(1 for token in ids[:end] if token != pad)
                    vision = list(report["vision_tokens_kept"][row])
                    task, doc_id = self._doc_key(requests[i])
                    image_tokens = int((inputs["input_ids"][row] == self.image_token_id).sum())  # all its images'
                    _SPARSITY[(task, doc_id)] = {
                        "vision_tokens_kept": vision,
                        "image_tokens": image_tokens,
                        "output_text_kept": report["output_text_kept"][row],
                        "output_text_scored": report["output_text_scored"][row],
                        "kv_stored_bytes_share": report["stored_bytes"] / rows,
                        "kv_dense_bytes_share": report["dense_bytes"] / rows,
                        "batch_kv_bytes_ratio": report["kv_bytes_ratio"],
                    }
                    totals["images"] += len(vision)
                    totals["vision_kept"] += sum(vision)
                    totals["vision_tokens"] += image_tokens
                    totals["text_kept"] += report["output_text_kept"][row]
                    totals["text_scored"] += report["output_text_scored"][row]
                    totals["gen_tokens"] += n_out
                    n_in = int(inputs["attention_mask"][row].sum())
                    results[i] = GenerationResult(
                        text=text, token_counts=TokenCounts(input_tokens=n_in, output_tokens=n_out)
                    )
                    self.cache_hook.add_partial("generate_until", (texts[row], self._gen_kwargs(requests[i])), text)
                progress.update(rows)
        progress.close()
        self._log_sparsity(totals, seconds)
        return results

    def _log_sparsity(self, totals: dict[str, int], seconds: float) -> None:
        """The run's sparsity into lmms-eval's throughput metrics (printed and in results["throughput"])."""
        from lmms_eval.models.model_utils.gen_metrics import log_metrics

        def ratio(num: str, den: str) -> float | None:
            return totals[num] / totals[den] if totals[den] else None

        extra = {
            "dl_images": totals["images"],
            "dl_vision_tokens_kept_per_image": ratio("vision_kept", "images"),
            "dl_vision_keep_rate": ratio("vision_kept", "vision_tokens"),
            "dl_output_text_keep_rate": ratio("text_kept", "text_scored"),
            "dl_output_text_scored": totals["text_scored"],
            "dl_kv_stored_bytes": totals["stored"],
            "dl_kv_dense_bytes": totals["dense"],
            "dl_kv_bytes_ratio": ratio("stored", "dense"),
        }
        log_metrics(
            total_elapsed_time=seconds,
            total_gen_tokens=totals["gen_tokens"],
            avg_speed=(totals["gen_tokens"] / seconds) if seconds > 0 else 0.0,
            additional_metrics={key: value for key, value in extra.items() if value is not None},
        )


class DynamicLlavaSimple(DynamicLlava):
    """
    The same model for `--force_simple` (doc_to_visual + doc_to_text requests): the context is the user text and the
    images of doc_to_visual(doc) come first, as the chat template puts them (`<image>` placeholders in the context
    are removed: the template adds one per image).
    """

    is_simple = True

    def _prompt(self, request: Instance) -> tuple[str, list]:
        ctx, _gen_kwargs, doc_to_visual, doc_id, task, split = request.args
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) or []
        if any(isinstance(visual, (str, dict)) for visual in visuals):
            raise NotImplementedError("dynamic_llava: video and audio inputs are not supported (images only)")
        content = [{"type": "image", "image": visual} for visual in visuals]
        content.append({"type": "text", "text": ctx.replace("<image>\n", "").replace("<image>", "")})
        text = self.processor.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )
        return text, list(visuals)

    def _gen_kwargs(self, request: Instance) -> dict:
        return request.args[1]


# ---- the local synthetic task --------------------------------------------------------------------------------------


def write_synthetic_task(out: str | Path, n: int = 200, seed: int = 1) -> Path:
    """
    Write the `synthetic_shapes` task into `out` for `lmms-eval --include_path OUT --tasks synthetic_shapes`:
    `data/images/*.png`, `data/test.jsonl`, `synthetic_shapes.yaml` (the data file's absolute path: lmms-eval hands
    `data_files` to `datasets.load_dataset`, which resolves a relative path against the working directory) and
    `utils.py`. Sample i is `make_sample(sample_rng(seed, i), 64)`, the one `dynamic-llava evaluate --task synthetic
    --seed SEED` asks as its question i; the PNG files are read back and compared pixel for pixel. Existing task files
    in `out` are replaced.
    """
    import numpy as np
    from PIL import Image

    from ..synthetic import IMAGE_SIZE
    from ..synthetic.task import make_sample, sample_rng

    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    out = Path(out).expanduser().resolve()
    images = out / "data" / "images"
    images.mkdir(parents=True, exist_ok=True)
    for old in images.glob("*.png"):
        old.unlink()
    records = []
    for i in range(n):
        sample = make_sample(sample_rng(seed, i), IMAGE_SIZE)
        name = f"{seed}_{i:05d}.png"
        sample["image"].save(images / name, format="PNG")
        with Image.open(images / name) as back:
            if not np.array_equal(np.asarray(back.convert("RGB")), np.asarray(sample["image"].convert("RGB"))):
                raise RuntimeError(f"{images / name} does not read back as the image written")
        records.append(
            {
                "index": i,  # = the doc_id lmms-eval gives this row
                "seed": seed,
                "image": f"images/{name}",  # relative to OUT/data
                "question": sample["question"],
                "answer": sample["answer"],
                "question_type": sample["question_type"],
            }
        )
    data_file = out / "data" / "test.jsonl"
    data_file.write_text("".join(json.dumps(record) + "\n" for record in records))
    template = (TASK_FILES / "synthetic_shapes" / "synthetic_shapes.yaml.template").read_text()
    yaml_text = template.replace("{n}", str(n)).replace("{seed}", str(seed))
    (out / "synthetic_shapes.yaml").write_text(yaml_text.replace("{data_file}", json.dumps(str(data_file))))
    shutil.copyfile(TASK_FILES / "synthetic_shapes" / "utils.py", out / "utils.py")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dynamic_llava.integrations.lmms_eval",
        description="Tools of the lmms-eval integration of Dynamic-LLaVA.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    write = commands.add_parser(
        "write-task", help="write the local synthetic_shapes task (use it with --include_path OUT)"
    )
    write.add_argument("out", help="folder to write the task into")
    write.add_argument("--n", type=int, default=200, help="number of questions (default 200)")
    write.add_argument("--seed", type=int, default=1, help="question stream, as `dynamic-llava evaluate --seed`")
    args = parser.parse_args(argv)
    try:
        out = write_synthetic_task(args.out, n=args.n, seed=args.seed)
    except (ValueError, OSError) as error:
        print(f"write-task: error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {args.n} questions (seed {args.seed}) to {out}; run lmms-eval with --include_path {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
