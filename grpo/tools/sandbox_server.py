"""The sandbox's server: a process that imported numpy and sympy once and forks one restricted
process per snippet; also the limits and the wire format it shares with `grpo.tools.sandbox`.

Run as `python -I sandbox_server.py CONFIG FD` by `Sandbox`; standard library only. Each snippet
is forked, inside the sandbox's cgroups (the server joined them), as the first process of a fresh
pid namespace; it enters fresh mount and IPC namespaces (private /tmp, /var/tmp, /dev/shm and
/proc), sets its rlimits, clears its environment, drops to nobody and runs the code; when it
ends, the kernel kills all it started. Each layer is probed at start and used where the machine
allows it.
"""

from __future__ import annotations

import builtins
import contextlib
import ctypes
import functools
import gc
import importlib
import json
import os
import pwd
import resource
import selectors
import signal
import socket
import stat
import struct
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NoReturn

PATH = "/usr/local/bin:/usr/bin:/bin"
_SCRATCH = ("/tmp", "/var/tmp", "/dev/shm")  # world-writable: a private tmpfs on each
_DRAIN_S = 1.0  # to read what is left in the pipes once the snippet has ended
_STDERR_TAIL = 4000
_STATUS_MAX = 1 << 16
_CHILDREN = "/proc/thread-self/children"
_DEVICES = ("null", "zero", "full", "random", "urandom")  # all /dev that snippets see, with shm
CLONE_NEWNS, CLONE_NEWIPC, CLONE_NEWPID = 0x00020000, 0x08000000, 0x20000000
MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_BIND, MS_REC, MS_PRIVATE = 2, 4, 8, 1 << 12, 1 << 14, 1 << 18
PR_SET_PDEATHSIG, PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS = 1, 36, 38

_libc = ctypes.CDLL(None, use_errno=True)
_libc.prctl.argtypes = [ctypes.c_int] + [ctypes.c_ulong] * 4
_libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_char_p]
_libc.unshare.argtypes = [ctypes.c_int]
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]


@dataclass(frozen=True)
class SandboxLimits:
    """What one snippet may use.

    memory_mb: what it may allocate, per process on top of the forked interpreter's address
    space (RLIMIT_AS), and for all its processes together (memory cgroup, plus an allowance
    for the interpreter's pages copied on write).
    max_processes: processes and threads at once, itself included (pids cgroup; else
    RLIMIT_NPROC as nobody). max_file_mb: each file (RLIMIT_FSIZE) and each private /tmp,
    /var/tmp, /dev/shm. Output past max_output_bytes stops the snippet; what the model reads
    is cut to max_output_chars.
    """

    cpu_seconds: int = 5
    wall_seconds: float = 10.0
    memory_mb: int = 1024
    max_processes: int = 16
    max_file_mb: int = 16
    max_output_bytes: int = 1_000_000
    max_output_chars: int = 2000

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if value <= 0:
                raise ValueError(f"SandboxLimits.{name} must be positive, got {value}")

    def message(self, limit: str) -> str:
        """The error line the model reads when `limit` stopped a snippet."""
        return {
            "wall": f"TimeoutError: the snippet ran past its {self.wall_seconds:g} s wall-time "
            "limit",
            "cpu": f"TimeoutError: the snippet ran past its {self.cpu_seconds} s CPU-time limit",
            "memory": f"MemoryError: the snippet ran past its {self.memory_mb} MB memory limit",
            "output": f"SandboxError: the snippet wrote more than {self.max_output_bytes} bytes "
            "of output and was stopped",
        }[limit]


def send(sock: socket.socket, message: dict[str, Any]) -> None:
    """One message: its length, then its JSON."""
    data = json.dumps(message).encode()
    sock.sendall(struct.pack("!I", len(data)) + data)


def receive(sock: socket.socket, timeout: float | None) -> dict[str, Any] | None:
    """The next message, or None at the end of the stream (TimeoutError past `timeout`)."""
    sock.settimeout(timeout)
    data = bytearray()
    size = 4
    while len(data) < size:
        chunk = sock.recv(min(size - len(data), 1 << 20))
        if not chunk:
            return None
        data += chunk
        if size == 4 and len(data) == 4:
            size += struct.unpack("!I", data)[0]
    return json.loads(data[4:])


