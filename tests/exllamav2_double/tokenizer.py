"""ExLlamaV2Tokenizer over the double's tokenizer.json: one token per vocabulary piece.

The vocabulary is read from tokenizer.json's model.vocab and added_tokens, the keys the library
reads (exllamav2/tokenizer/tokenizer.py:133-140); encoding is greedy longest match rather than
BPE, which the engine cannot tell apart: it only passes text in and ids out.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tests.exllamav2_double import torch_double


class ExLlamaV2Tokenizer:
    def __init__(
        self, config: Any, lazy_init: bool = True, force_json: bool = False, force_spm: bool = False
    ) -> None:
        path = Path(config.model_dir) / "tokenizer.json"
        # exllamav2/tokenizer/tokenizer.py:126-127
        if not path.exists():
            raise FileNotFoundError("No supported tokenizer found.")
        data = json.loads(path.read_text(encoding="utf8"))
        self.piece_to_id: dict[str, int] = dict(data["model"]["vocab"])
        self.special: dict[str, int] = {}
        for added in data.get("added_tokens", []):
            self.piece_to_id[added["content"]] = added["id"]
            if added["special"]:
                self.special[added["content"]] = added["id"]
        self.id_to_piece = {i: p for p, i in self.piece_to_id.items()}
        # exllamav2/tokenizer/tokenizer.py:197-198: the ids from the model's config.
        self.bos_token_id = config.bos_token_id
        self.eos_token_id = config.eos_token_id
        self._longest = max(len(p) for p in self.piece_to_id)

    def get_vocab_size(self) -> int:
        # exllamav2/tokenizer/tokenizer.py:259-263,302-311: one past the highest id.
        return 1 + max(self.id_to_piece)

    def encode(
        self,
        text: str,
        add_bos: bool = False,
        add_eos: bool = False,
        encode_special_tokens: bool = False,
        return_offsets: bool = False,
        embeddings: Any = None,
    ) -> torch_double.Tensor:
        ids: list[int] = []
        i = 0
        while i < len(text):
            for n in range(min(self._longest, len(text) - i), 0, -1):
                piece = text[i : i + n]
                if piece in self.piece_to_id and (
                    encode_special_tokens or piece not in self.special
                ):
                    ids.append(self.piece_to_id[piece])
                    i += n
                    break
            else:
                raise ValueError(f"the double's vocabulary has no piece for {text[i]!r}")
        # exllamav2/tokenizer/tokenizer.py:487-493: BOS/EOS added on request; shape (1, n).
        if add_bos and self.bos_token_id is not None:
            ids.insert(0, self.bos_token_id)
        if add_eos and self.eos_token_id is not None:
            ids.append(self.eos_token_id)
        return torch_double.row(ids)

    def get_id_to_piece_list(self, include_special_tokens: bool = False) -> list[str]:
        # exllamav2/tokenizer/tokenizer.py:662-700 with tokenizer/hf.py:41-66: without
        # include_special_tokens, special tokens decode to "" (HF skips them).
        pieces = [""] * self.get_vocab_size()
        for i, piece in self.id_to_piece.items():
            special = piece in self.special
            pieces[i] = piece if include_special_tokens or not special else ""
        return pieces

    def decode(self, ids: torch_double.Tensor, decode_special_tokens: bool = False) -> list[str]:
        # exllamav2/tokenizer/tokenizer.py:582-587: a (1, n) tensor decodes to one string per row.
        pieces = self.get_id_to_piece_list(decode_special_tokens)
        return ["".join(pieces[t] for t in r) for r in ids.tolist()]
