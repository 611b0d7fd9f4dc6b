"""ExLlamaV2 (the model): its module list, loading with progress callbacks, and what it "says".

The double has no weights. What it generates is its script: the model directory's
`double_script.txt` (a file only the double reads), or SCRIPT, tokenized, then the first EOS id,
over and over. That keeps every stream deterministic and lets tests choose what appears.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.exllamav2_double import torch_double

SCRIPT = "Hello! I am the test double of a language model, and I write one character at a time."
# Pretend weights, so torch.cuda.memory_allocated has something to report.
WEIGHT_BYTES = 64 * 1024**2

Progress = Callable[[int, int], None] | None


class ExLlamaV2:
    def __init__(self, config: Any, lazy_load: bool = False, archparams: Any = None) -> None:
        self.config = config
        # exllamav2/model.py:100-154: embedding, attention + MLP per layer, norm, head.
        self.modules = ["embedding"] + ["attn", "mlp"] * config.num_hidden_layers + ["norm", "head"]
        self.loaded = False
        script = Path(config.model_dir) / "double_script.txt"
        self.script = script.read_text(encoding="utf8") if script.exists() else SCRIPT

    def load(
        self,
        gpu_split: list[float] | None = None,
        lazy: bool = False,
        stats: bool = False,
        callback: Progress = None,
        callback_gen: Any = None,
        progress: bool = False,
    ) -> None:
        self._load_modules(callback)

    def load_autosplit(
        self,
        cache: Any,
        reserve_vram: int | list[int] | None = None,
        last_id_only: bool = False,
        callback: Progress = None,
        callback_gen: Any = None,
        progress: bool = False,
    ) -> None:
        # exllamav2/model.py:536: the chunk never exceeds the sequence length.
        self.config.max_input_len = min(self.config.max_input_len, self.config.max_seq_len)
        # exllamav2/cache.py:120-140: a lazy cache gets its tensors as layers are placed.
        assert cache.lazy, "load_autosplit needs a cache made with lazy=True"
        self._load_modules(callback)
        cache.allocate()

    def _load_modules(self, callback: Progress) -> None:
        # exllamav2/model.py:336-344 and 575-666: callback(i, n) before module i, then (n, n).
        total = len(self.modules)
        for index in range(total):
            if callback is not None:
                callback(index, total)
        if callback is not None:
            callback(total, total)
        torch_double.cuda.allocated[0] = torch_double.cuda.allocated.get(0, 0) + WEIGHT_BYTES
        self.loaded = True

    def unload(self) -> None:
        # exllamav2/model.py:682-691
        if self.loaded:
            torch_double.cuda.allocated[0] -= WEIGHT_BYTES
        self.modules = []
        self.loaded = False
