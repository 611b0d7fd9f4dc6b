"""The last step of tests.unit_sandbox, run inside bubblewrap by Debian's /usr/bin/python3 (the
libseccomp binding, python3-seccomp, is a system package): what systemd's service executor does
between fork and exec.

It mounts a new /proc with the unit's ProtectProc=/ProcSubset= options, drops to the service user,
sets no_new_privs, stacks one seccomp filter per directive exactly as systemd 252 builds it
(src/shared/seccomp-util.c, src/core/execute.c), writes its pid (the unit's main pid after exec)
and execs the unit's command. Its only argument is the JSON plan tests.unit_sandbox wrote.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import signal
import sys
from typing import Any

import seccomp

PR_SET_PDEATHSIG = 1
PR_SET_NO_NEW_PRIVS = 38
MS_NOSUID, MS_NODEV, MS_NOEXEC = 0x2, 0x4, 0x8
PROT_WRITE, PROT_EXEC = 0x2, 0x4
SHM_EXEC = 0o100000
AF_MAX = 46
NAMESPACE_FLAGS = (
    0x00020000,  # CLONE_NEWNS
    0x02000000,  # CLONE_NEWCGROUP
    0x04000000,  # CLONE_NEWUTS
    0x08000000,  # CLONE_NEWIPC
    0x10000000,  # CLONE_NEWUSER
    0x20000000,  # CLONE_NEWPID
    0x40000000,  # CLONE_NEWNET
    0x00000080,  # CLONE_NEWTIME
)


def _rule(f: Any, action: int, name: str, *args: Any) -> None:
    # systemd skips names the kernel or libseccomp does not know (SECCOMP_PARSE_PERMISSIVE).
    with contextlib.suppress(RuntimeError, ValueError, OSError):
        f.add_rule(action, name, *args)


def _action(error_number: int | None) -> int:
    return int(seccomp.ERRNO(error_number) if error_number is not None else seccomp.KILL_PROCESS)


def syscall_filter(plan: dict[str, Any]) -> Any:
    """SystemCallFilter= and SystemCallErrorNumber= (execute.c apply_syscall_filter)."""
    action = _action(plan["error_number"])
    if plan["allow_list"]:
        f = seccomp.SyscallFilter(defaction=action)
        for name in plan["syscalls"]:
            _rule(f, seccomp.ALLOW, name)
    else:
        f = seccomp.SyscallFilter(defaction=seccomp.ALLOW)
        for name in plan["syscalls"]:
            _rule(f, action, name)
    return f


def deny_filter(names: list[str]) -> Any:
    """ProtectClock=, ProtectKernelModules=, ProtectKernelLogs=, ProtectHostname=: EPERM."""
    f = seccomp.SyscallFilter(defaction=seccomp.ALLOW)
    for name in names:
        _rule(f, seccomp.ERRNO(errno.EPERM), name)
    return f


def memory_deny_write_execute() -> Any:
    """seccomp_memory_deny_write_execute(): W+X mmap, +X mprotect/pkey_mprotect, SHM_EXEC."""
    f = seccomp.SyscallFilter(defaction=seccomp.ALLOW)
    deny = seccomp.ERRNO(errno.EPERM)
    wx = PROT_WRITE | PROT_EXEC
    _rule(f, deny, "mmap", seccomp.Arg(2, seccomp.MASKED_EQ, wx, wx))
    _rule(f, deny, "mprotect", seccomp.Arg(2, seccomp.MASKED_EQ, PROT_EXEC, PROT_EXEC))
    _rule(f, deny, "pkey_mprotect", seccomp.Arg(2, seccomp.MASKED_EQ, PROT_EXEC, PROT_EXEC))
    _rule(f, deny, "shmat", seccomp.Arg(2, seccomp.MASKED_EQ, SHM_EXEC, SHM_EXEC))
    return f


def restrict_address_families(allowed: list[int]) -> Any:
    """seccomp_restrict_address_families() with an allow list: socket() of others fails."""
    f = seccomp.SyscallFilter(defaction=seccomp.ALLOW)
    deny = seccomp.ERRNO(errno.EAFNOSUPPORT)
    for family in range(AF_MAX):
        if family not in allowed:
            _rule(f, deny, "socket", seccomp.Arg(0, seccomp.EQ, family))
    _rule(f, deny, "socket", seccomp.Arg(0, seccomp.GE, AF_MAX))
    return f


def restrict_namespaces() -> Any:
    """seccomp_restrict_namespaces() with nothing allowed; clone3 gets ENOSYS, as there."""
    f = seccomp.SyscallFilter(defaction=seccomp.ALLOW)
    deny = seccomp.ERRNO(errno.EPERM)
    _rule(f, seccomp.ERRNO(errno.ENOSYS), "clone3")
    _rule(f, deny, "setns", seccomp.Arg(1, seccomp.EQ, 0))
    for flag in NAMESPACE_FLAGS:
        _rule(f, deny, "unshare", seccomp.Arg(0, seccomp.MASKED_EQ, flag, flag))
        _rule(f, deny, "clone", seccomp.Arg(0, seccomp.MASKED_EQ, flag, flag))
        _rule(f, deny, "setns", seccomp.Arg(1, seccomp.MASKED_EQ, flag, flag))
    return f


def lock_personality() -> Any:
    """seccomp_lock_personality(PER_LINUX): only the current persona, or the 0xffffffff query."""
    f = seccomp.SyscallFilter(defaction=seccomp.ALLOW)
    _rule(
        f,
        seccomp.ERRNO(errno.EPERM),
        "personality",
        seccomp.Arg(0, seccomp.NE, 0),
        seccomp.Arg(0, seccomp.NE, 0xFFFFFFFF),
    )
    return f


def mount_proc(options: list[str]) -> None:
    """A new proc instance over /proc, with the unit's options, in the sandbox's namespace only.

    Never a remount: bubblewrap's /proc (outside a new pid namespace) is the host's own
    instance, and remounting it would change /proc for every process on the machine.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    data = ",".join(options).encode()
    if libc.mount(b"proc", b"/proc", b"proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, data) != 0:
        raise OSError(ctypes.get_errno(), f"mounting /proc with {options}")


def main() -> None:
    plan = json.loads(sys.argv[1])
    if plan["proc_options"]:
        mount_proc(plan["proc_options"])
    with open(plan["pid_file"], "w") as pid_file:
        pid_file.write(str(os.getpid()))
    if plan["nice"] is not None:
        os.setpriority(os.PRIO_PROCESS, 0, plan["nice"])
    os.setgroups([])
    os.setgid(plan["gid"])
    os.setuid(plan["uid"])
    os.umask(plan["umask"])
    os.chdir(plan["cwd"])
    libc = ctypes.CDLL(None, use_errno=True)
    # Changing user cleared bubblewrap's --die-with-parent; a test that dies leaves nothing.
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "PR_SET_NO_NEW_PRIVS")
    filters = [deny_filter(plan["deny"])] if plan["deny"] else []
    if plan["memory_deny_write_execute"]:
        filters.append(memory_deny_write_execute())
    if plan["address_families"] is not None:
        filters.append(restrict_address_families(plan["address_families"]))
    if plan["restrict_namespaces"]:
        filters.append(restrict_namespaces())
    if plan["lock_personality"]:
        filters.append(lock_personality())
    # Last, as in systemd: once it is loaded, seccomp() itself may be refused.
    if plan["syscall_filter"]:
        filters.append(syscall_filter(plan["syscall_filter"]))
    for f in filters:
        f.load()
    os.execve(plan["argv"][0], plan["argv"], plan["env"])


if __name__ == "__main__":
    main()
