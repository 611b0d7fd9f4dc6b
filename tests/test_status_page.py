"""The sidecar's status page, in a real headless Chromium (Debian's) driven by Playwright, against
a live server and sidecar under synthetic load from three API keys; and the /stats fields it
draws, against known timings."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from playwright.async_api import Browser, Page, async_playwright

from llmserve.server.keys import KeyEntry, hash_secret, write_keys
from tests.conftest import (
    Process,
    ServerFactory,
    SidecarStack,
    free_port,
    start,
    start_synthetic_server,
    synthetic_engine,
)

CHROMIUM = "/usr/bin/chromium"
# No downloads, no sandbox (CI runs as root in a container), nothing phoning home.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts" / "status-page"
LAPTOP = {"width": 1280, "height": 900}
PHONE = {"width": 390, "height": 844}

SECRETS = {
    "acme": "sk-page-acme-7f3c1e9a",
    "globex": "sk-page-globex-52d08b4e",
    "initech": "sk-page-initech-c61a93f0",
}
# initech runs past its limit within seconds, so the table has rate-limited rows to show.
LIMITS: dict[str, dict[str, int]] = {"globex": {"tpm": 20_000}, "initech": {"rpm": 3}}
TOKEN = "sidecar-page-token-3b9e"


@dataclass
class Stack:
    sidecar: Process
    server: Process
    base: str
    page_url: str


@dataclass
class Console:
    """Console errors and uncaught exceptions of one page."""

    errors: list[str] = field(default_factory=list)

    def watch(self, page: Page) -> None:
        page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda exc: self.errors.append(f"uncaught: {exc}"))


def write_key_file(path: Path) -> None:
    write_keys(
        path,
        {
            name: KeyEntry(name=name, sha256=hash_secret(secret), **LIMITS.get(name, {}))
            for name, secret in SECRETS.items()
        },
    )


async def wait_for_health(url: str, seconds: float = 30) -> None:
    async with aiohttp.ClientSession() as session:
        for _ in range(int(seconds / 0.1)):
            with contextlib.suppress(aiohttp.ClientError):
                async with session.get(f"{url}health") as response:
                    if response.status == 200:
                        return
            await asyncio.sleep(0.1)
    raise AssertionError(f"the sidecar at {url} did not come up")


async def start_sidecar(
    processes: list[Process], socket_path: str, *args: str
) -> tuple[Process, str]:
    port = free_port()
    sidecar = await start(
        "sidecar", "--sidecar-port", str(port), "--sidecar-socket-path", socket_path, *args
    )
    processes.append(sidecar)
    url = f"http://127.0.0.1:{port}/"
    await wait_for_health(url)
    return sidecar, url


@pytest.fixture
async def stack(processes: list[Process], short_tmp: str) -> Stack:
    """`llmserve sidecar` and `llmserve serve --sidecar-spawn false` as separate processes, so
    the server can stop while the sidecar (and the page) stay up."""
    socket_path = f"{short_tmp}/events.sock"
    keys = Path(short_tmp) / "keys.toml"
    write_key_file(keys)
    sidecar, url = await start_sidecar(processes, socket_path)
    server, base = await start_synthetic_server(
        processes,
        *("--sidecar-spawn", "false", "--sidecar-socket-path", socket_path),
        *("--auth-keys-file", str(keys)),
        *("--synthetic-first-token-seconds", "0.12", "--synthetic-token-interval-seconds", "0.025"),
        *("--synthetic-completion-tokens", "40"),
    )
    return Stack(sidecar, server, base, url)


def chromium() -> str:
    assert Path(CHROMIUM).exists(), f"{CHROMIUM} is missing: scripts/setup --test installs it"
    return CHROMIUM


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        # launch() gives every run a fresh, temporary user-data-dir.
        browser = await playwright.chromium.launch(executable_path=chromium(), args=CHROMIUM_ARGS)
        yield browser
        await browser.close()


async def chat(
    session: aiohttp.ClientSession,
    base: str,
    key: str,
    *,
    model: str = "synthetic",
    hang_up: bool = False,
) -> int:
    body = {"model": model, "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    headers = {"Authorization": f"Bearer {SECRETS[key]}"}
    async with session.post(f"{base}/v1/chat/completions", json=body, headers=headers) as r:
        if hang_up and r.status == 200:
            await r.content.readline()
            r.close()
        else:
            await r.read()
        return r.status


async def load(base: str, stop: asyncio.Event) -> list[int]:
    """Steady traffic from three keys until `stop`: acme the most, initech past its rpm, one
    stream hung up on (a cancellation) and one request for a model that does not exist."""
    statuses: list[int] = []
    async with aiohttp.ClientSession() as session:

        async def worker(key: str, pause: float) -> None:
            while not stop.is_set():
                statuses.append(await chat(session, base, key))
                await asyncio.sleep(pause)

        workers = [
            worker("acme", 0.0),
            worker("acme", 0.1),
            worker("globex", 0.2),
            worker("initech", 0.3),
        ]
        oddities = asyncio.gather(
            chat(session, base, "globex", hang_up=True),
            chat(session, base, "acme", model="gpt-4"),
        )
        statuses += await oddities
        await asyncio.gather(*workers)
    return statuses


async def get_stats(url: str, token: str | None = None) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{url}stats", headers=headers) as response:
            assert response.status == 200
            return await response.json()


async def refreshes(page: Page) -> int:
    return int(await page.get_attribute("body", "data-refreshes") or 0)


async def wait_refreshes(page: Page, count: int) -> None:
    # A selector wait: the page's CSP forbids the eval behind wait_for_function("...").
    for _ in range(300):
        if await refreshes(page) >= count:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"the page did not refresh {count} times")


async def shown(page: Page, stat: str) -> str:
    return (await page.locator(f'[data-stat="{stat}"]').first.inner_text()).strip()


def number(text: str) -> tuple[float, float]:
    """A displayed number (with unit) and the rounding it was displayed with."""
    match = re.fullmatch(r"([\d,]+)(?:\.(\d+))?\s*(ms|s|%)?", text)
    assert match, f"not a number: {text!r}"
    digits = match[2] or ""
    value = float(match[1].replace(",", "") + (f".{digits}" if digits else ""))
    scale = {"ms": 1e-3, "s": 1.0, "%": 1e-2}.get(match[3] or "", 1.0)
    return value * scale, 0.5 * 10 ** -len(digits) * scale + 1e-12


def assert_shown_between(text: str, before: float, after: float, what: str) -> None:
    value, rounding = number(text)
    low, high = min(before, after) - rounding, max(before, after) + rounding
    assert low <= value <= high, f"{what}: page shows {text}, /stats said {before} then {after}"


def totals(stats: dict[str, Any], field_name: str) -> float:
    return sum(model["1m"][field_name] for model in stats["models"].values())


KEY_COLUMNS = ("name", "requests", "tokens", "share", "rate_limited", "errors", "limits")


async def key_rows(page: Page) -> list[dict[str, str]]:
    rows = []
    for row in await page.locator("#keys tbody tr").all():
        cells = [text.strip() for text in await row.locator("td").all_inner_texts()]
        rows.append(dict(zip(KEY_COLUMNS, cells, strict=True)))
    return rows


def requests_column(rows: list[dict[str, str]]) -> list[float]:
    return [number(row["requests"])[0] for row in rows]


async def check_numbers(page: Page, url: str) -> None:
    """Every number on the page lies between /stats just before and just after it was read: two
    refreshes after `before`, the page shows a snapshot whose fetch began after `before`."""
    before = await get_stats(url)
    await wait_refreshes(page, await refreshes(page) + 2)
    texts = {
        stat: await shown(page, stat)
        for stat in ("requests_per_second", "tokens_per_second", "events_lost")
    }
    rows = await key_rows(page)
    after = await get_stats(url)
    for stat in ("requests_per_second", "tokens_per_second"):
        assert_shown_between(texts[stat], totals(before, stat), totals(after, stat), stat)
    lost = (before["sidecar"]["events_lost"], after["sidecar"]["events_lost"])
    assert_shown_between(texts["events_lost"], *lost, "events lost")
    for row in rows:
        five = before["keys"][row["name"]]["5m"], after["keys"][row["name"]]["5m"]
        for column in ("requests", "rate_limited", "errors"):
            assert_shown_between(row[column], five[0][column], five[1][column], column)
        tokens = [w["prompt_tokens"] + w["completion_tokens"] for w in five]
        assert_shown_between(row["tokens"], *tokens, "tokens")
        # The key's share of the last minute's service; none while nothing was served.
        shares = [s["keys"][row["name"]]["1m"]["service_share"] for s in (before, after)]
        if row["share"] == "—":
            assert None in shares
        else:
            assert_shown_between(row["share"], *(share or 0.0 for share in shares), "share")


async def check_latency(page: Page, url: str) -> None:
    before = await get_stats(url)
    await wait_refreshes(page, await refreshes(page) + 2)
    texts = {
        f"{prefix}_{q}": await shown(page, f"{prefix}_{q}")
        for prefix in ("ttft", "itl")
        for q in ("p50", "p95", "p99")
    }
    after = await get_stats(url)
    for prefix, name in (("ttft", "ttft"), ("itl", "inter_token")):
        for q in ("p50", "p95", "p99"):
            values = [
                s["models"]["synthetic"]["5m"][f"{name}_{q}_seconds"] for s in (before, after)
            ]
            assert_shown_between(texts[f"{prefix}_{q}"], *values, f"{name} {q}")


async def bar_counts(page: Page, chart: str) -> list[int]:
    bars = page.locator(f"#{chart} rect.bar")
    return [
        int(count) for count in await bars.evaluate_all("bars => bars.map(b => b.dataset.count)")
    ]


async def screenshot(page: Page, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    await page.screenshot(path=str(path), full_page=True)
    return path


async def open_page(browser: Browser, url: str, viewport: dict[str, int]) -> tuple[Page, Console]:
    context = await browser.new_context(viewport=viewport)
    page = await context.new_page()
    console = Console()
    console.watch(page)
    await page.goto(url)
    await wait_refreshes(page, 3)
    return page, console


@pytest.mark.slow
async def test_status_page_under_load(stack: Stack, browser: Browser) -> None:
    stop = asyncio.Event()
    traffic = asyncio.create_task(load(stack.base, stop))
    try:
        await asyncio.sleep(4)
        page, console = await open_page(browser, stack.page_url, LAPTOP)

        assert await page.locator("#banner").is_hidden()
        assert await shown(page, "server_health") == "ready"
        assert await page.locator("#model").inner_text() == "synthetic"
        assert "engine synthetic" in await page.locator("#engine").inner_text()

        # Charts: bars for what was observed, and the 30 tokens/s line on the inter-token one.
        assert sum(await bar_counts(page, "chart-ttft")) > 0
        assert sum(await bar_counts(page, "chart-itl")) > 0
        assert await page.locator("#chart-itl line.threshold").count() == 1
        assert await page.locator("#chart-itl .threshold-label").text_content() == "30 tokens/s"
        heights = await page.locator("#chart-itl rect.bar").evaluate_all(
            "bars => bars.map(b => b.getBBox().height)"
        )
        assert max(heights) > 50
        spark = await page.locator("#spark-tokens path.spark-line").get_attribute("d")
        assert spark and spark.count("L") >= 1

        await check_numbers(page, stack.page_url)

        # The keys in use, by name, top first; never a secret, on the page or in /stats.
        rows = await key_rows(page)
        assert {row["name"] for row in rows} == set(SECRETS)
        assert requests_column(rows) == sorted(requests_column(rows), reverse=True)
        by_name = {row["name"]: row for row in rows}
        assert number(by_name["initech"]["rate_limited"])[0] > 0
        assert by_name["initech"]["limits"].endswith("rpm")
        assert by_name["acme"]["limits"] == "no limits"
        # acme streams on two workers, globex on one that pauses: acme gets the larger share, and
        # the shares are of the whole.
        shares = {name: number(row["share"])[0] for name, row in by_name.items()}
        assert shares["acme"] > shares["globex"] > 0
        assert abs(sum(shares.values()) - 1) < 0.005
        await page.locator('#keys th[data-sort="name"]').click()
        assert [row["name"] for row in await key_rows(page)] == sorted(SECRETS)
        await page.locator('#keys th[data-sort="requests"]').click()
        rows = await key_rows(page)
        assert requests_column(rows) == sorted(requests_column(rows), reverse=True)
        html = await page.content()
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{stack.page_url}stats") as response:
                raw_stats = await response.text()
        for secret in SECRETS.values():
            assert secret not in html
            assert secret not in raw_stats

        # The most recent errors and cancellations, from the sidecar's ring.
        problems = page.locator("#problems tbody tr")
        statuses = set(await problems.evaluate_all("rows => rows.map(r => r.dataset.status)"))
        assert {"cancelled", "invalid_request"} <= statuses
        assert "model_not_found" in await page.locator("#problems").inner_text()

        laptop = await screenshot(page, "laptop")
        phone_page, phone_console = await open_page(browser, stack.page_url, PHONE)
        phone = await screenshot(phone_page, "phone")
        width = await phone_page.evaluate("() => document.documentElement.scrollWidth")
        assert width <= PHONE["width"], "the page scrolls sideways on a phone"
        print(f"status page screenshots: {laptop} and {phone}")
        assert console.errors == [] and phone_console.errors == []
    finally:
        stop.set()
        statuses = await traffic
    assert {200, 429, 404} <= set(statuses)

    # Quiet now: latency quantiles hold still, and the page shows exactly what /stats says.
    for _ in range(100):
        stats = await get_stats(stack.page_url)
        if stats["servers"][0]["running"] == 0:
            break
        await asyncio.sleep(0.1)
    await check_latency(page, stack.page_url)
    await check_numbers(page, stack.page_url)
    assert console.errors == []

    # The server stops: the page says so at once (model unloaded), then that it is lost.
    stack.server.proc.send_signal(signal.SIGTERM)
    assert await stack.server.finish() == 0
    banner = page.locator("#banner")
    await banner.filter(has_text="server").wait_for(state="visible", timeout=10_000)
    await banner.filter(has_text="Lost the server").wait_for(state="visible", timeout=15_000)
    assert await shown(page, "server_health") == "down"
    print(f"server lost: {await screenshot(page, 'server-lost')}")

    # The sidecar stops too: the page cannot reach it and says so.
    stack.sidecar.proc.send_signal(signal.SIGTERM)
    await stack.sidecar.finish()
    await banner.filter(has_text="Cannot reach the sidecar").wait_for(timeout=10_000)
    assert await shown(page, "sidecar_health") == "unreachable"


async def test_serve_prints_the_page_address(processes: list[Process], short_tmp: str) -> None:
    port = free_port()
    server, _ = await start_synthetic_server(
        processes,
        *("--sidecar-port", str(port), "--sidecar-socket-path", f"{short_tmp}/events.sock"),
    )
    url = (await server.wait_for_line(r"status page: (http://\S+/)"))[1]
    assert url == f"http://127.0.0.1:{port}/"
    await wait_for_health(url)
    async with aiohttp.ClientSession() as session:
        async with session.get(url) as response:
            assert response.status == 200
            assert response.content_type == "text/html"
            assert "<title>llmserve status</title>" in await response.text()
    server.proc.send_signal(signal.SIGTERM)
    assert await server.finish() == 0


async def test_token_guards_stats_and_metrics_and_the_page_asks_for_it(
    processes: list[Process], short_tmp: str, browser: Browser
) -> None:
    log_file = Path(short_tmp) / "sidecar.log"
    _, url = await start_sidecar(
        processes,
        f"{short_tmp}/events.sock",
        *("--sidecar-token", TOKEN, "--sidecar-log-file", str(log_file)),
    )
    async with aiohttp.ClientSession() as session:
        for path in ("stats", "metrics"):
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
                async with session.get(f"{url}{path}", headers=headers) as response:
                    assert response.status == 401
                    body = await response.json()
                    assert body["error"]["code"] == "invalid_api_key"
                    assert TOKEN not in json.dumps(body)
            headers = {"Authorization": f"Bearer {TOKEN}"}
            async with session.get(f"{url}{path}", headers=headers) as response:
                assert response.status == 200
        for path in ("", "static/status.js", "health"):
            async with session.get(f"{url}{path}") as response:
                assert response.status == 200
                assert TOKEN not in await response.text()

    context = await browser.new_context(viewport=LAPTOP)
    page = await context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    await page.goto(url)
    form = page.locator("#token-form")
    await form.wait_for(state="visible")
    await page.fill("#token-input", "wrong")
    await page.click("#token-form button")
    await page.locator("#banner", has_text="not accepted").wait_for()
    await page.fill("#token-input", TOKEN)
    await page.click("#token-form button")
    await wait_refreshes(page, 2)
    assert await form.is_hidden()
    assert "No server has reported" in await page.locator("#banner").inner_text()
    assert await page.evaluate("() => sessionStorage.length") == 1
    assert errors == []
    assert TOKEN not in log_file.read_text()


async def test_stats_carry_what_the_page_draws(serve: ServerFactory, sidecar_stack: SidecarStack):
    """Known counts in, known histograms out; failures land in the ring of recent problems."""
    engine = synthetic_engine(
        first_token_seconds="0.05", token_interval_seconds="0.02", completion_tokens="10"
    )
    server = await serve(engine, events=sidecar_stack.sender(), **{"engine.kind": "synthetic"})
    body = {"model": "synthetic", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    async with aiohttp.ClientSession() as session:
        for model in ("synthetic", "synthetic", "synthetic", "nope"):
            url = server.make_url("/v1/chat/completions")
            async with session.post(url, json={**body, "model": model}) as response:
                await response.read()
        await sidecar_stack.wait_finished(4)
        async with session.get(sidecar_stack.http.make_url("/stats")) as response:
            stats = await response.json()
    five = stats["models"]["synthetic"]["5m"]
    ttft, itl = five["ttft_histogram"], five["inter_token_histogram"]
    for histogram in (ttft, itl):
        assert len(histogram["counts"]) == len(histogram["edges"]) + 1
    # Three streams: three first tokens, no sooner than 50 ms, and 9 gaps each.
    assert sum(ttft["counts"]) == 3
    assert sum(ttft["counts"][: ttft["edges"].index(0.04) + 1]) == 0
    assert sum(itl["counts"]) == 27
    assert five["requests_per_second"] == round(4 / 300, 3)
    for name in ("ttft", "inter_token"):
        p50, p95, p99 = (five[f"{name}_{q}_seconds"] for q in ("p50", "p95", "p99"))
        assert 0 < p50 <= p95 <= p99
    [problem] = stats["recent_problems"]
    assert problem["status"] == "invalid_request"
    assert problem["error_type"] == "model_not_found"
    assert problem["key"] == "anonymous"
    assert stats["sidecar"]["servers_reporting"] == 0
