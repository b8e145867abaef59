"""`dynamic-llava chat`: a conversation kept in the model's cache, one message per line of stdin, streamed; /image
PATH adds an image to the next message, /reset starts over, /exit or end of input ends."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from . import common
from .common import UsageError, one_line
from .flags import add_generation_flags

__all__ = ["Chat", "add_parser", "run"]


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "chat",
        help="a conversation kept in the model's cache (stdin: one message per line; /image PATH, /reset, /exit)",
        description="Chat with a model: each line you type is one message; the answer streams as it is generated, "
        "then its sparsity line. The conversation stays in the model's cache: each turn feeds only its new tokens. "
        "/image PATH adds an image to the next message, /reset starts over (with the --image images again), "
        "/exit or end of input ends. Reads a terminal or a pipe.",
    )
    add_generation_flags(parser, json_help="print one JSON line per turn (no streaming)")
    parser.set_defaults(run=run)
    return parser


class Chat:
    """One conversation kept in the model's cache: each turn feeds only its new tokens (and the last answer token)."""

    def __init__(self, model: Any, processor: Any, config: Any, folder: Path, args: argparse.Namespace) -> None:
        self.model, self.processor, self.config, self.folder, self.args = model, processor, config, folder, args
        eos = model.generation_config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])
        self.reset()

    def reset(self) -> None:
        self.messages: list[dict] = []
        self.ids = None  # the conversation's token ids so far (the last answer's final token not yet fed)
        self.cache = None
        self.closed = True  # whether the last answer ended with an end-of-sequence token
        self.turns = 0
        self.reset_by_error = False  # whether the last turn's failure dropped the conversation

    def turn(self, text: str, images: list[str], stream: bool) -> dict[str, Any]:
        """Answer `text` (with `images`, in order, before it); returns what the turn did (the JSON line)."""
        import torch

        from ..transformers_compat import cache_from_output

        processor, model, args = self.processor, self.model, self.args
        tokenizer = processor.tokenizer
        self.reset_by_error = False
        common.check_text(processor, text)
        content = [{"type": "image"} for _ in images] + [{"type": "text", "text": text}]
        messages = self.messages + [{"role": "user", "content": content}]
        whole = processor.apply_chat_template(messages, add_generation_prompt=True)
        if self.ids is None:
            chunk = whole
        else:
            before = processor.apply_chat_template(self.messages)
            if not whole.startswith(before):
                raise RuntimeError("the chat template does not render a conversation as an extension of its start")
            chunk = whole[len(before) :]
            if not self.closed and tokenizer.eos_token and before.endswith(tokenizer.eos_token):
                chunk = tokenizer.eos_token + chunk  # the answer stopped at --max-new-tokens: close it as the template
        inputs = processor(images=images or None, text=chunk, return_tensors="pt", add_special_tokens=self.ids is None)
        ids = inputs["input_ids"] if self.ids is None else torch.cat([self.ids, inputs["input_ids"]], dim=1)
        common.check_positions(ids.shape[1], args.max_new_tokens, self.config, "conversation", "/reset starts over")
        common.warn_unknown_words(tokenizer, text, self.folder)
        cached = 0 if self.cache is None else self.cache.get_seq_length()
        ids = ids.to(model.device)
        # the image inputs of this turn, whatever the base's processor names them (pixel_values, image_sizes,
        # image_grid_thw, ...); the text side is the conversation's `ids`
        text_side = ("input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids")
        image_inputs = {k: v for k, v in common.to_model(inputs, model).items() if k not in text_side}
        if image_inputs.get("pixel_values") is None:
            image_inputs = {}
        try:
            out = self._generate(ids, cached, image_inputs, stream)
        except Exception:
            had_turns = self.turns > 0
            self.reset()  # the cache may hold part of this turn
            self.reset_by_error = had_turns
            raise
        cache = cache_from_output(out)
        new = out.sequences[0, ids.shape[1] :]
        answer = processor.decode(new, skip_special_tokens=True).strip()
        self.closed = new.numel() > 0 and int(new[-1]) in self.eos_ids
        self.ids = out.sequences.cpu()
        self.messages = messages + [{"role": "assistant", "content": [{"type": "text", "text": answer}]}]
        self.cache = cache
        self.turns += 1
        return {
            "turn": self.turns,
            "prompt": text,
            "images": images,
            "answer": answer,
            "fed_tokens": ids.shape[1] - cached,
            "cache_length_before": cached,
            "cache_length": cache.get_seq_length(),
            "conversation_tokens": out.sequences.shape[1],
            "new_tokens": new.numel(),
            "sparsity": cache.sparsity_report(),
        }

    def _generate(self, ids: Any, cached: int, image_inputs: dict[str, Any], stream: bool) -> Any:
        """generate() of the conversation `ids` through the cache (its first `cached` tokens are in it)."""
        import torch
        from transformers import TextStreamer

        from ..transformers_compat import CACHE_KEY

        model, args = self.model, self.args
        call: dict[str, Any] = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if self.cache is not None:
            call[CACHE_KEY] = self.cache
            if image_inputs:
                # This turn's tokens but the last, with its new images, go through the cache first (transformers
                # 4.57's generate() hands pixel_values to the model only while the cache is empty); generate() then
                # feeds the last one. The same tokens and decisions as feeding the whole turn in generate().
                with torch.no_grad():
                    model(
                        input_ids=ids[:, cached:-1],
                        **image_inputs,
                        attention_mask=torch.ones_like(ids[:, :-1]),
                        use_cache=True,
                        logits_to_keep=1,
                        **{CACHE_KEY: self.cache},
                        **common.sparsity_kwargs(args),
                    )
        elif image_inputs:
            call.update(image_inputs)
        streamer = None
        if stream:
            streamer = TextStreamer(self.processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
            print("ASSISTANT: ", end="", flush=True)
        with torch.no_grad():
            return model.generate(
                **call, return_dict_in_generate=True, streamer=streamer, **common.generation_kwargs(args)
            )


def _read_turn(interactive: bool) -> str | None:
    """The next line the user typed (None at EOF): a prompt on a terminal, one line per turn from a pipe."""
    if interactive:
        try:
            return input("USER: ")
        except EOFError:
            print()
            return None
    line = sys.stdin.readline()
    return line if line else None


def run(args: argparse.Namespace) -> int:
    import torch

    common.check_generation_flags(args)
    if args.num_beams > 1:
        raise UsageError(
            "chat keeps one conversation in the cache: --num-beams is not supported; use greedy or --do-sample"
        )
    first_images = [common.readable_image(image) for image in args.image]
    folder, processor, config = common.open_model(args, announce_default=True)
    chat = Chat(common.load_weights(folder, args), processor, config, folder, args)
    if args.do_sample:
        torch.manual_seed(args.seed)
    interactive = sys.stdin.isatty()
    print(
        f"[chat] {args.model or folder.name}: one message per line; /image PATH adds an image to the next message, "
        "/reset starts over, /exit or end of input ends",
        file=sys.stderr,
    )
    pending, failures = list(first_images), 0
    while (line := _read_turn(interactive)) is not None:
        line = line.strip()
        if not line:
            continue
        try:
            if line.startswith("/"):
                command, _, rest = line.partition(" ")
                if command in ("/exit", "/quit"):
                    break
                if command == "/reset":
                    chat.reset()
                    pending = list(first_images)
                    print("[chat] the conversation starts over", file=sys.stderr)
                elif command == "/image":
                    pending.append(common.readable_image(rest.strip()))
                    print(f"[chat] {rest.strip()} goes with the next message", file=sys.stderr)
                else:
                    raise UsageError(f"unknown command {command}; use /image PATH, /reset or /exit")
                continue
            result = chat.turn(line, pending, stream=not args.json)
        except (UsageError, ValueError, OSError) as error:
            print(f"dynamic-llava chat: error: {one_line(error)}", file=sys.stderr, flush=True)
            if chat.turns == 0 and chat.reset_by_error:
                print("[chat] the conversation starts over", file=sys.stderr, flush=True)
            if pending and not line.startswith("/"):
                # a failed message takes its images with it: they must not ride along with the next one unasked
                print("[chat] that message's images were dropped; add them again with /image", file=sys.stderr)
                pending = []
            failures += 1
            continue
        pending = []
        if args.json:
            print(json.dumps(result), flush=True)
        else:
            print(
                f"{common.summary_line(chat.cache, config)}; cache {result['cache_length']:,} tokens, this turn fed "
                f"{result['fed_tokens']:,}",
                flush=True,
            )
    return 2 if failures and not interactive else 0
