"""Running model-written Python against its tests (MBPP pass@1), in a separate, limited process.

A task that scores code sets `unsafe_code: true` in its YAML, so lm-eval refuses to run it unless the
user passes `confirm_run_unsafe_code` (`--confirm_run_unsafe_code` on its CLI, `confirm_run_unsafe_code:
true` in a spec's evaluate settings). Only then does `run_tests` execute anything.

What `run_tests` does for each program:
- runs it in a new interpreter (`python -I -B`: no user site-packages, no PYTHON* variables, no current
  directory on sys.path, no .pyc written), in a new session (its whole process group is killed when time is up);
- a wall-clock time limit (the process group is killed) and resource limits set in the child before the
  program starts: CPU seconds, address space (memory), size of any file written, open files, no core dumps;
- a fresh scratch directory as its working directory, HOME and TMPDIR, deleted afterwards;
- a minimal environment (PATH, LANG, HOME, TMPDIR): none of the parent's variables, so no tokens or keys;
- an audit hook (PEP 578), installed before the program runs, that refuses: creating sockets, connecting,
  binding and name lookups; starting processes (subprocess, os.system, exec*, spawn*, posix_spawn, fork);
  sending signals to other processes; changing resource limits; loading ctypes, cffi or the raw
  subprocess module; opening files for writing, and creating, removing, renaming or changing the
  permissions of files, anywhere outside the scratch directory; reading other processes' /proc entries
  (their environment or memory); sqlite databases outside the scratch directory;
- where the kernel lets an unprivileged user do it (user namespaces, probed once), a new network namespace
  (`unshare --user --map-root-user --net`): the process then has no network interface but a loopback that
  is down, whatever the code does;
- stdout and stderr go nowhere (stdin carries only the job); the result comes back on a private pipe,
  written only after every test passed, so a program that exits early (`exit(0)`, `os._exit(0)`) does not pass.

What it does NOT protect against (this is a guard against mistakes of model-written code, not a sandbox
for hostile code):
- the audit hook lives in the same interpreter as the program: code that corrupts the interpreter's memory,
  or a compiled extension module that does I/O in C without raising audit events (numpy's `tofile`, for
  one), gets past it; code that writes to the result pipe itself, or replaces the functions the harness
  calls after the tests (`os.write`, `json.dumps`), can fake a pass;
- it can READ every file the user can read (sources, data, keys in the home directory): the hook only
  limits writes and /proc; it can use up to the memory, CPU and file-size limits given;
- without user namespaces there is no network isolation below the audit hook (see above);
- run as root, the limits on processes do not apply (the audit hook still refuses to start any), and the
  file permissions the hook does not cover are root's.
For untrusted models at scale, run evaluations inside a container or VM without network and with a
read-only file system; this module then limits the damage of a single program inside it.
"""

from __future__ import annotations

import ast
import functools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Sequence

from pefteval_harness.errors import BadInput

DEFAULT_TIMEOUT = 10.0  # seconds of wall-clock time per program (the authors of the merging study use 10)
DEFAULT_MEMORY_MB = 1024  # address space; CPython needs about 30 MB to start
DEFAULT_FILE_SIZE_MB = 16  # the largest file the program may write
_RESULT_LIMIT = 1 << 16  # bytes read back from the child

# Imports put before every program, as MBPP solutions assume them (standard library only).
PRELUDE = "\n".join(
    [
        "import math",
        "import re",
        "import sys",
        "import copy",
        "import datetime",
        "import itertools",
        "import collections",
        "import heapq",
        "import functools",
        "import string",
        "from typing import *",
        "from collections import *",
    ]
)

