"""The sandbox (grpo/tools/sandbox.py, issue 24 item 5): ordinary snippets read as the model
reads them; each hostile one is contained: a clear message in the tool output, the caller and
the server unaffected, nothing left running. A case that needs a layer the machine lacks is
skipped (the fork bomb runs only where the sandbox's own process limit binds)."""

from __future__ import annotations

import collections
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from grpo.tools.sandbox import Sandbox, SandboxLimits, SandboxResult

REPO = Path(__file__).resolve().parents[2]
LIMITS = SandboxLimits(
    cpu_seconds=2,
    wall_seconds=4.0,
    memory_mb=256,
    max_processes=8,
    max_file_mb=4,
    max_output_bytes=100_000,
    max_output_chars=400,
)
PYTHON_SERVER = f"{sys.executable}\0-I\0".encode()  # how the server's command line starts
SECRET_NAME, SECRET = "GRPO_SANDBOX_TEST_SECRET", f"secret-{uuid.uuid4().hex}"


@pytest.fixture(scope="module")
def sandbox():
    """One sandbox for the module, started while the caller's environment holds a secret."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(SECRET_NAME, SECRET)
        with Sandbox(LIMITS) as box:
            yield box


def needs(box: Sandbox, *layers: str) -> None:
    missing = set(layers) - box.layers
    if missing:
        pytest.skip(f"layers not in force on this machine: {sorted(missing)}")


def processes() -> dict[int, tuple[int, str]]:
    """pid: (parent pid, state) of every process."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                state, ppid = (entry / "stat").read_text().rsplit(")", 1)[1].split()[:2]
            except OSError:
                continue
            found[int(entry.name)] = (int(ppid), state)
    return found


def cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def python_server(box: Sandbox) -> int:
    """The sandbox's Python server: its outermost process, or that one's child."""
    children = collections.defaultdict(list)
    for pid, (ppid, _) in processes().items():
        children[ppid].append(pid)
    outer = box.server_pid
    return next(p for p in [outer, *children[outer]] if cmdline(p).startswith(PYTHON_SERVER))


def left_running(box: Sandbox) -> list[int]:
    """Live processes under the Python server: what snippets left behind."""
    table = processes()
    children = collections.defaultdict(list)
    for pid, (ppid, _) in table.items():
        children[ppid].append(pid)
    below, stack = [], list(children[python_server(box)])
    while stack:
        pid = stack.pop()
        if table.get(pid, (0, "Z"))[1] != "Z":
            below.append(pid)
        stack += children[pid]
    return below


