"""The server generation of `transformers/commands/serving.py`'s `ServeCommand` (transformers 4.57):
`DynamicLlavaServeCommand` loads and classifies Dynamic-LLaVA (`ThreadedServerLoading`); the server is otherwise the
stock one.

The stock look-ups replaced (4.57.6): the loader ends in `getattr(transformers, config.architectures[0])`
(`commands/serving.py:1625`) and `get_model_modality` raises "Unknown modality" for a class name outside
transformers' own mapping tables (`serving.py:907-914`). 4.57's `TimedModel` treats the timeout -1 as "unload at
once": the served model is kept about 3 years instead.
"""

from __future__ import annotations

import argparse
from typing import Any

from transformers.commands.serving import Modality, ServeArguments, ServeCommand

from .model import ThreadedServerLoading

__all__ = ["DynamicLlavaServeCommand", "run"]

_QUANTIZATION = {"bnb-4bit": {"load_in_4bit": True}, "bnb-8bit": {"load_in_8bit": True}, None: {}}


class DynamicLlavaServeCommand(ThreadedServerLoading, ServeCommand):
    VLM = Modality.VLM

    def loading_settings(self) -> dict[str, Any]:
        return {
            "trust_remote_code": self.args.trust_remote_code,
            "attn_implementation": self.args.attn_implementation,
            "dtype": self.args.dtype,
            "device": self.args.device,
            "quantization": self.get_quantization_config(self.args),
        }


def run(opts: argparse.Namespace) -> None:
    arguments = ServeArguments(
        continuous_batching=False,
        device=opts.device,
        dtype=opts.dtype,
        trust_remote_code=opts.trust_remote_code,
        attn_implementation=opts.attn_implementation,
        host=opts.host,
        port=opts.port,
        # 4.57's TimedModel has no "never": Timer(-1) fires at once, so the model was unloaded after every request
        # and concurrent requests raced to reload it ("Cannot copy out of meta tensor"). Keep it ~3 years instead.
        model_timeout=10**8,
        log_level=opts.log_level,
        default_seed=opts.default_seed,
        enable_cors=opts.enable_cors,
        force_model=opts.model,
        **_QUANTIZATION[opts.quantization],
    )
    server = DynamicLlavaServeCommand(arguments)
    server.load_model_and_processor(server.process_model_name(opts.model))  # 4.57 loads lazily: load before listening
    server.run()
