"""The shipped units run for real, each under its own sandbox as systemd would build it.

tests/unit_sandbox.py rebuilds a unit's sandbox from the unit file without booting systemd
(bubblewrap for the mounts, libseccomp for the filters, the installed systemd's own system call
sets). The tests play the service manager: they start the units in the order their
Before=/After= give, wait for READY=1, use them, and stop them in the reverse order, each with
SIGTERM to its main process, waiting for its exit before the next (as systemd's stop jobs do).

Reproduced directives: SystemCallFilter= (allow and ~deny lists, groups, with @default added to
an allow list as systemd does), SystemCallErrorNumber= (unset: the process is killed, SIGSYS),
SystemCallArchitectures=native (libseccomp kills other architectures), MemoryDenyWriteExecute=
(systemd's seccomp rules on mmap, mprotect, pkey_mprotect and shmat), RestrictAddressFamilies=,
RestrictNamespaces=yes, LockPersonality=, ProtectClock=, ProtectKernelModules=,
ProtectKernelLogs=, ProtectHostname= (their seccomp parts, EPERM, plus a UTS namespace),
NoNewPrivileges=, User=/Group= (as nobody: no user is created on this machine), UMask=, Nice=,
WorkingDirectory=, Environment= and the variables systemd sets, ProtectSystem=strict (the root
read-only), ProtectHome=yes, PrivateTmp=yes, PrivateDevices=yes (a minimal /dev), DeviceAllow=
(only the matching device nodes are bound in), ProtectProc= and ProcSubset= (a new /proc mounted
with hidepid= and subset=), RuntimeDirectory=, StateDirectory=, LogsDirectory=, ReadWritePaths=,
Before=/After= between the two units (start and stop order).

Not reproduced, and why: CapabilityBoundingSet=/AmbientCapabilities= (the service runs as a
non-root user, so it holds no capabilities anyway); ProtectKernelTunables= and
ProtectControlGroups= (read-only /proc/sys and /sys/fs/cgroup: read-only already under the
read-only root, and only root could write them); RestrictSUIDSGID= and RestrictRealtime= (their
seccomp rules guard calls the services never make; sched_setscheduler is in the denied
@resources anyway); the device cgroup itself (DevicePolicy=/DeviceAllow= are reproduced by which
nodes exist, so a denied device is ENOENT here, EPERM there; this machine has no GPU);
Restart=, WatchdogSec= enforcement, TimeoutStopSec= and the LogRateLimit settings (the manager's
and journald's jobs: stdout goes to a file). Deviations in the layout: /run, /var/lib and
/var/log are empty tmpfs mounts under the units' own directories (bubblewrap cannot create mount
points on the read-only root); ConfigurationDirectory= is mounted at /run/.configuration/llmserve,
with ExecStart's /etc/llmserve paths pointed there; where the test venv's interpreter lives
under /root (pyenv on this machine), that directory is bound back in read-only over ProtectHome=.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import free_port
from tests.unit_sandbox import NOBODY, SandboxedUnit, Unit, device_nodes

UNITS = Path(__file__).resolve().parent.parent / "scripts" / "systemd"
SERVER, SIDECAR = "llmserve.service", "llmserve-sidecar.service"
MODEL = "SmolLM2-135M-Instruct.Q4_1"


def start_order(names: list[str]) -> list[str]:
    """The order systemd starts these units in, from their Before= and After= (stop: reversed)."""
    after: dict[str, set[str]] = {name: set() for name in names}
    for name in names:
        unit = Unit(UNITS / name)
        for other in names:
            if other in unit.words_of("Unit", "After"):
                after[name].add(other)
            if other in unit.words_of("Unit", "Before"):
                after[other].add(name)
    ordered: list[str] = []
    while len(ordered) < len(names):
        ready = [n for n in names if n not in ordered and after[n] <= set(ordered)]
        assert ready, f"ordering cycle among {names}"
        ordered.append(ready[0])
    return ordered


@pytest.fixture
async def machine(short_tmp: str) -> AsyncIterator[dict[str, SandboxedUnit]]:
    """Both units of one host, sharing /run/llmserve, /var/log/llmserve and the configuration."""
    root = Path(short_tmp)
    units = {name: SandboxedUnit(Unit(UNITS / name), root) for name in (SERVER, SIDECAR)}
    yield units
    for unit in units.values():
        await unit.close()


def configure(unit: SandboxedUnit, text: str) -> None:
    path = unit.directory("etc") / "llmserve.toml"
    path.write_text(text)
    os.chown(path, NOBODY, NOBODY)
    path.chmod(0o600)


def two_free_ports() -> tuple[int, int]:
    """Two different free loopback ports (two free_port() calls may return the same one)."""
    with socket.socket() as one, socket.socket() as two:
        one.bind(("127.0.0.1", 0))
        two.bind(("127.0.0.1", 0))
        return int(one.getsockname()[1]), int(two.getsockname()[1])


def niceness(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[16])


def sample(metrics: str, name: str, **labels: str) -> float:
    """The sum of `name`'s samples whose labels include `labels`."""
    return sum(
        s.value
        for family in text_string_to_metric_families(metrics)
        for s in family.samples
        if s.name == name and labels.items() <= s.labels.items()
    )


