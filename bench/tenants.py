"""Multi-tenant load: several API keys at once, each with its own closed-loop workers, request
shape and weight, so a server's sharing between keys can be measured under a mix of them.

A tenant is given as `--tenant name=heavy,concurrency=24,max_tokens=200,key_env=HEAVY_KEY`.
Keys come from the environment (`key_env`) rather than the command line, where `ps` shows them
to every user; `key=` is accepted for throwaway keys."""

from __future__ import annotations

import asyncio
import itertools
import os
import re
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import aiohttp

from llmserve.bench.load import RequestResult, Target, stream_into

__all__ = ["TenantError", "TenantResults", "TenantSpec", "parse_tenant", "run_tenants"]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_INTEGERS = ("concurrency", "prompt_words", "max_tokens", "requests")
_FIELDS = {"name", "key", "key_env", "weight", *_INTEGERS}


class TenantError(ValueError):
    """A --tenant that cannot be read; the message names the field, never a key."""


@dataclass(frozen=True)
class TenantSpec:
    name: str
    concurrency: int
    # None: the run's --api-key (or none at all).
    api_key: str | None = None
    # None: the run's --prompt-words / --max-tokens.
    prompt_words: int | None = None
    max_tokens: int | None = None
    # None: keep sending until the run's duration ends.
    requests: int | None = None
    # Only for the report (service divided by weight); the server reads weights from its keys.
    weight: float = 1.0


def parse_tenant(text: str, environ: dict[str, str] | None = None) -> TenantSpec:
    """`name=N,concurrency=C[,key_env=VAR|key=SECRET][,prompt_words=W][,max_tokens=T]
    [,requests=R][,weight=X]`."""
    environ = os.environ.copy() if environ is None else environ
    fields: dict[str, str] = {}
    for part in text.split(","):
        name, sep, value = part.partition("=")
        name = name.strip()
        if not sep or name not in _FIELDS:
            raise TenantError(
                f"--tenant: {name or part!r} is not one of {', '.join(sorted(_FIELDS))}"
            )
        if name in fields:
            raise TenantError(f"--tenant: {name} is given twice")
        fields[name] = value.strip()
    if not _NAME.match(fields.get("name", "")):
        raise TenantError("--tenant needs name=NAME (letters, digits, '.', '_', '-')")
    label = fields["name"]
    numbers: dict[str, int] = {}
    for name in _INTEGERS:
        if name in fields:
            if not fields[name].isdigit() or int(fields[name]) < 1:
                raise TenantError(f"--tenant {label}: {name} must be a whole number of at least 1")
            numbers[name] = int(fields[name])
    if "concurrency" not in numbers:
        raise TenantError(f"--tenant {label}: concurrency=N is required")
    try:
        weight = float(fields.get("weight", "1"))
    except ValueError:
        weight = 0.0
    if not 0 < weight < float("inf"):
        raise TenantError(f"--tenant {label}: weight must be a number above 0")
    if "key" in fields and "key_env" in fields:
        raise TenantError(f"--tenant {label}: give key or key_env, not both")
    api_key = fields.get("key")
    if "key_env" in fields:
        api_key = environ.get(fields["key_env"])
        if not api_key:
            raise TenantError(
                f"--tenant {label}: environment variable {fields['key_env']} is unset"
            )
    return TenantSpec(
        name=label,
        api_key=api_key,
        weight=weight,
        concurrency=numbers["concurrency"],
        prompt_words=numbers.get("prompt_words"),
        max_tokens=numbers.get("max_tokens"),
        requests=numbers.get("requests"),
    )


@dataclass
class TenantResults:
    spec: TenantSpec
    target: Target
    results: list[RequestResult] = field(default_factory=list)
    # Requests still streaming when the run ended: cancelled, what they received is kept.
    cut: list[RequestResult] = field(default_factory=list)


async def run_tenants(
    template: Target,
    specs: list[TenantSpec],
    duration_seconds: float | None,
    on_done: Callable[[str], None],
) -> tuple[list[TenantResults], float]:
    """Every tenant's workers at once until the duration ends (requests then in flight are
    cancelled and kept in `cut`) or every tenant has sent its `requests`; results and the
    wall time."""
    tenants = [
        TenantResults(
            spec,
            replace(
                template,
                api_key=spec.api_key if spec.api_key is not None else template.api_key,
                prompt_words=spec.prompt_words or template.prompt_words,
                max_tokens=spec.max_tokens or template.max_tokens,
            ),
        )
        for spec in specs
    ]
    timeout = aiohttp.ClientTimeout(total=template.timeout_seconds)
    # A fresh connection per request, as run_level does and for the same reason.
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    loop = asyncio.get_running_loop()

    async def worker(
        session: aiohttp.ClientSession, tenant: TenantResults, counter: Iterator[int]
    ) -> None:
        for _ in counter:
            result = RequestResult()
            try:
                await stream_into(result, session, tenant.target)
            except asyncio.CancelledError:
                result.ended = time.perf_counter()
                tenant.cut.append(result)
                raise
            tenant.results.append(result)
            on_done(tenant.spec.name)

    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        started = time.perf_counter()
        starts: list[list[Coroutine[Any, Any, None]]] = []
        for tenant in tenants:
            # Shared by the tenant's workers: each takes the next request from it.
            count = tenant.spec.requests
            counter = itertools.count() if count is None else iter(range(count))
            workers = (
                tenant.spec.concurrency if count is None else min(tenant.spec.concurrency, count)
            )
            starts.append([worker(session, tenant, counter) for _ in range(workers)])
        # Tenants' first requests interleaved (a1 b1 a2 b2 ...): one tenant's whole first wave
        # arriving before the other's would hand it the server's slots, a head start that only
        # slot turnover undoes and that the scheduler is not to blame for.
        tasks = [
            loop.create_task(start)
            for wave in itertools.zip_longest(*starts)
            for start in wave
            if start is not None
        ]
        _, pending = await asyncio.wait(tasks, timeout=duration_seconds)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        return tenants, time.perf_counter() - started
