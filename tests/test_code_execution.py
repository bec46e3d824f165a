"""Running model-written code (pefteval_harness.code_execution): tests pass or fail as they should, and
the limits hold: time, memory, file size, no network, no processes, no writes outside the scratch folder,
no inherited environment. Also the extraction of code from a model's answer."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from pefteval_harness.code_execution import PRELUDE, extract_code, run_tests
from pefteval_harness.errors import BadInput

ADD_ONE = "def add_one(x):\n    return x + 1\n"


def test_a_correct_program_passes_and_a_failing_assert_names_its_test():
    assert run_tests(ADD_ONE, ["assert add_one(1) == 2", "assert add_one(-1) == 0"]) == (True, "passed")
    passed, reason = run_tests(ADD_ONE, ["assert add_one(1) == 2", "assert add_one(1) == 3"])
    assert not passed and reason.startswith("test 2: assert add_one(1) == 3") and "AssertionError" in reason
    # Setup runs first, in the same namespace; the prelude's imports are available.
    assert run_tests(PRELUDE + "\ndef f():\n    return math.floor(BASE)", ["assert f() == 2"], setup="BASE = 2.5")[0]
    passed, reason = run_tests("def broken(:\n", ["assert True"])
    assert not passed and reason.startswith("program: SyntaxError")


def test_exiting_early_is_not_a_pass():
    assert run_tests("import sys\nsys.exit(0)", ["assert False"]) == (False, "program: SystemExit: 0")
    passed, reason = run_tests("import os\nos._exit(0)", ["assert False"])
    assert not passed and "before its tests finished" in reason


def test_an_infinite_loop_is_killed_at_the_time_limit():
    start = time.monotonic()
    passed, reason = run_tests("while True:\n    pass", [], timeout=1.0)
    assert not passed and reason == "timed out after 1 s"
    assert time.monotonic() - start < 5


def test_network_access_is_refused():
    for program in (
        "import socket\nsocket.socket(socket.AF_INET, socket.SOCK_STREAM)",
        "import socket\nsocket.create_connection(('127.0.0.1', 9))",
        "import socket\nsocket.getaddrinfo('example.com', 80)",
        "import urllib.request\nurllib.request.urlopen('http://example.com', timeout=1)",
    ):
        passed, reason = run_tests(program, [])
        assert not passed and "refused by the sandbox" in reason, (program, reason)


def test_with_user_namespaces_the_program_has_no_network_below_the_audit_hook():
    from pefteval_harness.code_execution import network_namespace_prefix

    if not network_namespace_prefix():
        pytest.skip("this kernel (or container) gives no unprivileged user namespaces")
    # Its own network namespace: a loopback interface and nothing else, not even a route (lo is down).
    program = "NET = open('/proc/self/net/dev').read().splitlines()[2:]\nROUTES = open('/proc/self/net/route').read()"
    tests = [
        "assert [line.split(':')[0].strip() for line in NET] == ['lo'], NET",
        "assert ROUTES.splitlines()[1:] == [], ROUTES",
    ]
    assert run_tests(program, tests) == (True, "passed")


def test_processes_cannot_be_started_nor_signalled():
    for program in (
        "import subprocess\nsubprocess.run(['true'])",
        "import os\nos.system('true')",
        "import os\nos.fork()",
        "import os\nos.execv('/bin/true', ['true'])",
        "import os\nos.kill(os.getpid(), 0)",  # signal 0: harmless even if it got through
        "import ctypes",
        "import resource\nresource.setrlimit(resource.RLIMIT_CPU, (100, 100))",
    ):
        passed, reason = run_tests(program, [])
        assert not passed and "refused by the sandbox" in reason, (program, reason)


def test_files_are_written_in_a_fresh_scratch_folder_only(tmp_path):
    outside = tmp_path / "escaped.txt"
    passed, reason = run_tests(f"open({str(outside)!r}, 'w').write('x')", [])
    assert not passed and "refused by the sandbox: writing" in reason and not outside.exists()
    for program in (
        f"import os\nos.remove({str(tmp_path)!r})",
        f"import os\nos.mkdir({str(tmp_path / 'd')!r})",
        f"import pathlib\npathlib.Path({str(tmp_path / 'p.txt')!r}).write_text('x')",
        f"import shutil\nshutil.rmtree({str(tmp_path)!r})",
    ):
        assert not run_tests(program, [])[0], program
    assert tmp_path.exists() and list(tmp_path.iterdir()) == []
    # Inside its working directory (a new, empty scratch folder) the program may write; the folder is then
    # deleted, so no two programs share files.
    program = (
        "import os, tempfile\nSTART = sorted(os.listdir('.'))\nCWD = os.getcwd()\n"
        "open('notes.txt', 'w').write('x')\nwith tempfile.NamedTemporaryFile(dir=None) as f:\n    TMP = f.name\n"
    )
    tests = ["assert START == []", "assert open('notes.txt').read() == 'x'", "assert TMP.startswith(CWD)"]
    assert run_tests(program, tests) == (True, "passed")
    # The failure message carries the program's working directory out: a pefteval-code-* folder, gone now.
    passed, reason = run_tests("import os\nraise RuntimeError(os.getcwd())", [])
    scratch = Path(reason.removeprefix("program: RuntimeError: "))
    assert not passed and scratch.name.startswith("pefteval-code-") and not scratch.exists()


def test_other_processes_proc_entries_cannot_be_read_and_the_environment_is_not_inherited(monkeypatch):
    monkeypatch.setenv("PEFTEVAL_TEST_SECRET", "s3cret")
    passed, reason = run_tests("import os\nopen(f'/proc/{os.getppid()}/environ', 'rb').read()", [])
    assert not passed and "refused by the sandbox: reading" in reason
    assert run_tests("import os\nENV = dict(os.environ)", ["assert 'PEFTEVAL_TEST_SECRET' not in ENV"])[0]
    allowed = "{'PATH', 'LANG', 'HOME', 'TMPDIR', 'LC_CTYPE'}"
    assert run_tests("import os\nENV = set(os.environ)", [f"assert ENV <= {allowed}, ENV"])[0]


def test_memory_and_file_size_are_capped():
    passed, reason = run_tests("x = bytearray(2 << 30)", [], memory_mb=256)
    assert not passed and "MemoryError" in reason
    passed, reason = run_tests("open('big', 'wb').write(b'x' * (8 << 20))", [], file_size_mb=1)
    assert not passed and ("File too large" in reason or "file size" in reason)
    assert run_tests("x = bytearray(64 << 20)", [], memory_mb=256)[0]  # within the cap


def test_bad_arguments_are_bad_input():
    with pytest.raises(BadInput, match="tests must be a list"):
        run_tests(ADD_ONE, "assert add_one(1) == 2")
    with pytest.raises(BadInput, match="out of range"):
        run_tests(ADD_ONE, [], timeout=0)


def test_code_is_extracted_from_fences_or_raw_text():
    fenced = "Here is my solution:\n```python\ndef f(x):\n\treturn x * 2\n```\nIt doubles x."
    assert extract_code(fenced) == "def f(x):\n    return x * 2"
    two_blocks = "```python\nimport math\n```\nthen\n```py\ndef g():\n    return math.pi\n```"
    assert extract_code(two_blocks) == "import math\n\ndef g():\n    return math.pi"
    # Non-Python blocks are skipped; an unclosed fence (a cut generation) runs to the end.
    assert extract_code("```bash\nls\n```\n```python\nx = 1\n") == "x = 1"
    assert extract_code("def h():\n    return 3") == "def h():\n    return 3"
    prose = "Sure! The function is below.\ndef h(a, b):\n    return a + b\nThis adds the numbers, as asked."
    assert extract_code(prose) == "def h(a, b):\n    return a + b"
    for nothing in ("", "I do not know.", "```python\n```", "The answer is 42!", None):
        assert extract_code(nothing) is None, nothing
