"""Write a tiny random stock checkpoint of a base, as its stock class's `save_pretrained` writes it (weights, config,
tokenizer, image processor, chat template): a local stand-in for a Hub checkpoint, to try `dynamic-llava init` and
`dynamic-llava train` offline (the README's recipe for a new base). Its weights are random: what it answers means
nothing.

    python scripts/tiny_stock_model.py --base qwen2_5_vl --out ./stock-qwen     # or --base llava_next

The models and processors are the test suite's tiny ones (`tests/fixtures/bases.py`): a byte-level tokenizer with the
base's special tokens, the stock PIL image processor, transformers' own config classes at hidden 64, 4 layers.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from fixtures.bases import (  # noqa: E402
    llava_next_processor_kwargs,
    tiny_llava_next_config,
    tiny_llava_next_processor,
    tiny_qwen2_5_vl_config,
    tiny_qwen2_5_vl_processor,
)

FOUR_LAYERS = {"text_config": {"num_hidden_layers": 4}}


def write(base: str, out: Path) -> None:
    import torch

    torch.manual_seed(0)
    if base == "qwen2_5_vl":
        from transformers import Qwen2_5_VLForConditionalGeneration

        model = Qwen2_5_VLForConditionalGeneration(tiny_qwen2_5_vl_config(**FOUR_LAYERS))
        processor = tiny_qwen2_5_vl_processor()
        parts = [processor.tokenizer, processor.image_processor]  # (the stock processor would need torchvision)
    else:
        from transformers import LlavaNextForConditionalGeneration, LlavaNextProcessor

        model = LlavaNextForConditionalGeneration(tiny_llava_next_config(**FOUR_LAYERS))
        dynamic = tiny_llava_next_processor()
        parts = [
            LlavaNextProcessor(
                image_processor=dynamic.image_processor, tokenizer=dynamic.tokenizer, **llava_next_processor_kwargs()
            )
        ]
    model.save_pretrained(out)
    for part in parts:
        part.save_pretrained(out)
    if base == "qwen2_5_vl":
        (out / "chat_template.jinja").write_text(processor.chat_template)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", choices=("qwen2_5_vl", "llava_next"), required=True)
    parser.add_argument("--out", required=True, help="a new (or empty) folder")
    args = parser.parse_args()
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        parser.error(f"--out {out} is not empty: pass a new folder")
    write(args.base, out)
    print(f"tiny random stock {args.base} checkpoint written to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
