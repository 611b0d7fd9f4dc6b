"""The sidecar's settings: the `[sidecar]` section of llmserve's configuration.

Both processes read it (the server to find the event socket and to start the sidecar, the
sidecar to run), so it lives with the sidecar, next to the wire format.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

__all__ = ["SidecarSettings", "default_socket_path"]


def default_socket_path(server_port: int) -> str:
    """`events-<server port>.sock` in $XDG_RUNTIME_DIR/llmserve, else /run/llmserve if writable,
    else a per-user temp dir. The port keeps several servers on one host (one per GPU) apart."""
    name = f"events-{server_port}.sock"
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return str(Path(runtime) / "llmserve" / name)
    run = Path("/run/llmserve")
    if run.is_dir() and os.access(run, os.W_OK):
        return str(run / name)
    return str(Path(tempfile.gettempdir()) / f"llmserve-{os.getuid()}" / name)


class SidecarSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)

    spawn: bool = Field(True, description="`llmserve serve` runs the sidecar as a child process.")
    events: bool = Field(True, description="The server sends per-request events at all.")
    socket_path: str | None = Field(
        None, description="Unix datagram socket for events (default: see docs)."
    )
    nice: int = Field(
        10, ge=0, le=19, description="CPU priority the sidecar lowers itself to (0 = unchanged)."
    )
    host: str = Field("127.0.0.1", description="Address of /metrics, /stats and /health.")
    port: int = Field(8001, ge=0, le=65535, description="Port of /metrics, /stats and /health.")
    # SecretStr keeps the token out of reprs and tracebacks; no constraint on it, so a
    # validation error can never echo it either.
    token: SecretStr | None = Field(
        None, description="Bearer token that /metrics and /stats require (none: open)."
    )
    buffer_events: int = Field(
        1_000_000, ge=1000, description="Events the server keeps while the sidecar is away."
    )
    max_keys: int = Field(
        10_000, ge=1, description="API key names with their own series; the rest are `other`."
    )
    log_file: str | None = Field(None, description="Also write request logs to this file.")
    log_file_rotation: str = Field("100 MB", description="Rotate the log file at this size.")
    log_file_retention: int = Field(5, ge=1, description="Rotated log files kept.")
    loki_url: str | None = Field(None, description="Push request logs to this Loki (base URL).")
    loki_env: str = Field("dev", description="The `env` label on lines pushed to Loki.")
    loki_buffer_lines: int = Field(
        10_000, ge=100, description="Lines kept while Loki is unreachable; older ones drop."
    )

    @field_validator("token")
    @classmethod
    def _empty_token_is_none(cls, token: SecretStr | None) -> SecretStr | None:
        return token if token is not None and token.get_secret_value() else None

    def resolved_socket_path(self, server_port: int) -> str:
        return self.socket_path or default_socket_path(server_port)
