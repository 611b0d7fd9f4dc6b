"""Write a model directory the double (and the engine's own file reading) can load.

The files and keys are those of a Hugging Face model directory of a ChatML model (Qwen2.5's
layout): config.json, generation_config.json with two EOS ids, tokenizer.json with special
added tokens, tokenizer_config.json with the chat template. The vocabulary is one token per
printable ASCII character.
"""

from __future__ import annotations

import json
from pathlib import Path

SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
ENDOFTEXT, IM_START, IM_END = 0, 1, 2
CHARACTERS = "\n" + "".join(chr(c) for c in range(32, 127))
VOCAB_SIZE = len(SPECIAL) + len(CHARACTERS)
CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def write_model_dir(
    path: Path, *, script: str | None = None, context: int = 1024, layers: int = 4
) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    _write(
        path / "config.json",
        {
            "architectures": ["Qwen2ForCausalLM"],
            "bos_token_id": ENDOFTEXT,
            "eos_token_id": IM_END,
            "vocab_size": VOCAB_SIZE,
            "hidden_size": 256,
            "num_hidden_layers": layers,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": context,
        },
    )
    _write(path / "generation_config.json", {"eos_token_id": [IM_END, ENDOFTEXT]})
    _write(
        path / "tokenizer.json",
        {
            "added_tokens": [
                {"id": i, "content": text, "special": True} for i, text in enumerate(SPECIAL)
            ],
            "model": {
                "type": "WordLevel",
                "vocab": {c: len(SPECIAL) + i for i, c in enumerate(CHARACTERS)},
            },
        },
    )
    _write(
        path / "tokenizer_config.json",
        {"bos_token": None, "eos_token": "<|im_end|>", "chat_template": CHATML},
    )
    if script is not None:
        (path / "double_script.txt").write_text(script, encoding="utf-8")
    return path


def _write(path: Path, data: object) -> None:
    path.write_text(json.dumps(data), encoding="utf-8")
