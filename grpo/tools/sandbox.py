"""A sandboxed Python interpreter: each snippet runs in its own restricted process.

`Sandbox(limits).run(code)` sends the code to a pre-forked server (`sandbox_server.py`, started
inside new pid and network namespaces by util-linux `unshare`, with pids and memory cgroups
where this process may make them) and returns what the model reads. Each layer is detected at
start and used where the machine allows it; `Sandbox.layers` names those in force and
docs/tools.md says what each one stops and what the sandbox does not protect against. Imports
nothing from the rest of grpo.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import weakref
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from grpo.tools.sandbox_server import PATH, SandboxLimits, empty_cgroup, receive, send

__all__ = ["Sandbox", "SandboxLimits", "SandboxResult"]

COW_MB = 64  # the memory cgroup's allowance for the interpreter's pages copied on write
_SERVER = Path(__file__).with_name("sandbox_server.py")
_SERVER_ENV = {
    "PATH": PATH,
    "LC_ALL": "C.UTF-8",
    "OPENBLAS_NUM_THREADS": "1",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
}
_START_S = 120.0  # for the server to import its modules and probe the layers
_ANSWER_SLACK_S = 15.0  # past wall_seconds, before the client gives up on the server
_CUT = "\n[... output cut]\n"


@dataclass(frozen=True)
class SandboxResult:
    """How one snippet ended; `text` is what the model reads."""

    text: str  # stdout, then the error line, cut to max_output_chars
    stdout: str
    stderr: str  # its last characters, for logs
    error: str | None  # the traceback's last line, or what stopped the snippet
    exit_code: int | None  # None when a signal or the sandbox ended it
    signal: int | None
    limit: str | None  # "wall", "cpu", "memory", "output" or None
    seconds: float

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and self.error is None


class Sandbox:
    """Runs Python snippets under `limits` in a pre-forked server, restarted if it dies.

    Thread-safe, one snippet at a time: give each concurrent caller its own Sandbox.
    """

    def __init__(
        self, limits: SandboxLimits | None = None, preload: tuple[str, ...] = ("numpy", "sympy")
    ) -> None:
        self.limits = limits or SandboxLimits()
        self.preload = preload
        self._lock = threading.Lock()
        self._server: _Server | None = _Server(self.limits, preload)  # None once closed
        self.layers = self._server.layers

    @property
    def limits_processes(self) -> bool:
        """Whether a process limit binds snippets: a pids cgroup, or RLIMIT_NPROC as nobody."""
        return bool({"pids_cgroup", "nproc_rlimit"} & self.layers)

    @property
    def server_pid(self) -> int | None:
        """The pid of the server's outermost process (`setpriv`/`unshare`, or Python)."""
        return None if self._server is None else self._server.proc.pid

    def run(self, code: str) -> SandboxResult:
        """Run one snippet in a fresh process; never raises for what the snippet does."""
        with self._lock:
            if self._server is None:
                raise RuntimeError("the sandbox is closed")
            start = time.monotonic()
            for _ in range(2):  # a server found dead is replaced and asked again, once
                if self._server.proc.poll() is not None:
                    self._replace_server()
                try:
                    reply = self._server.ask(code, self.limits.wall_seconds + _ANSWER_SLACK_S)
                except TimeoutError:  # it stopped answering: replaced for the next snippet
                    reply = None
                    self._replace_server()
                    break
                if reply is not None:
                    break
                self._replace_server()
            if reply is None:
                reply = dict(
                    stdout="",
                    stderr="",
                    error="SandboxError: the sandbox server stopped answering",
                    exit_code=None,
                    signal=None,
                    limit=None,
                    seconds=time.monotonic() - start,
                )
        text = _text(reply["stdout"], reply["error"], self.limits.max_output_chars)
        return SandboxResult(text=text, **reply)

    def _replace_server(self) -> None:
        self._server.stop()
        self._server = _Server(self.limits, self.preload)
        self.layers = self._server.layers

    def close(self) -> None:
        """Stop the server and everything under it."""
        with self._lock:
            if self._server is not None:
                self._server.stop()
                self._server = None

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _text(stdout: str, error: str | None, limit: int) -> str:
    """stdout, then the error line; cut to `limit` characters, the error line kept whole."""
    tail = error or ""
    sep = "\n" if stdout and tail and not stdout.endswith("\n") else ""
    if len(stdout) + len(sep) + len(tail) <= limit:
        return stdout + sep + tail
    keep = limit - len(_CUT) - len(tail)
    if keep < 0:
        return (tail or stdout)[:limit]
    return stdout[:keep] + _CUT + tail