def serve(config: dict[str, Any], fd: int) -> None:
    """Import the preloaded modules, probe the layers, then answer until the socket closes."""
    limits = SandboxLimits(**config["limits"])
    layers = {"rlimits", "clean_env", "no_new_privs"}
    if _in_child(_probe_namespaces):
        layers |= {"pid_ns", "mount_ns", "ipc_ns"}
    if os.getuid() == 0 and _in_child(lambda: _drop_uid(*_nobody())):
        layers.add("uid_drop")
        if not any(Path(path).parent.name == "pids" for path in config["cgroups"]):
            layers.add("nproc_rlimit")  # counts all of nobody's processes, machine-wide
    if "pid_ns" not in layers and os.path.exists(_CHILDREN):
        _prctl(PR_SET_CHILD_SUBREAPER, 1)  # a snippet's orphans become the server's children
        layers.add("subreaper")
    expose = "uid_drop" in layers
    if "mount_ns" in layers and _in_child(lambda: _server_mounts(expose)):
        _server_mounts(expose)  # before any import may start a thread: unshare wants none
        layers.add("minimal_dev")
    for name in config["preload"]:
        with contextlib.suppress(ImportError):
            importlib.import_module(name)
    gc.freeze()  # the snippets' collections skip (and so do not copy) the server's objects
    for path in config["cgroups"]:  # after the imports: their pages are charged elsewhere
        Path(path, "cgroup.procs").write_text("0")  # once: a move per snippet costs milliseconds
    with contextlib.suppress(OSError):
        Path("/proc/self/oom_score_adj").write_text("-1000")  # the OOM killer takes snippets
    sock = socket.socket(fileno=fd)
    send(sock, {"layers": sorted(layers)})
    own_pid_ns = os.open("/proc/self/ns/pid", os.O_RDONLY)
    while (request := receive(sock, None)) is not None:
        if "pid_ns" in layers:  # the next child is the first process of a fresh pid namespace
            _check(_libc.setns(own_pid_ns, CLONE_NEWPID), "setns")
            _check(_libc.unshare(CLONE_NEWPID), "unshare")
        send(sock, _run(request["code"], limits, layers, config["cgroups"]))
        with contextlib.suppress(ChildProcessError):  # orphans reparented to the server
            while os.waitpid(-1, os.WNOHANG)[0] > 0:
                pass


def _run(code: str, limits: SandboxLimits, layers: set[str], cgroups: list[str]) -> dict:
    """Fork the snippet, collect its output and status: the reply's fields."""
    private = "mount_ns" in layers
    scratch = contextlib.nullcontext() if private else tempfile.TemporaryDirectory()
    with scratch as workdir:
        oom_kills = _oom_kills(cgroups)
        pipes = [os.pipe() for _ in range(3)]  # stdout, stderr, status
        start = time.monotonic()
        pid = os.fork()
        if pid == 0:
            _snippet(code, limits, layers, workdir, *(w for _, w in pipes))
        for _, w in pipes:
            os.close(w)
        fds, orphans = [r for r, _ in pipes], "subreaper" in layers
        out, err, info, limit, status, cpu = _collect(pid, fds, limits, cgroups, orphans)
        seconds = time.monotonic() - start
    signum = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
    exit_code = None if signum else os.WEXITSTATUS(status)
    if not limit and info.get("limit") in ("cpu", "memory"):  # the snippet's own report
        limit = info["limit"]
    if not limit and signum in (signal.SIGKILL, signal.SIGXCPU):
        if cpu >= limits.cpu_seconds:
            limit = "cpu"
        elif _oom_kills(cgroups) > oom_kills:
            limit = "memory"
    error = limits.message(limit) if limit else info.get("error")
    error = None if error is None else str(error)
    if error is None and signum:
        name = signal.Signals(signum).name
        error = f"SandboxError: the snippet died of signal {name} ({signal.strsignal(signum)})"
    return dict(
        stdout=out.decode("utf-8", "replace"),
        stderr=err.decode("utf-8", "replace")[-_STDERR_TAIL:],
        error=error,
        exit_code=exit_code,
        signal=signum,
        limit=limit,
        seconds=seconds,
    )


