"""The server generation of one `Serve` class (`transformers/cli/serve.py` with
`Serve._load_model_and_data_processor`; transformers 5.0 to 5.4): `DynamicLlavaServe` loads and classifies
Dynamic-LLaVA (`ThreadedServerLoading`); the server is otherwise the stock one, which its constructor runs.

The stock look-ups replaced (5.0.0): the loader ends in `getattr(transformers, config.architectures[0])`
(`cli/serve.py:1826`) and `get_model_modality` raises "Unknown modality" for a class name outside transformers' own
mapping tables (`serve.py:929-945`).
"""

from __future__ import annotations

import argparse
from typing import Any

from transformers.cli.serve import Modality, Serve

from .model import ThreadedServerLoading, accepted

__all__ = ["DynamicLlavaServe", "run"]


class DynamicLlavaServe(ThreadedServerLoading, Serve):
    VLM = Modality.VLM

    def loading_settings(self) -> dict[str, Any]:
        return {
            "trust_remote_code": self.trust_remote_code,
            "attn_implementation": self.attn_implementation,
            "dtype": self.dtype,
            "device": self.device,
            "quantization": self.get_quantization_config(),
        }


def run(opts: argparse.Namespace) -> None:
    settings = {
        "continuous_batching": False,
        "device": opts.device,
        "dtype": opts.dtype,
        "trust_remote_code": opts.trust_remote_code,
        "attn_implementation": opts.attn_implementation,
        "quantization": opts.quantization,
        "host": opts.host,
        "port": opts.port,
        "model_timeout": -1,
        "log_level": opts.log_level,
        "default_seed": opts.default_seed,
        "enable_cors": opts.enable_cors,
        "force_model": opts.model,  # loaded in __init__
    }
    DynamicLlavaServe(**accepted(DynamicLlavaServe.__init__, settings))  # runs uvicorn until stopped