# The child: reads its job from stdin, limits itself, installs the audit hook, then runs setup, program and
# tests in one namespace. It reports on the pipe `result_fd` only; a failure names the first failing step.
_CHILD = r"""
import json, os, resource, sys
job = json.loads(sys.stdin.read())
sys.stdin.close()
fd, scratch = job["result_fd"], os.path.realpath(job["scratch"])
for name, value in job.pop("limits").items():
    limit = getattr(resource, name)
    hard = resource.getrlimit(limit)[1]
    value = value if hard == resource.RLIM_INFINITY else min(value, hard)  # only root may raise a hard limit
    resource.setrlimit(limit, (value, value))
own_proc = ("/proc/self/", "/proc/thread-self/", f"/proc/{os.getpid()}/")
blocked_events = {
    "socket.__new__", "socket.connect", "socket.bind", "socket.getaddrinfo", "socket.gethostbyname",
    "socket.gethostbyaddr", "socket.getnameinfo", "socket.sendto", "socket.sendmsg",
    "subprocess.Popen", "os.system", "os.exec", "os.spawn", "os.posix_spawn", "os.fork", "os.forkpty",
    "os.kill", "os.killpg", "signal.pthread_kill", "resource.setrlimit", "resource.prlimit",
    "ctypes.dlopen", "ctypes.dlsym", "ctypes.cdata", "ctypes.call_function",
}
blocked_modules = {"ctypes", "_ctypes", "cffi", "_cffi_backend", "_posixsubprocess"}
path_events = {
    "os.remove": (0,), "os.rmdir": (0,), "os.rename": (0, 1), "os.mkdir": (0,), "os.chmod": (0,),
    "os.chown": (0,), "os.symlink": (0, 1), "os.link": (0, 1), "os.truncate": (0,), "os.utime": (0,),
    "shutil.rmtree": (0,), "shutil.copyfile": (1,), "shutil.move": (1,), "os.chdir": (0,),
    "os.mkfifo": (0,), "os.mknod": (0,), "os.setxattr": (0,), "os.removexattr": (0,),
}
write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
for name in blocked_modules:
    sys.modules.pop(name, None)  # a cached module would be imported without an "import" event

def inside(path):
    if isinstance(path, int):
        return True  # an open file descriptor: its path was checked when it was opened
    try:
        path = os.fsdecode(path)
    except TypeError:
        return False
    real = os.path.realpath(path)
    return real == scratch or real.startswith(scratch + os.sep)

def refuse(event, detail=""):
    raise PermissionError(f"refused by the sandbox: {event} {detail}".strip())

def audit(event, args):
    if event in blocked_events:
        refuse(event)
    if event == "import" and args[0].partition(".")[0] in blocked_modules:
        refuse(event, args[0])
    if event == "open":
        path, mode, flags = args
        writes = (mode is not None and any(c in mode for c in "wax+")) or (mode is None and flags & write_flags)
        if writes and not inside(path):
            refuse("writing", repr(path))
        if isinstance(path, (str, bytes)):
            text = os.path.realpath(os.fsdecode(path)) + "/"
            if text.startswith("/proc/") and not text.startswith(own_proc) and text[6:7].isdigit():
                refuse("reading", repr(path))
    elif event in path_events:
        for i in path_events[event]:
            if i < len(args) and args[i] is not None and not inside(args[i]):
                refuse(event, repr(args[i]))
    elif event == "sqlite3.connect":
        database = args[0]
        if database != ":memory:" and not inside(database):
            refuse(event, repr(database))

sys.addaudithook(audit)
namespace = {"__name__": "__main__", "__builtins__": __builtins__}
steps = [("setup", job["setup"]), ("program", job["program"])]
steps += [(f"test {i + 1}: {t.strip()[:200]}", t) for i, t in enumerate(job["tests"])]
for step, source in steps:
    try:
        exec(compile(source, f"<{step.split(':')[0]}>", "exec"), namespace)
    except BaseException as error:  # noqa: BLE001 - SystemExit too: exiting early is no pass
        kind = type(error).__name__
        message = str(error).splitlines()[0][:300] if str(error) else ""
        reason = f"{step}: {kind}" + (f": {message}" if message else "")
        os.write(fd, json.dumps({"passed": False, "reason": reason}).encode())
        os._exit(1)
os.write(fd, json.dumps({"passed": True, "reason": "passed"}).encode())
os._exit(0)
"""