def _collect(
    pid: int, fds: list[int], limits: SandboxLimits, cgroups: list[str], orphans: bool
) -> tuple[bytes, bytes, dict[str, Any], str | None, int, float]:
    """Read the snippet's stdout, stderr and status pipe until it has ended and they are
    drained, stopping it at its wall time or at max_output_bytes. Returns what was read, the
    limit that stopped it, its wait status and its CPU seconds."""
    out_fd, err_fd, status_fd = fds
    out, err, status = bytearray(), bytearray(), bytearray()
    written = {out_fd: 0, err_fd: 0}
    info: dict[str, Any] = {}
    limit, wait_status, cpu = None, None, 0.0
    deadline = time.monotonic() + limits.wall_seconds
    pidfd = os.pidfd_open(pid)

    def stop(reason: str) -> None:
        nonlocal limit, deadline
        limit, deadline = reason, time.monotonic() + _DRAIN_S
        os.kill(pid, signal.SIGKILL)  # still ours to kill: not reaped yet

    with selectors.DefaultSelector() as selector:
        for fd in [*fds, pidfd]:
            selector.register(fd, selectors.EVENT_READ)
        while selector.get_map():
            timeout = deadline - time.monotonic()
            if timeout <= 0:
                if limit or wait_status is not None:
                    break  # a descendant that left the pid namespace holds a pipe
                stop("wall")
                continue
            for key, _ in selector.select(timeout):
                if key.fd == pidfd:
                    selector.unregister(pidfd)
                    wait_status, cpu = _reap(pid, cgroups, orphans)
                    deadline = min(deadline, time.monotonic() + _DRAIN_S)
                    continue
                chunk = os.read(key.fd, 1 << 16)
                if not chunk:
                    selector.unregister(key.fd)
                elif key.fd == status_fd:
                    status = (status + chunk)[-_STATUS_MAX:]
                else:
                    written[key.fd] += len(chunk)
                    if key.fd == out_fd:
                        out += chunk[: limits.max_output_bytes - len(out)]
                    else:
                        err = (err + chunk)[-_STDERR_TAIL * 4 :]
                    if written[key.fd] > limits.max_output_bytes and not limit:
                        stop("output")
    if wait_status is None:  # the drain ran out before the kill was through
        wait_status, cpu = _reap(pid, cgroups, orphans)
    for fd in [*fds, pidfd]:
        os.close(fd)
    for line in status.splitlines():
        with contextlib.suppress(ValueError, TypeError):
            info.update(json.loads(line))
    return bytes(out), bytes(err), info, limit, wait_status, cpu


def _reap(pid: int, cgroups: list[str], orphans: bool) -> tuple[int, float]:
    """Kill what an ended snippet left (its process group, its cgroups' other processes, the
    orphans reparented to the server: none inside a pid namespace), then reap it; returns its
    wait status and CPU seconds."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
    for path in cgroups:
        empty_cgroup(path, keep=os.getpid())
    _, status, usage = os.wait4(pid, 0)
    for _ in range(100 if orphans else 0):  # the server's only children are a snippet's
        children = [int(child) for child in Path(_CHILDREN).read_text().split()]
        if not children:
            break
        for child in children:
            with contextlib.suppress(OSError):
                os.kill(child, signal.SIGKILL)
                os.waitpid(child, 0)
    return status, usage.ru_utime + usage.ru_stime


def empty_cgroup(path: str, keep: int = 0) -> None:
    """SIGKILL a cgroup's processes but `keep` until none is left (for a second at most)."""
    for _ in range(100):
        try:
            pids = [int(pid) for pid in Path(path, "cgroup.procs").read_text().split()]
        except OSError:
            return
        pids = [pid for pid in pids if pid not in (0, keep)]  # 0: one this pid ns cannot see
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.01)


def _oom_kills(cgroups: list[str]) -> int:
    """How many processes the kernel's OOM killer has killed in the memory cgroup."""
    for path in cgroups:
        with contextlib.suppress(OSError):
            for line in Path(path, "memory.oom_control").read_text().splitlines():
                if line.startswith("oom_kill "):
                    return int(line.split()[1])
    return 0


