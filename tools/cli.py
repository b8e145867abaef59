"""The `dynamic-llava` command."""

from __future__ import annotations

import argparse
import json
import sys


def _demo(args) -> int:
    import torch

    from .tiny import calibrate_output_text_bias, tiny_inputs, tiny_model

    torch.manual_seed(args.seed)
    model = tiny_model(args.seed)
    inputs = tiny_inputs([(5, 6, 7, 8, 9)], seed=args.seed)
    calibrate_output_text_bias(model, inputs, max_new_tokens=args.max_new_tokens)
    out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False, return_dict_in_generate=True)
    cache = out["cache"] if "cache" in out else out["past_key_values"]
    report = cache.sparsity_report()
    prompt_len = inputs["input_ids"].shape[1]
    print("Dynamic-LLaVA demo: a tiny RANDOM model built locally (no trained weights ship yet).")
    print(f"prompt: {prompt_len} tokens, of which 16 image tokens; sparse_layer={model.config.sparse_layer}")
    print(f"generated ids: {out.sequences[0, prompt_len:].tolist()}")
    print(f"kept vision tokens: {cache.kept_vision_indices[0].tolist()} ({report['vision_tokens_kept'][0][0]} of 16)")
    print(
        f"output-text tokens kept: {report['output_text_kept'][0]} of {report['output_text_scored'][0]} "
        f"(keep ratio {report['output_text_keep_rate']:.2f}; the random predictor's bias was shifted toward 0.5)"
    )
    print(f"entries per layer: {report['kept_lengths']}")
    print(
        f"KV cache: {report['stored_bytes']} bytes stored vs {report['dense_bytes']} bytes in a dense cache "
        f"(ratio {report['kv_bytes_ratio']:.3f})"
    )
    if args.json:
        print(json.dumps(report))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dynamic-llava", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="generate with a tiny local model and print what was kept")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--max-new-tokens", type=int, default=24)
    demo.add_argument("--json", action="store_true", help="also print the sparsity report as JSON")
    demo.set_defaults(func=_demo)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError, OSError) as error:
        print(f"dynamic-llava {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
