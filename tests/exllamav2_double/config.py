"""ExLlamaV2Config: what prepare() reads from a model directory, and the engine's tunables."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


class ExLlamaV2Config:
    def __init__(self, model_dir: str | None = None) -> None:
        # exllamav2/config.py:174-188: the defaults, flash-attn off through the environment.
        self.max_batch_size = 1
        self.max_input_len = 2048
        self.max_attention_size = 2048**2
        self.max_output_len = None
        self.no_flash_attn = "EXLLAMA_NO_FLASH_ATTN" in os.environ
        self.model_dir = model_dir
        # exllamav2/config.py:190-194: a directory given is read at once.
        if model_dir is not None:
            self.prepare()

    def prepare(self) -> None:
        root = Path(self.model_dir or "")
        # exllamav2/config.py:212-219: the directory and its config.json must exist.
        assert root.exists(), "Can't find " + str(root)
        assert (root / "config.json").exists(), "Can't find " + str(root / "config.json")
        read: dict[str, Any] = json.loads((root / "config.json").read_text(encoding="utf8"))
        # exllamav2/config.py:225-237: generation_config.json's eos ids, always as a list.
        generation = root / "generation_config.json"
        if generation.exists():
            eos = json.loads(generation.read_text(encoding="utf8")).get("eos_token_id")
            self.generation_config = {"eos_token_id": [eos] if isinstance(eos, int) else eos}
        # exllamav2/config.py:242-243: exactly one architecture.
        assert len(read["architectures"]) == 1, "Multiple architectures defined in config.json"
        self.architecture = read["architectures"][0]
        # exllamav2/config.py:247-253: bos/eos/pad ids; of an eos list only the first is kept.
        self.bos_token_id = read.get("bos_token_id")
        self.eos_token_id = read.get("eos_token_id")
        self.pad_token_id = read.get("pad_token_id")
        self.vocab_size = read["vocab_size"]
        if isinstance(self.eos_token_id, list):
            self.eos_token_id = self.eos_token_id[0]
        self.num_hidden_layers = read["num_hidden_layers"]
        self.num_attention_heads = read["num_attention_heads"]
        self.num_key_value_heads = read.get("num_key_value_heads", self.num_attention_heads)
        self.head_dim = read.get("head_dim", read["hidden_size"] // self.num_attention_heads)
        # exllamav2/config.py:369-375: the context from the first key present, else 2048.
        keys = ("max_sequence_length", "model_max_length", "max_position_embeddings")
        self.max_seq_len = next((read[k] for k in keys if k in read), 2048)

    def arch_compat_overrides(self, quiet: bool = False, warn_only: bool = False) -> None:
        # exllamav2/config.py:629-674 disables flash-attn for architectures or flash-attn builds
        # that lack softcap/SWA support; a model dir may ask for that with "double_eager_only".
        read = json.loads((Path(self.model_dir or "") / "config.json").read_text(encoding="utf8"))
        if read.get("double_eager_only") and not warn_only:
            self.no_flash_attn = True