def _snippet(
    code: str,
    limits: SandboxLimits,
    layers: set[str],
    workdir: str | None,
    out_w: int,
    err_w: int,
    status_w: int,
) -> NoReturn:
    """The snippet's process: confine itself, run the code, exit."""
    status, redirected = 1, False
    try:
        null = os.open(os.devnull, os.O_RDONLY)
        for fd, target in ((null, 0), (out_w, 1), (err_w, 2), (status_w, 3)):
            os.dup2(fd, target)
        redirected = True
        os.closerange(4, resource.getrlimit(resource.RLIMIT_NOFILE)[0])
        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # dies with the server
        os.setsid()
        if "mount_ns" in layers:
            _isolate(limits.max_file_mb)
        with contextlib.suppress(OSError):
            Path("/proc/self/oom_score_adj").write_text("1000")  # the first the OOM killer takes
        workdir = workdir or tempfile.mkdtemp(dir="/tmp")  # in its private /tmp
        uid, gid = _nobody() if "uid_drop" in layers else (os.getuid(), os.getgid())
        os.chown(workdir, uid, gid)
        os.chdir(workdir)
        _set_rlimits(limits, nproc="nproc_rlimit" in layers)
        os.environ.clear()
        os.environ.update(PATH=PATH, HOME=workdir, TMPDIR=workdir, LANG="C.UTF-8")
        tempfile.tempdir = workdir
        if "uid_drop" in layers:
            _drop_uid(uid, gid)
        _prctl(PR_SET_NO_NEW_PRIVS, 1)
        status = _execute(code, limits)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            record = {"error": f"SandboxError: the snippet's setup failed: {exc}"}
            if redirected:
                os.write(3, json.dumps(record).encode() + b"\n")
    finally:
        os._exit(status)


def _execute(code: str, limits: SandboxLimits) -> int:
    """Run the code as __main__, its error line and limit to fd 3; returns the exit status."""
    sys.set_int_max_str_digits(0)  # lifted: docs/tools.md says why
    streams = [
        open(fd, "w", buffering=1, encoding="utf-8", errors="backslashreplace", closefd=False)
        for fd in (1, 2)
    ]
    sys.stdout, sys.stderr = streams
    cpu_hit = []

    def on_cpu_limit(signum: int, frame: object) -> None:
        cpu_hit.append(True)
        raise TimeoutError(limits.message("cpu").partition(": ")[2])

    signal.signal(signal.SIGXCPU, on_cpu_limit)  # the hard limit, a second later, is SIGKILL
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # past max_file_mb, a write raises instead
    namespace = {"__name__": "__main__", "__builtins__": builtins}
    record: dict[str, Any] = {}
    status = 0
    try:
        exec(compile(code, "<snippet>", "exec"), namespace)
    except SystemExit as exc:
        status = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    except BaseException as exc:
        namespace.clear()  # frees what a memory bomb holds
        status = 1
        record["error"] = traceback.format_exception_only(exc)[-1].strip()
        if isinstance(exc, MemoryError) or cpu_hit:
            record["limit"] = "memory" if isinstance(exc, MemoryError) else "cpu"
        with contextlib.suppress(BaseException):
            traceback.print_exception(exc, file=streams[1])
    for stream in streams:
        with contextlib.suppress(BaseException):
            stream.flush()
    with contextlib.suppress(OSError):
        os.write(3, json.dumps(record).encode() + b"\n")
    return status


def _set_rlimits(limits: SandboxLimits, nproc: bool) -> None:
    """CPU time, address space (over the current one), file size, no core dumps; processes."""
    with open("/proc/self/status") as status:
        vm_kb = next(int(line.split()[1]) for line in status if line.startswith("VmSize:"))
    values = {
        resource.RLIMIT_CPU: (limits.cpu_seconds, limits.cpu_seconds + 1),
        resource.RLIMIT_AS: ((vm_kb << 10) + (limits.memory_mb << 20),) * 2,
        resource.RLIMIT_FSIZE: (limits.max_file_mb << 20,) * 2,
        resource.RLIMIT_CORE: (0, 0),
    }
    if nproc:
        values[resource.RLIMIT_NPROC] = (limits.max_processes,) * 2
    for which, value in values.items():
        resource.setrlimit(which, value)


def _probe_namespaces() -> None:
    _check(_libc.unshare(CLONE_NEWPID), "unshare")
    if not _in_child(lambda: _isolate(1)):
        raise OSError("cannot isolate a snippet")


def _isolate(tmpfs_mb: int) -> None:
    """Fresh mount and IPC namespaces: private /tmp, /var/tmp, /dev/shm and /proc. The
    interpreter's own directories under one of them (a virtual environment in /tmp) are bound
    back, so its lazily imported modules stay importable."""
    _check(_libc.unshare(CLONE_NEWNS | CLONE_NEWIPC), "unshare")
    _check(_libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None), "mount /")
    scratch = [path for path in _SCRATCH if os.path.isdir(path)]
    inside = [d for d in _interpreter_dirs() if any(d.startswith(s + "/") for s in scratch)]
    kept = {path: os.open(path, os.O_PATH) for path in _outermost(inside)}
    options = f"size={tmpfs_mb}m,mode=1777".encode()
    for path in scratch:
        flags = MS_NOSUID | MS_NODEV
        _check(_libc.mount(b"tmpfs", path.encode(), b"tmpfs", flags, options), "mount")
    for path, fd in kept.items():
        os.makedirs(path, exist_ok=True)
        _bind(fd, path)
    flags = MS_NOSUID | MS_NODEV | MS_NOEXEC  # a /proc that shows its own pid namespace only
    _check(_libc.mount(b"proc", b"/proc", b"proc", flags, None), "mount /proc")


