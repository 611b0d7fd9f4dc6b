"""Run a shipped systemd unit's command under that unit's own sandbox, without booting systemd.

systemd itself must never run here (its tmpfiles step would empty /tmp for the whole machine),
so the sandbox is rebuilt from the unit file: bubblewrap for the mount namespace and
tests/unit_sandbox_exec.py (under Debian's python3, for libseccomp) for what systemd's executor
does last: /proc options, the service user, no_new_privs and the seccomp filters. System call
sets come from `systemd-analyze syscall-filter`, so they are the installed systemd's own.
Which directives are reproduced, which are not and why: tests/test_units_sandboxed.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fnmatch
import json
import os
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SYSTEM_PYTHON = "/usr/bin/python3"
NOBODY = 65534
INSTALLED_LLMSERVE = "/opt/llmserve/.venv/bin/llmserve"
CONFIGURATION_MOUNT = "/run/.configuration"
# (directive, its directory under the test's machine root, where systemd puts it)
UNIT_DIRECTORIES = (
    ("RuntimeDirectory", "run", "/run"),
    ("StateDirectory", "state", "/var/lib"),
    ("LogsDirectory", "logs", "/var/log"),
)


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """Sections of `Key=Value` lines; a key may repeat, and each value is kept in order."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


@cache
def syscall_group(name: str) -> frozenset[str]:
    """The system calls of a group such as @system-service, nested groups expanded."""
    output = subprocess.run(
        ["systemd-analyze", "syscall-filter", "--no-pager", name],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    names: set[str] = set()
    for line in output.splitlines()[1:]:
        word = line.strip()
        if not word or word.startswith("#"):
            continue
        names |= syscall_group(word) if word.startswith("@") else {word}
    return frozenset(names)


def expand(word: str) -> frozenset[str]:
    # "name:errno" sets a per-call error number; the call is in the set either way.
    word = word.partition(":")[0]
    return syscall_group(word) if word.startswith("@") else frozenset({word})


def syscall_filter(values: list[str]) -> tuple[bool, set[str]] | None:
    """(allow list?, set) as config_parse_syscall_filter builds it from the assignments."""
    allow_list: bool | None = None
    syscalls: set[str] = set()
    for value in values:
        if not value:
            allow_list, syscalls = None, set()
            continue
        invert = value.startswith("~")
        if allow_list is None:
            allow_list = not invert
            syscalls = set(syscall_group("@default")) if allow_list else set()
        for word in value.lstrip("~").split():
            if allow_list == invert:
                syscalls -= expand(word)
            else:
                syscalls |= expand(word)
    return None if allow_list is None else (allow_list, syscalls)


def device_nodes(patterns: list[str]) -> list[str]:
    """Device nodes that DeviceAllow= entries (paths, globs, char-<group>) name on this host."""
    entries = [pattern.split()[0] for pattern in patterns]  # without the access ("rw")
    groups = [e.removeprefix("char-") for e in entries if e.startswith("char-")]
    majors = set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/devices").read_text().split("Block devices:")[0].splitlines():
            number, _, name = line.strip().partition(" ")
            if number.isdigit() and any(fnmatch.fnmatch(name, g) for g in groups):
                majors.add(int(number))
    nodes = {str(p) for e in entries if e.startswith("/dev/") for p in Path("/").glob(e[1:])}
    for path in Path("/dev").iterdir():
        with contextlib.suppress(OSError):
            mode = path.lstat().st_mode
            if stat.S_ISCHR(mode) and os.major(path.lstat().st_rdev) in majors:
                nodes.add(str(path))
    return sorted(nodes)


@dataclass
class Unit:
    """A unit file's settings, and the sandbox its [Service] section asks for."""

    path: Path
    sections: dict[str, dict[str, list[str]]] = field(init=False)

    def __post_init__(self) -> None:
        self.sections = parse_unit(self.path.read_text())

    @property
    def service(self) -> dict[str, list[str]]:
        return self.sections.get("Service", {})

    def get(self, key: str, default: str = "") -> str:
        values = self.service.get(key)
        return values[-1] if values else default

    def flag(self, key: str) -> bool:
        return self.get(key) in ("yes", "true", "on", "1")

    def words(self, key: str) -> list[str]:
        return self.words_of("Service", key)

    def words_of(self, section: str, key: str) -> list[str]:
        """A list setting's words; an empty assignment resets the list, as in systemd."""
        words: list[str] = []
        for value in self.sections.get(section, {}).get(key, []):
            words = words + value.split() if value else []
        return words

    def deny_lists(self) -> list[str]:
        names: set[str] = set()
        if self.flag("ProtectClock"):
            names |= syscall_group("@clock")
        if self.flag("ProtectKernelModules"):
            names |= syscall_group("@module")
        if self.flag("ProtectKernelLogs"):
            names.add("syslog")
        if self.flag("ProtectHostname"):
            names |= {"sethostname", "setdomainname"}
        return sorted(names)

    def address_families(self) -> list[int] | None:
        families = self.words("RestrictAddressFamilies")
        if not families:
            return None
        assert not families[0].startswith("~"), "only allow lists are reproduced"
        return [int(getattr(socket, name)) for name in families]

    def error_number(self) -> int | None:
        name = self.get("SystemCallErrorNumber", "kill")
        return None if name == "kill" else int(getattr(errno, name))


@dataclass
class SandboxedUnit:
    """The unit's ExecStart, run as systemd would run it; the test plays the service manager.

    `machine` holds the host side of what units share: run/, state/, logs/ and etc/ (the
    configuration the test writes). Each unit's own notify socket, main pid and journal.log
    (stdout and stderr) are in `machine`/<unit name>/.
    """

    unit: Unit
    machine: Path
    process: asyncio.subprocess.Process | None = None
    _notify: socket.socket | None = None
    messages: list[str] = field(default_factory=list)

    @property
    def root(self) -> Path:
        return self.machine / self.unit.path.stem

    def directory(self, name: str) -> Path:
        """A directory the service user owns, shared by the units of this machine."""
        path = self.machine / name
        path.mkdir(parents=True, exist_ok=True)
        os.chown(path, NOBODY, NOBODY)
        return path

    @property
    def journal(self) -> Path:
        return self.root / "journal.log"

    def _mounts(self, name: str) -> Iterator[str]:
        unit = self.unit
        assert unit.get("ProtectSystem") == "strict", "only ProtectSystem=strict is reproduced"
        yield from ("--ro-bind", "/", "/", "--proc", "/proc", "--tmpfs", "/run")
        if unit.flag("PrivateDevices"):
            yield from ("--dev", "/dev")
        elif unit.service.get("DeviceAllow"):
            yield from ("--dev", "/dev")
            for node in device_nodes(unit.service["DeviceAllow"]):
                yield from ("--dev-bind", node, node)
        else:
            yield from ("--dev-bind", "/dev", "/dev")
        # What the unit's command runs from here stays visible where a directive hides its
        # folder: the venv's interpreter (this machine's is under /root/.pyenv; an install's is
        # /usr) and the checkout with the venv (in a real install, /opt/llmserve).
        kept = (Path(sys.base_prefix), ROOT)
        if unit.flag("ProtectHome"):
            yield from ("--tmpfs", "/home", "--tmpfs", "/root")
            yield from _keep_visible(kept, ("/home", "/root"))
            yield from ("--remount-ro", "/home", "--remount-ro", "/root")
        if unit.flag("PrivateTmp"):
            yield from ("--tmpfs", "/tmp", "--tmpfs", "/var/tmp")
            yield from _keep_visible(kept, ("/tmp", "/var/tmp"))
        for key, host, parent in UNIT_DIRECTORIES:
            if unit.get(key):
                yield from ("--tmpfs", parent, "--bind", str(self.directory(host)))
                yield f"{parent}/{unit.get(key)}"
        yield from ("--perms", "0755", "--dir", CONFIGURATION_MOUNT)
        yield from ("--ro-bind", str(self.directory("etc")), f"{CONFIGURATION_MOUNT}/{name}")
        for path in unit.words("ReadWritePaths"):
            yield from ("--bind", path.lstrip("-"), path.lstrip("-"))
        yield from ("--perms", "0755", "--dir", "/run/systemd")
        yield from ("--bind", str(self.root / "notify"), "/run/systemd/notify")
        yield from ("--bind", str(self.root), "/run/.sandbox")
        if unit.flag("ProtectHostname"):
            yield "--unshare-uts"

    def _plan(self, name: str) -> dict[str, object]:
        unit = self.unit
        argv = [
            str(ROOT / ".venv" / "bin" / "llmserve")
            if word == INSTALLED_LLMSERVE
            else word.replace(f"/etc/{name}/", f"{CONFIGURATION_MOUNT}/{name}/")
            for word in shlex.split(unit.get("ExecStart"))
        ]
        env = {
            "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": f"/var/lib/{name}",
            "USER": name,
            "LOGNAME": name,
            "SHELL": "/usr/sbin/nologin",
            "INVOCATION_ID": os.urandom(16).hex(),
            "NOTIFY_SOCKET": "/run/systemd/notify",
        }
        if unit.get("WatchdogSec"):
            env["WATCHDOG_USEC"] = str(int(float(unit.get("WatchdogSec")) * 1_000_000))
        for key, _, directory in UNIT_DIRECTORIES:
            if unit.get(key):
                env[key.upper().replace("DIRECTORY", "_DIRECTORY")] = f"{directory}/{unit.get(key)}"
        for value in unit.service.get("Environment", []):
            for assignment in shlex.split(value):
                variable, _, setting = assignment.partition("=")
                env[variable] = setting
        filters = syscall_filter(unit.service.get("SystemCallFilter", []))
        proc_options = []
        if unit.get("ProtectProc") in ("invisible", "noaccess", "ptraceable"):
            proc_options.append(f"hidepid={unit.get('ProtectProc')}")
        if unit.get("ProcSubset") == "pid":
            proc_options.append("subset=pid")
        return {
            "argv": argv,
            "env": env,
            "cwd": unit.get("WorkingDirectory", "/"),
            "uid": NOBODY,
            "gid": NOBODY,
            "umask": int(unit.get("UMask", "0022"), 8),
            "nice": int(unit.get("Nice")) if unit.get("Nice") else None,
            "pid_file": "/run/.sandbox/main.pid",
            "proc_options": proc_options,
            "syscall_filter": filters
            and {
                "allow_list": filters[0],
                "syscalls": sorted(filters[1]),
                "error_number": unit.error_number(),
            },
            "deny": unit.deny_lists(),
            "memory_deny_write_execute": unit.flag("MemoryDenyWriteExecute"),
            "address_families": unit.address_families(),
            "restrict_namespaces": unit.get("RestrictNamespaces") == "yes",
            "lock_personality": unit.flag("LockPersonality"),
        }

    def command(self, name: str = "llmserve") -> list[str]:
        """The bubblewrap command line; `name` is the unit's directory name (llmserve)."""
        bwrap = shutil.which("bwrap")
        assert bwrap, "bubblewrap is missing (Debian's bubblewrap package; scripts/setup --test)"
        helper = str(ROOT / "tests" / "unit_sandbox_exec.py")
        plan = json.dumps(self._plan(name))
        return [bwrap, "--die-with-parent", *self._mounts(name), SYSTEM_PYTHON, helper, plan]

    async def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        notify = self.root / "notify"
        notify.unlink(missing_ok=True)
        self._notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._notify.bind(str(notify))
        self._notify.setblocking(False)
        notify.chmod(0o777)
        with self.journal.open("ab") as journal:
            self.process = await asyncio.create_subprocess_exec(
                *self.command(), stdin=subprocess.DEVNULL, stdout=journal, stderr=journal
            )

    async def notified(self, prefix: str, seconds: float) -> str:
        """The first notify message starting with `prefix`; fails if the process exits first."""
        assert self.process is not None and self._notify is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        while loop.time() < deadline:
            for message in self.messages:
                if message.startswith(prefix):
                    return message
            if self.process.returncode is not None:
                break
            with contextlib.suppress(TimeoutError):
                data = await asyncio.wait_for(loop.sock_recv(self._notify, 4096), 0.2)
                self.messages.append(data.decode())
        raise AssertionError(
            f"no {prefix!r} from {self.unit.path.name} (exit {self.process.returncode}, "
            f"{describe(self.process.returncode)}): {self.journal.read_text()[-3000:]}"
        )

    def main_pid(self) -> int:
        return int((self.root / "main.pid").read_text())

    def kill(self, signum: signal.Signals = signal.SIGTERM) -> None:
        os.kill(self.main_pid(), signum)

    async def stop(self, seconds: float) -> int:
        """SIGTERM to the main process, as systemd sends it; its exit code within `seconds`."""
        assert self.process is not None
        self.kill()
        return await asyncio.wait_for(self.process.wait(), seconds)

    async def close(self) -> None:
        if self.process is not None and self.process.returncode is None:
            with contextlib.suppress(OSError, ValueError):
                self.kill(signal.SIGKILL)
            self.process.kill()
            await self.process.wait()
        if self._notify is not None:
            self._notify.close()


def describe(code: int | None) -> str:
    """bubblewrap exits 128 + N when the command dies of signal N."""
    if code is not None and code > 128:
        return f"killed by {signal.Signals(code - 128).name}"
    return "still running" if code is None else "exited"


def _keep_visible(paths: tuple[Path, ...], hidden: tuple[str, ...]) -> Iterator[str]:
    """bubblewrap arguments that bind `paths` back, read-only, into the `hidden` folders."""
    for path in paths:
        if any(path.is_relative_to(folder) for folder in hidden):
            for above in reversed(path.parents[:-2]):
                yield from ("--perms", "0755", "--dir", str(above))
            if path.is_dir() and not path.stat().st_mode & stat.S_IXOTH:
                # A checkout in a folder only its owner may enter (`mktemp -d` makes them 0700):
                # the unit's user could not reach the code, which an install puts under /opt.
                yield from ("--perms", "0755", "--dir", str(path))
                for child in sorted(path.iterdir()):
                    yield from ("--ro-bind", str(child), str(child))
            else:
                yield from ("--ro-bind", str(path), str(path))