class _Server:
    """One server process, its socket and its cgroups; `stop` kills it and removes them."""

    def __init__(self, limits: SandboxLimits, preload: tuple[str, ...]) -> None:
        prefix, layers = _launcher()
        cgroups = _make_cgroups(limits)
        ours, theirs = socket.socketpair()
        config = {"limits": asdict(limits), "preload": preload, "cgroups": list(cgroups.values())}
        self.proc = subprocess.Popen(
            [*prefix, sys.executable, "-I", str(_SERVER), json.dumps(config), str(theirs.fileno())],
            pass_fds=[theirs.fileno()],
            env=_SERVER_ENV,
            cwd="/",
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            start_new_session=True,
        )
        theirs.close()
        self.sock = ours
        self.stop = weakref.finalize(self, _stop, self.proc, ours, tuple(cgroups.values()))
        hello = receive(ours, _START_S)
        if hello is None:
            self.stop()
            raise RuntimeError("the sandbox server did not start (its error is on stderr)")
        self.layers = layers | {f"{c}_cgroup" for c in cgroups} | set(hello["layers"])

    def ask(self, code: str, timeout: float) -> dict[str, Any] | None:
        """The server's reply for one snippet; None if it is gone (TimeoutError if it does
        not answer within `timeout`)."""
        try:
            send(self.sock, {"code": code})
            return receive(self.sock, timeout)
        except (BrokenPipeError, ConnectionResetError):
            return None


def _stop(proc: subprocess.Popen, sock: socket.socket, cgroups: tuple[str, ...]) -> None:
    """Kill a server's process group (with --kill-child, its whole pid namespace too)."""
    sock.close()
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    for path in cgroups:
        empty_cgroup(path)
        with contextlib.suppress(OSError):
            os.rmdir(path)


@functools.cache
def _launcher() -> tuple[tuple[str, ...], frozenset[str]]:
    """The command prefix that starts the server, and the layers it puts in force."""
    prefix: tuple[str, ...] = ()
    setpriv = shutil.which("setpriv", path=PATH)
    if setpriv and _succeeds(setpriv, "--pdeathsig", "KILL"):
        prefix = (setpriv, "--pdeathsig", "KILL")  # the server dies with the thread that made it
    unshare = shutil.which("unshare", path=PATH)
    if unshare:
        users = [("--user", "--map-root-user")]
        for user in ([()] if os.geteuid() == 0 else []) + users:
            command = (unshare, *user, "--pid", "--net", "--fork", "--kill-child")
            if _succeeds(*command):
                layers = {"server_pid_ns", "net_ns"} | ({"user_ns"} if user else set())
                return prefix + command, frozenset(layers)
    return prefix, frozenset()


def _succeeds(*command: str) -> bool:
    """Whether `command true` exits 0."""
    try:
        done = subprocess.run([*command, "true"], env=_SERVER_ENV, capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


_serial = itertools.count()


def _make_cgroups(limits: SandboxLimits) -> dict[str, str]:
    """Fresh cgroup v1 pids and memory groups for one server, where this process may make them."""
    knobs = {
        "pids": ("pids.max", limits.max_processes + 1),  # and the server
        "memory": ("memory.limit_in_bytes", (limits.memory_mb + COW_MB) << 20),
    }
    made = {}
    for controller, (knob, value) in knobs.items():
        path = Path("/sys/fs/cgroup", controller, f"grpo-sandbox-{os.getpid()}-{next(_serial)}")
        try:
            path.mkdir()
        except OSError:
            continue
        try:
            (path / knob).write_text(str(value))
        except OSError:
            path.rmdir()
            continue
        made[controller] = str(path)
    return made