def _server_mounts(expose: bool) -> None:
    """The server's own mount namespace, which the snippets copy: a /dev with harmless devices
    only (no GPU, disk or other device node); with `expose`, the interpreter made readable."""
    _check(_libc.unshare(CLONE_NEWNS), "unshare")
    _check(_libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None), "mount /")
    kept = {name: os.open(f"/dev/{name}", os.O_PATH) for name in _DEVICES}
    _check(_libc.mount(b"tmpfs", b"/dev", b"tmpfs", MS_NOSUID, b"size=64k,mode=755"), "mount")
    for name, fd in kept.items():
        Path("/dev", name).touch()
        _bind(fd, f"/dev/{name}")
    os.mkdir("/dev/shm", 0o1777)
    for name, target in (("fd", ""), ("stdin", "/0"), ("stdout", "/1"), ("stderr", "/2")):
        os.symlink(f"/proc/self/fd{target}", f"/dev/{name}")
    if expose:
        _expose_interpreter()


def _bind(fd: int, target: str) -> None:
    """Bind what the O_PATH `fd` holds (hidden since, maybe) on `target`; close `fd`."""
    source = f"/proc/self/fd/{fd}".encode()
    _check(_libc.mount(source, target.encode(), None, MS_BIND | MS_REC, None), "bind")
    os.close(fd)


def _expose_interpreter() -> None:
    """Let nobody read the interpreter's directories where a directory closed to others hides
    them (a Python under /root): a tmpfs over that directory, with the interpreter's
    directories bound back into it."""
    hidden: dict[str, list[str]] = {}  # a closed directory: the directories to bind back
    for path in _interpreter_dirs():
        closed = _closed_ancestor(path)
        if closed and closed != path:
            hidden.setdefault(closed, []).append(path)
    hidden = {closed: _outermost(paths) for closed, paths in hidden.items()}
    options = b"size=64k,mode=755"
    for closed, kept in hidden.items():
        fds = [os.open(path, os.O_PATH) for path in kept]
        _check(_libc.mount(b"tmpfs", closed.encode(), b"tmpfs", MS_NOSUID, options), "mount")
        for path, fd in zip(kept, fds, strict=True):
            os.makedirs(path, exist_ok=True)
            _bind(fd, path)


def _interpreter_dirs() -> list[str]:
    """The interpreter's prefixes and import path, resolved, existing, parents first."""
    dirs = {os.path.realpath(d) for d in (sys.base_prefix, sys.prefix, *sys.path)}
    return sorted(filter(os.path.isdir, dirs))


def _outermost(paths: list[str]) -> list[str]:
    """`paths` (sorted, parents first) without those inside another of them."""
    kept: list[str] = []
    for path in paths:
        if not any(path.startswith(k + "/") for k in kept):
            kept.append(path)
    return kept


def _closed_ancestor(path: str) -> str | None:
    """The first directory on the way to `path` that others may not enter, if any."""
    parts = Path(path).parts
    for depth in range(2, len(parts) + 1):
        directory = os.path.join(*parts[:depth])
        if not os.stat(directory).st_mode & stat.S_IXOTH:
            return directory
    return None


@functools.cache
def _nobody() -> tuple[int, int]:
    try:
        entry = pwd.getpwnam("nobody")
    except KeyError:
        return 65534, 65534
    return entry.pw_uid, entry.pw_gid


def _drop_uid(uid: int, gid: int) -> None:
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)


def _prctl(option: int, value: int) -> None:
    _check(_libc.prctl(option, value, 0, 0, 0), "prctl")


def _check(result: int, what: str) -> None:
    if result != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")


def _in_child(fn: Callable[[], object]) -> bool:
    """Whether fn() returns without raising in a forked child."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            fn()
            code = 0
        finally:
            os._exit(code)
    return os.waitpid(pid, 0)[1] == 0


if __name__ == "__main__":
    serve(json.loads(sys.argv[1]), int(sys.argv[2]))
