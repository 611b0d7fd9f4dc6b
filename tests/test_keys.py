"""API keys: the `llmserve keys` command, the file's permissions, and authentication."""

from __future__ import annotations

import asyncio
import os
import re
from contextlib import nullcontext
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp.test_utils import TestServer

from llmserve.server.cli import main
from llmserve.server.keys import KeyExpired, KeyFileError, KeyStore, read_keys, write_keys
from llmserve.server.ratelimit.kinds import KINDS
from tests.conftest import Process, ServerFactory, start, synthetic_engine


def keys(path: Path, *args: str, capsys: pytest.CaptureFixture[str]) -> str:
    assert main(["keys", "--file", str(path), *args]) == 0
    return capsys.readouterr().out.strip()


def test_create_list_set_revoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    path = tmp_path / "keys.toml"
    secret = keys(path, "create", "acme", "--rpm", "5", "--tpm", "1000", capsys=capsys)
    assert secret.startswith("sk-") and len(secret) == 3 + 43
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert secret not in path.read_text()

    keys(path, "set", "acme", "--concurrency", "2", "--models", "m1,m2", capsys=capsys)
    entry = read_keys(path)["acme"]
    assert entry.limits == {"rpm": 5, "tpm": 1000, "concurrency": 2}
    assert entry.models == ["m1", "m2"]
    keys(path, "set", "acme", "--rpm", "none", capsys=capsys)
    assert read_keys(path)["acme"].limit("rpm") is None
    assert "acme: rpm unlimited, tpm 1000" in keys(path, "list", capsys=capsys)

    store = KeyStore(path)
    assert store.authenticate(secret) is not None
    assert store.authenticate(secret + "x") is None
    keys(path, "revoke", "acme", capsys=capsys)
    store.reload()
    assert store.authenticate(secret) is None


def test_every_kind_of_limit_is_a_flag_and_a_field_of_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "keys.toml"
    flags = [arg for n, k in enumerate(KINDS, start=2) for arg in (f"--{k.name}", str(n))]
    keys(path, "create", "acme", *flags, capsys=capsys)
    expected = {k.name: n for n, k in enumerate(KINDS, start=2)}
    assert read_keys(path)["acme"].limits == expected
    text = path.read_text()
    for name, limit in expected.items():
        assert f"\n{name} = {limit}\n" in text
    listed = keys(path, "list", capsys=capsys)
    assert all(f"{name} {limit}" in listed for name, limit in expected.items())


def test_requests_per_day_in_the_keys_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "keys.toml"
    keys(path, "create", "acme", "--rpd", "500", capsys=capsys)
    assert "rpd = 500" in path.read_text()
    assert read_keys(path)["acme"].limits == {"rpd": 500}
    assert "rpd 500" in keys(path, "list", capsys=capsys)
    keys(path, "set", "acme", "--rpd", "none", capsys=capsys)
    assert read_keys(path)["acme"].limits == {}
    path.write_text(path.read_text().replace("[keys.acme]", "[keys.acme]\nrpd = 0"))
    with pytest.raises(KeyFileError, match="rpd"):
        read_keys(path)


@pytest.mark.parametrize("field", ["limits = { rpm = 5 }", "rpx = 5", 'rpm = "many"', "tpd = -1"])
def test_a_limit_that_is_no_kind_or_no_number_is_refused(tmp_path: Path, field: str) -> None:
    path = tmp_path / "keys.toml"
    path.write_text(f'[keys.acme]\nsha256 = "{"0" * 64}"\n{field}\n')
    path.chmod(0o600)
    with pytest.raises(KeyFileError, match="'acme' is invalid"):
        read_keys(path)


