"""llmserve's request path: HTTP, admission, engines and the SSE writer."""

from __future__ import annotations

from importlib import metadata

try:
    __version__ = metadata.version("llmserve")
except metadata.PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"
