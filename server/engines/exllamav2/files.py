"""What the ExLlamaV2 engine reads from a Hugging Face model directory itself, not via the library.

ExLlamaV2 keeps only the first EOS id of config.json and renders no chat templates, so the stop
ids, the chat template and the special-token texts come from the model's JSON files here, the
way Hugging Face's `transformers` reads them. Nothing here needs torch or a GPU.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmserve.server.engines.base import EngineError

__all__ = ["ModelFiles", "read_model_files"]


@dataclass(frozen=True, slots=True)
class ModelFiles:
    eos_token_ids: tuple[int, ...]
    chat_template: str | None
    bos_token: str
    eos_token: str
    add_bos: bool


def read_model_files(model_dir: str) -> ModelFiles:
    """Read config.json, generation_config.json and the tokenizer's and template's files."""
    root = Path(model_dir)
    if not (root / "config.json").is_file():
        raise EngineError(f"exllamav2.model_dir {model_dir} holds no config.json")
    config = _read_json(root / "config.json") or {}
    generation = _read_json(root / "generation_config.json") or {}
    tokenizer = _read_json(root / "tokenizer_config.json") or {}
    eos_ids = _ids(config.get("eos_token_id")) + _ids(generation.get("eos_token_id"))
    bos_token = _token_text(tokenizer.get("bos_token"))
    return ModelFiles(
        # Python ints, in order, without repeats: the generator accepts no other stop types.
        eos_token_ids=tuple(dict.fromkeys(eos_ids)),
        chat_template=_chat_template(root, tokenizer),
        bos_token=bos_token,
        eos_token=_token_text(tokenizer.get("eos_token")),
        # transformers' own rule: tokenizers that name a BOS token add it unless told not to.
        add_bos=bool(tokenizer.get("add_bos_token", bool(bos_token))),
    )


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EngineError(f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict):
        raise EngineError(f"{path} is not a JSON object")
    return data


def _ids(value: object) -> list[int]:
    if isinstance(value, bool):
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [int(v) for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


def _token_text(value: object) -> str:
    if isinstance(value, str):
        return value
    content = value.get("content") if isinstance(value, dict) else None
    return content if isinstance(content, str) else ""


def _chat_template(root: Path, tokenizer: dict[str, Any]) -> str | None:
    """transformers' order: chat_template.jinja, chat_template.json, then tokenizer_config.json."""
    jinja = root / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    separate = _read_json(root / "chat_template.json") or {}
    for source in (separate.get("chat_template"), tokenizer.get("chat_template")):
        template = _named_default(source)
        if template is not None:
            return template
    return None


def _named_default(source: object) -> str | None:
    """A template string, or from a list of named ones the one called "default" (else the first)."""
    if isinstance(source, str):
        return source
    if isinstance(source, list):
        named = {
            t.get("name"): t.get("template")
            for t in source
            if isinstance(t, dict) and isinstance(t.get("template"), str)
        }
        if "default" in named:
            return named["default"]
        if named:
            return next(iter(named.values()))
    return None