def test_a_weight_is_a_flag_a_field_of_the_file_and_a_column(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "keys.toml"
    keys(path, "create", "acme", "--rpm", "5", capsys=capsys)
    keys(path, "create", "globex", "--weight", "2.5", capsys=capsys)
    entries = read_keys(path)
    assert (entries["acme"].weight, entries["globex"].weight) == (1.0, 2.5)
    assert path.read_text().count("weight") == 1 and "\nweight = 2.5\n" in path.read_text()
    listed = dict(line.split(":", 1) for line in keys(path, "list", capsys=capsys).splitlines())
    assert "; weight 1;" in listed["acme"] and "; weight 2.5;" in listed["globex"]

    # Back to the default, the file is byte for byte what it was before the weight was set.
    before = path.read_bytes()
    assert "; weight 40;" in keys(path, "set", "acme", "--weight", "40", capsys=capsys)
    assert read_keys(path)["acme"] == entries["acme"].model_copy(update={"weight": 40.0})
    keys(path, "set", "acme", "--weight", "1", capsys=capsys)
    assert path.read_bytes() == before

    # A whole number in the file is a weight too.
    path.write_text(path.read_text().replace("weight = 2.5", "weight = 3"))
    assert read_keys(path)["globex"].weight == 3.0


def test_a_changed_weight_applies_from_the_next_request(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "keys.toml"
    secret = keys(path, "create", "acme", "--weight", "2", capsys=capsys)
    store = KeyStore(path)
    running = store.authenticate(secret)
    assert running is not None and running.weight == 2.0
    keys(path, "set", "acme", "--weight", "0.5", capsys=capsys)
    assert store.reload()
    renewed = store.authenticate(secret)
    assert renewed is not None and renewed.weight == 0.5
    # A request already running keeps the entry it started with, as for every other field.
    assert running.weight == 2.0


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("0", "greater than or equal to 0.001"),
        ("0.0", "greater than or equal to 0.001"),
        ("-1", "greater than or equal to 0.001"),
        ("-0.5", "greater than or equal to 0.001"),
        ("1e-320", "greater than or equal to 0.001"),
        ("1000.5", "less than or equal to 1000"),
        ("nan", "a finite number"),
        ("inf", "a finite number"),
        ("-inf", "a finite number"),
        ("true", "a valid number"),
        ('"2"', "a valid number"),
        ("[2]", "a valid number"),
    ],
)
def test_a_weight_out_of_range_or_not_a_number_is_refused_in_the_file(
    tmp_path: Path, value: str, reason: str
) -> None:
    path = tmp_path / "keys.toml"
    path.write_text(f'[keys.acme]\nsha256 = "{"0" * 64}"\nweight = {value}\n')
    path.chmod(0o600)
    with pytest.raises(
        KeyFileError, match=f"key 'acme' is invalid: weight: Input should be {reason}"
    ):
        read_keys(path)


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("0", "greater than or equal to 0.001"),
        ("-2", "greater than or equal to 0.001"),
        ("1001", "less than or equal to 1000"),
        ("1e309", "a finite number"),
        ("nan", "a finite number"),
        ("inf", "a finite number"),
    ],
)
@pytest.mark.parametrize("command", ["create", "set"])
def test_a_bad_weight_on_the_command_line_is_refused_naming_key_and_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str, value: str, reason: str
) -> None:
    path = tmp_path / "keys.toml"
    keys(path, "create", "other", "--weight", "3", capsys=capsys)
    if command == "set":
        keys(path, "create", "acme", "--weight", "3", capsys=capsys)
    before = path.read_bytes()
    assert main(["keys", "--file", str(path), command, "acme", "--weight", value]) == 1
    error = capsys.readouterr().err
    assert f"'acme' is not a valid key: weight: Input should be {reason}" in error
    assert path.read_bytes() == before


def test_a_weight_that_is_not_a_number_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "keys.toml"
    with pytest.raises(SystemExit) as usage:
        main(["keys", "--file", str(path), "create", "acme", "--weight", "heavy"])
    assert usage.value.code == 2
    assert "argument --weight: invalid float value: 'heavy'" in capsys.readouterr().err
    assert not path.exists()


def test_a_file_others_can_read_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    path = tmp_path / "keys.toml"
    keys(path, "create", "acme", capsys=capsys)
    os.chmod(path, 0o644)
    with pytest.raises(KeyFileError, match="chmod 600"):
        KeyStore(path)


