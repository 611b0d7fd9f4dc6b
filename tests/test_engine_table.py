"""`engine.kind` chooses an engine through one table, and choosing one imports no other.

Adding an engine is its folder, one line of `ENGINES`, its configuration section and its tests:
these checks fail when the table, the sections and the engine classes disagree.
"""

from __future__ import annotations

import subprocess
import sys
from importlib import import_module
from pathlib import Path
from typing import get_type_hints

import pytest

from llmserve.server.config import Config, ConfigError, engine_kinds, load_config
from llmserve.server.engines import ENGINES

ROOT = Path(__file__).parent.parent
# What each engine brings in; no other engine may import it.
HEAVY = {
    "llamacpp": ("llama_cpp", "llmserve.server.engines.llamacpp"),
    "exllamav2": ("torch", "exllamav2", "llmserve.server.engines.exllamav2"),
    "synthetic": (),
}


def test_every_engine_in_the_table_has_a_section_named_after_it() -> None:
    assert sorted(ENGINES) == sorted(engine_kinds())
    for kind, path in ENGINES.items():
        module, _, name = path.partition(":")
        engine_class = getattr(import_module(module, "llmserve.server.engines"), name)
        assert engine_class.kind == kind
        section = Config.model_fields[kind].annotation
        assert get_type_hints(engine_class.__init__)["settings"] is section


def test_an_unknown_kind_is_refused_naming_the_engines_there_are() -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(environ={}, overrides={"engine.kind": "no-such-engine"})
    message = str(caught.value)
    assert "engine.kind = 'no-such-engine' (from flag --engine-kind)" in message
    assert all(repr(kind) in message for kind in ENGINES)


CHOOSE = """
import sys
from llmserve.server.config import load_config
from llmserve.server.engines import EngineError, create_engine

try:
    create_engine(load_config(environ={}, overrides={"engine.kind": sys.argv[1]}))
except EngineError as exc:  # exllamav2 without torch: refused, which is enough here
    print(exc, file=sys.stderr)
print(" ".join(sorted(sys.modules)))
"""


@pytest.mark.parametrize("kind", sorted(HEAVY))
def test_choosing_an_engine_imports_no_other_engine(kind: str) -> None:
    done = subprocess.run(
        [sys.executable, "-c", CHOOSE, kind],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
        check=True,
    )
    imported = set(done.stdout.split())
    others = [name for other, names in HEAVY.items() if other != kind for name in names]
    assert not imported.intersection(others), done.stderr
    assert f"llmserve.server.engines.{kind}" in imported