@functools.lru_cache(maxsize=1)
def network_namespace_prefix() -> tuple[str, ...]:
    """`unshare` arguments that give the child its own, empty network namespace, or () where the kernel
    (or the container) does not allow it without privileges. Probed once per process."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return ()
    prefix = (unshare, "--user", "--map-root-user", "--net")
    try:
        probe = subprocess.run([*prefix, "true"], capture_output=True, timeout=10, env={"PATH": "/usr/bin:/bin"})
    except (OSError, subprocess.TimeoutExpired):
        return ()
    return prefix if probe.returncode == 0 else ()


def run_tests(
    program: str,
    tests: Sequence[str],
    setup: str = "",
    timeout: float = DEFAULT_TIMEOUT,
    memory_mb: int = DEFAULT_MEMORY_MB,
    file_size_mb: int = DEFAULT_FILE_SIZE_MB,
) -> tuple[bool, str]:
    """Run `setup`, then `program`, then each of `tests` (Python statements, usually asserts) in one fresh,
    limited interpreter (see the module docstring for what is and is not prevented).

    Returns (passed, reason): (True, "passed") when every test ran without an exception; otherwise False
    and one line naming the first failing step ("test 2: AssertionError", "program: SyntaxError: ...",
    "timed out after 10 s", "killed by SIGKILL" ...). A program that fails is never an error here.
    """
    if not isinstance(program, str) or not isinstance(setup, str):
        raise BadInput("run_tests: program and setup must be strings")
    if isinstance(tests, str) or not all(isinstance(t, str) for t in tests):
        raise BadInput("run_tests: tests must be a list of Python statements (strings)")
    if not timeout > 0 or memory_mb < 64 or file_size_mb < 0:
        raise BadInput(
            f"run_tests: timeout {timeout} s, memory {memory_mb} MB or file size {file_size_mb} MB out of range"
        )
    scratch = tempfile.mkdtemp(prefix="pefteval-code-")
    read_end, write_end = os.pipe()
    cpu_seconds = int(timeout) + 1
    job = {
        "program": program,
        "tests": list(tests),
        "setup": setup,
        "result_fd": write_end,
        "scratch": scratch,
        "limits": {
            "RLIMIT_CPU": cpu_seconds,
            "RLIMIT_AS": memory_mb << 20,
            "RLIMIT_FSIZE": file_size_mb << 20,
            "RLIMIT_NOFILE": 64,
            "RLIMIT_CORE": 0,
        },
    }
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": scratch, "TMPDIR": scratch}
    command = [*network_namespace_prefix(), sys.executable, "-I", "-B", "-c", _CHILD]
    try:
        process = subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=scratch,
            env=env,
            pass_fds=(write_end,),
            start_new_session=True,  # its own process group, killed as a whole
            close_fds=True,
        )
    except BaseException:
        os.close(read_end)
        os.close(write_end)
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    os.close(write_end)  # the child holds the only writer: EOF when it is gone
    try:
        try:
            process.communicate(json.dumps(job).encode(), timeout=timeout)
        except BaseException as error:
            _kill_group(process)  # not reaped yet, so the group is still the child's own
            if isinstance(error, subprocess.TimeoutExpired):
                return False, f"timed out after {timeout:g} s"
            raise
        report = _read_report(read_end)
    finally:
        os.close(read_end)
        shutil.rmtree(scratch, ignore_errors=True)
    if report is not None:
        return bool(report.get("passed") is True and process.returncode == 0), str(report.get("reason", ""))
    return False, _exit_reason(process.returncode, cpu_seconds)


def _kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    process.wait()


def _read_report(fd: int) -> dict | None:
    data = b""
    while len(data) < _RESULT_LIMIT:
        chunk = os.read(fd, _RESULT_LIMIT - len(data))
        if not chunk:
            break
        data += chunk
    try:
        report = json.loads(data.decode("utf-8", errors="replace"))
    except ValueError:
        return None
    return report if isinstance(report, dict) else None


def _exit_reason(returncode: int | None, cpu_seconds: int) -> str:
    if returncode is not None and returncode < 0:
        name = signal.Signals(-returncode).name if -returncode in signal.valid_signals() else str(-returncode)
        if name == "SIGXCPU":
            return f"CPU time limit ({cpu_seconds} s) exceeded"
        if name == "SIGXFSZ":
            return "file size limit exceeded"
        return f"killed by {name}"
    if returncode == 0:
        return "exited before its tests finished (os._exit?)"
    return f"exited with code {returncode} before reporting (out of memory?)"


# ------------------------------------------------------------------------------------ code extraction

# A fenced block: ```python / ```py / ``` ... ```, or an unclosed fence running to the end (a cut generation).
_FENCE = re.compile(r"```[ \t]*(?P<lang>[\w+-]*)[^\n]*\n(?P<body>.*?)(?:```|\Z)", re.DOTALL)
_PYTHON_TAGS = {"", "python", "py", "python3"}
# Lines where a program can start when looking for the longest valid run in free text.
_CODE_START = re.compile(r"^(?:def |class |import |from |@|async def )")
_MAX_LINES = 200  # of free text scanned for code (the search is quadratic in it)


def _parses(code: str) -> bool:
    try:
        ast.parse(code)
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        return False
    return True


def extract_code(text: str) -> str | None:
    """The Python program in a model's answer, or None when there is none.

    Rule: the fenced code blocks tagged python (or untagged), joined, when they parse together; else the
    first such block that parses. Without a fence: the whole answer if it parses, else the longest run of
    lines that starts at a `def`/`class`/`import`/`from`/decorator line and parses (models often add prose
    before or after the code). Tabs become 4 spaces; the code is dedented. None when no code parses or
    it is empty: the answer is then scored as failing and counted as not parsed.
    """
    if not isinstance(text, str):
        return None
    text = text.replace("\r\n", "\n").replace("\t", "    ")
    blocks = [
        textwrap.dedent(m.group("body")).strip("\n")
        for m in _FENCE.finditer(text)
        if m.group("lang").lower() in _PYTHON_TAGS
    ]
    blocks = [b for b in blocks if b.strip()]
    if blocks:
        joined = "\n\n".join(blocks)
        if _parses(joined):
            return joined
        return next((b for b in blocks if _parses(b)), None)
    code = textwrap.dedent(text).strip("\n")
    if code.strip() and _parses(code):
        return code
    return _longest_valid_run(code.splitlines()[:_MAX_LINES])


def _longest_valid_run(lines: list[str]) -> str | None:
    best: list[str] = []
    for start, line in enumerate(lines):
        if not _CODE_START.match(line):
            continue
        for end in range(len(lines), start, -1):
            if end - start <= len(best):
                break
            snippet = "\n".join(lines[start:end])
            if _parses(snippet):
                best = lines[start:end]
                break
    code = "\n".join(best).strip("\n")
    return code if code.strip() else None