async def test_requests_need_a_valid_key(
    serve: ServerFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    path = tmp_path / "keys.toml"
    secret = keys(path, "create", "acme", capsys=capsys)
    limited = keys(path, "create", "narrow", "--models", "other-model", capsys=capsys)
    store = KeyStore(path)
    server = await serve(
        synthetic_engine(completion_tokens="3"), keys=store, **{"engine.kind": "synthetic"}
    )
    body = {"model": "synthetic", "messages": [{"role": "user", "content": "hi"}]}
    url = server.make_url("/v1/chat/completions")

    async def call(headers: dict[str, str]) -> tuple[int, dict[str, object], str]:
        async with aiohttp.ClientSession() as session:
            async with session.post(url, json=body, headers=headers) as r:
                return r.status, await r.json(), r.headers.get("WWW-Authenticate", "")

    status, error, challenge = await call({})
    assert (status, error["error"]["code"], challenge) == (401, "missing_api_key", "Bearer")
    status, error, _ = await call({"Authorization": "Bearer sk-wrong-secret"})
    assert (status, error["error"]["code"]) == (401, "invalid_api_key")
    assert "sk-wrong-secret" not in str(error)
    assert (await call({"Authorization": f"Bearer {secret}"}))[0] == 200
    assert (await call({"x-api-key": secret}))[0] == 200
    status, error, _ = await call({"x-api-key": limited})
    assert (status, error["error"]["code"]) == (403, "model_not_allowed")

    keys(path, "revoke", "acme", capsys=capsys)
    store.reload()
    assert (await call({"x-api-key": secret}))[0] == 401


async def test_openai_client_sends_its_key(
    serve: ServerFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    path = tmp_path / "keys.toml"
    secret = keys(path, "create", "acme", capsys=capsys)
    server = await serve(
        synthetic_engine(completion_tokens="3"), keys=KeyStore(path), **{"engine.kind": "synthetic"}
    )
    base = str(server.make_url("/v1"))
    async with openai.AsyncOpenAI(base_url=base, api_key=secret, max_retries=0) as client:
        models = await client.models.list()
        assert [m.id for m in models.data] == ["synthetic"]
    async with openai.AsyncOpenAI(base_url=base, api_key="sk-nope", max_retries=0) as client:
        with pytest.raises(openai.AuthenticationError):
            await client.models.list()


async def test_no_keys_on_a_public_address_is_refused(processes: list[Process]):
    server = await start("serve", "--host", "0.0.0.0", "--port", "0", "--sidecar-spawn", "false")
    processes.append(server)
    assert await server.finish() == 1
    assert "refusing to serve without API keys on 0.0.0.0" in "".join(server.log)


async def test_reloading_keys_under_load_drops_no_stream(
    serve: ServerFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    path = tmp_path / "keys.toml"
    secret = keys(path, "create", "acme", capsys=capsys)
    store = KeyStore(path)
    engine = synthetic_engine(token_interval_seconds="0.01", completion_tokens="40")
    server = await serve(engine, keys=store, **{"engine.kind": "synthetic"})
    body = {"model": "synthetic", "messages": [{"role": "user", "content": "hi"}], "stream": True}

    async def stream(key: str) -> bytes:
        async with aiohttp.ClientSession() as session:
            async with session.post(
                server.make_url("/v1/chat/completions"), json=body, headers={"x-api-key": key}
            ) as r:
                assert r.status == 200
                return await r.read()

    running = [asyncio.create_task(stream(secret)) for _ in range(5)]
    await asyncio.sleep(0.1)
    newcomer = keys(path, "create", "globex", capsys=capsys)
    keys(path, "revoke", "acme", capsys=capsys)
    assert store.reload_if_changed()
    for raw in await asyncio.gather(*running):
        assert raw.count(b'"content":"') == 41  # the role chunk, then 40 tokens
        assert raw.endswith(b"data: [DONE]\n\n")
    assert (await stream(newcomer)).endswith(b"data: [DONE]\n\n")


async def _status(server: TestServer, secret: str) -> tuple[int, dict[str, Any]]:
    body = {"model": "synthetic", "messages": [{"role": "user", "content": "hi"}]}
    async with aiohttp.ClientSession() as session:
        async with session.post(
            server.make_url("/v1/chat/completions"), json=body, headers={"x-api-key": secret}
        ) as r:
            return r.status, await r.json()


async def test_an_expired_key_gets_a_401_that_says_it_expired(
    serve: ServerFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "keys.toml"
    secret = keys(path, "create", "acme", "--expires", "30d", capsys=capsys)
    store = KeyStore(path)
    engine = synthetic_engine(completion_tokens="2")
    server = await serve(engine, keys=store, **{"engine.kind": "synthetic"})
    assert (await _status(server, secret))[0] == 200

    keys(path, "set", "acme", "--expires", "2020-01-31T00:00Z", capsys=capsys)
    assert store.reload()
    status, error = await _status(server, secret)
    assert (status, error["error"]["code"]) == (401, "expired_api_key")
    assert "expired at 2020-01-31T00:00:00+00:00" in error["error"]["message"]
    assert secret not in str(error)
    assert "expires 2020-01-31T00:00:00+00:00" in keys(path, "list", capsys=capsys)

    keys(path, "set", "acme", "--expires", "never", capsys=capsys)
    assert store.reload()
    assert (await _status(server, secret))[0] == 200


async def test_a_rotated_key_takes_both_secrets_until_the_overlap_ends(
    serve: ServerFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "keys.toml"
    old = keys(path, "create", "acme", "--rpm", "100", capsys=capsys)
    new = keys(path, "rotate", "acme", "--overlap", "1h", capsys=capsys)
    assert new.startswith("sk-") and new != old
    store = KeyStore(path)
    engine = synthetic_engine(completion_tokens="2")
    server = await serve(engine, keys=store, **{"engine.kind": "synthetic"})
    assert (await _status(server, old))[0] == 200
    assert (await _status(server, new))[0] == 200
    assert "previous secret valid until" in keys(path, "list", capsys=capsys)
    assert old not in path.read_text() and new not in path.read_text()

    # The overlap ends: from then on only the new secret works, under the same name and limits.
    entry = read_keys(path)["acme"]
    ended = entry.model_copy(update={"previous_expires": datetime.now(UTC) - timedelta(seconds=1)})
    write_keys(path, {"acme": ended})
    assert store.reload()
    status, error = await _status(server, old)
    assert (status, error["error"]["code"]) == (401, "expired_api_key")
    assert (await _status(server, new))[0] == 200
    assert read_keys(path)["acme"].limits == {"rpm": 100}


def test_the_old_secret_never_outlives_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "keys.toml"
    old = keys(path, "create", "acme", "--expires", "1d", capsys=capsys)
    new = keys(path, "rotate", "acme", "--overlap", "7d", capsys=capsys)
    store = KeyStore(path)
    assert store.authenticate(old) is not None
    later = datetime.now(UTC) + timedelta(days=2)
    for secret in (old, new):
        with pytest.raises(KeyExpired):
            store.authenticate(secret, now=later)


@pytest.mark.parametrize(
    "args",
    [
        ["create", "caf\udce9"],
        ["create", "acme", "--expires", "next tuesday"],
        ["rotate", "acme"],
        ["set", "nobody", "--rpm", "3"],
    ],
)
def test_bad_keys_commands_get_a_message_not_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str]
) -> None:
    path = tmp_path / "keys.toml"
    keys(path, "create", "acme", capsys=capsys)
    with pytest.raises(SystemExit) if args[-1] in ("acme", "next tuesday") else nullcontext():
        assert main(["keys", "--file", str(path), *args]) in (1, 2)
    error = capsys.readouterr().err
    assert "Traceback" not in error and error.strip()
    assert list(read_keys(path)) == ["acme"]


async def test_last_use_is_noted_beside_the_keys_file_at_most_once_a_minute(
    serve: ServerFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "keys.toml"
    secret = keys(path, "create", "acme", capsys=capsys)
    keys(path, "create", "idle", capsys=capsys)
    before = path.read_bytes()
    store = KeyStore(path)
    engine = synthetic_engine(completion_tokens="2")
    server = await serve(engine, keys=store, **{"engine.kind": "synthetic"})
    for _ in range(3):
        assert (await _status(server, secret))[0] == 200
    # No write per request, and none before a minute has passed.
    await store.record_usage()
    record = tmp_path / "keys.toml.last-used.json"
    assert not record.exists()
    await store.record_usage(now=True)
    assert oct(record.stat().st_mode & 0o777) == "0o600"
    assert path.read_bytes() == before
    listed = dict(line.split(":", 1) for line in keys(path, "list", capsys=capsys).splitlines())
    assert re.search(r"last used \d{4}-\d\d-\d\dT\d\d:\d\d\+00:00", listed["acme"])
    assert "last used never" in listed["idle"]
    # A damaged record costs the column, not the command.
    record.write_bytes(b"\xff[")
    assert "last used never" in keys(path, "list", capsys=capsys)


async def test_a_last_use_record_that_cannot_be_written_is_said_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "keys.toml"
    secret = keys(path, "create", "acme", capsys=capsys)
    # What a read-only /etc does to the write, even for root: the record's name is taken.
    (tmp_path / "keys.toml.last-used.json").mkdir()
    store = KeyStore(path)
    for _ in range(3):
        assert store.authenticate(secret) is not None
        await store.record_usage(now=True)
    warnings = [r for r in caplog.records if "cannot record when API keys" in r.message]
    assert len(warnings) == 1
    assert "last used never" in keys(path, "list", capsys=capsys)


def test_an_invalid_entry_is_named_without_repeating_what_it_holds(tmp_path: Path) -> None:
    path = tmp_path / "keys.toml"
    path.write_text('[keys.acme]\nsha256 = "sk-LEAKED-SECRET"\nnote = "sk-ANOTHER"\n')
    path.chmod(0o600)
    with pytest.raises(KeyFileError) as refused:
        read_keys(path)
    message = str(refused.value)
    assert "'acme' is invalid" in message and "sha256" in message and "note" in message
    assert "sk-" not in message