def test_device_allow_binds_in_only_the_devices_it_names() -> None:
    # char-mem is major 1 (/dev/null, /dev/zero, ...); /dev/tty is major 5.
    assert "/dev/null" in device_nodes(["char-mem rw"])
    assert "/dev/tty" not in device_nodes(["char-mem rw"])
    assert device_nodes(["/dev/null rw"]) == ["/dev/null"]
    # No GPU on this machine: the units' NVIDIA groups name nothing here.
    assert device_nodes(["char-nvidia-frontend rw", "char-nvidia-uvm rw"]) == []


async def test_the_sidecar_unit_starts_serves_and_stops_under_its_sandbox(
    machine: dict[str, SandboxedUnit],
) -> None:
    sidecar = machine[SIDECAR]
    port = free_port()
    configure(sidecar, f"[sidecar]\nport = {port}\n")
    await sidecar.start()
    await sidecar.notified("READY=1", 60)
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{port}/metrics") as response:
            assert response.status == 200
            metrics = await response.text()
    # process_* need /proc/stat, which ProcSubset=pid hides.
    assert sample(metrics, "process_start_time_seconds") > 0
    assert sample(metrics, "process_cpu_seconds_total") > 0
    assert niceness(sidecar.main_pid()) == 10
    assert await sidecar.stop(30) == 0


async def test_the_server_unit_loads_the_model_serves_and_stops_under_its_sandbox(
    machine: dict[str, SandboxedUnit],
) -> None:
    server = machine[SERVER]
    port = free_port()
    configure(
        server,
        f"[server]\nport = {port}\n[llamacpp]\ncontext_per_sequence = 512\nparallel = 2\n",
    )
    await server.start()
    assert MODEL in await server.notified("READY=1", 300)
    body = {"model": MODEL, "prompt": "Hello", "max_tokens": 4}
    async with aiohttp.ClientSession() as session:
        url = f"http://127.0.0.1:{port}/v1/completions"
        async with session.post(url, json=body) as response:
            assert response.status == 200
            assert (await response.json())["usage"]["completion_tokens"] == 4
    assert await server.stop(60) == 0


async def test_in_systemd_order_the_sidecar_records_every_request_of_the_drain(
    machine: dict[str, SandboxedUnit],
) -> None:
    port, sidecar_port = two_free_ports()
    configure(
        machine[SERVER],
        f"[server]\nport = {port}\ndrain_timeout_seconds = 3\n"
        '[engine]\nkind = "synthetic"\n'
        "[synthetic]\ntoken_interval_seconds = 0.05\ncompletion_tokens = 100000\n"
        f'[sidecar]\nport = {sidecar_port}\nlog_file = "/var/log/llmserve/requests.log"\n',
    )
    order = start_order([SERVER, SIDECAR])
    for name in order:
        await machine[name].start()
        await machine[name].notified("READY=1", 60)

    # Half finish within the drain, half outlast it and are cancelled for the shutdown.
    lengths = [20] * 5 + [4000] * 5
    started = asyncio.Semaphore(0)
    async with aiohttp.ClientSession() as session:

        async def stream(max_tokens: int) -> str:
            body = {"model": "synthetic", "prompt": "Hi", "max_tokens": max_tokens, "stream": True}
            url = f"http://127.0.0.1:{port}/v1/completions"
            async with session.post(url, json=body) as response:
                await response.content.readline()
                started.release()
                await response.read()
                return response.headers["x-request-id"]

        tasks = [asyncio.create_task(stream(n)) for n in lengths]
        for _ in tasks:
            await started.acquire()

        request_ids = []
        metrics = ""
        for name in reversed(order):
            unit = machine[name]
            if name == SIDECAR:
                url = f"http://127.0.0.1:{sidecar_port}/metrics"
                async with session.get(url) as response:
                    metrics = await response.text()
            unit.kill()
            if name == SERVER:
                request_ids = await asyncio.gather(*tasks)
            assert await asyncio.wait_for(unit.process.wait(), 60) == 0  # type: ignore[union-attr]

    log_file = machine[SIDECAR].directory("logs") / "requests.log"
    lines = [json.loads(line) for line in log_file.read_text().splitlines()]
    logged = [line["request_id"] for line in lines if line.get("msg") == "request finished"]
    assert sorted(logged) == sorted(request_ids)
    assert sample(metrics, "llm_requests_total", status="ok") == 5
    assert sample(metrics, "llm_requests_cancelled_total", reason="shutdown") == 5
    assert "could not be delivered" not in machine[SERVER].journal.read_text()