def run_contained(box: Sandbox, code: str) -> SandboxResult:
    """Run `code`, then check the caller is unaffected and nothing it started still runs."""
    server = box.server_pid
    result = box.run(code)
    assert box.server_pid == server, "the sandbox server had to restart"
    os.kill(os.getppid(), 0)  # the test runner's parent is alive
    deadline = time.monotonic() + 5
    while (left := left_running(box)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not left, f"left running: {[cmdline(pid) for pid in left]}"
    assert box.run("print('next')").text == "next\n"
    return result


# Ordinary snippets.


@pytest.mark.parametrize(
    ("code", "text", "exit_code"),
    [
        ("print(6 * 7)", "42\n", 0),
        ("print('before')\n1 / 0", "before\nZeroDivisionError: division by zero", 1),
        ("1 +", "SyntaxError: invalid syntax", 1),
        ("import sys\nprint('a')\nsys.exit(3)", "a\n", 3),
    ],
)
def test_the_model_reads_stdout_then_the_errors_last_line(sandbox, code, text, exit_code):
    result = sandbox.run(code)
    assert result.text == text
    assert result.exit_code == exit_code
    assert result.limit is None and result.signal is None


def test_numpy_and_sympy_are_usable(sandbox):
    code = "import numpy as np, sympy as sp\nprint(np.arange(4).sum(), sp.factor('x**2 - 1'))"
    assert sandbox.run(code).text == "6 (x - 1)*(x + 1)\n"


def test_the_int_to_str_digit_limit_is_lifted(sandbox):
    assert sandbox.run("print(len(str(10**5000)))").text == "5001\n"


def test_long_output_is_cut_keeping_the_error_line(sandbox):
    result = sandbox.run("print('x' * 5000)\nraise ValueError('boom')")
    assert len(result.text) <= LIMITS.max_output_chars
    assert "[... output cut]" in result.text and result.text.endswith("ValueError: boom")


def test_each_snippet_starts_fresh(sandbox):
    sandbox.run("x = 5\nopen('here.txt', 'w').write('1')")
    code = "import os\nprint('x' in globals(), os.listdir('.'), os.getcwd() != '/')"
    assert sandbox.run(code).text == "False [] True\n"


# Hostile snippets.


def test_an_infinite_loop_is_stopped(sandbox):
    result = run_contained(sandbox, "while True:\n    pass")
    assert result.limit in ("cpu", "wall")
    assert result.text == LIMITS.message(result.limit)
    assert result.seconds < LIMITS.wall_seconds + 2


def test_sleeping_forever_is_stopped_at_the_wall_time(sandbox):
    result = run_contained(sandbox, "import time\ntime.sleep(10**6)")
    assert result.limit == "wall"
    assert result.text == "TimeoutError: the snippet ran past its 4 s wall-time limit"


def test_a_fork_bomb_is_contained(sandbox):
    if not sandbox.limits_processes:
        pytest.skip("no process limit binds here (no pids cgroup, no RLIMIT_NPROC as nobody)")
    code = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"
    result = run_contained(sandbox, code)
    assert result.limit in ("cpu", "wall")
    assert result.text.startswith("TimeoutError: the snippet ran past its")


def test_a_memory_bomb_is_stopped(sandbox):
    result = run_contained(sandbox, "x = []\nwhile True:\n    x.append(bytearray(10**7))")
    assert result.limit == "memory"
    assert result.text == "MemoryError: the snippet ran past its 256 MB memory limit"


def test_the_memory_of_all_its_processes_is_capped(sandbox):
    needs(sandbox, "memory_cgroup")
    code = (
        "import os, time\n"
        "for _ in range(3):\n"
        "    if os.fork() == 0:\n"
        "        block = bytearray(200 << 20)\n"  # each under RLIMIT_AS, together over the cap
        "        time.sleep(1)\n"
        "        os._exit(0)\n"
        "print(sum(os.WIFSIGNALED(os.wait()[1]) for _ in range(3)))"
    )
    result = run_contained(sandbox, code)
    assert result.stdout in ("1\n", "2\n", "3\n"), result.text  # the OOM killer stopped some


def test_100_mb_of_output_is_stopped(sandbox):
    code = "import sys\nchunk = 'x' * 2**20\nfor _ in range(100):\n    sys.stdout.write(chunk)"
    result = run_contained(sandbox, code)
    assert result.limit == "output"
    assert len(result.text) <= LIMITS.max_output_chars
    assert result.text.startswith("xxx") and result.text.endswith(LIMITS.message("output"))


def test_files_are_capped(sandbox):
    result = run_contained(sandbox, "open('big', 'wb').write(b'0' * (5 << 20))")
    assert result.text == "OSError: [Errno 27] File too large"


def test_writing_outside_its_folder_fails(sandbox, tmp_path):
    needs(sandbox, "uid_drop", "mount_ns")
    name = f"grpo-sandbox-escape-{uuid.uuid4().hex}"
    targets = [str(tmp_path / name), str(REPO / name), f"/tmp/{name}", f"/dev/shm/{name}"]
    code = (
        f"for path in {targets!r}:\n"
        "    try:\n"
        "        open(path, 'w').write('x')\n"
        "    except OSError as error:\n"
        "        print(type(error).__name__)\n"
        "open('inside.txt', 'w').write('ok')\n"
        "print(open('inside.txt').read())"
    )
    result = run_contained(sandbox, code)
    assert result.text.endswith("ok\n")
    assert not any(Path(target).exists() for target in targets)


def test_the_callers_environment_does_not_reach_it(sandbox):
    assert os.environ[SECRET_NAME] == SECRET
    # Without both, the snippet is the caller's user outside its pid namespace: /proc/PID/environ
    pids = [os.getpid(), "self", 1] if {"pid_ns", "uid_drop"} & sandbox.layers else ["self"]
    code = (
        "import os\n"
        "print(sorted(os.environ), os.environ.get(" + repr(SECRET_NAME) + "))\n"
        f"for pid in {pids!r}:\n"
        "    try:\n"
        "        print(open(f'/proc/{pid}/environ', 'rb').read())\n"
        "    except OSError as error:\n"
        "        print(type(error).__name__)"
    )
    result = run_contained(sandbox, code)
    assert result.text.startswith("['HOME', 'LANG', 'PATH', 'TMPDIR'] None\n")
    assert SECRET not in result.text


def test_it_cannot_reach_a_port_on_the_host(sandbox):
    needs(sandbox, "net_ns")
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        code = (
            "import socket\n"
            "try:\n"
            f"    socket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
            "    print('connected')\n"
            "except OSError as error:\n"
            "    print(error)"
        )
        result = run_contained(sandbox, code)
        listener.setblocking(False)
        with pytest.raises(BlockingIOError):
            listener.accept()
    assert result.text == "[Errno 101] Network is unreachable\n"


def test_it_sees_no_device_but_harmless_ones(sandbox):
    needs(sandbox, "minimal_dev")  # no GPU (/dev/nvidia*, /dev/dri), disk or other device node
    result = run_contained(sandbox, "import os\nprint(sorted(os.listdir('/dev')))")
    harmless = ["fd", "full", "null", "random", "shm", "stderr", "stdin", "stdout", "urandom"]
    assert result.text == f"{[*harmless, 'zero']}\n"


def test_killing_its_parent_fails(sandbox):
    if not {"pid_ns", "uid_drop"} & sandbox.layers:
        pytest.skip("neither a pid namespace nor a dropped uid: it could kill the test runner")
    code = (
        "import os, signal\n"
        "os.kill(os.getppid(), signal.SIGKILL)\n"
        f"for pid in ({os.getpid()}, {python_server(sandbox)}):\n"
        "    try:\n"
        "        os.kill(pid, signal.SIGKILL)\n"
        "        print('killed')\n"
        "    except OSError as error:\n"
        "        print(type(error).__name__)"
    )
    result = run_contained(sandbox, code)
    assert "killed" not in result.text


def test_a_segfault_is_reported(sandbox):
    result = run_contained(sandbox, "import ctypes\nctypes.string_at(0)")
    assert result.signal == signal.SIGSEGV
    assert result.text == "SandboxError: the snippet died of signal SIGSEGV (Segmentation fault)"


def test_a_detached_process_does_not_outlive_it(sandbox):
    if not {"pid_ns", "subreaper"} & sandbox.layers:
        pytest.skip("neither a pid namespace nor a child subreaper")
    mark = f"{4000 + os.getpid() % 1000}.{uuid.uuid4().int % 10**6}"  # a unique `sleep` argument
    code = (
        "import os\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    if os.fork() == 0:\n"
        f"        os.execv('/bin/sleep', ['sleep', '{mark}'])\n"
        "    os._exit(0)\n"
        "print('detached')"
    )
    result = run_contained(sandbox, code)
    assert result.text == "detached\n"
    wanted = f"sleep\0{mark}\0".encode()
    assert not [pid for pid in processes() if cmdline(pid) == wanted]


# The server's life.


def test_a_dead_server_is_restarted():
    with Sandbox(LIMITS, preload=()) as box:
        os.kill(python_server(box), signal.SIGKILL)
        first = box.server_pid
        assert box.run("print(1)").text == "1\n"
        assert box.server_pid != first


def test_a_hung_server_does_not_hang_the_caller(monkeypatch):
    monkeypatch.setattr("grpo.tools.sandbox._ANSWER_SLACK_S", 0.5)
    with Sandbox(SandboxLimits(wall_seconds=0.5), preload=()) as box:
        os.kill(python_server(box), signal.SIGSTOP)
        first = box.server_pid
        result = box.run("print(1)")
        assert result.text == "SandboxError: the sandbox server stopped answering"
        assert box.server_pid != first
        with pytest.raises(ProcessLookupError):
            os.kill(first, 0)
        assert box.run("print(1)").text == "1\n"


def test_closing_leaves_nothing():
    ours = f"grpo-sandbox-{os.getpid()}-"
    before = sorted(str(p) for p in Path("/sys/fs/cgroup").glob(f"*/{ours}*"))
    box = Sandbox(LIMITS, preload=())
    server = box.server_pid
    box.run("print(1)")
    box.close()
    with pytest.raises(ProcessLookupError):
        os.kill(server, 0)
    assert sorted(str(p) for p in Path("/sys/fs/cgroup").glob(f"*/{ours}*")) == before
    with pytest.raises(RuntimeError):
        box.run("print(1)")


def test_limits_must_be_positive():
    with pytest.raises(ValueError, match="wall_seconds"):
        SandboxLimits(wall_seconds=0)


@pytest.mark.parametrize(
    ("code", "flags", "text"),
    [
        ("print('hello')", [], "hello\n"),
        (
            "import ctypes\nctypes.string_at(0)",
            [],
            "SandboxError: the snippet died of signal SIGSEGV (Segmentation fault)",
        ),
        (
            "import time\ntime.sleep(60)",
            ["--wall-seconds", "1"],
            "TimeoutError: the snippet ran past its 1 s wall-time limit",
        ),
    ],
)
def test_the_command_prints_what_the_model_reads(tmp_path, code, flags, text):
    snippet = tmp_path / "snippet.py"
    snippet.write_text(code)
    done = subprocess.run(
        [sys.executable, "scripts/sandbox.py", str(snippet), *flags],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == text


def test_an_interpreter_under_tmp_keeps_its_modules(tmp_path):
    """Each snippet gets a private /tmp: a virtual environment living under /tmp (a clone there)
    is bound back into it, so modules the server had not imported still import."""
    if not Path(tempfile.gettempdir()).resolve().is_relative_to("/tmp"):
        pytest.skip("the temporary directory is not under /tmp")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    (site,) = venv.glob("lib/python*/site-packages")
    (site / "ours.pth").write_text("\n".join(p for p in sys.path if p.endswith("site-packages")))
    (site / "lazy_probe.py").write_text("ANSWER = 42\n")
    snippet = tmp_path / "snippet.py"
    snippet.write_text("import lazy_probe\nprint(lazy_probe.ANSWER)")
    done = subprocess.run(
        [venv / "bin" / "python", "scripts/sandbox.py", str(snippet)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (done.returncode, done.stdout) == (0, "42\n"), done.stderr
